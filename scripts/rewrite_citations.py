#!/usr/bin/env python3
"""Rewrite old citations into ones that resolve inside the repository.

* ``MODEL.md §X`` (a file that used to live outside the repository) -> ``docs/MODEL.md §X``;
  ``MODEL.md 6.2 / 7.2`` and ``MODEL.md sections 6.2 and 7.2`` get their ``§``;
  ``Appendix A.1`` next to a MODEL.md citation -> ``§A.1``;
* references to the issue tracker ("the issue's bound", "issue 4", ...) -> the section of
  docs/MODEL.md that now holds the fact (§11: the accuracy bars and the matmul bound).

Idempotent: a rewritten file no longer matches any rule, so running it again changes nothing.
It works on whatever files exist (the same scan as scripts/check_citations.py), so it can be
re-run after other branches have moved files. Usage:

    python scripts/rewrite_citations.py [REPO_ROOT] [--check]

``--check`` only lists the files that would change (exit 1 if any).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_citations import iter_files  # noqa: E402

_NUM = r"(\d+(?:\.\d+)*)"

# Applied in order to the whole text of a file. Each pattern matches only the old form.
RULES: list[tuple[re.Pattern, str]] = [
    # issue-tracker references whose facts now live in docs/MODEL.md §11
    (re.compile(r"\bthe((?:\s|//|#|\*)+)issue's bound"), r"the\1bar of docs/MODEL.md §11.1"),
    (re.compile(r"Bar: 55 dB, the issue's;"), "Bar: 55 dB (docs/MODEL.md §11.2);"),
    (re.compile(r"F32 weights \(issue 4\)"), "F32 weights (docs/MODEL.md §11.1)"),
    (re.compile(r" \(issue 6\)\."), "."),
    (re.compile(r"\(issue 4's benchmark; not a test\)"), "(the benchmark of docs/MODEL.md §11.3; not a test)"),
    (re.compile(r"The issue's bound uses ggml's GEMM"), "The matmul bound (docs/MODEL.md §11.3) uses ggml's GEMM"),
    # section numbers written without §
    (re.compile(r"(?<![\w/.-])MODEL\.md sections? " + _NUM + r" and " + _NUM), r"MODEL.md §\1 and §\2"),
    (re.compile(r"(?<![\w/.-])MODEL\.md " + _NUM + r" / " + _NUM), r"MODEL.md §\1 / §\2"),
    # "MODEL.md §4, Appendix A.1" -> "MODEL.md §4, §A.1"
    (re.compile(r"((?<![\w/.-])MODEL\.md[^\n]*?)\bAppendix ([A-Z]\.\d+)"), r"\1§\2"),
    # the file itself now lives in docs/
    (re.compile(r"(?<![\w/.-])MODEL\.md"), "docs/MODEL.md"),
]


def rewrite(text: str) -> str:
    for rx, repl in RULES:
        text = rx.sub(repl, text)
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    args = [a for a in argv if a != "--check"]
    root = Path(args[0]) if args else Path(__file__).resolve().parent.parent
    changed = []
    for p in iter_files(root):
        rel = p.relative_to(root).as_posix()
        if rel.startswith("docs/"):
            continue  # the documents are written in the new form
        try:
            old = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        new = rewrite(old)
        if new != old:
            changed.append(rel)
            if not check:
                p.write_text(new, encoding="utf-8")
    for rel in changed:
        print(("would rewrite " if check else "rewrote ") + rel)
    return 1 if (check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
