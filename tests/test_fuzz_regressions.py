"""Replays every input that once crashed or misbehaved under the fuzzers (fuzz/, docs/FUZZING.md).

tests/data/fuzz_regressions/<target>/ holds the inputs of each harness of fuzz/harnesses.py; the
model-file inputs found by the libFuzzer harnesses (fuzz/fuzz_weights.cpp) are stored as the file
they wrote and replayed by the `weights` target. Each target runs in a subprocess, so a crash
fails its test instead of killing the run; a harness raises on anything but success or a
FluxMiniError.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "fuzz_regressions"
TARGETS = sorted(p.name for p in CORPUS.iterdir() if p.is_dir() and any(p.iterdir()))


def test_corpus_is_there():
    # The replay below must not silently pass on an empty or misplaced corpus.
    assert {"init_image", "png_metadata", "weights"} <= set(TARGETS), TARGETS


@pytest.mark.parametrize("target", TARGETS)
def test_replay(target, tmp_path):
    files = sorted(str(p) for p in (CORPUS / target).iterdir())
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "fuzz")!r})
        import harnesses
        one = harnesses.TARGETS[{target!r}]
        for f in {files!r}:
            with open(f, "rb") as fh:
                one(fh.read())
            print("ok", f, flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "FUZZ_TMPDIR": str(tmp_path)})
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert r.stdout.count("ok ") == len(files)


@pytest.mark.parametrize("path", ["init_image/decompression-bomb-bmp", "png_metadata/decompression-bomb-tiff"])
def test_huge_image_dimensions_are_a_file_error(path):
    # Found by the init_image and png_metadata fuzzers: Pillow's DecompressionBombError (not an
    # OSError) escaped both readers.
    import fluxmini
    from fluxmini.imageio import load_image

    f = CORPUS / path
    with pytest.raises(fluxmini.FluxMiniFileError, match="too large"):
        load_image(f)
    with pytest.raises(fluxmini.FluxMiniFileError, match="too large"):
        fluxmini.read_metadata(f)


def test_tensor_name_not_utf8_names_the_index():
    # Found by hand before fuzzing: such a name raised UnicodeDecodeError from the bindings.
    import fluxmini

    with pytest.raises(fluxmini.FluxMiniFileError, match=r"tensor #1 has a name that is not valid UTF-8"):
        fluxmini.FluxMini.load(CORPUS / "weights" / "name-not-utf8.bin")
