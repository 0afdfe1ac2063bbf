"""Runs one Python-level harness of fuzz/harnesses.py under atheris (libFuzzer for Python).

Usage: python fuzz/run_atheris.py TARGET [libFuzzer options] [CORPUS_DIR ...]
TARGET: weights, after_load, prompt, png_metadata, init_image, server. Example (ASan+UBSan extension):
  PYTHONPATH=/tmp/build-asan/pkg scripts/sanitized.sh python fuzz/run_atheris.py prompt \
      -runs=200000 -timeout=10 -rss_limit_mb=4096 /tmp/fluxmini-fuzz/corpus/prompt SEEDS/prompt
Needs the `fuzz` extra (pip install ".[fuzz]").
"""

import sys

import atheris

if len(sys.argv) < 2:
    sys.exit(__doc__)
target = sys.argv.pop(1)

with atheris.instrument_imports(include=["fluxmini"]):
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import harnesses

    if target == "server":  # imported here, not on first use, so that atheris instruments them
        import fluxmini.server.app  # noqa: F401
        import fluxmini.server.params  # noqa: F401

if target not in harnesses.TARGETS:
    sys.exit(f"unknown target {target!r}; one of {', '.join(harnesses.TARGETS)}")
one = harnesses.TARGETS[target]


def test_one_input(data: bytes) -> None:
    one(data)


atheris.Setup(sys.argv, test_one_input)
atheris.Fuzz()
