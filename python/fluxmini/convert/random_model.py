"""Random-weight models of any size, in any of gpustack's variants (tests and benchmarks)."""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import FluxMiniValueError
from ..inventory import COMPONENTS, LAYOUT_PREFIXES, ModelDims, component_tensors
from ..progress import ByteProgress
from .gguf_writer import StreamingWriter
from .plan import _types_arg, plan_tensors
from .type_rules import _block, _encode_flat, encode_tensor, gpustack_type, is_block_type, tensor_nbytes


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
                       metadata: dict | None, progress: ByteProgress) -> None:
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
    bar = ByteProgress(total, "make-random", progress)
    biggest = max(int(np.prod(shape)) for _, plan in plans for *_, shape, _ in plan)
    pool = _RandomPool(rng, size=min(1 << 24, max(1 << 16, 1 << (biggest - 1).bit_length())))
    try:
        for path, plan in plans:
            _write_random_file(path, plan, rng, pool, metadata, bar)
    finally:
        bar.close()
    return [path for path, _ in plans]
