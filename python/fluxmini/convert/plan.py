"""Plans (the tensors, names and types of an output file) and exact file-size prediction."""

from __future__ import annotations

from typing import Callable, Iterable

from ..errors import FluxMiniValueError
from ..inventory import COMPONENTS, LAYOUT_PREFIXES, ModelDims, T5Dims, component_tensors
from .gguf_writer import gguf_header
from .type_rules import SOURCE_TYPES, gpustack_type, resolve_types


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
    embedding, gpustack layout, no metadata) give docs/MODEL.md §1.1's numbers.
    """
    plan = plan_tensors(dims, variant, layout, keep_t5_duplicate, source_types=source_types,
                        components=components, bare=bare)
    head, _, data = gguf_header([(full, shape, t) for _, full, _, shape, t in plan], metadata)
    return len(head) + data
