#!/usr/bin/env python3
"""Check that every citation in the code resolves inside the repository.

Scans every text file of the repository (sources, tests, benchmarks, scripts, docs, README;
data folders and vendored ggml excepted) for

* paths ``docs/...``: the file must exist;
* section references ``§N`` / ``§N.M`` / ``§A.N`` (ranges ``§2–3`` count both ends), which all
  refer to ``docs/MODEL.md``: the section heading must exist there;
* source tags such as ``[FORK-86]``: the tag must be defined in ``docs/MODEL.md`` §0;
* references that point outside the repository: ``MODEL.md`` without ``docs/``, the background
  spec or notes folders (``../shared``, ``shared/spec``, ``/work/``), and "the issue" /
  "issue N" (the issue tracker is not part of a clone; cite the doc section instead).

Usage: ``python scripts/check_citations.py [REPO_ROOT]``; prints one line per problem and exits
1 if there is any. ``tests/test_docs.py`` runs it. ``scripts/rewrite_citations.py`` turns the
old citation forms into the checked ones.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

#: What is scanned: every text file of the repository (git's tracked and not-ignored files, or a
#: walk of the tree outside git) with one of these suffixes, plus SCAN_FILES; a new top-level
#: folder (fuzz/, docs/, ...) is scanned without being listed here.
SCAN_FILES = ("CMakeLists.txt", ".ci/run")
TEXT_SUFFIXES = {".py", ".pyi", ".cpp", ".cc", ".c", ".h", ".hpp", ".sh", ".md", ".txt", ".toml",
                 ".cmake", ".cfg", ".ini", ".yml", ".yaml", ".rst"}
#: folders holding data, results, vendored sources or build outputs (not ours to cite from)
SKIP_PARTS = {"data", "results", "__pycache__", "ggml", "build", "dist", ".git", ".venv", "venv",
              "node_modules", ".pytest_cache"}
#: these two describe the citation forms themselves
SKIP_FILES = {"scripts/check_citations.py", "scripts/rewrite_citations.py"}

MODEL_DOC = "docs/MODEL.md"

_HEADING = re.compile(r"^#{2,6}\s+(?:§\s*)?([A-Z](?:\.\d+)*|\d+(?:\.\d+)*)\.?(?:\s|$)")
_TAG_DEF = re.compile(r"^\|\s*`\[([A-Z][A-Z0-9]+-[A-Za-z0-9]+)\]`\s*\|")
_LABEL = r"(?:[A-Z](?:\.\d+)*|\d+(?:\.\d+)*)"
_SECTION = re.compile(r"§\s?(" + _LABEL + r")(?:\s?[–-]\s?(" + _LABEL + r"))?")
_APPENDIX = re.compile(r"\bAppendix\s+(" + _LABEL + r")")
# a source tag: two or more capitals or digits, a hyphen, a version or name ([FORK-86], [SDC-ac54e])
_TAG = re.compile(r"\[([A-Z][A-Z0-9]+-[A-Za-z0-9]+)\]")
# a repository docs path; not one inside another path (vendor/x/docs/...) or a source path
# written [TAG]:docs/...
_DOCS_PATH = re.compile(r"(?<![\w/.:-])docs/[\w./-]*\w")
_OUTSIDE = [
    (re.compile(r"(?<![\w/.-])MODEL\.md"), "MODEL.md without docs/ (cite docs/MODEL.md)"),
    (re.compile(r"(?<!docs/)(?<=[\w/.-])MODEL\.md"), "a MODEL.md outside docs/"),
    (re.compile(r"\.\./shared|\bshared/(?:spec|notes)\b|/work/"), "a path outside the repository"),
    (re.compile(r"\bthe(?:\s|//|#|\*)+issue\b", re.I), '"the issue" (cite the doc section that holds the fact)'),
    (re.compile(r"\bissues?\s+#?\d+", re.I), '"issue N" (the tracker is not in a clone; cite docs/)'),
]


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    kind: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}: {self.text}"


@dataclass
class ModelDoc:
    sections: set
    tags: set


def parse_model_doc(text: str) -> ModelDoc:
    """Section labels (from the headings) and source tags (from the §0 table) of docs/MODEL.md."""
    sections, tags = set(), set()
    for line in text.splitlines():
        m = _HEADING.match(line)
        if m:
            sections.add(m.group(1))
        m = _TAG_DEF.match(line)
        if m:
            tags.add(m.group(1))
    return ModelDoc(sections, tags)


def check_text(text: str, rel: str, root: Path, doc: ModelDoc | None) -> tuple[list[Problem], int]:
    """Problems in one file's text, and the number of citations seen."""
    problems: list[Problem] = []
    seen = 0

    def bad(lineno: int, kind: str, what: str) -> None:
        problems.append(Problem(rel, lineno, kind, what))

    for lineno, line in enumerate(text.splitlines(), 1):
        for m in _DOCS_PATH.finditer(line):
            seen += 1
            path = m.group(0).rstrip(".")
            if not (root / path).exists():
                bad(lineno, "missing file", path)
        labels = []
        for m in _SECTION.finditer(line):
            labels += [(m.group(0), g) for g in m.groups() if g]
        labels += [(m.group(0), m.group(1)) for m in _APPENDIX.finditer(line)]
        for whole, label in labels:
            seen += 1
            if doc is None:
                bad(lineno, "missing file", f"{MODEL_DOC} (cited as {whole})")
            elif label not in doc.sections:
                bad(lineno, "missing section", f"{MODEL_DOC} has no section {label} (cited as {whole!r})")
        for m in _TAG.finditer(line):
            seen += 1
            if doc is None or m.group(1) not in doc.tags:
                bad(lineno, "unknown source tag", f"{m.group(0)} is not defined in {MODEL_DOC} §0")
    # over the whole text: a phrase such as "the bound" may be broken across lines
    lines = text.splitlines()
    for rx, kind in _OUTSIDE:
        for m in rx.finditer(text):
            seen += 1
            lineno = text.count("\n", 0, m.start()) + 1
            bad(lineno, "points outside the repository", f"{kind}: {lines[lineno - 1].strip()[:120]}")
    return problems, seen


def _candidates(root: Path):
    """Relative paths of the repository's files: git's view when root is a git work tree."""
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True).stdout.strip()
        if Path(top).resolve() == root.resolve():
            out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                                  "--exclude-standard"], capture_output=True, check=True).stdout
            return sorted({Path(p.decode()) for p in out.split(b"\0") if p})
    except (OSError, subprocess.CalledProcessError):
        pass
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def iter_files(root: Path):
    root = Path(root)
    for rel in _candidates(root):
        p = root / rel
        if rel.as_posix() in SKIP_FILES or SKIP_PARTS & set(rel.parts[:-1]) or not p.is_file():
            continue
        if p.suffix in TEXT_SUFFIXES or rel.as_posix() in SCAN_FILES:
            yield p


def check_repo(root: Path) -> tuple[list[Problem], int]:
    """All problems under ``root`` and the number of citations checked."""
    root = Path(root)
    doc_path = root / MODEL_DOC
    doc = parse_model_doc(doc_path.read_text(encoding="utf-8")) if doc_path.is_file() else None
    problems: list[Problem] = []
    seen = 0
    for p in iter_files(root):
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found, n = check_text(text, p.relative_to(root).as_posix(), root, doc)
        problems += found
        seen += n
    return problems, seen


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent
    problems, seen = check_repo(root)
    for p in problems:
        print(p)
    print(f"{seen} citations checked, {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
