"""One-input checks of fluxmini's untrusted-input paths, shared by the atheris fuzzers
(fuzz/run_atheris.py) and the regression replay (tests/test_fuzz_regressions.py).

Each ``one_<target>(data: bytes)`` feeds ``data`` to fluxmini and returns normally when fluxmini
either accepted it or refused it with a FluxMiniError; any other exception propagates (a
finding). Crashes and sanitizer reports end the process (run it under scripts/sanitized.sh with an
extension built with FLUXMINI_SANITIZE to see silent memory errors).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

import fluxmini  # noqa: E402
from fluxmini import imageio, pipeline, tokenizers  # noqa: E402,F401 (imported here: atheris instruments them)
from fluxmini.errors import FluxMiniError  # noqa: E402

_TMP = Path(os.environ.get("FUZZ_TMPDIR", "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()))


def _scratch(suffix: str) -> Path:
    return _TMP / f"fluxmini-pyfuzz-{os.getpid()}{suffix}"


class _Bytes:
    """Draws values from the input bytes (zeros once they run out), like libFuzzer's
    FuzzedDataProvider, so the same bytes always mean the same test case without atheris."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def int(self, lo: int, hi: int) -> int:
        span = hi - lo + 1
        n = max(1, (span.bit_length() + 7) // 8)
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return lo + int.from_bytes(chunk.ljust(n, b"\0"), "little") % span

    def pick(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def bytes(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out


# ------------------------------------------------------------------------- model files

def one_weights(data: bytes, suffix: str = ".gguf") -> None:
    """A whole model file (GGUF or safetensors bytes) given as the main file."""
    p = _scratch(suffix)
    p.write_bytes(data)
    try:
        fluxmini.FluxMini.load(p, components=[])
    except FluxMiniError as e:
        assert str(e)


def _tiny_dims(b: _Bytes):
    """Small, mostly odd hyper-parameters; the engine infers them from the tensor shapes."""
    from fluxmini.inventory import ClipDims, FluxDims, ModelDims, T5Dims, VaeDims

    head_dim = b.pick([32, 64, 128, 16])
    heads = b.int(1, 3)
    return ModelDims(
        flux=FluxDims(hidden=head_dim * heads, head_dim=head_dim, depth=b.int(0, 2), depth_single=b.int(0, 2),
                      mlp_ratio=b.pick([4.0, 1.0, 2.0, 0.5]), in_channels=b.pick([64, 64, 4, 16, 68]),
                      context_dim=b.pick([32, 64, 1, 3]), vec_dim=b.pick([32, 64, 1, 5]), guidance=b.int(0, 1) == 1),
        clip=ClipDims(vocab=b.pick([64, 49408 // 256, 1, 2]), positions=b.pick([77, 77, 1, 80]),
                      hidden=b.pick([64, 64, 128, 32, 96]), layers=b.int(0, 2), mlp=b.pick([64, 32, 1])),
        t5=T5Dims(vocab=b.pick([64, 8, 1]), d_model=b.pick([32, 64, 1, 7]), layers=b.int(0, 2),
                  heads=b.int(1, 3), d_kv=b.pick([16, 8, 1]), d_ff=b.pick([32, 64, 1]),
                  buckets=b.pick([32, 1, 2, 8]), duplicate_embed=b.int(0, 1) == 1),
        vae=VaeDims(ch=b.pick([32, 32, 64, 8, 16]), ch_mult=b.pick([(1, 1), (1, 2), (1,), (1, 1, 1)]),
                    num_res_blocks=b.int(0, 2), z_channels=b.pick([16, 16, 4, 1]),
                    in_channels=b.pick([3, 3, 1, 4]), out_channels=b.pick([3, 3, 1, 4])),
    )


def _forward_all(model) -> None:
    """One small forward of each component the model has (on inputs its config accepts)."""
    info = model.info()["components"]
    cfg = {k: v["config"] for k, v in info.items() if v["present"]}
    if "clip_l" in cfg:
        vocab = cfg["clip_l"]["vocab"]
        ids = np.minimum(np.arange(77), vocab - 1)
        model.encode_clip(ids)
    if "t5xxl" in cfg:
        model.encode_t5(np.minimum(np.arange(5), cfg["t5xxl"]["vocab"] - 1))
    if "diffusion" in cfg:
        d = cfg["diffusion"]
        lat = np.full((d["latent_channels"], 2, 2), 0.1, np.float32)
        model.transformer(lat, 0.5, 3.5, np.full((3, d["context_dim"]), 0.1, np.float32),
                          np.full(d["vec_dim"], 0.1, np.float32))
    if "vae" in cfg:
        v = cfg["vae"]
        model.vae_decode(np.full((v["z_channels"], 2, 2), 0.1, np.float32))
        if v.get("has_encoder"):
            scale = 2 ** (v["levels"] - 1)
            model.vae_encode(np.zeros((3, 2 * scale, 2 * scale), np.float32))


def one_after_load(data: bytes) -> None:
    """A tiny model with hyper-parameters and types chosen by the input, plus a few raw byte
    edits (header or data); if it loads, each present component runs one small forward."""
    import fixtures
    from fluxmini.inventory import COMPONENTS

    b = _Bytes(data)
    dims = _tiny_dims(b)
    comps = [c for c in COMPONENTS if b.int(0, 3) != 3]  # (zero bytes: all four)
    big_type = b.pick(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
    layout = b.pick(["gpustack", "sd.cpp"])
    p = _scratch(".gguf")
    try:
        fixtures.write_model(p, dims=dims, components=comps, big_type=big_type, layout=layout,
                             seed=b.int(0, 255))
    except Exception:
        return  # the gguf writer refuses these dims (e.g. rows that do not fill quant blocks)
    raw = bytearray(p.read_bytes())
    for _ in range(b.int(0, 4)):
        pos = b.int(0, len(raw) - 1) if b.int(0, 1) else b.int(0, min(len(raw), 4096) - 1)
        chunk = b.bytes(b.int(1, 8))
        raw[pos:pos + len(chunk)] = chunk
    p.write_bytes(bytes(raw))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = fluxmini.FluxMini.load(p, components=[], threads=1)
            _forward_all(model)
    except FluxMiniError as e:
        assert str(e)


# ------------------------------------------------------------------- prompts and images

_TOKENIZERS = {}


def one_prompt(data: bytes) -> None:
    """Any text as a prompt for both tokenizers (any Unicode, control characters, long texts)."""
    from fluxmini import tokenizers

    if not _TOKENIZERS:
        _TOKENIZERS["clip"] = tokenizers.clip_tokenizer()
        _TOKENIZERS["t5"] = tokenizers.t5_tokenizer()
    b = _Bytes(data)
    mode = b.int(0, 3)
    raw = b.rest()
    if mode == 0:
        text = raw.decode("utf-8", "replace")
    elif mode == 1:
        text = raw.decode("utf-16-le", "surrogatepass") if len(raw) % 2 == 0 else raw.decode("latin-1")
    elif mode == 2:
        text = raw.decode("latin-1") * 50  # long prompts
    else:
        text = "".join(chr(x % 0x110000) for x in np.frombuffer(raw[: len(raw) // 4 * 4], "<u4"))
    length = 1 + (len(raw) % 512)
    for call in (lambda: _TOKENIZERS["clip"].encode(text), lambda: _TOKENIZERS["t5"].encode(text, length)):
        try:
            ids = call()
        except FluxMiniError as e:
            assert str(e)
            continue
        assert ids.dtype == np.int32 and ids.ndim == 1 and (ids >= 0).all()


def one_png_metadata(data: bytes) -> None:
    """Bytes as an image file for fluxmini.read_metadata (PNG text chunks and anything else)."""
    p = _scratch(".png")
    p.write_bytes(data)
    try:
        meta = fluxmini.read_metadata(p)
    except FluxMiniError as e:
        assert str(e)
        return
    assert isinstance(meta, dict)


def one_init_image(data: bytes) -> None:
    """Bytes as an init image file: fluxmini's image loading and img2img preparation."""
    from fluxmini import pipeline

    p = _scratch(".img")
    p.write_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img, w, h = pipeline._prepare_init(str(p), 64, 64)
    except FluxMiniError as e:
        assert str(e)
        return
    assert img.size == (w, h) == (64, 64) and img.mode == "RGB"


TARGETS = {
    "weights": one_weights,
    "after_load": one_after_load,
    "prompt": one_prompt,
    "png_metadata": one_png_metadata,
    "init_image": one_init_image,
}
