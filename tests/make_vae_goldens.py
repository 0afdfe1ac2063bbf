"""Write tests/data/vae_goldens.npz from diffusers' AutoencoderKL (needs torch + diffusers).

    python tests/make_vae_goldens.py

The reference is diffusers' ``AutoencoderKL`` configured as the Flux autoencoder (16 latent
channels, no quant_conv / post_quant_conv, mid-block attention, GroupNorm(32, eps 1e-6)) on torch
CPU float32. Its state dict is made from our BFL-named tensors (as the engine reads them:
tests.fixtures.read_component dequantizes F16 to the exact float32 values) by diffusers' own
``convert_ldm_vae_checkpoint`` with the ``first_stage_model.`` prefix it expects, and loaded with
``strict=True``: the name mapping (up levels in reverse order, attention 1x1 convs as linear
weights, nin_shortcut -> conv_shortcut, ...) is diffusers', not ours.

Inputs come from fixed seeds (numpy's PCG64), so tests/test_vae.py regenerates them and compares
the engine with these numbers without torch. The model files are the deterministic tiny models of
tests/fixtures.py (values depend only on seed and tensor name). Importing this module needs only
numpy; torch and diffusers are imported by the functions that run the reference.
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDENS = os.path.join(HERE, "data", "vae_goldens.npz")
sys.path.insert(0, HERE)

import fixtures  # noqa: E402
from fluxmini.inventory import ModelDims, VaeDims, component_tensors, tiny_dims  # noqa: E402

# Models: name -> (VaeDims, big type, F16 GroupNorm weights). "f32": tiny_dims' VAE (ch 32,
# ch_mult (1, 2, 2, 2), one resnet per encoder level, two per decoder level); "res2": the real
# model's structure (ch_mult (1, 2, 4, 4), 2 / 3 resnets per level) in small widths; "f16": F16
# conv kernels (as in gpustack's FP16 file); "gpustack": F32 conv kernels with F16 GroupNorm
# weights, the types of the VAE in gpustack's quantized files (docs/MODEL.md §1.1).
MODELS = {
    "f32": (tiny_dims().vae, "f32", False),
    "res2": (VaeDims(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2), "f32", False),
    "f16": (tiny_dims().vae, "f16", False),
    "gpustack": (tiny_dims().vae, "f32", True),
}

# Cases: (model, "decode" | "encode", latent h, latent w, seed). Encode inputs are images of
# 8h x 8w pixels. The 48 x 48 encode has 2304 positions in its mid attention, more than the
# engine's 4 Mi-float score block allows at once: it runs the query-chunked attention.
CASES = [
    ("f32", "decode", 8, 8, 1),
    ("f32", "decode", 6, 10, 2),
    ("f32", "encode", 8, 8, 3),
    ("f32", "encode", 10, 6, 4),
    ("f32", "encode", 48, 48, 5),
    ("res2", "decode", 8, 8, 6),
    ("res2", "decode", 10, 6, 7),
    ("res2", "encode", 6, 10, 8),
    ("f16", "decode", 6, 10, 9),
    ("f16", "encode", 6, 10, 10),
    ("gpustack", "decode", 6, 10, 11),
    ("gpustack", "encode", 6, 10, 12),
]


def case_key(case) -> str:
    model, kind, h, w, seed = case
    return f"{model}_{kind}_{h}x{w}_s{seed}"


def model_path(name: str):
    """The tiny VAE-only model file of `name`, cached in tests/_models."""
    vdims, big, f16_norms = MODELS[name]
    dims = ModelDims(vae=vdims)
    types = None
    if f16_norms:
        prefix = "first_stage_model."
        types = {prefix + n: "f16" for n, shape in component_tensors("vae", dims)
                 if len(shape) == 1 and n.endswith(".weight")}
    return fixtures.cached_model(f"vae-{name}", dims=dims, big_type=big, components=("vae",), types=types)


def case_input(case) -> np.ndarray:
    """Decode: latent [16, h, w] ~ N(0, 1). Encode: image [3, 8h, 8w] in (-1, 1)."""
    model, kind, h, w, seed = case
    rng = np.random.default_rng(seed)
    if kind == "decode":
        return rng.standard_normal((MODELS[model][0].z_channels, h, w)).astype(np.float32)
    return np.tanh(rng.standard_normal((MODELS[model][0].in_channels, 8 * h, 8 * w))).astype(np.float32)


def diffusers_config(vdims: VaeDims) -> dict:
    chans = [vdims.ch * m for m in vdims.ch_mult]
    return dict(in_channels=vdims.in_channels, out_channels=vdims.out_channels,
                down_block_types=["DownEncoderBlock2D"] * len(chans),
                up_block_types=["UpDecoderBlock2D"] * len(chans),
                block_out_channels=chans, layers_per_block=vdims.num_res_blocks,
                latent_channels=vdims.z_channels, norm_num_groups=32, act_fn="silu",
                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)


def reference_model(name: str):
    """diffusers AutoencoderKL with the model's weights, mapped by diffusers' converter."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = diffusers_config(MODELS[name][0])
    tensors = fixtures.read_component(model_path(name), "vae")
    checkpoint = {"first_stage_model." + k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
    state = convert_ldm_vae_checkpoint(checkpoint, cfg)
    model = AutoencoderKL(**cfg)
    model.load_state_dict(state, strict=True)
    return model.eval().float()


def reference(model, case) -> np.ndarray:
    """Decode: the image [3, 8h, 8w]; encode: the latent mean [16, h, w]."""
    import torch

    x = torch.from_numpy(case_input(case))[None]
    with torch.no_grad():
        if case[1] == "decode":
            return model.decode(x).sample[0].numpy().astype(np.float32)
        return model.encode(x).latent_dist.mean[0].numpy().astype(np.float32)


def main() -> None:
    import torch

    torch.set_num_threads(2)
    models = {}
    out = {}
    for case in CASES:
        if case[0] not in models:
            models[case[0]] = reference_model(case[0])
        out[case_key(case)] = reference(models[case[0]], case)
    np.savez_compressed(GOLDENS, **out)
    print(f"wrote {GOLDENS}: {len(out)} arrays, {os.path.getsize(GOLDENS)} bytes")


if __name__ == "__main__":
    main()
