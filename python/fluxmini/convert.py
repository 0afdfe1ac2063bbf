"""Writing FLUX.1-mini GGUF files: gpustack's per-tensor type rules and a streaming writer.

The writer takes (name, float32 array) pairs one at a time, so peak memory is about one tensor.
``write_random_model`` makes random-weight models of any size in any layout; tests use it with
tiny dimensions and benchmarks with the real ones.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator

import numpy as np

from .errors import FluxMiniValueError
from .inventory import COMPONENTS, LAYOUT_PREFIXES, ModelDims, component_tensors

TYPE_NAMES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1")


def _gguf():
    import gguf  # runtime dependency; imported lazily to keep `import fluxmini` light

    return gguf


def ggml_type(name: str):
    gguf = _gguf()
    key = name.lower()
    if key not in TYPE_NAMES:
        raise FluxMiniValueError(f"unknown tensor type {name!r}; choose one of {', '.join(TYPE_NAMES)}")
    return getattr(gguf.GGMLQuantizationType, key.upper())


def is_block_type(type_name: str) -> bool:
    return type_name.lower().startswith("q")


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


class StreamingWriter:
    """Two-pass GGUF writer: declare every tensor first, then stream the data in order."""

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        gguf = _gguf()
        self._w = gguf.GGUFWriter(str(path), "fluxmini")
        for k, v in (metadata or {}).items():
            self._w.add_string(k, str(v))
        self._order: list[str] = []

    def declare(self, name: str, shape: tuple[int, ...], type_name: str) -> None:
        gguf = _gguf()
        qtype = ggml_type(type_name)
        n = int(np.prod(shape)) if shape else 1
        if type_name == "f32":
            self._w.add_tensor_info(name, shape, np.dtype(np.float32), n * 4)
        elif type_name == "f16":
            self._w.add_tensor_info(name, shape, np.dtype(np.float16), n * 2)
        else:
            bs, ts = gguf.GGML_QUANT_SIZES[qtype]
            if shape[-1] % bs:
                raise FluxMiniValueError(f"{name}: row length {shape[-1]} is not a multiple of {bs} for {type_name}")
            byte_shape = tuple(shape[:-1]) + (shape[-1] // bs * ts,)
            self._w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), n // bs * ts, raw_dtype=qtype)
        self._order.append(name)

    def begin(self) -> None:
        self._w.write_header_to_file()
        self._w.write_kv_data_to_file()
        self._w.write_ti_data_to_file()

    def write(self, raw: np.ndarray) -> None:
        self._w.write_tensor_data(raw)

    def close(self) -> None:
        self._w.close()


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


def write_random_model(path: str | os.PathLike, dims: ModelDims, *, layout: str = "gpustack",
                       types: dict[str, str] | str = "f32", components: Iterable[str] = COMPONENTS,
                       seed: int = 0, rule: Callable | None = None, bare: bool = False,
                       metadata: dict[str, str] | None = None) -> list[tuple[str, tuple[int, ...], str]]:
    """Write a random-weight model; returns the (full name, shape, type) list written.

    ``types`` is one type for every big weight or a dict per component; small tensors follow
    gpustack's rules. ``bare`` drops the layout prefix (split files hold one component each).
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
    for _, name, shape, t in plan:
        raw, _ = encode_tensor(random_tensor(rng, name, shape), t)
        w.write(raw)
    w.close()
    return [(full, shape, t) for full, _, shape, t in plan]


def iter_plan(dims: ModelDims, layout: str = "gpustack") -> Iterator[tuple[str, str, str, tuple[int, ...]]]:
    for comp in COMPONENTS:
        for name, shape in component_tensors(comp, dims):
            yield comp, LAYOUT_PREFIXES[layout][comp] + name, name, shape
