"""Name normalisation: every input naming to the bare names of inventory.py.

Prefixes and ignored tensors come from fluxmini/data/names.txt (:mod:`fluxmini.names`), shared with
the C++ loader; the diffusers and llama.cpp-T5 renames here are the converter's alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import FluxMiniValueError
from ..names import DUPLICATES, is_ignored, strip_prefix
from .readers import SrcTensor, _kept_type


def _ignored(component: str, name: str) -> bool:
    """Tensors the runtime does not use (fluxmini/data/names.txt); dropped without complaint."""
    return is_ignored(component, name)


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


# diffusers FluxTransformer2DModel -> BFL (docs/MODEL.md §1.6): plain renames
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
    return strip_prefix(name)


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
        (copy, original), = DUPLICATES["t5xxl"].items()  # encoder.embed_tokens repeats shared
        dup = mine.pop(copy, None)
        for k, v in mine.items():
            col.have[k] = _Virt.of(v)
        if original not in col.have and dup is not None:
            col.have[original] = _Virt.of(dup)
        if t5_dup and original in col.have:
            src = dup if dup is not None else col.have[original].parts[0][0]
            col.have[copy] = _Virt.of(src)
    else:
        for k, v in mine.items():
            col.have[k] = _Virt.of(v)
    return col


_BFL_FLUX = re.compile(r"(img_in|txt_in|time_in|vector_in|guidance_in|double_blocks|single_blocks|final_layer)\.")


def _is_bfl_flux(name: str) -> bool:
    return bool(_BFL_FLUX.match(name))
