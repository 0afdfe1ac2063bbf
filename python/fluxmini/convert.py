"""Converting, quantizing and making FLUX.1-mini GGUF files.

* ``convert``: original weights (BFL / diffusers / Hugging Face names, safetensors or GGUF, one
  file per component or an all-in-one file) to one GGUF holding all four components, in
  gpustack's or upstream stable-diffusion.cpp's name layout, with gpustack's per-tensor type rules.
* ``quantize``: re-encode an existing all-in-one GGUF with other types.
* ``predict_file_size``: the exact size of a file before writing it (MODEL.md §1.1).
* ``make_random``: a random-weight model of full size in any of gpustack's six variants, fast.

Everything streams: a tensor is read, converted and written in row chunks, so memory stays at a
few tens of MB whatever the model size. Types follow MODEL.md §1.4 (``gpustack_type``).
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import FluxMiniFileError, FluxMiniValueError
from .inventory import (COMPONENTS, LAYOUT_PREFIXES, ClipDims, FluxDims, ModelDims, T5Dims, VaeDims,
                        component_tensors)

TYPE_NAMES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1")
ALIGNMENT = 32
CHUNK_ELEMENTS = 1 << 22  # elements converted at a time (16 MB of float32)

COMPONENT_TITLES = {"diffusion": "diffusion model", "clip_l": "CLIP-L", "t5xxl": "T5-XXL", "vae": "VAE"}


def _gguf():
    import gguf  # runtime dependency; imported lazily to keep `import fluxmini` light

    return gguf


# ----------------------------------------------------------------------------------------------
# Types

def ggml_type(name: str):
    """The ggml type of one of the types we can encode (TYPE_NAMES)."""
    gguf = _gguf()
    key = name.lower()
    if key not in TYPE_NAMES:
        raise FluxMiniValueError(f"unknown tensor type {name!r}; choose one of {', '.join(TYPE_NAMES)}")
    return getattr(gguf.GGMLQuantizationType, key.upper())


def _any_ggml_type(name: str):
    """The ggml type for any ggml type name (also the ones we only copy, like q4_k)."""
    gguf = _gguf()
    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise FluxMiniValueError(f"unknown ggml tensor type {name!r}") from None


def _block(type_name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type."""
    return _gguf().GGML_QUANT_SIZES[_any_ggml_type(type_name)]


def is_block_type(type_name: str) -> bool:
    return type_name.lower().startswith(("q", "iq", "tq", "mxfp", "nvfp"))


def tensor_nbytes(shape: Sequence[int], type_name: str) -> int:
    n = int(np.prod(shape)) if len(shape) else 1
    bs, ts = _block(type_name)
    if n % bs:
        raise FluxMiniValueError(f"{n} elements are not a whole number of {type_name} blocks of {bs}")
    return n // bs * ts


def gpustack_type(component: str, bare_name: str, shape: tuple[int, ...], main: str,
                  component_type: str, source: str = "f32") -> str:
    """Type gpustack's converter gives a tensor (MODEL.md §1.4).

    ``main`` is the main --outtype, ``component_type`` the per-component type (CLIP/T5/VAE
    override, or ``main`` for the diffusion model), ``source`` the type the tensor had in the
    source file (kept for biases, norms scales, embedders, and rows that do not fit blocks).
    """
    row = shape[-1] if len(shape) > 0 else 1
    if is_block_type(main) and row % 32 != 0:
        return source
    if bare_name.endswith(".bias") or bare_name.endswith(".scale"):
        return source
    if component == "diffusion" and any(
        k in bare_name for k in ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
    ):
        return source
    if is_block_type(component_type) and row % 32 != 0:
        return source
    return component_type


# gpustack's six variants: (main type, CLIP-L type, T5 type, VAE type) and the source types the
# converter read (diffusion F32 after BF16 widening, CLIP F16, T5 F16, VAE F32) — MODEL.md §1.1.
VARIANTS = {
    "FP16": ("f16", "f16", "f16", "f16"),
    "Q8_0": ("q8_0", "f16", "q8_0", "f16"),
    "pure-Q8_0": ("q8_0", "q8_0", "q8_0", "f16"),
    "Q4_1": ("q4_1", "f16", "q4_1", "f16"),
    "Q4_0": ("q4_0", "f16", "q4_0", "f16"),
    "pure-Q4_0": ("q4_0", "q4_0", "q4_0", "f16"),
}
SOURCE_TYPES = {"diffusion": "f32", "clip_l": "f16", "t5xxl": "f16", "vae": "f32"}
# MODEL.md §1.1, computed with n_kv = 0 and the gpustack layout.
GPUSTACK_SIZES = {"FP16": 16_690_011_936, "Q8_0": 9_349_852_832, "pure-Q8_0": 9_234_579_808,
                  "Q4_1": 5_846_275_104, "Q4_0": 5_345_764_000, "pure-Q4_0": 5_169_011_808}


def variant_name(name: str) -> str:
    """Canonical variant name ("q4_0" -> "Q4_0", "f16" -> "FP16", "pure-q8_0" -> "pure-Q8_0")."""
    key = name.strip().lower().replace("pure_", "pure-")
    aliases = {v.lower(): v for v in VARIANTS}
    aliases.update({"f16": "FP16", "fp16": "FP16"})
    if key not in aliases:
        raise FluxMiniValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return aliases[key]


def resolve_types(type: str = "f16", *, clip_l_type: str | None = None, t5xxl_type: str | None = None,
                  vae_type: str | None = None, pure: bool = False, variant: str | None = None) -> dict[str, str]:
    """Per-component types, gpustack style.

    With a block type (q8_0, q4_0, ...) the T5 follows ``type``, CLIP-L stays F16 unless ``pure``
    and the VAE stays F16 — so ``type="q4_0"`` gives gpustack's Q4_0 file and ``pure=True`` its
    pure-Q4_0. With a float type every component gets it. ``variant`` picks one of VARIANTS.
    Explicit per-component types override.
    """
    if variant is not None:
        main, clip, t5, vae = VARIANTS[variant_name(variant)]
    else:
        main = type.lower()
        ggml_type(main)
        block = is_block_type(main)
        clip = main if (pure or not block) else "f16"
        t5 = main
        vae = "f16" if block else main
    out = {"diffusion": main, "clip_l": clip, "t5xxl": t5, "vae": vae}
    for comp, t in (("clip_l", clip_l_type), ("t5xxl", t5xxl_type), ("vae", vae_type)):
        if t is not None:
            ggml_type(t)
            out[comp] = t.lower()
    return out


def _encode_flat(data: np.ndarray, type_name: str) -> np.ndarray:
    """Encode float data (a whole number of blocks) as flat bytes of ``type_name``.

    gguf.quants works over groups of 16 rows; giving it one long row makes one group, which is
    much faster for short rows (blocks are independent, so the bytes are the same)."""
    flat = np.ascontiguousarray(data, dtype=np.float32).reshape(1, -1)
    return encode_tensor(flat, type_name)[0].reshape(-1)


def encode_tensor(data: np.ndarray, type_name: str) -> tuple[np.ndarray, object]:
    """Quantize/convert float data to ``type_name``; returns (raw array, ggml type)."""
    gguf = _gguf()
    qtype = ggml_type(type_name)
    data = np.ascontiguousarray(data, dtype=np.float32)
    if type_name == "f32":
        return data, qtype
    if type_name == "f16":
        return data.astype(np.float16), qtype
    return gguf.quants.quantize(data, qtype), qtype


# ----------------------------------------------------------------------------------------------
# GGUF v3 writing (our own, so that a file can have no key/value pairs at all, like gpustack's)

def _pad(n: int, align: int = ALIGNMENT) -> int:
    return (n + align - 1) // align * align


def _gguf_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _gguf_value(v) -> bytes:
    # value type ids of GGUF v3: UINT32 4, INT32 5, FLOAT32 6, BOOL 7, STRING 8, UINT64 10, INT64 11
    if isinstance(v, bool):
        return struct.pack("<IB", 7, int(v))
    if isinstance(v, (int, np.integer)):
        v = int(v)
        return struct.pack("<IQ", 10, v) if v >= 0 else struct.pack("<Iq", 11, v)
    if isinstance(v, (float, np.floating)):
        return struct.pack("<If", 6, float(v))
    return struct.pack("<I", 8) + _gguf_string(str(v))


def gguf_header(tensors: Sequence[tuple[str, tuple[int, ...], str]],
                metadata: dict | None = None) -> tuple[bytes, list[int], int]:
    """The header of a GGUF v3 file (padded to the alignment), each tensor's data offset, and the
    total data size (every tensor padded to 32 bytes)."""
    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(metadata or {}))]
    for k, v in (metadata or {}).items():
        out.append(_gguf_string(str(k)))
        out.append(_gguf_value(v))
    offsets = []
    off = 0
    for name, shape, t in tensors:
        ne = [int(s) for s in reversed(shape)] or [1]
        out.append(_gguf_string(name))
        out.append(struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, int(_any_ggml_type(t)), off))
        offsets.append(off)
        off += _pad(tensor_nbytes(shape, t))
    head = b"".join(out)
    head += b"\0" * (_pad(len(head)) - len(head))
    return head, offsets, off


class StreamingWriter:
    """Two-pass GGUF writer: declare every tensor first, then stream the data in order.

    ``metadata`` (a dict of str/int/float/bool) becomes GGUF key/value pairs; None or {} writes none
    (n_kv = 0, like gpustack's files). Data can be given whole (``write``) or in pieces
    (``write_part``); each tensor is padded to 32 bytes.
    """

    def __init__(self, path: str | os.PathLike, metadata: dict | None = None):
        self.path = os.fspath(path)
        self.metadata = dict(metadata or {})
        self._infos: list[tuple[str, tuple[int, ...], str]] = []
        self._sizes: list[int] = []
        self._f = None
        self._i = 0
        self._done = 0

    def declare(self, name: str, shape: tuple[int, ...], type_name: str) -> None:
        type_name = type_name.lower()
        _any_ggml_type(type_name)
        bs, _ = _block(type_name)
        row = shape[-1] if len(shape) else 1
        if row % bs:
            raise FluxMiniValueError(f"{name}: row length {row} is not a multiple of {bs} for {type_name}")
        self._infos.append((name, tuple(int(s) for s in shape), type_name))
        self._sizes.append(tensor_nbytes(shape, type_name))

    @property
    def tensors(self) -> list[tuple[str, tuple[int, ...], str]]:
        return list(self._infos)

    def header(self) -> bytes:
        return gguf_header(self._infos, self.metadata)[0]

    def file_size(self) -> int:
        head, _, data = gguf_header(self._infos, self.metadata)
        return len(head) + data

    def begin(self) -> None:
        self._f = open(self.path, "wb")
        self._f.write(self.header())

    def write_part(self, raw: np.ndarray) -> None:
        """Append bytes of the current tensor; moves to the next one when this one is complete."""
        if self._i >= len(self._infos):
            raise FluxMiniValueError("more tensor data than declared")
        buf = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        need = self._sizes[self._i] - self._done
        if buf.nbytes > need:
            raise FluxMiniValueError(f"{self._infos[self._i][0]}: {self._done + buf.nbytes} bytes of data for a "
                                     f"tensor of {self._sizes[self._i]} bytes")
        self._f.write(memoryview(buf))
        self._done += buf.nbytes
        if self._done == self._sizes[self._i]:
            self._f.write(b"\0" * (_pad(self._done) - self._done))
            self._i += 1
            self._done = 0

    def write(self, raw: np.ndarray) -> None:
        """Write one whole tensor."""
        i = self._i
        self.write_part(raw)
        if self._i == i:
            raise FluxMiniValueError(f"{self._infos[i][0]}: {raw.nbytes} bytes of data for a tensor of "
                                     f"{self._sizes[i]} bytes")

    def close(self) -> None:
        f, self._f = self._f, None
        if f is None:
            return
        f.close()
        if self._i != len(self._infos):
            raise FluxMiniValueError(f"{self.path}: closed after {self._i} of {len(self._infos)} tensors")

    def abort(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            f.close()
        try:
            os.remove(self.path)
        except OSError:
            pass


class _Progress:
    """tqdm when installed, else one stderr line rewritten at most twice a second."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.n = 0
        self._bar = None
        self._t0 = self._last = time.monotonic()
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)

    def update(self, n: int) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= 0.5 or self.n >= self.total:
            self._last = now
            pct = 100.0 * self.n / self.total if self.total else 100.0
            rate = self.n / max(now - self._t0, 1e-9) / 1e6
            sys.stderr.write(f"\r{self.desc}: {pct:5.1f}% {self.n / 1e9:.2f}/{self.total / 1e9:.2f} GB "
                             f"{rate:.0f} MB/s")
            sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ----------------------------------------------------------------------------------------------
# Plans and size prediction

def _dims_with_dup(dims: ModelDims, keep_t5_duplicate: bool | None) -> ModelDims:
    if keep_t5_duplicate is None or dims.t5.duplicate_embed == keep_t5_duplicate:
        return dims
    t5 = T5Dims(**{**dims.t5.__dict__, "duplicate_embed": bool(keep_t5_duplicate)})
    return ModelDims(flux=dims.flux, clip=dims.clip, t5=t5, vae=dims.vae)


def _types_arg(types) -> dict[str, str]:
    if isinstance(types, dict):
        out = {c: types.get(c, types.get("diffusion", "f32")).lower() for c in COMPONENTS}
        return out
    if isinstance(types, (tuple, list)):
        return dict(zip(COMPONENTS, (t.lower() for t in types)))
    try:
        return resolve_types(variant=types)
    except FluxMiniValueError:
        return resolve_types(types)


def plan_tensors(dims: ModelDims | None = None, types="Q4_0", layout: str = "gpustack",
                 keep_t5_duplicate: bool | None = True, *, source_types: dict[str, str] | None = None,
                 components: Iterable[str] = COMPONENTS, bare: bool = False,
                 rule: Callable | None = None) -> list[tuple[str, str, str, tuple[int, ...], str]]:
    """(component, full name, bare name, shape, type) of every tensor of a model file.

    ``types``: a variant name ("Q4_0", "pure-Q8_0", ...), a type name ("q4_0": same as
    ``resolve_types``), or a dict of per-component types. ``source_types``: the type each kept
    tensor has in the source (default: gpustack's sources, SOURCE_TYPES).
    """
    if layout not in LAYOUT_PREFIXES:
        raise FluxMiniValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUT_PREFIXES)}")
    dims = _dims_with_dup(dims or ModelDims(), keep_t5_duplicate)
    types = _types_arg(types)
    src = {**SOURCE_TYPES, **(source_types or {})}
    out = []
    for comp in components:
        prefix = "" if bare else LAYOUT_PREFIXES[layout][comp]
        for name, shape in component_tensors(comp, dims):
            t = (rule or gpustack_type)(comp, name, shape, types["diffusion"], types[comp], src[comp])
            out.append((comp, prefix + name, name, shape, t))
    return out


def predict_file_size(dims: ModelDims | None = None, variant="Q4_0", layout: str = "gpustack",
                      keep_t5_duplicate: bool = True, *, metadata: dict | None = None,
                      source_types: dict[str, str] | None = None, components: Iterable[str] = COMPONENTS,
                      bare: bool = False) -> int:
    """Exact size in bytes of a model file (header + data with 32-byte padding), without writing it.

    ``variant`` is a gpustack variant name, a type name or a dict of per-component types (see
    ``plan_tensors``). ``metadata=None`` means no key/value pairs (n_kv = 0), as in gpustack's files;
    pass the metadata a writer used to predict its file. The defaults (full-size dims, T5 duplicate
    embedding, gpustack layout, no metadata) give MODEL.md §1.1's numbers.
    """
    plan = plan_tensors(dims, variant, layout, keep_t5_duplicate, source_types=source_types,
                        components=components, bare=bare)
    head, _, data = gguf_header([(full, shape, t) for _, full, _, shape, t in plan], metadata)
    return len(head) + data


# ----------------------------------------------------------------------------------------------
# Random weights

def random_tensor(rng: np.random.Generator, bare_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A random value with a sane scale, so that activations stay finite through deep stacks."""
    if bare_name.endswith((".scale", "norm.weight", "norm1.weight", "norm2.weight", "layer_norm.weight",
                           "layer_norm1.weight", "layer_norm2.weight", "final_layer_norm.weight",
                           "norm_out.weight")):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if bare_name.endswith(".bias") or len(shape) == 1:
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    if "embedding" in bare_name or bare_name in ("shared.weight", "encoder.embed_tokens.weight"):
        return rng.standard_normal(shape).astype(np.float32)
    if "relative_attention_bias" in bare_name:
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def _random_scale(bare_name: str, shape: tuple[int, ...]) -> float | None:
    """Standard deviation ``random_tensor`` uses for a zero-mean tensor; None for the others."""
    if len(shape) < 2 or bare_name.endswith((".scale", ".bias")):
        return None
    if "embedding" in bare_name or bare_name in ("shared.weight", "encoder.embed_tokens.weight"):
        return 1.0
    if "relative_attention_bias" in bare_name:
        return 0.5
    return float(1.0 / np.sqrt(int(np.prod(shape[1:]))))


def write_random_model(path: str | os.PathLike, dims: ModelDims, *, layout: str = "gpustack",
                       types: dict[str, str] | str = "f32", components: Iterable[str] = COMPONENTS,
                       seed: int = 0, rule: Callable | None = None, bare: bool = False,
                       metadata: dict[str, str] | None = None) -> list[tuple[str, tuple[int, ...], str]]:
    """Write a random-weight model; returns the (full name, shape, type) list written.

    ``types`` is one type for every big weight or a dict per component; small tensors follow
    gpustack's rules (kept tensors are F32). ``bare`` drops the layout prefix (split files hold one
    component each). Every value comes from ``random_tensor`` (exact, slow for big models: see
    ``make_random``).
    """
    if layout not in LAYOUT_PREFIXES:
        raise FluxMiniValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUT_PREFIXES)}")
    if isinstance(types, str):
        types = {c: types for c in COMPONENTS}
    main = types.get("diffusion", "f32")
    rng = np.random.default_rng(seed)
    plan: list[tuple[str, str, tuple[int, ...], str]] = []
    for comp in components:
        prefix = "" if bare else LAYOUT_PREFIXES[layout][comp]
        for name, shape in component_tensors(comp, dims):
            t = (rule or gpustack_type)(comp, name, shape, main, types.get(comp, main), "f32")
            plan.append((prefix + name, name, shape, t))
    w = StreamingWriter(path, metadata)
    for full, _, shape, t in plan:
        w.declare(full, shape, t)
    w.begin()
    try:
        for _, name, shape, t in plan:
            raw, _ = encode_tensor(random_tensor(rng, name, shape), t)
            w.write(raw)
        w.close()
    except BaseException:
        w.abort()
        raise
    return [(full, shape, t) for full, _, shape, t in plan]


def iter_plan(dims: ModelDims, layout: str = "gpustack") -> Iterator[tuple[str, str, str, tuple[int, ...]]]:
    for comp in COMPONENTS:
        for name, shape in component_tensors(comp, dims):
            yield comp, LAYOUT_PREFIXES[layout][comp] + name, name, shape


class _RandomPool:
    """Unit-normal values generated once; each type encoded once. Big tensors are slices of the pool
    at random offsets with the block scales multiplied by the tensor's standard deviation, so a
    tensor costs a copy, not a random draw and a quantization."""

    def __init__(self, rng: np.random.Generator, size: int = 1 << 24):
        self.rng = rng
        self.size = size
        self.f32 = rng.standard_normal(size, dtype=np.float32)
        self._blocks: dict[str, np.ndarray] = {}

    def blocks(self, t: str) -> np.ndarray:
        if t not in self._blocks:
            bs, ts = _block(t)
            self._blocks[t] = _encode_flat(self.f32, t).reshape(-1, ts)
        return self._blocks[t]

    def _slices(self, n: int, size: int) -> Iterator[tuple[int, int]]:
        """Pieces (start, stop) of the pool, starting at a random offset, covering n items."""
        while n > 0:
            a = int(self.rng.integers(0, size))
            m = min(n, size - a)
            yield a, a + m
            n -= m

    def chunks(self, shape: tuple[int, ...], t: str, scale: float) -> Iterator[np.ndarray]:
        n = int(np.prod(shape))
        if is_block_type(t):
            bs, ts = _block(t)
            pool = self.blocks(t)
            n_scales = 2 if t.endswith("_1") else 1  # d (and m) fp16 at the start of each block
            for a, b in self._slices(n // bs, pool.shape[0]):
                c = pool[a:b].copy()
                d = c[:, : 2 * n_scales].view(np.float16)
                d[...] = (d.astype(np.float32) * scale).astype(np.float16)
                yield c
        else:
            for a, b in self._slices(n, self.size):
                piece = self.f32[a:b] * np.float32(scale)
                yield _encode_flat(piece, t)


def _write_random_file(path: str, plan, rng: np.random.Generator, pool: _RandomPool,
                       metadata: dict | None, progress: _Progress) -> None:
    w = StreamingWriter(path, metadata)
    for _, full, _, shape, t in plan:
        w.declare(full, shape, t)
    w.begin()
    try:
        for _, _, bare, shape, t in plan:
            scale = _random_scale(bare, shape)
            if scale is None or int(np.prod(shape)) < (1 << 16):
                raw = _encode_flat(random_tensor(rng, bare, shape), t)
                w.write(raw)
                progress.update(raw.nbytes)
            else:
                for raw in pool.chunks(shape, t, scale):
                    w.write_part(raw)
                    progress.update(raw.nbytes)
        w.close()
    except BaseException:
        w.abort()
        raise


SPLIT_FILES = {"diffusion": "diffusion_model.gguf", "clip_l": "clip_l.gguf", "t5xxl": "t5xxl.gguf",
               "vae": "vae.gguf"}


def make_random(output: str | os.PathLike, variant: str = "Q4_0", layout: str = "gpustack", seed: int = 0,
                dims: ModelDims | None = None, progress: bool = True, *, split: bool = False,
                keep_t5_duplicate: bool = True, metadata: dict | None = None) -> list[str]:
    """Write a random-weight FLUX.1-mini (full size unless ``dims``) in one of gpustack's variants.

    Values have ``random_tensor``'s scales (weights ~ N(0, 1/fan_in), norm scales ~ 1, biases
    small), so activations stay finite. Big tensors are cut from one random pool (see _RandomPool):
    the full-size Q4_0 file takes seconds of CPU, bounded by the disk. With the defaults (no
    metadata, T5 duplicate kept) the file has exactly the size of gpustack's file of that variant.

    ``split=True`` writes stable-diffusion.cpp's separate files into the directory ``output``:
    diffusion_model.gguf (BFL names, for --diffusion-model), clip_l.gguf (--clip_l), t5xxl.gguf
    (--t5xxl) and vae.gguf (--vae), each with bare names. Returns the paths written.
    """
    types = _types_arg(variant)
    dims = dims or ModelDims()
    rng = np.random.default_rng(seed)
    output = os.fspath(output)
    if split:
        os.makedirs(output, exist_ok=True)
        jobs = [(os.path.join(output, SPLIT_FILES[c]), [c], True) for c in COMPONENTS]
    else:
        jobs = [(output, list(COMPONENTS), False)]
    plans = [(path, plan_tensors(dims, types, layout, keep_t5_duplicate, components=comps, bare=bare))
             for path, comps, bare in jobs]
    total = sum(tensor_nbytes(shape, t) for _, plan in plans for *_, shape, t in plan)
    bar = _Progress(total, "make-random", progress)
    biggest = max(int(np.prod(shape)) for _, plan in plans for *_, shape, _ in plan)
    pool = _RandomPool(rng, size=min(1 << 24, max(1 << 16, 1 << (biggest - 1).bit_length())))
    try:
        for path, plan in plans:
            _write_random_file(path, plan, rng, pool, metadata, bar)
    finally:
        bar.close()
    return [path for path, _ in plans]


# ----------------------------------------------------------------------------------------------
# Reading inputs

_SAFETENSORS_DTYPE_NAMES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "F64": "f64", "F8_E4M3": "f8_e4m3",
                            "F8_E5M2": "f8_e5m2"}


def _kept_type(dtype: str) -> str:
    """The type a tensor keeps when the rules leave it unconverted (BF16 is widened to F32 like sd.cpp)."""
    if dtype in ("bf16", "f64", "f8_e4m3", "f8_e5m2"):
        return "f32"
    return dtype


class SrcTensor:
    """One tensor of an input file, read lazily as flat element ranges."""

    __slots__ = ("label", "name", "shape", "dtype", "file", "_read", "_raw")

    def __init__(self, label: str, name: str, shape: tuple[int, ...], dtype: str, file,
                 read: Callable[[int, int], np.ndarray], raw: Callable[[int, int], np.ndarray] | None):
        self.label, self.name, self.shape, self.dtype, self.file = label, name, shape, dtype, file
        self._read, self._raw = read, raw

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def read(self, a: int, b: int) -> np.ndarray:
        """Elements [a, b) as flat float32."""
        return self._read(a, b)

    def raw(self, a: int, b: int) -> np.ndarray:
        """The stored bytes of elements [a, b) (block-aligned for block types)."""
        return self._raw(a, b)


def close_inputs(tensors: Iterable[SrcTensor]) -> None:
    """Close the files behind ``read_input``'s tensors."""
    for f in {id(t.file): t.file for t in tensors}.values():
        f.close()


def _safetensors_tensors(path: str) -> list[SrcTensor]:
    from .safetensors_io import FLOAT_DTYPES, SafetensorsFile

    sf = SafetensorsFile(path)
    label = os.path.basename(path)
    out = []
    for name, ent in sf.entries.items():
        dtype = _SAFETENSORS_DTYPE_NAMES.get(ent.dtype, ent.dtype.lower())

        def read(a, b, name=name, sdt=ent.dtype):
            if sdt not in FLOAT_DTYPES:
                raise FluxMiniValueError(f"{label}: tensor {name} has dtype {sdt}, not a floating-point type")
            return sf.read(name, a, b)

        def raw(a, b, name=name):
            return sf.raw(name, a, b).view(np.uint8)

        out.append(SrcTensor(label, name, ent.shape, dtype, sf, read, raw))
    return out


class _GGUFData:
    """Plain reads of a GGUF file's tensor data (the header is parsed by gguf.GGUFReader)."""

    def __init__(self, path: str):
        self.path = path
        self._fh = None

    def bytes(self, offset: int, nbytes: int) -> np.ndarray:
        from .safetensors_io import read_file_range

        return read_file_range(self, offset, nbytes)

    def close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()


def _gguf_tensors(path: str) -> list[SrcTensor]:
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path, "r")
        infos = [(t.name, t.tensor_type, tuple(int(s) for s in reversed(t.shape.tolist())), int(t.data_offset),
                  int(t.n_bytes)) for t in reader.tensors]
    except Exception as e:  # the reader raises ValueError, struct.error, ... on bad files
        raise FluxMiniFileError(f"{path}: not a readable GGUF file, damaged or truncated ({e})") from e
    del reader
    size = os.path.getsize(path)
    data = _GGUFData(path)
    label = os.path.basename(path)
    out = []
    for name, qt, shape, off, nbytes in infos:
        if off + nbytes > size:
            raise FluxMiniFileError(f"{path}: truncated GGUF file (tensor {name} ends at byte {off + nbytes}, "
                                    f"the file has {size})")
        dtype = qt.name.lower()
        bs, ts = gguf.GGML_QUANT_SIZES[qt]

        if dtype in ("f32", "f16", "f64", "bf16"):
            npdt = {"f32": np.float32, "f16": np.float16, "f64": np.float64, "bf16": np.uint16}[dtype]

            def raw(a, b, off=off, ts=ts):
                return data.bytes(off + a * ts, (b - a) * ts)

            def read(a, b, raw=raw, npdt=npdt, bf16=dtype == "bf16"):
                v = raw(a, b).view(npdt)
                return (v.astype(np.uint32) << 16).view(np.float32) if bf16 else v.astype(np.float32)
        elif bs > 1:
            def raw(a, b, off=off, bs=bs, ts=ts):
                return data.bytes(off + a // bs * ts, (b - a) // bs * ts)

            def read(a, b, off=off, qt=qt, bs=bs, ts=ts, name=name):
                b0, b1 = a // bs, -(-b // bs)
                blocks = data.bytes(off + b0 * ts, (b1 - b0) * ts)
                try:
                    vals = gguf.quants.dequantize(blocks.reshape(1, -1), qt)
                except NotImplementedError:
                    raise FluxMiniValueError(f"{label}: cannot dequantize {name} ({qt.name})") from None
                return vals.reshape(-1)[a - b0 * bs: b - b0 * bs].astype(np.float32)
        else:
            def read(a, b, name=name, dtype=dtype):
                raise FluxMiniValueError(f"{label}: tensor {name} has type {dtype}, not a floating-point type")

            raw = None
        out.append(SrcTensor(label, name, shape, dtype, data, read, raw))
    return out


_ROLE_SUBFOLDERS = {"diffusion": "transformer", "clip_l": "text_encoder", "t5xxl": "text_encoder_2", "vae": "vae"}


def _input_files(path: str, role: str | None) -> list[str]:
    """The files an input names: a file, a shard index, or a (diffusers) folder."""
    if not os.path.exists(path):
        raise FluxMiniFileError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        sub = _ROLE_SUBFOLDERS.get(role or "")
        if sub and os.path.isdir(os.path.join(path, sub)):
            path = os.path.join(path, sub)
        index = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
        if index:
            return _index_files(index[0])
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            files = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if not files:
            raise FluxMiniFileError(f"{path}: folder holds no .safetensors or .gguf files")
        return files
    if path.endswith(".json"):
        return _index_files(path)
    return [path]


def _index_files(index: str) -> list[str]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise FluxMiniFileError(f"{index}: not a safetensors shard index ({e})") from e
    folder = os.path.dirname(index)
    out = [os.path.join(folder, f) for f in files]
    for f in out:
        if not os.path.exists(f):
            raise FluxMiniFileError(f"{index}: shard {os.path.basename(f)} is missing")
    return out


def read_input(path: str | os.PathLike, role: str | None = None) -> list[SrcTensor]:
    """All tensors of an input (file, shard index or folder), lazily."""
    out: list[SrcTensor] = []
    seen: dict[str, str] = {}
    for f in _input_files(os.fspath(path), role):
        if f.endswith((".ckpt", ".pt", ".pth", ".bin", ".pkl")):
            raise FluxMiniFileError(f"{f}: PyTorch pickle files are not read (they can run code); "
                                    "save the weights as safetensors first")
        try:
            with open(f, "rb") as fh:
                magic = fh.read(4)
        except OSError as e:
            raise FluxMiniFileError(f"cannot read {f}: {e.strerror or e}") from e
        tensors = _gguf_tensors(f) if magic == b"GGUF" else _safetensors_tensors(f)
        for t in tensors:
            if t.name in seen:
                raise FluxMiniValueError(f"tensor {t.name} appears in both {seen[t.name]} and {t.label}")
            seen[t.name] = t.label
        out += tensors
    return out


# ----------------------------------------------------------------------------------------------
# Name normalisation: every input to the bare names of inventory.py

# Prefixes a tensor name may carry, per component (MODEL.md §1.3, §1.5); longest first.
INPUT_PREFIXES = {
    "diffusion": ("model.diffusion_model.", "diffusion_model."),
    "clip_l": ("cond_stage_model.transformer.", "text_encoders.clip_l.transformer.", "text_encoders.clip_l.",
               "conditioner.embedders.0.transformer.", "clip_l.", "te."),
    "t5xxl": ("cond_stage_model.1.transformer.", "text_encoders.t5xxl.transformer.", "text_encoders.t5xxl.",
              "t5xxl.", "te1."),
    "vae": ("first_stage_model.", "vae."),
}


def _ignored(component: str, name: str) -> bool:
    """Tensors the runtime does not use; dropped without complaint."""
    if name.endswith(("position_ids", "logit_scale")):
        return True
    if component == "clip_l":
        return name.startswith(("text_projection", "text_model.text_projection", "vision_model.",
                                "visual_projection"))
    if component == "t5xxl":
        return name.startswith(("decoder.", "lm_head.", "dec.", "output."))
    return False


@dataclass
class _Virt:
    """An output tensor as a concatenation of flat element ranges of source tensors."""

    shape: tuple[int, ...]
    parts: list[tuple[SrcTensor, int, int]]
    origin: str  # source name(s), for messages

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def label(self) -> str:
        return self.parts[0][0].label

    @property
    def kept_type(self) -> str:
        ts = {_kept_type(p[0].dtype) for p in self.parts}
        return ts.pop() if len(ts) == 1 else "f32"

    @staticmethod
    def of(src: SrcTensor, shape: tuple[int, ...] | None = None) -> "_Virt":
        return _Virt(tuple(shape if shape is not None else src.shape), [(src, 0, src.numel)], src.name)


# diffusers FluxTransformer2DModel -> BFL (MODEL.md §1.6): plain renames
_DF_RENAMES = [(re.compile(p), r) for p, r in [
    (r"x_embedder\.(weight|bias)", r"img_in.\1"),
    (r"context_embedder\.(weight|bias)", r"txt_in.\1"),
    (r"time_text_embed\.timestep_embedder\.linear_1\.(weight|bias)", r"time_in.in_layer.\1"),
    (r"time_text_embed\.timestep_embedder\.linear_2\.(weight|bias)", r"time_in.out_layer.\1"),
    (r"time_text_embed\.guidance_embedder\.linear_1\.(weight|bias)", r"guidance_in.in_layer.\1"),
    (r"time_text_embed\.guidance_embedder\.linear_2\.(weight|bias)", r"guidance_in.out_layer.\1"),
    (r"time_text_embed\.text_embedder\.linear_1\.(weight|bias)", r"vector_in.in_layer.\1"),
    (r"time_text_embed\.text_embedder\.linear_2\.(weight|bias)", r"vector_in.out_layer.\1"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.(weight|bias)", r"double_blocks.\1.img_mod.lin.\2"),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear\.(weight|bias)", r"double_blocks.\1.txt_mod.lin.\2"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.(weight|bias)", r"double_blocks.\1.img_attn.proj.\2"),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.(weight|bias)", r"double_blocks.\1.txt_attn.proj.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(weight|bias)", r"double_blocks.\1.img_mlp.0.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(weight|bias)", r"double_blocks.\1.img_mlp.2.\2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.(weight|bias)", r"double_blocks.\1.txt_mlp.0.\2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.(weight|bias)", r"double_blocks.\1.txt_mlp.2.\2"),
    (r"single_transformer_blocks\.(\d+)\.proj_out\.(weight|bias)", r"single_blocks.\1.linear2.\2"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear\.(weight|bias)", r"single_blocks.\1.modulation.lin.\2"),
    (r"proj_out\.(weight|bias)", r"final_layer.linear.\1"),
]]
# fused BFL tensors: pattern -> (BFL target, the diffusers names of its parts in order)
_DF_FUSED = [
    (re.compile(r"transformer_blocks\.(\d+)\.attn\.to_([qkv])\.(weight|bias)"),
     "double_blocks.{0}.img_attn.qkv.{2}", ["transformer_blocks.{0}.attn.to_%s.{2}" % x for x in "qkv"]),
    (re.compile(r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj\.(weight|bias)"),
     "double_blocks.{0}.txt_attn.qkv.{2}", ["transformer_blocks.{0}.attn.add_%s_proj.{2}" % x for x in "qkv"]),
    (re.compile(r"single_transformer_blocks\.(\d+)\.(?:attn\.to_([qkv])|proj_(mlp))\.(weight|bias)"),
     "single_blocks.{0}.linear1.{3}",
     ["single_transformer_blocks.{0}.attn.to_%s.{3}" % x for x in "qkv"]
     + ["single_transformer_blocks.{0}.proj_mlp.{3}"]),
]
_DF_SWAPPED = re.compile(r"norm_out\.linear\.(weight|bias)")  # halves (scale, shift) -> BFL (shift, scale)


def _map_diffusers_flux(tensors: dict[str, SrcTensor]) -> tuple[dict[str, _Virt], list[str], list[str]]:
    """diffusers transformer names -> BFL. Returns (mapped, unknown names, missing part names)."""
    have: dict[str, _Virt] = {}
    unknown: list[str] = []
    fused: dict[str, tuple[list[str], dict[int, SrcTensor]]] = {}
    for name, src in tensors.items():
        for pat, rep in _DF_RENAMES:
            m = pat.fullmatch(name)
            if m:
                have[m.expand(rep)] = _Virt.of(src)
                break
        else:
            m = _DF_SWAPPED.fullmatch(name)
            if m:
                rows = src.shape[0] if src.shape else 0
                if rows % 2:
                    raise FluxMiniValueError(f"{src.label}: {name} has an odd number of rows {rows}; "
                                             "it must hold (scale, shift) halves")
                half = src.numel // 2
                have[f"final_layer.adaLN_modulation.1.{m.group(1)}"] = _Virt(
                    src.shape, [(src, half, src.numel), (src, 0, half)], name)
                continue
            for pat, target, part_names in _DF_FUSED:
                m = pat.fullmatch(name)
                if m:
                    g = m.groups()
                    key = target.format(*g)
                    idx = 3 if (len(g) == 4 and g[2] == "mlp") else "qkv".index(g[1])
                    names = [p.format(*g) for p in part_names]
                    fused.setdefault(key, (names, {}))[1][idx] = src
                    break
            else:
                unknown.append(name)
    missing: list[str] = []
    for key, (names, parts) in fused.items():
        absent = [names[i] for i in range(len(names)) if i not in parts]
        if absent:
            missing += [f"{n} (part of {key})" for n in absent]
            continue
        srcs = [parts[i] for i in range(len(names))]
        trail = {s.shape[1:] for s in srcs}
        if len(trail) != 1 or any(not s.shape for s in srcs):
            raise FluxMiniValueError(f"{srcs[0].label}: cannot fuse {', '.join(names)} into {key}: shapes "
                                     + ", ".join(str(list(s.shape)) for s in srcs))
        shape = (sum(s.shape[0] for s in srcs),) + srcs[0].shape[1:]
        have[key] = _Virt(shape, [(s, 0, s.numel) for s in srcs], " + ".join(names))
    return have, unknown, missing


_LLAMA_T5 = {"attn_q": "layer.0.SelfAttention.q", "attn_k": "layer.0.SelfAttention.k",
             "attn_v": "layer.0.SelfAttention.v", "attn_o": "layer.0.SelfAttention.o",
             "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias", "attn_norm": "layer.0.layer_norm",
             "ffn_gate": "layer.1.DenseReluDense.wi_0", "ffn_up": "layer.1.DenseReluDense.wi_1",
             "ffn_down": "layer.1.DenseReluDense.wo", "ffn_norm": "layer.1.layer_norm"}


def _map_llama_t5(name: str) -> str | None:
    """llama.cpp T5 encoder names (city96's t5-v1_1-xxl-encoder GGUFs) -> Hugging Face names
    (the pairs of gguf-py's tensor_mapping.py)."""
    if name == "token_embd.weight":
        return "shared.weight"
    if name == "enc.output_norm.weight":
        return "encoder.final_layer_norm.weight"
    m = re.fullmatch(r"enc\.blk\.(\d+)\.([a-z_]+)\.weight", name)
    if m and m[2] in _LLAMA_T5:
        return f"encoder.block.{m[1]}.{_LLAMA_T5[m[2]]}.weight"
    return None


def _map_diffusers_vae(name: str, n_up: int) -> str | None:
    """diffusers AutoencoderKL name -> CompVis (BFL ae) name, or None if it is not a diffusers name."""
    m = re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", name)
    if m:
        return f"{m[1]}.norm_out.{m[2]}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", name)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name)
    if m:
        return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", name)
    if m:
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", name)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0|query|key"
                     r"|value|proj_attn)\.(weight|bias)", name)
    if m:
        part = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}[m[2]]
        return f"{m[1]}.mid.attn_1.{part}.{m[3]}"
    return None


@dataclass
class _Collected:
    have: dict[str, _Virt] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    missing_parts: list[str] = field(default_factory=list)
    others: dict[str, int] = field(default_factory=dict)  # tensors of other components seen
    labels: list[str] = field(default_factory=list)


def _strip(component: str, name: str) -> tuple[str | None, str]:
    """(owning component by prefix or None, name without that prefix)."""
    for comp in (component,) + tuple(c for c in COMPONENTS if c != component):
        for p in INPUT_PREFIXES[comp]:
            if name.startswith(p):
                return comp, name[len(p):]
    return None, name


def _collect(component: str, tensors: list[SrcTensor], all_in_one: bool, t5_dup: bool) -> _Collected:
    """The tensors of one component, renamed to inventory names."""
    col = _Collected(labels=sorted({t.label for t in tensors}))
    mine: dict[str, SrcTensor] = {}
    for t in tensors:
        owner, bare = _strip(component, t.name)
        if owner is not None and owner != component:
            col.others[owner] = col.others.get(owner, 0) + 1
            continue
        if owner is None and all_in_one:
            continue  # unprefixed names of an all-in-one file are reported once by the caller
        if component == "clip_l" and bare.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            bare = "text_model." + bare  # transformers >= 5 saves CLIPTextModel without text_model.
        if component == "t5xxl":
            bare = _map_llama_t5(bare) or bare
        if _ignored(component, bare):
            continue
        if bare in mine:
            raise FluxMiniValueError(f"{t.label}: two tensors map to {component} tensor {bare}: "
                                     f"{mine[bare].name} and {t.name}")
        mine[bare] = t
    if component == "diffusion":
        df = {k: v for k, v in mine.items() if not _is_bfl_flux(k)}
        for k, v in mine.items():
            if k not in df:
                col.have[k] = _Virt.of(v)
        if df:
            mapped, unknown, missing = _map_diffusers_flux(df)
            for k, v in mapped.items():
                if k in col.have:
                    raise FluxMiniValueError(f"{v.label}: {k} given both in BFL and diffusers names")
                col.have[k] = v
            col.unknown += unknown
            col.missing_parts += missing
    elif component == "vae":
        n_up = len({m[1] for k in mine for m in [re.match(r"decoder\.up_blocks\.(\d+)\.", k)] if m})
        for k, v in mine.items():
            new = _map_diffusers_vae(k, n_up) or k
            shape = v.shape
            if re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight", new) and len(shape) in (2, 3):
                shape = tuple(shape[:2]) + (1, 1)  # Linear (diffusers) -> 1x1 conv (CompVis)
            if new in col.have:
                raise FluxMiniValueError(f"{v.label}: two tensors map to VAE tensor {new}")
            col.have[new] = _Virt.of(v, shape)
    elif component == "t5xxl":
        dup = mine.pop("encoder.embed_tokens.weight", None)
        for k, v in mine.items():
            col.have[k] = _Virt.of(v)
        if "shared.weight" not in col.have and dup is not None:
            col.have["shared.weight"] = _Virt.of(dup)
        if t5_dup and "shared.weight" in col.have:
            src = dup if dup is not None else col.have["shared.weight"].parts[0][0]
            col.have["encoder.embed_tokens.weight"] = _Virt.of(src)
    else:
        for k, v in mine.items():
            col.have[k] = _Virt.of(v)
    return col


_BFL_FLUX = re.compile(r"(img_in|txt_in|time_in|vector_in|guidance_in|double_blocks|single_blocks|final_layer)\.")


def _is_bfl_flux(name: str) -> bool:
    return bool(_BFL_FLUX.match(name))


# ----------------------------------------------------------------------------------------------
# Dimension inference

def _dim(have: dict[str, _Virt], candidates: list[tuple[str, int]], default: int) -> int:
    for name, axis in candidates:
        v = have.get(name)
        if v is not None and len(v.shape) > axis:
            return int(v.shape[axis])
    return default


def _count(have: dict[str, _Virt], pattern: str, default: int) -> int:
    rx = re.compile(pattern)
    idx = {int(m[1]) for k in have for m in [rx.match(k)] if m}
    return max(idx) + 1 if idx else default


def infer_dims(component: str, have: dict[str, tuple[int, ...]] | dict[str, _Virt], keep_t5_duplicate: bool = False):
    """Dimensions of one component from its tensor shapes (bare names -> shapes or _Virt).

    Missing key tensors fall back to FLUX.1-mini's sizes, so that a missing tensor is reported as
    missing rather than as a wrong shape everywhere.
    """
    have = {k: (v if isinstance(v, _Virt) else _Virt(tuple(v), [], k)) for k, v in have.items()}
    if component == "diffusion":
        d = FluxDims()
        h = _dim(have, [("img_in.weight", 0), ("txt_in.weight", 0), ("final_layer.linear.weight", 1),
                        ("time_in.out_layer.weight", 0)], d.hidden)
        mlp = _dim(have, [("double_blocks.0.img_mlp.0.weight", 0), ("double_blocks.0.txt_mlp.0.weight", 0)],
                   int(h * d.mlp_ratio))
        return FluxDims(
            hidden=h,
            head_dim=_dim(have, [("double_blocks.0.img_attn.norm.query_norm.scale", 0),
                                 ("single_blocks.0.norm.query_norm.scale", 0)], d.head_dim),
            depth=_count(have, r"double_blocks\.(\d+)\.", d.depth),
            depth_single=_count(have, r"single_blocks\.(\d+)\.", d.depth_single),
            mlp_ratio=mlp / h if h else d.mlp_ratio,
            in_channels=_dim(have, [("img_in.weight", 1), ("final_layer.linear.weight", 0)], d.in_channels),
            context_dim=_dim(have, [("txt_in.weight", 1)], d.context_dim),
            vec_dim=_dim(have, [("vector_in.in_layer.weight", 1)], d.vec_dim),
            guidance=any(k.startswith("guidance_in.") for k in have),
        )
    if component == "clip_l":
        d = ClipDims()
        emb = "text_model.embeddings."
        return ClipDims(
            vocab=_dim(have, [(emb + "token_embedding.weight", 0)], d.vocab),
            positions=_dim(have, [(emb + "position_embedding.weight", 0)], d.positions),
            hidden=_dim(have, [(emb + "token_embedding.weight", 1), (emb + "position_embedding.weight", 1),
                               ("text_model.final_layer_norm.weight", 0)], d.hidden),
            layers=_count(have, r"text_model\.encoder\.layers\.(\d+)\.", d.layers),
            mlp=_dim(have, [("text_model.encoder.layers.0.mlp.fc1.weight", 0)], d.mlp),
        )
    if component == "t5xxl":
        d = T5Dims()
        p0 = "encoder.block.0.layer."
        heads = _dim(have, [(p0 + "0.SelfAttention.relative_attention_bias.weight", 1)], d.heads)
        inner = _dim(have, [(p0 + "0.SelfAttention.q.weight", 0)], heads * d.d_kv)
        return T5Dims(
            vocab=_dim(have, [("shared.weight", 0)], d.vocab),
            d_model=_dim(have, [("shared.weight", 1), ("encoder.final_layer_norm.weight", 0)], d.d_model),
            layers=_count(have, r"encoder\.block\.(\d+)\.", d.layers),
            heads=heads,
            d_kv=inner // heads if heads and inner % heads == 0 else d.d_kv,
            d_ff=_dim(have, [(p0 + "1.DenseReluDense.wi_0.weight", 0)], d.d_ff),
            buckets=_dim(have, [(p0 + "0.SelfAttention.relative_attention_bias.weight", 0)], d.buckets),
            duplicate_embed=keep_t5_duplicate,
        )
    if component == "vae":
        d = VaeDims()
        ch = _dim(have, [("encoder.conv_in.weight", 0)], d.ch)
        levels = _count(have, r"encoder\.down\.(\d+)\.", len(d.ch_mult))
        mult = []
        for i in range(levels):
            default = ch * (d.ch_mult[i] if i < len(d.ch_mult) else 1)
            c = _dim(have, [(f"encoder.down.{i}.block.0.conv1.weight", 0)], default)
            mult.append(c // ch if ch and c % ch == 0 else c)
        return VaeDims(
            ch=ch, ch_mult=tuple(mult),
            num_res_blocks=_count(have, r"encoder\.down\.0\.block\.(\d+)\.", d.num_res_blocks),
            z_channels=_dim(have, [("decoder.conv_in.weight", 1)],
                            _dim(have, [("encoder.conv_out.weight", 0)], 2 * d.z_channels) // 2),
            in_channels=_dim(have, [("encoder.conv_in.weight", 1)], d.in_channels),
            out_channels=_dim(have, [("decoder.conv_out.weight", 0)], d.out_channels),
        )
    raise FluxMiniValueError(f"unknown component {component!r}")


# ----------------------------------------------------------------------------------------------
# Conversion

def _names_list(names: Sequence[str], limit: int = 8) -> str:
    names = list(names)
    s = ", ".join(names[:limit])
    return s + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class _Item:
    component: str
    full: str
    bare: str
    shape: tuple[int, ...]
    type: str
    virt: _Virt


@dataclass
class ConvertResult:
    """What ``convert``/``quantize`` wrote."""

    path: str
    tensors: list[tuple[str, tuple[int, ...], str]]  # (full name, shape, type) in file order
    types: dict[str, str]
    layout: str
    dims: ModelDims
    metadata: dict
    size: int


def _passthrough(v: _Virt, out_type: str) -> bool:
    """Can the output bytes be copied from the source as they are?"""
    if any(p[0].dtype != out_type or p[0]._raw is None for p in v.parts):
        return False
    bs, _ = _block(out_type)
    return all(a % bs == 0 and b % bs == 0 for _, a, b in v.parts)


def _item_chunks(item: _Item) -> Iterator[np.ndarray]:
    """The encoded bytes of one output tensor, in row-aligned chunks."""
    v, t = item.virt, item.type
    row = item.shape[-1] if item.shape else 1
    step = max(1, CHUNK_ELEMENTS // row) * row
    raw = _passthrough(v, t)
    if not raw and t not in TYPE_NAMES:
        raise FluxMiniValueError(f"{item.full}: cannot encode type {t} (only copy it); source "
                                 f"{v.origin} in {v.label}")
    bounds = []
    off = 0
    for src, a, b in v.parts:
        bounds.append((off, off + b - a, src, a))
        off += b - a
    for c0 in range(0, off, step):
        c1 = min(off, c0 + step)
        pieces = []
        for o0, o1, src, a in bounds:
            lo, hi = max(c0, o0), min(c1, o1)
            if lo < hi:
                pieces.append((src.raw if raw else src.read)(a + lo - o0, a + hi - o0))
        data = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        if raw:
            yield data
        else:
            yield _encode_flat(data, t)


def _check(component: str, col: _Collected, dims_part, inventory) -> list[str]:
    """Problems of one component: missing tensors, wrong shapes, unknown names."""
    title = f"{COMPONENT_TITLES[component]} ({', '.join(col.labels)})"
    problems = []
    expected = dict(inventory)
    missing = [n for n in expected if n not in col.have]
    if col.missing_parts:
        missing = col.missing_parts + [n for n in missing if not any(n in p for p in col.missing_parts)]
    if missing:
        hint = ""
        if not col.have and col.others:
            held = ", ".join(f"{n} {COMPONENT_TITLES[c]} tensors" for c, n in col.others.items())
            hint = f" (the input holds {held}, no {COMPONENT_TITLES[component]} tensors: is it the right file?)"
        problems.append(f"{title}: {len(missing)} tensor(s) missing: {_names_list(missing)}{hint}")
    wrong = [f"{n} is {list(v.shape)}, expected {list(expected[n])}" for n, v in col.have.items()
             if n in expected and tuple(v.shape) != tuple(expected[n])]
    if wrong:
        problems.append(f"{title}: {len(wrong)} tensor(s) with a wrong shape (dimensions inferred from the "
                        f"file: {dims_part}): {_names_list(wrong, 5)}")
    unknown = col.unknown + [f"{v.origin}" + (f" (as {n})" if n != v.origin else "")
                             for n, v in col.have.items() if n not in expected]
    if unknown:
        problems.append(f"{title}: {len(unknown)} unknown tensor(s): {_names_list(unknown)}")
    return problems


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def convert(output: str | os.PathLike, *, diffusion: str | os.PathLike | None = None,
            clip_l: str | os.PathLike | None = None, t5xxl: str | os.PathLike | None = None,
            vae: str | os.PathLike | None = None, model: str | os.PathLike | None = None,
            layout: str = "gpustack", type: str = "f16", clip_l_type: str | None = None,
            t5xxl_type: str | None = None, vae_type: str | None = None, pure: bool = False,
            variant: str | None = None, keep_t5_duplicate: bool = False,
            metadata: dict | None = None, progress: bool = True) -> ConvertResult:
    """Convert FLUX.1-mini weights to one GGUF file with all four components.

    Inputs (each a safetensors file, a GGUF file, a shard index, or a folder — a diffusers
    pipeline folder works for every component): ``diffusion`` (BFL names like TencentARC's
    flux-mini.safetensors, or diffusers FluxTransformer2DModel names), ``clip_l`` (HF CLIPTextModel
    names), ``t5xxl`` (HF T5EncoderModel names), ``vae`` (BFL ae.safetensors / CompVis names or
    diffusers AutoencoderKL names). Names may carry the usual prefixes (model.diffusion_model.,
    text_encoders.clip_l.transformer., cond_stage_model..., first_stage_model., vae.). ``model``
    is an all-in-one file (e.g. one of gpustack's) used for every component not given separately.

    Types: ``type`` with gpustack's per-tensor rules (``resolve_types``: a block type keeps CLIP-L
    and the VAE in F16 unless ``pure``; ``variant`` picks one of gpustack's six), overridden per
    component by ``clip_l_type``/``t5xxl_type``/``vae_type``. Tensors the rules keep keep their
    source type (BF16 sources are held as F32). ``layout``: "gpustack" or "sd.cpp" names.
    ``keep_t5_duplicate`` writes T5's ``encoder.embed_tokens.weight`` (a copy of ``shared.weight``
    that gpustack's files contain and the runtime ignores). ``metadata`` adds GGUF keys to ours.
    """
    output = os.fspath(output)
    if layout not in LAYOUT_PREFIXES:
        raise FluxMiniValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUT_PREFIXES)}")
    types = resolve_types(type, clip_l_type=clip_l_type, t5xxl_type=t5xxl_type, vae_type=vae_type,
                          pure=pure, variant=variant)
    given = {"diffusion": diffusion, "clip_l": clip_l, "t5xxl": t5xxl, "vae": vae}
    absent = [COMPONENT_TITLES[c] for c, p in given.items() if p is None and model is None]
    if absent:
        raise FluxMiniValueError(f"no input for: {', '.join(absent)} (give a file for each component, or an "
                                 "all-in-one model file)")
    inputs = [os.fspath(p) for p in list(given.values()) + [model] if p is not None]
    for p in inputs:
        if _same_file(p, output):
            raise FluxMiniValueError(f"the output {output} is also an input")

    cache: dict[tuple[str, str | None], list[SrcTensor]] = {}

    def tensors_of(path, role):
        key = (os.fspath(path), role)
        if key not in cache:
            cache[key] = read_input(path, role)
        return cache[key]

    try:
        problems: list[str] = []
        collected: dict[str, _Collected] = {}
        for comp in COMPONENTS:
            if given[comp] is not None:
                col = _collect(comp, tensors_of(given[comp], comp), False, keep_t5_duplicate)
            else:
                col = _collect(comp, tensors_of(model, None), True, keep_t5_duplicate)
            collected[comp] = col
        if model is not None:
            stray = [t.name for t in tensors_of(model, None)
                     if _strip("diffusion", t.name)[0] is None and not _ignored("", t.name)]
            if stray:
                problems.append(f"{os.path.basename(os.fspath(model))}: {len(stray)} tensor(s) of no known component: "
                                f"{_names_list(stray)}")

        dims_parts = {c: infer_dims(c, collected[c].have, keep_t5_duplicate) for c in COMPONENTS}
        dims = ModelDims(flux=dims_parts["diffusion"], clip=dims_parts["clip_l"], t5=dims_parts["t5xxl"],
                         vae=dims_parts["vae"])
        inventories = {c: component_tensors(c, dims) for c in COMPONENTS}
        for c in COMPONENTS:
            problems += _check(c, collected[c], dims_parts[c], inventories[c])
        if problems:
            raise FluxMiniValueError("cannot convert:\n  " + "\n  ".join(problems))
        f, cl, t5, va = dims.flux, dims.clip, dims.t5, dims.vae
        mismatch = []
        if f.context_dim != t5.d_model:
            mismatch.append(f"the diffusion model takes text features of width {f.context_dim} but T5 makes "
                            f"{t5.d_model}")
        if f.vec_dim != cl.hidden:
            mismatch.append(f"the diffusion model takes a pooled vector of width {f.vec_dim} but CLIP-L makes "
                            f"{cl.hidden}")
        if f.in_channels != 4 * va.z_channels:
            mismatch.append(f"the diffusion model takes {f.in_channels} channels per token but the VAE has "
                            f"{va.z_channels} latent channels ({4 * va.z_channels} per 2x2 patch)")
        if mismatch:
            raise FluxMiniValueError("the components do not fit together: " + "; ".join(mismatch))

        items: list[_Item] = []
        for comp in COMPONENTS:
            prefix = LAYOUT_PREFIXES[layout][comp]
            for bare, shape in inventories[comp]:
                v = collected[comp].have[bare]
                t = gpustack_type(comp, bare, shape, types["diffusion"], types[comp], v.kept_type)
                items.append(_Item(comp, prefix + bare, bare, tuple(shape), t, v))

        sources = []
        for p in inputs:
            b = os.path.basename(os.path.normpath(p))
            if b not in sources:
                sources.append(b)
        meta = {"fluxmini.architecture": "flux-mini", "fluxmini.quantization": types["diffusion"],
                "fluxmini.layout": layout, "fluxmini.source": ", ".join(sources)}
        meta.update(metadata or {})
        return _write_items(output, items, meta, types, layout, dims, progress, "convert")
    finally:
        for tensors in cache.values():
            close_inputs(tensors)


def _write_items(output: str, items: list[_Item], meta: dict, types: dict, layout: str, dims: ModelDims,
                 progress: bool, desc: str) -> ConvertResult:
    tmp = output + ".part"
    w = StreamingWriter(tmp, meta)
    for it in items:
        w.declare(it.full, it.shape, it.type)
    total = sum(tensor_nbytes(it.shape, it.type) for it in items)
    bar = _Progress(total, desc, progress)
    w.begin()
    try:
        for it in items:
            for raw in _item_chunks(it):
                w.write_part(raw)
                bar.update(raw.nbytes)
        w.close()
        os.replace(tmp, output)
    except BaseException:
        w.abort()
        raise
    finally:
        bar.close()
    return ConvertResult(output, [(it.full, it.shape, it.type) for it in items], types, layout, dims, meta,
                         os.path.getsize(output))


def detect_layout(names: Iterable[str]) -> str:
    """"sd.cpp" if any name uses upstream's text-encoder prefixes, else "gpustack"."""
    return "sd.cpp" if any(n.startswith("text_encoders.") for n in names) else "gpustack"


def quantize(input_gguf: str | os.PathLike, output_gguf: str | os.PathLike, type: str = "q4_0", *,
             clip_l_type: str | None = None, t5xxl_type: str | None = None, vae_type: str | None = None,
             pure: bool = False, variant: str | None = None, layout: str | None = None,
             keep_t5_duplicate: bool | None = None, metadata: dict | None = None,
             progress: bool = True) -> ConvertResult:
    """Re-encode an all-in-one model file (any layout) with other types, streaming.

    Types as in ``convert`` (gpustack's rules; tensors the rules keep keep the type they have in
    the input). ``layout`` None keeps the input's layout; ``keep_t5_duplicate`` None keeps T5's
    duplicate embedding if the input has it.
    """
    src = os.fspath(input_gguf)
    tensors = read_input(src)
    close_inputs(tensors)
    names = [t.name for t in tensors]
    if layout is None:
        layout = detect_layout(names)
    if keep_t5_duplicate is None:
        keep_t5_duplicate = any(n.endswith("transformer.encoder.embed_tokens.weight") for n in names)
    return convert(output_gguf, model=src, layout=layout, type=type, clip_l_type=clip_l_type,
                   t5xxl_type=t5xxl_type, vae_type=vae_type, pure=pure, variant=variant,
                   keep_t5_duplicate=keep_t5_duplicate, metadata=metadata, progress=progress)


# ----------------------------------------------------------------------------------------------
# Command line (registered by fluxmini.cli)

def _cmd_convert(args) -> int:
    res = convert(args.output, diffusion=args.diffusion_model, clip_l=args.clip_l, t5xxl=args.t5xxl,
                  vae=args.vae, model=args.model, layout=args.layout, type=args.type,
                  clip_l_type=args.clip_l_type, t5xxl_type=args.t5xxl_type, vae_type=args.vae_type,
                  pure=args.pure, variant=args.variant, keep_t5_duplicate=args.keep_t5_duplicate,
                  progress=not args.quiet)
    print(f"wrote {res.path}: {len(res.tensors)} tensors, {res.size:,} bytes")
    return 0


def _cmd_quantize(args) -> int:
    res = quantize(args.input, args.output, args.type, clip_l_type=args.clip_l_type, t5xxl_type=args.t5xxl_type,
                   vae_type=args.vae_type, pure=args.pure, variant=args.variant, layout=args.layout,
                   progress=not args.quiet)
    print(f"wrote {res.path}: {len(res.tensors)} tensors, {res.size:,} bytes")
    return 0


def _cmd_make_random(args) -> int:
    from .inventory import tiny_dims

    t0 = time.monotonic()
    paths = make_random(args.output, variant=args.variant, layout=args.layout, seed=args.seed,
                        dims=tiny_dims() if args.tiny else None, progress=not args.quiet, split=args.split)
    dt = time.monotonic() - t0
    for p in paths:
        print(f"wrote {p}: {os.path.getsize(p):,} bytes")
    print(f"{dt:.1f} s")
    return 0


def _add_type_flags(p, default_type: str) -> None:
    p.add_argument("--type", default=default_type, type=str.lower, choices=TYPE_NAMES,
                   help=f"type of the big weights (default {default_type}); with a block type CLIP-L and the VAE "
                        "stay F16 unless --pure, as in gpustack's files")
    p.add_argument("--variant", default=None, help="one of gpustack's variants instead of --type: "
                   + ", ".join(VARIANTS))
    p.add_argument("--pure", action="store_true", help="quantize CLIP-L like the rest (gpustack's pure-* files)")
    p.add_argument("--clip-l-type", dest="clip_l_type", type=str.lower, choices=TYPE_NAMES, default=None)
    p.add_argument("--t5xxl-type", dest="t5xxl_type", type=str.lower, choices=TYPE_NAMES, default=None)
    p.add_argument("--vae-type", dest="vae_type", type=str.lower, choices=TYPE_NAMES, default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_convert_subcommands(subparsers) -> None:
    """Register ``convert``, ``quantize`` and ``make-random`` on an argparse subparsers object;
    each sets ``func`` so the caller runs ``args.func(args)``."""
    p = subparsers.add_parser("convert", help="convert FLUX.1-mini weights to one GGUF file",
                              description=convert.__doc__.split("\n\n")[0])
    p.add_argument("--diffusion-model", dest="diffusion_model", help="flux-mini transformer (BFL or diffusers)")
    p.add_argument("--clip_l", "--clip-l", dest="clip_l", help="CLIP-L text encoder")
    p.add_argument("--t5xxl", dest="t5xxl", help="T5-XXL encoder")
    p.add_argument("--vae", dest="vae", help="VAE (BFL ae.safetensors or diffusers)")
    p.add_argument("-m", "--model", dest="model", help="all-in-one file for the components not given")
    p.add_argument("-o", "--output", required=True, help="output .gguf")
    p.add_argument("--layout", choices=tuple(LAYOUT_PREFIXES), default="gpustack",
                   help="tensor names: gpustack's (llama-box, fluxmini) or upstream sd.cpp's")
    p.add_argument("--keep-t5-duplicate", dest="keep_t5_duplicate", action="store_true",
                   help="also write T5's encoder.embed_tokens.weight (as gpustack's files do)")
    _add_type_flags(p, "f16")
    p.set_defaults(func=_cmd_convert)

    p = subparsers.add_parser("quantize", help="re-encode a model file with other types")
    p.add_argument("input", help="input .gguf (all four components)")
    p.add_argument("output", help="output .gguf")
    p.add_argument("--layout", choices=tuple(LAYOUT_PREFIXES), default=None, help="default: the input's")
    _add_type_flags(p, "q4_0")
    p.set_defaults(func=_cmd_quantize)

    p = subparsers.add_parser("make-random", help="write a random-weight full-size model (for benchmarks)")
    p.add_argument("-o", "--output", required=True, help="output .gguf (a folder with --split)")
    p.add_argument("--variant", default="Q4_0", help="one of " + ", ".join(VARIANTS) + " (default Q4_0)")
    p.add_argument("--layout", choices=tuple(LAYOUT_PREFIXES), default="gpustack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", action="store_true",
                   help="separate diffusion/clip_l/t5xxl/vae files with bare names (for stable-diffusion.cpp)")
    p.add_argument("--tiny", action="store_true", help="tiny dimensions (tests)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_make_random)
