"""``convert`` (original weights to one GGUF) and ``quantize`` (re-encode a GGUF)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import FluxMiniValueError
from ..inventory import COMPONENTS, LAYOUT_PREFIXES, ModelDims, component_tensors, infer_dims

from ..progress import ByteProgress
from .gguf_writer import StreamingWriter
from .names import _Collected, _Virt, _collect, _ignored, _strip
from .readers import SrcTensor, close_inputs, read_input
from .type_rules import (CHUNK_ELEMENTS, COMPONENT_TITLES, TYPE_NAMES, _block, _encode_flat, gpustack_type,
                         resolve_types, tensor_nbytes)


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

        dims_parts = {c: infer_dims(c, {k: v.shape for k, v in collected[c].have.items()}, keep_t5_duplicate)
                      for c in COMPONENTS}
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
    w = StreamingWriter(output, meta)  # (writes OUTPUT.part, renamed when complete)
    for it in items:
        w.declare(it.full, it.shape, it.type)
    total = sum(tensor_nbytes(it.shape, it.type) for it in items)
    bar = ByteProgress(total, desc, progress)
    w.begin()
    try:
        for it in items:
            for raw in _item_chunks(it):
                w.write_part(raw)
                bar.update(raw.nbytes)
        w.close()
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
