"""One-input checks of fluxmini's untrusted-input paths, shared by the atheris fuzzers
(fuzz/run_atheris.py) and the regression replay (tests/test_fuzz_regressions.py).

Each ``one_<target>(data: bytes)`` feeds ``data`` to fluxmini and returns normally when fluxmini
either accepted it or refused it with a FluxMiniError; any other exception propagates (a
finding). Crashes and sanitizer reports end the process (run it under scripts/sanitized.sh with an
extension built with FLUXMINI_SANITIZE to see silent memory errors).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import os
import re
import struct
import sys
import tempfile
import urllib.parse
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

_WEIGHT_BASES: list = []


def _weight_bases() -> list:
    """Valid files to damage: the seeds' tiny GGUF files (every type; gpustack, sd.cpp and bare
    names; KV pairs of every type; alignment 64), safetensors of every dtype, and two tiny FLUX
    models (all four components, so the loader's checks after parsing run too)."""
    if not _WEIGHT_BASES:
        import make_seeds
        from fluxmini.inventory import COMPONENTS

        tmp = _scratch(".seed")
        for t in make_seeds.TYPES + list(make_seeds.K_TYPES):
            for layout in make_seeds.NAMES:
                make_seeds.small_gguf(tmp, t, layout, kv=(layout == "gpustack"))
                _WEIGHT_BASES.append(tmp.read_bytes())
        make_seeds.small_gguf(tmp, "f32", "bare", kv=True, alignment=64)
        _WEIGHT_BASES.append(tmp.read_bytes())
        tmp.unlink()
        for _, (header, data) in make_seeds.safetensors_seeds():
            _WEIGHT_BASES.append(struct.pack("<Q", len(header)) + header + data)
        dims = _tiny_dims(_Bytes(b""))
        _WEIGHT_BASES.append(_tiny_gguf(dims, COMPONENTS, "q4_0", "gpustack"))
        _WEIGHT_BASES.append(_tiny_gguf(dims, COMPONENTS, "f16", "sd.cpp"))
    return _WEIGHT_BASES


def one_weights(data: bytes, suffix: str = ".gguf") -> None:
    """A whole model file given as the main file: the input itself when it starts as a model file
    does (GGUF magic, or a safetensors header), else one of a few valid files (_weight_bases)
    with the input's damage: up to 8 overwrites of 1-8 bytes, mostly in the first 4 KiB, and now
    and then a cut. The second form needs no coverage feedback to reach past the first checks
    (under the ASan preload atheris has none, and would keep only one input)."""
    if data[:4] != b"GGUF" and data[8:9] != b"{":
        b = _Bytes(data)
        raw = bytearray(b.pick(_weight_bases()))
        for _ in range(b.int(0, 8)):
            pos = b.int(0, min(len(raw), 4096) - 1) if b.int(0, 3) else b.int(0, len(raw) - 1)
            chunk = b.bytes(b.int(1, 8))
            raw[pos:pos + len(chunk)] = chunk
        if b.int(0, 7) == 0:
            del raw[b.int(0, len(raw)):]
        data = bytes(raw)
    p = _scratch(suffix)
    p.write_bytes(data)
    try:
        fluxmini.FluxMini.load(p, components=[])
    except FluxMiniError as e:
        assert str(e)


def _tiny_dims(b: _Bytes):
    """Small hyper-parameters; the engine infers them from the tensor shapes. Each is one of a few
    a model can have (the first: what zero bytes give), or now and then one it must refuse or
    handle at its edge (head_dim not 128, no layers, a one-row vocabulary, 2 buckets ...), so
    that most inputs load and reach the forward."""
    from fluxmini.inventory import ClipDims, FluxDims, ModelDims, T5Dims, VaeDims

    def pick(good, odd):
        return b.pick(odd) if b.int(0, 15) == 15 else b.pick(good)

    heads = pick([1, 2], [3])
    return ModelDims(
        flux=FluxDims(hidden=128 * heads, head_dim=pick([128], [64, 32, 16]), depth=pick([1, 2], [0]),
                      depth_single=pick([1, 0, 2], [0]), mlp_ratio=pick([1.0, 2.0, 4.0], [0.5, 3.0]),
                      in_channels=pick([64], [4, 16, 68, 1]), context_dim=pick([32, 64], [1, 3]),
                      vec_dim=pick([32, 64], [1, 5]), guidance=b.int(0, 1) == 0),
        clip=ClipDims(vocab=pick([64, 193], [1, 2]), positions=pick([8, 77], [1, 80]), hidden=pick([64, 128], [96, 32]),
                      layers=pick([1, 2], [0]), mlp=pick([64, 32], [1, 3])),
        t5=T5Dims(vocab=pick([64, 8], [1]), d_model=pick([32, 64], [1, 7]), layers=pick([1, 2], [0]),
                  heads=pick([1, 2, 3], [5]), d_kv=pick([16, 8], [1, 3]), d_ff=pick([32, 64], [1, 5]),
                  buckets=pick([32, 8, 4], [1, 2, 5]), duplicate_embed=b.int(0, 1) == 0),
        vae=VaeDims(ch=pick([32, 64], [16, 8]), ch_mult=pick([(1, 1), (1, 2), (1,), (1, 1, 1)], [(2, 1), (1, 2, 4, 4)]),
                    num_res_blocks=pick([1, 2], [0]), z_channels=pick([16, 4], [1, 3]),
                    in_channels=pick([3], [1, 4]), out_channels=pick([3], [1, 4])),
    )


def _forward_all(model, image_channels: int = 3) -> None:
    """One small forward of each component the model has (on inputs its config accepts; the
    encoder's image channels are not in the config: the caller says them)."""
    info = model.info()["components"]
    cfg = {k: v["config"] for k, v in info.items() if v["present"]}
    if "clip_l" in cfg:
        c = cfg["clip_l"]
        ids = np.minimum(np.arange(c["positions"]), c["vocab"] - 1)  # the model takes `positions` ids
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
            model.vae_encode(np.zeros((image_channels, 2 * scale, 2 * scale), np.float32))


# ggml type ids and (block bytes, block elements) of the types a tiny model is written in
_GGML_TYPES = {"f32": (0, 4, 1), "f16": (1, 2, 1), "q4_0": (2, 18, 32), "q4_1": (3, 20, 32), "q5_0": (6, 22, 32),
               "q5_1": (7, 24, 32), "q8_0": (8, 34, 32), "bf16": (30, 2, 1)}
_PATTERNS: dict = {}
_LAYOUTS: dict = {}  # (dims, components, type, layout) -> (header, tensors), the last _LAYOUTS_KEPT made
_LAYOUTS_KEPT = 1024  # (a header is a few KB)
_ON_DISK: list = [None]  # the key of the model in the scratch file


def _pattern(type_name: str, nbytes: int) -> memoryview:
    """At least nbytes (8 MiB at first) of blocks of small random values (N(0, 0.05)) in a type, quantized once by gguf-py;
    tensors take their bytes from its start, so writing a model quantizes nothing."""
    if len(_PATTERNS.get(type_name, b"")) < nbytes:
        import gguf

        x = (0.05 * np.random.default_rng(0).standard_normal((1, 2048))).astype(np.float32)
        if type_name == "f32":
            raw = x.tobytes()
        elif type_name == "f16":
            raw = x.astype(np.float16).tobytes()
        else:
            raw = gguf.quants.quantize(x, getattr(gguf.GGMLQuantizationType, type_name.upper())).tobytes()
        _PATTERNS[type_name] = memoryview(raw * (max(nbytes, 8 << 20) // len(raw) + 1))
    return _PATTERNS[type_name]


def _gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _tiny_layout(dims, comps, big_type: str, layout: str):
    """A tiny model's GGUF header (version 3, alignment 32, padded) with the tensors
    fluxmini.inventory lists, each in the type tests/fixtures.py would pick, and its tensors as
    (type, bytes, padding) in file order."""
    import fixtures
    from fluxmini.inventory import LAYOUT_PREFIXES, component_tensors

    infos, tensors, offset = [], [], 0
    for comp in comps:
        for name, shape in component_tensors(comp, dims):
            t = fixtures.tensor_type(comp, name, shape, big_type)
            type_id, block_bytes, block_elems = _GGML_TYPES[t]
            nbytes = math.prod(shape) // block_elems * block_bytes
            infos.append(_gguf_string(LAYOUT_PREFIXES[layout][comp] + name) + struct.pack("<I", len(shape))
                         + struct.pack(f"<{len(shape)}Q", *reversed(shape)) + struct.pack("<IQ", type_id, offset))
            tensors.append((t, nbytes, -nbytes % 32))
            offset += nbytes + (-nbytes % 32)
    head = (b"GGUF" + struct.pack("<IQQ", 3, len(infos), 1) + _gguf_string("general.architecture")
            + struct.pack("<I", 8) + _gguf_string("fluxmini-test") + b"".join(infos))
    return head + b"\0" * (-len(head) % 32), tensors


def _write_tiny_gguf(f, head: bytes, tensors) -> int:
    """Writes the model straight from the patterns (no copy of it in memory: under ASan every
    large Python buffer costs shadow-memory poisoning too); returns its size."""
    f.write(head)
    size = len(head)
    for t, nbytes, pad in tensors:
        f.write(_pattern(t, nbytes)[:nbytes])
        f.write(bytes(pad))
        size += nbytes + pad
    return size


def _tiny_gguf(dims, comps, big_type: str, layout: str) -> bytes:
    """A tiny model's GGUF file as bytes (written here directly: gguf-py's writer and quantizers
    took about 0.13 s a model)."""
    out = io.BytesIO()
    _write_tiny_gguf(out, *_tiny_layout(dims, comps, big_type, layout))
    return out.getvalue()


_INTERNAL = re.compile(r"internal (error|ggml check failed)")


def one_after_load(data: bytes) -> None:
    """A tiny model with hyper-parameters, component set, type and layout chosen by the input,
    plus a few raw byte edits (header or data); if it loads, each present component runs one
    small forward."""
    from fluxmini.inventory import COMPONENTS

    b = _Bytes(data)
    dims = _tiny_dims(b)
    comps = tuple(c for c in COMPONENTS if b.int(0, 3) != 3)  # (zero bytes: all four)
    big_type = b.pick(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
    layout = b.pick(["gpustack", "sd.cpp"])
    key = (repr(dims), comps, big_type, layout)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _tiny_layout(dims, comps, big_type, layout)
        if len(_LAYOUTS) > _LAYOUTS_KEPT:
            del _LAYOUTS[next(k for k in _LAYOUTS if k != key)]
    head, tensors = _LAYOUTS[key]
    size = len(head) + sum(nbytes + pad for _, nbytes, pad in tensors)
    edits = []
    for _ in range(b.int(0, 4)):
        pos = b.int(0, size - 1) if b.int(0, 1) else b.int(0, min(size, 4096) - 1)
        edits.append((pos, b.bytes(b.int(1, 8))))  # may run past the end: the file grows
    # The model's file stays on disk between inputs: rewritten only when the model changes, the
    # edits patched in and undone afterwards (writing a few MB per input took a fifth of the time).
    p = _scratch(".gguf")
    if _ON_DISK[0] != key or not p.exists():
        _ON_DISK[0] = None
        with open(p, "wb") as f:
            _write_tiny_gguf(f, head, tensors)
        _ON_DISK[0] = key
    undo = []
    try:
        with open(p, "r+b") as f:
            for pos, chunk in edits:
                f.seek(pos)
                undo.append((pos, f.read(len(chunk))))
                f.seek(pos)
                f.write(chunk)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = fluxmini.FluxMini.load(p, components=[], threads=1)
            _forward_all(model, dims.vae.in_channels)
            del model
    except FluxMiniError as e:
        # A ggml abort or an engine invariant reached from file contents is a finding, even though
        # the engine turns it into a FluxMiniRuntimeError.
        assert str(e) and not _INTERNAL.search(str(e)), str(e)
    finally:
        with open(p, "r+b") as f:
            for pos, old in reversed(undo):  # (overlapping edits: the first one's bytes are the original)
                f.seek(pos)
                f.write(old)
            f.truncate(size)


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


# ---------------------------------------------------------------------- server requests

_MAX_SIZE = 256  # the fuzzed server's --max-size (small: images up to (4*256)^2 pixels are decoded)
_MAX_BODY = 1 << 20


class _Raw(str):
    """JSON text put into a body as is (deep nesting, duplicate keys, bare literals)."""


def _dump(value) -> str:
    if isinstance(value, _Raw):
        return str(value)
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    if isinstance(value, tuple):  # an object as (key, value) pairs: keys may repeat
        return "{" + ",".join(json.dumps(k) + ":" + _dump(v) for k, v in value) + "}"
    return json.dumps(value)  # NaN/Infinity as JSON's extensions; lone surrogates as \\udXXX escapes


def _text(b: _Bytes, limit: int = 64) -> str:
    """Any text: UTF-8 (with replacement), UTF-16 with lone surrogates, or code points of any value."""
    raw = b.bytes(b.int(0, limit))
    mode = b.int(0, 2)
    if mode == 0:
        return raw.decode("utf-8", "replace")
    if mode == 1:
        return raw[: len(raw) // 2 * 2].decode("utf-16-le", "surrogatepass")
    return "".join(chr(x % 0x110000) for x in raw)


_INTERESTING_TEXT = [
    "512x512", "16x16", "256x256", "auto", "b64_json", "url", "png", "jpeg", "webp", "sd.cpp", "none", "",
    "512X512", " 512x512", "512x512x1", "-16x16", "0x0", "16x0", "272x16", "\u00b2x16", "16x\u00b3",
    "\u0661\u0666x\u0661\u0666", "1e3", "0x10", "+5", "-1", "1_0", " 7 ", "\u0663", "nan", "inf", "-inf", "1e999",
    "true", "false", "True", "1", "0", "yes", "null", "[]", "{}", "[{}]", '[{"path_or_name": "style"}]',
    '[{"name": "style.safetensors", "scale": 0.5}]', '[{"path_or_name": "../style"}]', '[{"path_or_name": "outside"}]',
    "style", "style.safetensors", "outside.safetensors", "missing", "flux-mini", "a\x00b", "\ud800", "\udcff",
    "9" * 30, "1" * 5000, "a photo of a cat", "x" * 4000, "x" * 4001,
]
_INTERESTING_NUMBERS = [0, 1, -1, 2, 10, 11, 16, 100, 101, 512, 1000, 2 ** 31, 2 ** 63 - 1, 2 ** 64 - 1, 2 ** 64,
                        -(2 ** 63), 10 ** 30, 0.5, -0.0, 1.5, 3.5, 1e308, 1e-320, 100.0, 100.5, 16.0, 1e19,
                        float("nan"), float("inf"), float("-inf")]
_SERVER: dict = {}  # the app and its fixtures, made by _server() on first use


def _json_value(b: _Bytes, depth: int = 0):
    """A JSON value of any type and size."""
    kind = b.int(0, 11)
    if kind == 0:
        return None
    if kind == 1:
        return b.int(0, 1) == 1
    if kind == 2:
        return b.pick(_INTERESTING_NUMBERS)
    if kind == 3:
        return b.int(-(2 ** 16), 2 ** 16)
    if kind == 4:
        return b.pick(_INTERESTING_TEXT)
    if kind == 5:
        return _text(b)
    if kind == 6:
        return _text(b, 8) * b.pick([1, 100, 1000, 5000])
    if kind == 7 and depth < 4:
        return [_json_value(b, depth + 1) for _ in range(b.pick([0, 1, 2, 3, 9]))]
    if kind == 8 and depth < 4:
        return tuple((b.pick(_fields()) if b.int(0, 1) else _text(b, 16), _json_value(b, depth + 1))
                     for _ in range(b.int(0, 3)))
    if kind == 9:  # deep nesting, past any recursion limit
        k = b.pick([10, 100, 999, 1000, 3000, 100000])
        return _Raw(b.pick(["[", '{"a":']) * k)
    if kind == 10:
        return _Raw(b.pick(["[" * 2000 + "]" * 2000, "-" + "9" * 5000, "1" * 5000, "1e400", "-1e400", "0.1e-400",
                            "NaN", "-Infinity", "[1,]", "\"\\ud800\"", "\"\\u0000\"", "\"\\x\"", "01", "1.", ".5"]))
    return b.int(0, 2 ** 64 + 16)


def _fields() -> list:
    if not _SERVER:
        _server()
    return _SERVER["fields"]


def _field_value(b: _Bytes, name: str):
    """A value for a named field: mostly a well-formed one (to reach the checks behind), else anything."""
    if b.int(0, 2) == 0:
        return _json_value(b)
    valid = {
        "prompt": ["a cat", "x" * 4000, "", "\u00e9\u00e8 \U0001f600"], "model": ["flux-mini", "other", ""],
        "n": [1, 2, 10], "size": ["16x16", "256x256", "auto", "32x48"], "response_format": ["b64_json", "url"],
        "output_format": ["png", "jpeg", "webp"], "output_compression": [0, 50, 100], "stream": [True, False],
        "progress": [True, False], "partial_images": [0, 3, 10], "seed": [0, 42, 2 ** 64 - 1, 2 ** 64 - 10],
        "steps": [1, 20, 100], "guidance": [0, 3.5, 100], "t5_length": [1, 256, 512], "compat": ["sd.cpp", "none", None],
        "strength": [0, 0.75, 1], "lora": [[{"path_or_name": "style", "scale": 0.8}], [{"name": "style.safetensors"}],
                                          [{"path_or_name": "outside"}], [{"path_or_name": "style"}] * 9, []],
    }.get(name)
    return b.pick(valid) if valid else _json_value(b)


def _form_text(value) -> bytes:
    """A JSON-typed value as a multipart text field would carry it."""
    if isinstance(value, (_Raw, list, tuple)) or value is None:
        text = _dump(value)
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    return text.encode("utf-8", "surrogatepass")


_PNG_BOMB = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
             + b"\0\0\0\0" + struct.pack(">I", 0) + b"IEND\xaeB`\x82")


def _server():
    """The server's app around a fake model, created once: the fuzzer drives it in process (no
    sockets). The worker is replaced by one that checks each accepted request and answers at once."""
    if _SERVER:
        return _SERVER
    from PIL import Image

    from fluxmini.server import app as server_app
    from fluxmini.server import params

    logging.getLogger("python_multipart").setLevel(logging.CRITICAL)  # framing errors are expected here
    logging.getLogger("multipart").setLevel(logging.CRITICAL)

    lora_dir = Path(tempfile.mkdtemp(prefix="fluxmini-fuzz-lora-"))
    (lora_dir / "style.safetensors").write_bytes(b"\0" * 8)
    (lora_dir / "outside.safetensors").symlink_to("/etc/hostname")  # leads out of the folder: refused
    images = []
    for mode, size, fmt in [("RGB", (16, 16), "PNG"), ("RGBA", (33, 47), "PNG"), ("L", (1, 1), "PNG"),
                            ("RGB", (40, 24), "JPEG"), ("P", (20, 20), "GIF"), ("RGB", (16, 16), "WEBP"),
                            ("I;16", (8, 8), "PNG"), ("RGB", (2000, 1), "PNG")]:
        buf = io.BytesIO()
        try:
            Image.new(mode, size).save(buf, fmt)
        except (OSError, KeyError, ValueError):
            continue  # a format this Pillow cannot write
        images.append(buf.getvalue())
    images += [_PNG_BOMB, images[0][:40], b"GIF89a", b""]

    class FakeModel:
        paths = {"model": "/models/flux-mini.gguf"}

    apps = {}
    for key in (None, "sk-fuzz"):
        app = server_app.create_app(FakeModel(), model_id="flux-mini", api_key=key, max_size=_MAX_SIZE,
                                    max_body_bytes=_MAX_BODY, lora_dir=str(lora_dir))
        app.state.worker.submit = _fake_submit
        apps[key] = app
    fields = sorted(params.EDIT_FIELDS | params.IGNORED_FIELDS) + ["mask", "unknown", ""]
    _SERVER.update(apps=apps, images=images, fields=fields, lora_dir=os.path.realpath(lora_dir),
                   loop=asyncio.new_event_loop(), params=params)
    return _SERVER


def _fake_submit(job) -> int:
    """Stands for the worker: an accepted request must hold what the worker relies on."""
    params = _SERVER["params"]
    r = job.req
    assert isinstance(r.prompt, str) and len(r.prompt) <= params.MAX_PROMPT_CHARS and "\0" not in r.prompt
    assert type(r.n) is int and 1 <= r.n <= params.MAX_N
    for side in (r.width, r.height):
        assert type(side) is int and side % 16 == 0 and 16 <= side <= _MAX_SIZE, (r.width, r.height)
    assert type(r.steps) is int and 1 <= r.steps <= params.MAX_STEPS
    for v, hi in ((r.guidance, params.MAX_GUIDANCE), (r.strength, 1.0)):
        assert type(v) is float and 0.0 <= v <= hi, v
    assert r.seed is None or (type(r.seed) is int and 0 <= r.seed and r.seed + r.n - 1 < 2 ** 64)
    assert r.t5_length is None or (type(r.t5_length) is int and 1 <= r.t5_length <= 512)
    assert r.compat in (None, "sd.cpp")
    assert r.response_format in params.RESPONSE_FORMATS and r.output_format in params.OUTPUT_FORMATS
    assert type(r.output_compression) is int and 0 <= r.output_compression <= 100
    assert type(r.partial_images) is int and 0 <= r.partial_images <= params.MAX_PARTIAL_IMAGES
    assert type(r.stream) is bool and type(r.progress) is bool
    assert len(r.lora_paths) == len(r.loras) <= params.MAX_LORAS
    for path, scale in r.lora_paths:
        assert os.path.dirname(path) == _SERVER["lora_dir"] and os.path.isfile(path), path
        assert abs(scale) <= params.MAX_LORA_SCALE
    if r.edit:
        assert r.init_image.mode == "RGB" and r.init_image.width * r.init_image.height <= (4 * _MAX_SIZE) ** 2
    else:
        assert r.init_image is None
    r.kwargs(0)
    job.state = "done"
    job.post({"kind": "image", "index": 0, "seed": r.seed or 0, "data": b"\x89PNG", "b64": "iVBORw=="})
    job.post({"kind": "done"})
    return 0


def _asgi(app, method: str, path: str, headers: list, chunks: list):
    """(status, headers, body) of one request to an ASGI app, run on the harness's event loop."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": urllib.parse.quote(path).encode("ascii"),
             "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 5000),
             "server": ("127.0.0.1", 8000)}
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the client stays connected until the answer is read

    async def send(message):
        sent.append(message)

    _SERVER["loop"].run_until_complete(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.lower(): v for k, v in start.get("headers", [])}, body


def one_server(data: bytes) -> None:
    """One HTTP request to the server's app (JSON generations, multipart edits, other routes):
    JSON and form fields of every type and size, odd headers and framing. The answer must be a
    success or a 4xx with OpenAI's JSON error object, never a 5xx or an exception."""
    srv = _server()
    b = _Bytes(data)
    key = b.pick([None, "sk-fuzz"])
    auth = "Bearer sk-fuzz" if b.int(0, 7) else b.pick(["", "Bearer", "bearer  sk-fuzz ", "Basic sk-fuzz",
                                                         "Bearer sk-fuzZ", "Bearer sk-fuzz\u00e9", None])
    route = b.int(0, 9)
    ctype = None
    if route <= 3:  # generations, a JSON object built from fields
        path, method, ctype = "/v1/images/generations", "POST", "application/json"
        pairs = []
        if b.int(0, 7):
            pairs.append(("prompt", _field_value(b, "prompt")))
        for _ in range(b.int(0, 6)):
            name = b.pick(srv["fields"]) if b.int(0, 3) else _text(b, 16)
            pairs.append((name, _field_value(b, name)))
        body = _dump(tuple(pairs) if b.int(0, 15) else _json_value(b)).encode("utf-8", "surrogatepass")
    elif route <= 6:  # edits, a multipart form built from fields and files
        path, method = "/v1/images/edits", "POST"
        boundary = b.pick(["fuzzb", "----WebKitFormBoundary7MA4YWxkTrZu0gW", "a" * 70, "x y", "\u00e9"])
        parts = []
        if b.int(0, 7):
            parts.append(("image", "cat.png", b.pick(srv["images"])))
        if b.int(0, 7):
            parts.append(("prompt", None, _form_text(_field_value(b, "prompt"))))
        for _ in range(b.int(0, 6)):
            name = b.pick(srv["fields"]) if b.int(0, 3) else _text(b, 16)
            if b.int(0, 5) == 0:
                parts.append((name, b.pick(["x.png", "", "a\"b", None]), b.pick(srv["images"])))
            else:
                parts.append((name, None, _form_text(_field_value(b, name))))
        out = []
        for name, filename, content in parts:
            disp = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
            head = f"--{boundary}\r\nContent-Disposition: {disp}\r\n"
            if filename is not None:
                head += "Content-Type: " + b.pick(["image/png", "application/octet-stream", "text/plain"]) + "\r\n"
            out.append(head.encode("utf-8", "surrogatepass") + b"\r\n" + content + b"\r\n")
        body = b"".join(out) + (f"--{boundary}--\r\n".encode("utf-8", "surrogatepass") if b.int(0, 7) else b"")
        ctype = b.pick([f"multipart/form-data; boundary={boundary}", f'multipart/form-data; boundary="{boundary}"',
                        "multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; charset=utf-8; "
                        f"boundary={boundary}"])
    elif route <= 8:  # raw bytes to either POST route
        path, method = b.pick([("/v1/images/generations", "POST"), ("/v1/images/edits", "POST")])
        ctype = "multipart/form-data; boundary=fuzzb" if path.endswith("edits") else b.pick(["application/json", None])
        body = b.rest()
    else:  # the other routes, any path and method
        method = b.pick(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "X"])  # HTTP: ASCII tokens
        path = b.pick(["/health", "/", "/v1/models", "/v1/models/", "/v1/models/flux-mini", "/v1/images/files/",
                       "/v1/images/files/x.png", "/v1/images/generations", "/v1/images/edits", "/nope"]) + _text(b, 24)
        # as uvicorn gives it: percent-decoded UTF-8, undecodable bytes replaced
        path = path.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        body = b.rest()[:256]
    headers = []
    if ctype is not None and b.int(0, 15):
        headers.append((b"content-type", ctype.encode("utf-8", "surrogatepass")))
    if auth is not None:
        headers.append((b"authorization", auth.encode("latin-1")))  # as HTTP carries header bytes
    length = b.pick(["true", "true", "true", None, "0", "1", "-1", "\u00b2", " 12", "99999999999999999999", "abc", ""])
    if length is not None:
        headers.append((b"content-length", (str(len(body)) if length == "true" else length).encode("latin-1")))
    cut = sorted(b.int(0, len(body)) for _ in range(b.int(0, 2)))
    chunks = [body[i:j] for i, j in zip([0] + cut, cut + [len(body)])]
    status, rheaders, rbody = _asgi(srv["apps"][key], method, path, headers, chunks)
    assert status < 500, (status, rbody[:500])
    if status >= 400:
        assert rheaders.get(b"content-type", b"").startswith(b"application/json"), rheaders
        err = json.loads(rbody)["error"]
        assert isinstance(err["message"], str) and err["message"], err
        assert all(isinstance(err[k], (str, type(None))) for k in ("type", "param", "code")), err


TARGETS = {
    "weights": one_weights,
    "after_load": one_after_load,
    "prompt": one_prompt,
    "png_metadata": one_png_metadata,
    "init_image": one_init_image,
    "server": one_server,
}
