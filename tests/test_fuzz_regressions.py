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
    assert {"init_image", "png_metadata", "server", "weights"} <= set(TARGETS), TARGETS


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


# ------------------------------------------------------------------ server requests (fuzz/harnesses.py `server`)

def _post(body: bytes, path: str = "/v1/images/generations", ctype: bytes = b"application/json", length=None):
    """(status, error object or None) of one request to the fuzzed app (fake model, max_size 256)."""
    import json

    sys.path.insert(0, str(ROOT / "fuzz"))
    import harnesses

    app = harnesses._server()["apps"][None]
    headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode() if length is None else length)]
    status, _, answer = harnesses._asgi(app, "POST", path, headers, [body])
    return status, (json.loads(answer)["error"] if status >= 400 else None)


def test_server_deeply_nested_json_is_a_400():
    # Found by the server fuzzer: json.loads raised RecursionError, answered 500 (and in the
    # multipart 'lora' field too).
    status, err = _post(b"[" * 100000)
    assert status == 400 and err["code"] == "invalid_json", (status, err)
    b = b"--fb\r\n"
    form = (b + b'Content-Disposition: form-data; name="prompt"\r\n\r\na cat\r\n' + b
            + b'Content-Disposition: form-data; name="lora"\r\n\r\n' + b"[" * 100000 + b"\r\n--fb--\r\n")
    status, err = _post(form, "/v1/images/edits", b"multipart/form-data; boundary=fb")
    assert status == 400 and err["param"] == "lora", (status, err)


def test_server_field_name_with_a_lone_surrogate_is_a_400():
    # Found by the server fuzzer: the error naming the field could not be encoded as UTF-8 (500).
    status, err = _post(b'{"prompt": "a cat", "\\ud800x": 1}')
    assert status == 400 and err["code"] == "unknown_parameter" and err["param"] == "\\ud800x", (status, err)


def test_server_digits_that_are_not_ascii_are_a_400():
    # Found by the server fuzzer: str.isdigit() accepts '\u00b2' (superscript two), int() does not (500).
    status, err = _post(b'{"prompt": "a cat", "size": "\xc2\xb2x16"}')
    assert status == 400 and err["param"] == "size", (status, err)
    status, err = _post(b'{"prompt": "a cat"}', length=b"\xb2")  # a Latin-1 header byte
    assert status == 400 and "Content-Length" in err["message"], (status, err)


def test_server_default_size_respects_max_size():
    # Found by the server fuzzer: without 'size', a server started with --max-size below 512 still
    # made 512x512 images.
    from fluxmini.server import params

    assert (params.from_json({"prompt": "a"}, max_size=256).width, params.from_json({"prompt": "a"}, max_size=256).height) == (256, 256)
    assert params.from_json({"prompt": "a", "size": "auto"}, max_size=1024).width == 512
