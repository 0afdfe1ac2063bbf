"""Write tests/data/flux_goldens.npz from diffusers' FluxTransformer2DModel (needs torch + diffusers).

    python tests/make_flux_goldens.py

The reference is diffusers' FLUX transformer on torch CPU float32. Its state dict is built from
our BFL-named tensors (as the engine reads them: tests.fixtures.read_component dequantizes
quantized files) by diffusers' own ``convert_flux_transformer_checkpoint_to_diffusers``, so the
name mapping (fused qkv split, swapped final shift/scale, ...) is diffusers', not ours. That
function hard-codes the FLUX width (``inner_dim = 3072``) for splitting the single blocks'
``linear1``; for the narrow test models its source is compiled with the model's width in place
of the constant, nothing else changed.

Inputs come from fixed seeds (numpy's PCG64) and are stored next to the outputs, so
tests/test_flux.py compares the engine with these numbers without torch. The model files are the
deterministic tiny models of tests/fixtures.py (values depend only on seed and tensor name).
"""

from __future__ import annotations

import inspect
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDENS = os.path.join(HERE, "data", "flux_goldens.npz")
sys.path.insert(0, HERE)

import fixtures  # noqa: E402
from fluxmini.inventory import FluxDims, ModelDims, tiny_dims  # noqa: E402

# Models: name -> (FluxDims overrides, big weight type). Tiny dims: hidden 256 = 2 heads of 128,
# 2 double + 3 single blocks, T5 width 64, pooled width 64.
MODELS = {
    "f32": ({}, "f32"),
    "w384": ({"hidden": 384}, "f32"),  # 3 heads
    "nog": ({"guidance": False}, "f32"),  # schnell-style: no guidance_in
    "f16": ({}, "f16"),
    "q8_0": ({}, "q8_0"),
    "q4_0": ({}, "q4_0"),
}

# Cases: (model, latent h, latent w, sigma, guidance, text tokens, seed).
CASES = [
    ("f32", 16, 16, 1.0, 3.5, 7, 1),      # square, sd.cpp-style short prompt
    ("f32", 12, 20, 0.6, 3.5, 64, 2),     # non-square, longer text
    ("f32", 9, 13, 0.05, 3.5, 33, 3),     # odd sides: padded to 10 x 14 then cropped
    ("f32", 32, 24, 0.3, 3.5, 256, 4),    # more tokens, long text
    ("w384", 14, 10, 0.8, 3.5, 20, 5),
    ("nog", 10, 12, 0.5, 3.5, 12, 6),
    ("f16", 16, 12, 0.7, 3.5, 24, 7),
    ("q8_0", 16, 12, 0.7, 3.5, 24, 7),
    ("q4_0", 16, 12, 0.7, 3.5, 24, 7),
    ("q4_0", 11, 16, 0.2, 3.5, 7, 8),
]


def model_dims(name: str) -> ModelDims:
    dims = tiny_dims()
    for k, v in MODELS[name][0].items():
        setattr(dims.flux, k, v)
    return dims


def model_path(name: str):
    """The tiny model file of `name` (diffusion only), cached in tests/_models."""
    return fixtures.cached_model(f"flux-{name}", dims=model_dims(name), big_type=MODELS[name][1],
                                 components=("diffusion",))


def case_inputs(h: int, w: int, n_txt: int, seed: int, dims: FluxDims):
    """latent [16, h, w], t5 [n_txt, context_dim], pooled [vec_dim] from a fixed seed."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((dims.in_channels // 4, h, w)).astype(np.float32)
    t5 = (0.5 * rng.standard_normal((n_txt, dims.context_dim))).astype(np.float32)
    pooled = rng.standard_normal(dims.vec_dim).astype(np.float32)
    return latent, t5, pooled


def _converter(hidden: int):
    """diffusers' BFL -> diffusers converter, with its hard-coded width replaced by `hidden`."""
    from diffusers.loaders import single_file_utils as sfu

    fn = sfu.convert_flux_transformer_checkpoint_to_diffusers
    if hidden == 3072:
        return fn
    src = inspect.getsource(fn)
    assert src.count("inner_dim = 3072") == 1, "diffusers' converter changed; update make_flux_goldens.py"
    src = src.replace("inner_dim = 3072", f"inner_dim = {hidden}")
    namespace = dict(vars(sfu))
    exec(compile(src, sfu.__file__, "exec"), namespace)
    return namespace[fn.__name__]


def reference_model(path):
    """diffusers FluxTransformer2DModel (float32, eval) holding the tensors of the file at `path`."""
    import torch
    from diffusers import FluxTransformer2DModel

    tensors = fixtures.read_component(path, "diffusion")
    hidden, in_ch = tensors["img_in.weight"].shape
    heads = hidden // 128
    depth = len({k.split(".")[1] for k in tensors if k.startswith("double_blocks.")})
    depth_single = len({k.split(".")[1] for k in tensors if k.startswith("single_blocks.")})
    checkpoint = {"model.diffusion_model." + k: torch.from_numpy(v.copy()) for k, v in tensors.items()}
    sd = _converter(hidden)(checkpoint)
    with torch.device("meta"):  # no random init: every parameter comes from the file
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=in_ch, num_layers=depth, num_single_layers=depth_single,
            attention_head_dim=128, num_attention_heads=heads,
            joint_attention_dim=tensors["txt_in.weight"].shape[1],
            pooled_projection_dim=tensors["vector_in.in_layer.weight"].shape[1],
            guidance_embeds="guidance_in.in_layer.weight" in tensors, axes_dims_rope=(16, 56, 56))
    missing, unexpected = model.load_state_dict(sd, strict=True, assign=True)
    assert not missing and not unexpected
    return model.float().eval()


def reference_forward(model, latent, sigma, guidance, t5, pooled):
    """Velocity [C, h, w] as FluxPipeline computes it: odd sides zero-padded at the bottom/right
    (docs/MODEL.md §3.2, as stable-diffusion.cpp does), 2x2 packing, ids (0, row, col), cropped."""
    import torch

    c, h, w = latent.shape
    hp, wp = (h + 1) // 2, (w + 1) // 2
    padded = np.zeros((c, 2 * hp, 2 * wp), np.float32)
    padded[:, :h, :w] = latent
    x = torch.from_numpy(padded)[None]
    # FluxPipeline._pack_latents
    x = x.view(1, c, hp, 2, wp, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, hp * wp, c * 4)
    # FluxPipeline._prepare_latent_image_ids
    img_ids = torch.zeros(hp, wp, 3)
    img_ids[..., 1] = img_ids[..., 1] + torch.arange(hp)[:, None]
    img_ids[..., 2] = img_ids[..., 2] + torch.arange(wp)[None, :]
    img_ids = img_ids.reshape(hp * wp, 3)
    txt_ids = torch.zeros(t5.shape[0], 3)
    kwargs = {}
    if model.config.guidance_embeds:
        kwargs["guidance"] = torch.tensor([guidance], dtype=torch.float32)
    with torch.no_grad():
        out = model(hidden_states=x, encoder_hidden_states=torch.from_numpy(t5)[None],
                    pooled_projections=torch.from_numpy(pooled)[None],
                    timestep=torch.tensor([sigma], dtype=torch.float32), img_ids=img_ids, txt_ids=txt_ids,
                    return_dict=False, **kwargs)[0]
    # FluxPipeline._unpack_latents
    out = out.view(1, hp, wp, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(c, 2 * hp, 2 * wp)
    return out[:, :h, :w].numpy().astype(np.float32)


def main():
    import torch

    torch.set_num_threads(2)
    out = {}
    models = {}
    for i, (name, h, w, sigma, guidance, n_txt, seed) in enumerate(CASES):
        if name not in models:
            models[name] = reference_model(model_path(name))
        latent, t5, pooled = case_inputs(h, w, n_txt, seed, model_dims(name).flux)
        ref = reference_forward(models[name], latent, sigma, guidance, t5, pooled)
        out[f"c{i}_latent"], out[f"c{i}_t5"], out[f"c{i}_pooled"] = latent, t5, pooled
        out[f"c{i}_out"] = ref
        print(f"case {i}: {name} {h}x{w} sigma={sigma} L={n_txt}  max|v|={np.abs(ref).max():.3f}")
    np.savez_compressed(GOLDENS, **out)
    print(f"wrote {GOLDENS} ({os.path.getsize(GOLDENS)} bytes)")


if __name__ == "__main__":
    main()
