"""Tensor types: the ggml types we encode, gpustack's per-tensor type rules and variants, encoding."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import FluxMiniValueError


TYPE_NAMES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1")
ALIGNMENT = 32
CHUNK_ELEMENTS = 1 << 22  # elements converted at a time (16 MB of float32)

COMPONENT_TITLES = {"diffusion": "diffusion model", "clip_l": "CLIP-L", "t5xxl": "T5-XXL", "vae": "VAE"}


def _gguf():
    import gguf  # runtime dependency; imported lazily to keep `import fluxmini` light

    return gguf


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
    """Type gpustack's converter gives a tensor (docs/MODEL.md §1.4).

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
# converter read (diffusion F32 after BF16 widening, CLIP F16, T5 F16, VAE F32) — docs/MODEL.md §1.1.
VARIANTS = {
    "FP16": ("f16", "f16", "f16", "f16"),
    "Q8_0": ("q8_0", "f16", "q8_0", "f16"),
    "pure-Q8_0": ("q8_0", "q8_0", "q8_0", "f16"),
    "Q4_1": ("q4_1", "f16", "q4_1", "f16"),
    "Q4_0": ("q4_0", "f16", "q4_0", "f16"),
    "pure-Q4_0": ("q4_0", "q4_0", "q4_0", "f16"),
}
SOURCE_TYPES = {"diffusion": "f32", "clip_l": "f16", "t5xxl": "f16", "vae": "f32"}
# docs/MODEL.md §1.1, computed with n_kv = 0 and the gpustack layout.
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
