"""Every citation in the code resolves inside the repository (scripts/check_citations.py).

The repository check runs the checker over the real tree. The unit checks build small fake
repositories and show that the checker flags each kind of bad citation (a missing section, a
missing file, an unknown source tag, a reference outside the repository) and accepts good ones,
so a passing repository check means something. Old citation forms are assembled from pieces
below so that this file itself contains none of them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPTS))
    try:
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(SCRIPTS))
    return mod


cc = _load("check_citations")
rw = _load("rewrite_citations")

BARE = "MOD" + "EL.md"          # the old, outside-the-repository form
DOC = "docs/" + BARE
ISSUE = "the " + "issue"
S = "§"
GOOD = "[" + "GOOD-1]"           # a tag the fake document defines

FAKE_DOC = f"""# fake
## 0. Sources
| tag | what |
|---|---|
| `{GOOD}` | a source |
## 1. Files
### 1.1 Sizes
### 1.2 Names
### 1.3 Prefixes
### 1.5 Layouts
## 4. Sampler
### 4.4 Schedules
## 11. Bars
### 11.1 F32
## A. Appendix
### A.1 Pipeline
### A.3 RNG
"""


def _fake_repo(tmp_path, body, doc=FAKE_DOC):
    (tmp_path / "docs").mkdir()
    if doc is not None:
        (tmp_path / DOC).write_text(doc, encoding="utf-8")
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "a.cpp").write_text(body, encoding="utf-8")
    return tmp_path


def test_repository_citations_resolve():
    problems, seen = cc.check_repo(ROOT)
    assert not problems, "\n" + "\n".join(map(str, problems)) + (
        "\n(run `python scripts/rewrite_citations.py` for old citation forms)")
    # the code cites docs/MODEL.md some 50 times: a scan that finds far fewer is broken
    assert seen >= 50, seen


def test_model_doc_sections_and_tags_parse():
    doc = cc.parse_model_doc((ROOT / DOC).read_text(encoding="utf-8"))
    # chapters 0-11 and the appendix, as the code cites them
    for label in ["0", "1", "1.1", "1.3", "1.4", "1.5", "1.6", "2", "3", "3.2", "4", "4.2", "4.3", "4.4",
                  "4.6", "5", "5.1", "5.3", "5.4", "6", "6.1", "6.2", "7", "7.1", "7.2", "11.1", "11.2",
                  "11.3", "A", "A.1", "A.3"]:
        assert label in doc.sections, label
    assert {"FORK-86", "FORK-CONV", "SDC-9578", "SDC-ac54e", "SDC-HEAD", "LBOX-86", "LBOX-140", "HF-T"} <= doc.tags
    assert "1.99" not in doc.sections and "NOPE-1" not in doc.tags


def test_good_citations_pass(tmp_path):
    body = (f"// {DOC} {S}1.1, {S}1.2 and {S}4.4 / {S}A.3; {GOOD}:model.cpp\n"
            f"// ranges {DOC} {S}1–4, and {DOC} {S}11.1\n"
            f"// a path: {DOC}; another repository's source path {GOOD}:" + "do" + "cs/flux.md\n")
    root = _fake_repo(tmp_path, body)
    problems, seen = cc.check_repo(root)
    assert problems == []
    assert seen >= 9


@pytest.mark.parametrize("line, kind", [
    (f"// {DOC} {S}9.9", "missing section"),
    (f"// {DOC} {S}1.1–2", "missing section"),          # the range's upper end does not exist
    (f"// {DOC} {S}B.1", "missing section"),
    ("// see docs/" + "NOPE.md", "missing file"),
    ("// from [" + "NOPE-2]:flux.hpp", "unknown source tag"),
    (f"// ({BARE} {S}1.1)", "points outside the repository"),
    (f"// ``{BARE}`` {S}1.1", "points outside the repository"),
    ("// ../" + "sha" + "red/spec/" + BARE, "points outside the repository"),
    (f"// 1e-4, {ISSUE}'s bound", "points outside the repository"),
    (f"// 1e-4, the\n//   {ISSUE[4:]}'s bound", "points outside the repository"),   # broken across lines
    ("// F32 weights (" + "issue" + " 4)", "points outside the repository"),
])
def test_fabricated_bad_citation_is_flagged(tmp_path, line, kind):
    root = _fake_repo(tmp_path, f"// fine: {DOC} {S}1.1\n{line}\n")
    problems, _ = cc.check_repo(root)
    assert [p.kind for p in problems if p.kind == kind], problems
    assert all(p.path == "csrc/a.cpp" for p in problems)
    assert all(p.line >= 2 for p in problems), problems   # the good first line is not flagged


def test_missing_model_doc_is_flagged(tmp_path):
    root = _fake_repo(tmp_path, f"// {DOC} {S}1.1\n", doc=None)
    problems, _ = cc.check_repo(root)
    assert {p.kind for p in problems} == {"missing file"}


def test_main_exit_status(tmp_path, capsys):
    root = _fake_repo(tmp_path, f"// {DOC} {S}9.9\n")
    assert cc.main([str(root)]) == 1
    assert "csrc/a.cpp:1: missing section" in capsys.readouterr().out
    (root / "csrc" / "a.cpp").write_text(f"// {DOC} {S}1.1\n", encoding="utf-8")
    assert cc.main([str(root)]) == 0


# the old forms found in the code before the documents moved into docs/, and what they become
OLD_FORMS = [
    (f"// ({BARE} {S}1.3, {S}1.5).", f"// ({DOC} {S}1.3, {S}1.5)."),
    (f"Spec: ``{BARE}`` {S}4 (sampler)", f"Spec: ``{DOC}`` {S}4 (sampler)"),
    (f"The pipeline ({BARE} {S}4, Appendix A.1):", f"The pipeline ({DOC} {S}4, {S}A.1):"),
    (f"text in a prompt ({BARE} sections 1.1 and 1.2):", f"text in a prompt ({DOC} {S}1.1 and {S}1.2):"),
    (f"# (b) vectors: {BARE} 1.1 / 1.2 and NOTICE.md", f"# (b) vectors: {DOC} {S}1.1 / {S}1.2 and NOTICE.md"),
    (f"({BARE} {GOOD}, based on", f"({DOC} {GOOD}, based on"),
    (f"1e-4 ({ISSUE}'s bound).", f"1e-4 (the bar of {DOC} {S}11.1)."),
    (f"<= 1e-4, the\n    {ISSUE[4:]}'s bound. What", f"<= 1e-4, the\n    bar of {DOC} {S}11.1. What"),
    (f"// <= 1e-4, the\n// {ISSUE[4:]}'s bound.", f"// <= 1e-4, the\n// bar of {DOC} {S}11.1."),
    ("F32_TOL = 1e-4  # F32 weights (" + "iss" + "ue 4)", f"F32_TOL = 1e-4  # F32 weights ({DOC} {S}11.1)"),
]


@pytest.mark.parametrize("old, new", OLD_FORMS)
def test_rewrite_turns_old_forms_into_checked_ones(tmp_path, old, new):
    assert rw.rewrite(old) == new
    assert rw.rewrite(new) == new                      # idempotent
    root = _fake_repo(tmp_path, old + "\n")
    assert cc.check_repo(root)[0], "the old form must be flagged"
    (root / "csrc" / "a.cpp").write_text(rw.rewrite(old) + "\n", encoding="utf-8")
    assert cc.check_repo(root)[0] == []


def test_rewrite_script_leaves_repository_unchanged():
    # after the rewrite commit there is nothing left to rewrite; a branch merged later that
    # brings old forms back fails here and in test_repository_citations_resolve
    assert rw.main([str(ROOT), "--check"]) == 0


def test_every_folder_is_scanned_but_data(tmp_path):
    root = _fake_repo(tmp_path, f"// {DOC} {S}1.1\n")
    (root / "fuzz").mkdir()
    (root / "fuzz" / "f.cpp").write_text("// see docs/" + "FUZZING.md\n", encoding="utf-8")
    (root / "tests" / "data").mkdir(parents=True)
    (root / "tests" / "data" / "vocab.txt").write_text("the " + "issue</w>\n", encoding="utf-8")
    problems, _ = cc.check_repo(root)
    assert [(p.path, p.kind) for p in problems] == [("fuzz/f.cpp", "missing file")]
