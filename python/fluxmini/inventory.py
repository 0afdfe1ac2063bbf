"""The tensor inventory of FLUX.1-mini's four components, and the prefixes of each file layout.

One table for the whole project: the converter, ``make-random`` and the test fixtures all
list tensors from here; the prefixes of each layout come from fluxmini/data/names.txt, which the
C++ loader embeds. ``infer_dims`` reads a component's dimensions back from tensor shapes.
Names are the *bare* component names (BFL names for the diffusion model and the VAE, Hugging
Face names for CLIP-L and T5); shapes are PyTorch order ``[out, in, ...]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from .errors import FluxMiniValueError
# The prefixes written in front of the bare names, per layout, are in fluxmini/data/names.txt.
from .names import COMPONENTS, LAYOUT_PREFIXES  # noqa: F401 (re-exported)


@dataclass
class FluxDims:
    hidden: int = 3072
    head_dim: int = 128
    depth: int = 5
    depth_single: int = 10
    mlp_ratio: float = 4.0
    in_channels: int = 64
    context_dim: int = 4096
    vec_dim: int = 768
    guidance: bool = True


@dataclass
class ClipDims:
    vocab: int = 49408
    positions: int = 77
    hidden: int = 768
    layers: int = 12
    mlp: int = 3072


@dataclass
class T5Dims:
    vocab: int = 32128
    d_model: int = 4096
    layers: int = 24
    heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    buckets: int = 32
    duplicate_embed: bool = True


@dataclass
class VaeDims:
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    in_channels: int = 3
    out_channels: int = 3


@dataclass
class ModelDims:
    flux: FluxDims = field(default_factory=FluxDims)
    clip: ClipDims = field(default_factory=ClipDims)
    t5: T5Dims = field(default_factory=T5Dims)
    vae: VaeDims = field(default_factory=VaeDims)


def flux_tensors(d: FluxDims) -> list[tuple[str, tuple[int, ...]]]:
    h = d.hidden
    mlp = int(h * d.mlp_ratio)
    out = [("img_in.weight", (h, d.in_channels)), ("img_in.bias", (h,))]
    embedders = [("time_in", 256), ("vector_in", d.vec_dim)]
    if d.guidance:
        embedders.insert(1, ("guidance_in", 256))
    for name, n_in in embedders:
        out += [(f"{name}.in_layer.weight", (h, n_in)), (f"{name}.in_layer.bias", (h,)),
                (f"{name}.out_layer.weight", (h, h)), (f"{name}.out_layer.bias", (h,))]
    out += [("txt_in.weight", (h, d.context_dim)), ("txt_in.bias", (h,))]
    for i in range(d.depth):
        p = f"double_blocks.{i}."
        for s in ("img", "txt"):
            out += [(f"{p}{s}_mod.lin.weight", (6 * h, h)), (f"{p}{s}_mod.lin.bias", (6 * h,)),
                    (f"{p}{s}_attn.qkv.weight", (3 * h, h)), (f"{p}{s}_attn.qkv.bias", (3 * h,)),
                    (f"{p}{s}_attn.norm.query_norm.scale", (d.head_dim,)),
                    (f"{p}{s}_attn.norm.key_norm.scale", (d.head_dim,)),
                    (f"{p}{s}_attn.proj.weight", (h, h)), (f"{p}{s}_attn.proj.bias", (h,)),
                    (f"{p}{s}_mlp.0.weight", (mlp, h)), (f"{p}{s}_mlp.0.bias", (mlp,)),
                    (f"{p}{s}_mlp.2.weight", (h, mlp)), (f"{p}{s}_mlp.2.bias", (h,))]
    for i in range(d.depth_single):
        p = f"single_blocks.{i}."
        out += [(f"{p}linear1.weight", (3 * h + mlp, h)), (f"{p}linear1.bias", (3 * h + mlp,)),
                (f"{p}linear2.weight", (h, h + mlp)), (f"{p}linear2.bias", (h,)),
                (f"{p}norm.query_norm.scale", (d.head_dim,)),
                (f"{p}norm.key_norm.scale", (d.head_dim,)),
                (f"{p}modulation.lin.weight", (3 * h, h)), (f"{p}modulation.lin.bias", (3 * h,))]
    out += [("final_layer.adaLN_modulation.1.weight", (2 * h, h)),
            ("final_layer.adaLN_modulation.1.bias", (2 * h,)),
            ("final_layer.linear.weight", (d.in_channels, h)),
            ("final_layer.linear.bias", (d.in_channels,))]
    return out


def clip_tensors(d: ClipDims) -> list[tuple[str, tuple[int, ...]]]:
    p = "text_model."
    h = d.hidden
    out = [(p + "embeddings.token_embedding.weight", (d.vocab, h)),
           (p + "embeddings.position_embedding.weight", (d.positions, h))]
    for i in range(d.layers):
        q = f"{p}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += [(f"{q}self_attn.{proj}.weight", (h, h)), (f"{q}self_attn.{proj}.bias", (h,))]
        for ln in ("layer_norm1", "layer_norm2"):
            out += [(f"{q}{ln}.weight", (h,)), (f"{q}{ln}.bias", (h,))]
        out += [(f"{q}mlp.fc1.weight", (d.mlp, h)), (f"{q}mlp.fc1.bias", (d.mlp,)),
                (f"{q}mlp.fc2.weight", (h, d.mlp)), (f"{q}mlp.fc2.bias", (h,))]
    out += [(p + "final_layer_norm.weight", (h,)), (p + "final_layer_norm.bias", (h,))]
    return out


def t5_tensors(d: T5Dims) -> list[tuple[str, tuple[int, ...]]]:
    inner = d.heads * d.d_kv
    out = [("shared.weight", (d.vocab, d.d_model))]
    if d.duplicate_embed:
        out.append(("encoder.embed_tokens.weight", (d.vocab, d.d_model)))
    for i in range(d.layers):
        p = f"encoder.block.{i}.layer."
        for x in ("q", "k", "v"):
            out.append((f"{p}0.SelfAttention.{x}.weight", (inner, d.d_model)))
        out.append((f"{p}0.SelfAttention.o.weight", (d.d_model, inner)))
        if i == 0:
            out.append((f"{p}0.SelfAttention.relative_attention_bias.weight", (d.buckets, d.heads)))
        out += [(f"{p}0.layer_norm.weight", (d.d_model,)),
                (f"{p}1.DenseReluDense.wi_0.weight", (d.d_ff, d.d_model)),
                (f"{p}1.DenseReluDense.wi_1.weight", (d.d_ff, d.d_model)),
                (f"{p}1.DenseReluDense.wo.weight", (d.d_model, d.d_ff)),
                (f"{p}1.layer_norm.weight", (d.d_model,))]
    out.append(("encoder.final_layer_norm.weight", (d.d_model,)))
    return out


def _resnet(p: str, cin: int, cout: int) -> list[tuple[str, tuple[int, ...]]]:
    out = [(p + "norm1.weight", (cin,)), (p + "norm1.bias", (cin,)),
           (p + "conv1.weight", (cout, cin, 3, 3)), (p + "conv1.bias", (cout,)),
           (p + "norm2.weight", (cout,)), (p + "norm2.bias", (cout,)),
           (p + "conv2.weight", (cout, cout, 3, 3)), (p + "conv2.bias", (cout,))]
    if cin != cout:
        out += [(p + "nin_shortcut.weight", (cout, cin, 1, 1)), (p + "nin_shortcut.bias", (cout,))]
    return out


def _attn(p: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    out = [(p + "norm.weight", (c,)), (p + "norm.bias", (c,))]
    for x in ("q", "k", "v", "proj_out"):
        out += [(f"{p}{x}.weight", (c, c, 1, 1)), (f"{p}{x}.bias", (c,))]
    return out


def vae_tensors(d: VaeDims) -> list[tuple[str, tuple[int, ...]]]:
    chans = [d.ch * m for m in d.ch_mult]
    n = len(chans)
    out = [("encoder.conv_in.weight", (d.ch, d.in_channels, 3, 3)), ("encoder.conv_in.bias", (d.ch,))]
    cin = d.ch
    for i, c in enumerate(chans):
        for j in range(d.num_res_blocks):
            out += _resnet(f"encoder.down.{i}.block.{j}.", cin, c)
            cin = c
        if i != n - 1:
            out += [(f"encoder.down.{i}.downsample.conv.weight", (c, c, 3, 3)),
                    (f"encoder.down.{i}.downsample.conv.bias", (c,))]
    top = chans[-1]
    out += _resnet("encoder.mid.block_1.", top, top) + _attn("encoder.mid.attn_1.", top)
    out += _resnet("encoder.mid.block_2.", top, top)
    out += [("encoder.norm_out.weight", (top,)), ("encoder.norm_out.bias", (top,)),
            ("encoder.conv_out.weight", (2 * d.z_channels, top, 3, 3)),
            ("encoder.conv_out.bias", (2 * d.z_channels,))]
    out += [("decoder.conv_in.weight", (top, d.z_channels, 3, 3)), ("decoder.conv_in.bias", (top,))]
    out += _resnet("decoder.mid.block_1.", top, top) + _attn("decoder.mid.attn_1.", top)
    out += _resnet("decoder.mid.block_2.", top, top)
    cin = top
    for i in reversed(range(n)):
        c = chans[i]
        for j in range(d.num_res_blocks + 1):
            out += _resnet(f"decoder.up.{i}.block.{j}.", cin, c)
            cin = c
        if i != 0:
            out += [(f"decoder.up.{i}.upsample.conv.weight", (c, c, 3, 3)),
                    (f"decoder.up.{i}.upsample.conv.bias", (c,))]
    out += [("decoder.norm_out.weight", (chans[0],)), ("decoder.norm_out.bias", (chans[0],)),
            ("decoder.conv_out.weight", (d.out_channels, chans[0], 3, 3)),
            ("decoder.conv_out.bias", (d.out_channels,))]
    return out


def component_tensors(component: str, dims: ModelDims) -> list[tuple[str, tuple[int, ...]]]:
    if component == "diffusion":
        return flux_tensors(dims.flux)
    if component == "clip_l":
        return clip_tensors(dims.clip)
    if component == "t5xxl":
        return t5_tensors(dims.t5)
    if component == "vae":
        return vae_tensors(dims.vae)
    raise FluxMiniValueError(f"unknown component {component!r}")


def tiny_dims() -> ModelDims:
    """Small widths in the real layer structure, for tests (row lengths multiples of 32)."""
    return ModelDims(
        flux=FluxDims(hidden=256, head_dim=128, depth=2, depth_single=3, context_dim=64, vec_dim=64),
        clip=ClipDims(hidden=64, layers=2, mlp=128),
        t5=T5Dims(d_model=64, layers=2, heads=4, d_kv=16, d_ff=96),
        vae=VaeDims(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
    )


# ----------------------------------------------------------------------------------------------
# Dimension inference

def _dim(have: dict[str, tuple[int, ...]], candidates: list[tuple[str, int]], default: int) -> int:
    for name, axis in candidates:
        v = have.get(name)
        if v is not None and len(v) > axis:
            return int(v[axis])
    return default


def _count(have: dict[str, tuple[int, ...]], pattern: str, default: int) -> int:
    rx = re.compile(pattern)
    idx = {int(m[1]) for k in have for m in [rx.match(k)] if m}
    return max(idx) + 1 if idx else default


def infer_dims(component: str, shapes: dict[str, Sequence[int]], keep_t5_duplicate: bool = False):
    """Dimensions of one component from its tensor shapes (bare names -> PyTorch-order shapes).

    The converter's one dimension inference (the engine's is FluxConfig::infer and its siblings in
    csrc/, which read the same tensors; tests/test_dims.py checks that both agree on files
    written from these dimensions).

    Missing key tensors fall back to FLUX.1-mini's sizes, so that a missing tensor is reported as
    missing rather than as a wrong shape everywhere.
    """
    have = {k: tuple(v) for k, v in shapes.items()}
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
