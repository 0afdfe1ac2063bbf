"""Write tests/data/pipeline_goldens.npz: whole generations by an independent torch reference.

    python tests/make_pipeline_goldens.py

The reference (this file, also imported by tests/test_pipeline.py for its live test) is a plain
loop over the Hugging Face models on torch CPU float32, holding the tiny random model's weights
(tests/fixtures.read_component: the float32 values the engine sees):

* tokens: transformers ``CLIPTokenizer`` from fluxmini's vocab.json/merges.txt (77 ids,
  padded with EOS) and plain ``sentencepiece`` pieces of spiece.model + EOS, padded with 0;
* text: transformers ``CLIPTextModel`` (``pooler_output``) and ``T5EncoderModel``
  (``last_hidden_state``); their state-dict names are the file's names;
* transformer: diffusers ``FluxTransformer2DModel``, state dict made by diffusers' own
  ``convert_flux_transformer_checkpoint_to_diffusers`` (which hard-codes FLUX's width 3072 to
  split the single blocks' fused ``linear1``: the narrow tensors are laid out at FLUX's offsets
  before the call and cut back after it, so the mapping itself is diffusers');
* VAE: diffusers ``AutoencoderKL`` through diffusers' ``convert_ldm_vae_checkpoint``;
  decode of ``z / 0.3611 + 0.1159`` (``z / 0.3611`` for compat "llama-box"), encode = posterior
  mean, ``0.3611 * (mean - 0.1159)`` (``0.3611 * mean`` for "llama-box");
* schedule: diffusers ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-dev's configuration and
  ``calculate_shift`` (as ``FluxPipeline`` sets it up); for compat "sd.cpp" and "llama-box" the
  formula of docs/MODEL.md §4.4 in float64; img2img start as diffusers'
  ``FluxImg2ImgPipeline.get_timesteps`` (sd.cpp: ``t_enc = int(steps * strength)``,
  docs/MODEL.md §5.3);
* T5 length when a case gives none: 512, 256 for "sd.cpp", 255 for "llama-box";
* Euler: ``x += (sigma_next - sigma) * v`` in float32, ``x = sigma * noise + (1 - sigma) * z``
  for img2img.

The starting noise is an input: fluxmini.rng.initial_noise(seed, ..., compat) (sd.cpp's Philox
generator, checked against an independent implementation in tests/test_rng.py); it is stored
with the outputs. Stored per case: the decoded image [3, H, W] (float, before the byte
conversion) and the final latent.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDENS = os.path.join(HERE, "data", "pipeline_goldens.npz")
TOK = os.path.join(HERE, "..", "python", "fluxmini", "data", "tokenizers")
sys.path.insert(0, HERE)

import fixtures  # noqa: E402

VAE_SCALE, VAE_SHIFT = 0.3611, 0.1159

# name -> generation parameters (the init image of img2img cases is INIT_SEED's picture)
CASES = {
    "t2i": dict(prompt="a photo of a cat", width=64, height=64, steps=4, guidance=3.5, seed=42),
    "t2i_wide_empty": dict(prompt="", width=80, height=48, steps=3, guidance=2.0, seed=7, t5_length=32),
    "t2i_sdcpp": dict(prompt="a lovely cat", width=64, height=48, steps=4, guidance=3.5, seed=3,
                      compat="sd.cpp"),
    "t2i_llamabox": dict(prompt="a lovely cat", width=64, height=48, steps=4, guidance=3.5, seed=3,
                         compat="llama-box"),
    "i2i": dict(prompt="a watercolour of a lighthouse", width=64, height=64, steps=5, guidance=3.5,
                seed=11, strength=0.6, t5_length=64),
    "i2i_sdcpp": dict(prompt="a watercolour of a lighthouse", width=64, height=64, steps=4, guidance=3.5,
                      seed=12, strength=0.5, compat="sd.cpp"),
    "i2i_llamabox": dict(prompt="a watercolour of a lighthouse", width=64, height=64, steps=4, guidance=3.5,
                         seed=12, strength=0.5, compat="llama-box"),
}
INIT_SEED = 5


def model_path():
    """The tiny F32 model with all four components (cached in tests/_models)."""
    return fixtures.cached_model("pipe-f32", big_type="f32")


def init_image(width: int = 64, height: int = 64) -> np.ndarray:
    """A deterministic uint8 [H, W, 3] picture: smooth gradients plus a little noise."""
    rng = np.random.default_rng(INIT_SEED)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin((x + y) / 9.0)], axis=-1) * 255
    base += rng.normal(0, 12, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- reference models


def _flux_state_dict(tensors: dict):
    import torch
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    hidden = tensors["img_in.weight"].shape[0]
    mlp = tensors["single_blocks.0.linear2.weight"].shape[1] - hidden
    full_h, full_mlp = 3072, 12288  # the widths diffusers' converter splits linear1 at
    ckpt = {}
    for k, v in tensors.items():
        t = torch.from_numpy(v.copy())
        if k.startswith("single_blocks.") and ".linear1." in k:
            parts = torch.split(t, [hidden, hidden, hidden, mlp], dim=0)
            padded = []
            for p, n in zip(parts, (full_h, full_h, full_h, full_mlp)):
                z = torch.zeros((n,) + tuple(p.shape[1:]), dtype=p.dtype)
                z[: p.shape[0]] = p
                padded.append(z)
            t = torch.cat(padded, dim=0)
        ckpt["model.diffusion_model." + k] = t
    sd = convert_flux_transformer_checkpoint_to_diffusers(ckpt)
    for k in list(sd):
        if k.startswith("single_transformer_blocks."):
            if any(s in k for s in (".attn.to_q.", ".attn.to_k.", ".attn.to_v.")):
                sd[k] = sd[k][:hidden].clone()
            elif ".proj_mlp." in k:
                sd[k] = sd[k][:mlp].clone()
    return sd


def reference_models(path):
    """(clip, t5, flux, vae) torch float32 eval models holding the tensors of the file at `path`."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    # CLIP-L
    ct = fixtures.read_component(path, "clip_l")
    vocab, hidden = ct["text_model.embeddings.token_embedding.weight"].shape
    layers = len({k.split(".")[3] for k in ct if k.startswith("text_model.encoder.layers.")})
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_attention_heads=hidden // 64,
        intermediate_size=ct["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0], num_hidden_layers=layers,
        max_position_embeddings=ct["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    # transformers 5 dropped the "text_model." level of CLIPTextModel's state dict (4.x has it)
    strip = not any(k.startswith("text_model.") for k in clip.state_dict())
    res = clip.load_state_dict({(k[len("text_model."):] if strip else k): torch.from_numpy(v.copy())
                                for k, v in ct.items()}, strict=False)
    assert not res.unexpected_keys and all("position_ids" in k for k in res.missing_keys), res
    # T5
    tt = fixtures.read_component(path, "t5xxl")
    vocab, d_model = tt["shared.weight"].shape
    buckets, heads = tt["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    inner = tt["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    t5 = T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, num_heads=heads,
        d_ff=tt["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        num_layers=len({k.split(".")[2] for k in tt if k.startswith("encoder.block.")}),
        relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, is_encoder_decoder=False))
    # encoder.embed_tokens is tied to shared in T5EncoderModel; the file's copy is a duplicate
    # (identical in real files, other random values in the test files): the table is shared.weight
    t5_sd = {k: torch.from_numpy(v.copy()) for k, v in tt.items()}
    t5_sd["encoder.embed_tokens.weight"] = t5_sd["shared.weight"]
    res = t5.load_state_dict(t5_sd, strict=False)
    assert not res.unexpected_keys and not res.missing_keys, res
    assert t5.encoder.embed_tokens.weight.data_ptr() == t5.shared.weight.data_ptr()
    # Flux
    ft = fixtures.read_component(path, "diffusion")
    fh, in_ch = ft["img_in.weight"].shape
    flux = FluxTransformer2DModel(
        patch_size=1, in_channels=in_ch,
        num_layers=len({k.split(".")[1] for k in ft if k.startswith("double_blocks.")}),
        num_single_layers=len({k.split(".")[1] for k in ft if k.startswith("single_blocks.")}),
        attention_head_dim=128, num_attention_heads=fh // 128,
        joint_attention_dim=ft["txt_in.weight"].shape[1],
        pooled_projection_dim=ft["vector_in.in_layer.weight"].shape[1],
        guidance_embeds="guidance_in.in_layer.weight" in ft, axes_dims_rope=(16, 56, 56))
    flux.load_state_dict(_flux_state_dict(ft), strict=True)
    # VAE
    vt = fixtures.read_component(path, "vae")
    levels = len({k.split(".")[2] for k in vt if k.startswith("encoder.down.")})
    blocks = len({k.split(".")[4] for k in vt if k.startswith("encoder.down.0.block.")})
    chans = tuple(vt[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels))
    cfg = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
               up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=chans,
               layers_per_block=blocks, latent_channels=vt["decoder.conv_in.weight"].shape[1],
               norm_num_groups=32, act_fn="silu", use_quant_conv=False, use_post_quant_conv=False,
               mid_block_add_attention=True, scaling_factor=VAE_SCALE, shift_factor=VAE_SHIFT)
    vae = AutoencoderKL(**cfg)
    sd = convert_ldm_vae_checkpoint({"first_stage_model." + k: torch.from_numpy(v.copy()) for k, v in vt.items()},
                                    cfg)
    vae.load_state_dict(sd, strict=True)
    return tuple(m.float().eval() for m in (clip, t5, flux, vae))


# --------------------------------------------------------------------------- reference loop


def reference_tokens(prompt: str, t5_length: int):
    import sentencepiece
    from transformers import CLIPTokenizer

    clip_tok = CLIPTokenizer(os.path.join(TOK, "clip-l", "vocab.json"), os.path.join(TOK, "clip-l", "merges.txt"))
    clip_ids = clip_tok([prompt], padding="max_length", max_length=77, truncation=True)["input_ids"][0]
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(TOK, "t5", "spiece.model"))
    ids = sp.encode(prompt)[: t5_length - 1] + [1]
    t5_ids = ids + [0] * (t5_length - len(ids))
    return np.asarray(clip_ids, np.int64), np.asarray(t5_ids, np.int64)


def reference_sigmas(steps: int, width: int, height: int, compat=None) -> np.ndarray:
    if compat in ("sd.cpp", "llama-box"):  # docs/MODEL.md §4.4, mu = 1.15 fixed
        t = np.linspace(999.0, 0.0, steps) if steps > 1 else np.array([999.0])
        tt = (t + 1.0) / 1000.0
        e = np.exp(1.15)
        return np.append(e / (e + (1.0 / tt - 1.0)), 0.0).astype(np.float32)
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    mu = calculate_shift((height // 16) * (width // 16), 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)
    return sched.sigmas.numpy().astype(np.float32)


def reference_start(steps: int, strength: float, compat=None) -> int:
    if compat in ("sd.cpp", "llama-box"):
        t_enc = int(steps * strength)
        if t_enc == steps:
            t_enc -= 1
        return steps - t_enc - 1
    init_timestep = min(steps * strength, steps)
    return int(max(steps - init_timestep, 0))


def reference_generate(models, *, prompt, width, height, steps, guidance, noise, compat=None,
                       t5_length=None, init=None, strength=None):
    """The decoded image [3, H, W] (float32) and the final latent [16, h, w]."""
    import torch

    clip, t5, flux, vae = models
    if t5_length is None:
        t5_length = {"sd.cpp": 256, "llama-box": 255}.get(compat, 512)
    clip_ids, t5_ids = reference_tokens(prompt, t5_length)
    with torch.no_grad():
        pooled = clip(input_ids=torch.from_numpy(clip_ids)[None]).pooler_output
        ctx = t5(input_ids=torch.from_numpy(t5_ids)[None]).last_hidden_state
        sig = reference_sigmas(steps, width, height, compat)
        x = torch.from_numpy(np.asarray(noise, np.float32).copy())[None]
        start = 0
        if init is not None:
            img = torch.from_numpy(init.astype(np.float32) / 255.0 * 2.0 - 1.0).permute(2, 0, 1)[None]
            mean = vae.encode(img).latent_dist.mode()
            z0 = mean * VAE_SCALE if compat == "llama-box" else (mean - VAE_SHIFT) * VAE_SCALE
            start = reference_start(steps, strength, compat)
            s0 = float(sig[start])
            x = s0 * x + (1.0 - s0) * z0
        c, h, w = x.shape[1:]
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        img_ids = ids.reshape(-1, 3)
        txt_ids = torch.zeros(ctx.shape[1], 3)
        g = torch.full([1], float(guidance))
        for i in range(start, steps):
            packed = x.view(1, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, (h // 2) * (w // 2), c * 4)
            out = flux(hidden_states=packed, timestep=torch.tensor([float(sig[i])]), guidance=g,
                       pooled_projections=pooled, encoder_hidden_states=ctx, txt_ids=txt_ids, img_ids=img_ids,
                       return_dict=False)[0]
            v = out.view(1, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, c, h, w)
            x = x + (float(sig[i + 1]) - float(sig[i])) * v
        z = x / VAE_SCALE if compat == "llama-box" else x / VAE_SCALE + VAE_SHIFT
        decoded = vae.decode(z).sample
    return decoded[0].numpy().astype(np.float32), x[0].numpy().astype(np.float32)


def case_noise(params) -> np.ndarray:
    from fluxmini.rng import initial_noise

    return initial_noise(params["seed"], 16, params["height"] // 8, params["width"] // 8, params.get("compat"))


def run_case(models, name: str):
    p = dict(CASES[name])
    p.pop("seed")  # the noise carries it
    init = init_image(p["width"], p["height"]) if "strength" in p else None
    noise = case_noise(dict(CASES[name]))
    decoded, latent = reference_generate(models, noise=noise, init=init, **p)
    return decoded, latent, noise


def check_against_flux_pipeline(models, name: str = "t2i") -> float:
    """Max |difference| between this loop's final latent and diffusers' own FluxPipeline's for
    a txt2img case (same models, embeddings and packed noise): checks the loop itself."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    clip, t5, flux, vae = models
    p = dict(CASES[name])
    assert "strength" not in p and p.get("compat") is None
    noise = case_noise(p)
    _, latent = reference_generate(models, noise=noise, **{k: v for k, v in p.items() if k != "seed"})
    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=None, text_encoder_2=t5,
                        tokenizer_2=None, transformer=flux)
    pipe.set_progress_bar_config(disable=True)
    clip_ids, t5_ids = reference_tokens(p["prompt"], p.get("t5_length", 512))
    with torch.no_grad():
        pooled = clip(input_ids=torch.from_numpy(clip_ids)[None]).pooler_output
        ctx = t5(input_ids=torch.from_numpy(t5_ids)[None]).last_hidden_state
    c, h, w = noise.shape
    packed = torch.from_numpy(noise)[None].view(1, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    packed = packed.reshape(1, (h // 2) * (w // 2), c * 4)
    out = pipe(prompt_embeds=ctx, pooled_prompt_embeds=pooled, height=p["height"], width=p["width"],
               num_inference_steps=p["steps"], guidance_scale=p["guidance"], latents=packed,
               output_type="latent").images
    theirs = out.view(1, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(c, h, w).numpy()
    return float(np.abs(theirs - latent).max())


def main() -> int:
    import diffusers
    import torch
    import transformers

    models = reference_models(model_path())
    diff = check_against_flux_pipeline(models)
    print(f"this loop vs diffusers FluxPipeline, final latent: max |diff| = {diff:.3g}")
    assert diff <= 1e-5, "the reference loop no longer matches diffusers' FluxPipeline"
    out = {"cases": np.array(json.dumps(CASES, sort_keys=True)), "init_image": init_image(),
           "versions": np.array(f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
                                f"transformers {transformers.__version__}")}
    for name in CASES:
        decoded, latent, noise = run_case(models, name)
        out[f"{name}/decoded"] = decoded
        out[f"{name}/latent"] = latent
        out[f"{name}/noise"] = noise
        print(f"{name}: decoded {decoded.shape} range [{decoded.min():.3f}, {decoded.max():.3f}]")
    np.savez_compressed(GOLDENS, **out)
    print(f"wrote {GOLDENS} ({os.path.getsize(GOLDENS)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
