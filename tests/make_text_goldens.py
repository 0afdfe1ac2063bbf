"""Write tests/data/text_goldens.npz from transformers' CLIPTextModel and T5EncoderModel
(needs torch + transformers).

    python tests/make_text_goldens.py

References, on torch CPU float32 with the tensors the engine sees (tests.fixtures.read_component
dequantizes quantized files):
  * CLIP-L: ``CLIPTextModel(...).pooler_output`` with the config of openai/clip-vit-large-patch14's
    text tower (bos 0, pad 1, eos 2: transformers' legacy pooling, argmax(input_ids), which is
    what FLUX.1's text_encoder config selects).
  * T5: ``T5EncoderModel(...).last_hidden_state`` without an attention mask (as FLUX.1 runs it),
    T5 v1.1 config (gated-gelu with gelu_new, 32 buckets, max distance 128, eps 1e-6).

For F16 / Q8_0 / Q4_0 weights the goldens also carry the size of the error that ggml's
arithmetic itself makes (``*_model_err``: RMS, ``*_model_max``: max-abs): the same torch
reference run once more with the activations rounded the way ggml's CPU backend rounds them
(``ggml_arithmetic``): the input of every Linear rounded to F16 (F16 weights) or quantized to
Q8_0 blocks of 32 with an F16 scale (Q8_0 / Q4_0 weights), and GELU / quick GELU read from
ggml's F16 tables. Both are relative to the exact reference (RMS of the difference over RMS of
the reference; max |difference| over max |reference|). The tests allow the engine's difference
from the exact reference to be a little larger than that (rounding flips make the engine and
the model differ slightly: see tests/test_text_encoders.py).

Inputs: token ids from fluxmini.tokenizers on a few prompts, and random ids from fixed seeds;
all are stored next to the outputs. Models: the deterministic tiny models of tests/fixtures.py
(CLIP width 64 = 1 head, T5 width 64 with 4 heads of 16, 2 layers each, full vocabularies).
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDENS = os.path.join(HERE, "data", "text_goldens.npz")
sys.path.insert(0, HERE)

import fixtures  # noqa: E402
from fluxmini.inventory import LAYOUT_PREFIXES, component_tensors, tiny_dims  # noqa: E402
from fluxmini.tokenizers import tokenize_clip, tokenize_t5  # noqa: E402

WEIGHT_TYPES = ("f32", "f16", "q8_0", "q4_0")
QUANT = ("q8_0", "q4_0")
CLIP_VOCAB, CLIP_BOS, CLIP_EOS = 49408, 49406, 49407
T5_VOCAB = 32128


def tensor_types(big: str) -> dict:
    """Types of the text-encoder tensors, as in gpustack's files (docs/MODEL.md §1.1, §1.4): FP16 files
    hold every CLIP/T5 tensor in F16, 1-D ones included; quantized files quantize T5's RMSNorm
    weights too, and the "pure" files CLIP's LayerNorm weights and position embedding, with
    biases in their source type (F16 here). Tensors whose rows are not whole blocks keep the
    source type (the tiny T5's relative-position table, 4 heads wide: stored F16 here)."""
    dims = tiny_dims()
    out = {}
    for comp in ("clip_l", "t5xxl"):
        prefix = LAYOUT_PREFIXES["gpustack"][comp]
        for name, shape in component_tensors(comp, dims):
            full = prefix + name
            if big == "f16":
                out[full] = "f16"
            elif big in QUANT:
                if name.endswith(".bias") or shape[-1] % 32:
                    out[full] = "f16"
                else:
                    out[full] = big
    return out


def model_path(big: str):
    """The tiny CLIP-L + T5 model with `big` weights, cached in tests/_models."""
    types = tensor_types(big) if big != "f32" else None
    return fixtures.cached_model(f"text-{big}", big_type=big, components=("clip_l", "t5xxl"), types=types)


PROMPTS = [
    "a lovely cat",
    "A photo of an astronaut riding a horse on the moon",
    "",
    "cinematic still of a lighthouse on a cliff at dusk, volumetric fog, 35mm, highly detailed, "
    "golden hour, dramatic clouds, waves crashing on the rocks below, a lone seagull, film grain, "
    "muted teal and orange palette, wide angle, sharp focus, award winning photograph, trending",
]


def clip_cases():
    """(name, weight type, ids [77]) for every CLIP golden."""
    cases = []
    for i, p in enumerate(PROMPTS):
        cases.append((f"prompt{i}", "f32", tokenize_clip(p)))
    rng = np.random.default_rng(401)
    cases.append(("random", "f32", rng.integers(0, CLIP_VOCAB, 77).astype(np.int32)))
    # The largest id twice: the FIRST of them is pooled (torch.argmax's tie rule).
    ids = rng.integers(0, 40000, 77).astype(np.int32)
    ids[[20, 50]] = 45000
    cases.append(("tie", "f32", ids))
    # EOS in the middle with text after it (not padding): the EOS is pooled.
    ids = tokenize_clip("a red fox in the snow, oil painting")
    n = int(np.argmax(ids == CLIP_EOS))
    ids[n + 1:n + 30] = rng.integers(1000, 40000, 29)
    cases.append(("eos_mid", "f32", ids))
    # No EOS at all: the largest id is pooled.
    cases.append(("no_eos", "f32", rng.integers(0, CLIP_EOS, 77).astype(np.int32)))
    for big in ("f16", "q8_0", "q4_0"):
        cases.append((f"prompt1_{big}", big, tokenize_clip(PROMPTS[1])))
        cases.append((f"random_{big}", big, np.random.default_rng(402).integers(0, CLIP_VOCAB, 77).astype(np.int32)))
    return cases


def t5_cases():
    """(name, weight type, ids [L]) for every T5 golden."""
    rng = np.random.default_rng(501)
    cases = [
        ("prompt3_512", "f32", tokenize_t5(PROMPTS[3], 512)),
        ("prompt1_256", "f32", tokenize_t5(PROMPTS[1], 256)),
        ("random_7", "f32", rng.integers(0, T5_VOCAB, 7).astype(np.int32)),
        ("random_77", "f32", rng.integers(0, T5_VOCAB, 77).astype(np.int32)),
        ("empty_1", "f32", tokenize_t5("", 1)),  # just </s>
        ("prompt0_256_f16", "f16", tokenize_t5(PROMPTS[0], 256)),
        ("prompt1_256_q8_0", "q8_0", tokenize_t5(PROMPTS[1], 256)),
        ("random_9_q8_0", "q8_0", rng.integers(0, T5_VOCAB, 9).astype(np.int32)),
        ("prompt3_512_q4_0", "q4_0", tokenize_t5(PROMPTS[3], 512)),
        ("random_9_q4_0", "q4_0", rng.integers(0, T5_VOCAB, 9).astype(np.int32)),
    ]
    return cases


# ------------------------------------------------------------------------------- references


def clip_reference(path):
    """transformers CLIPTextModel (float32, eval) holding the CLIP-L tensors of `path`."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    t = fixtures.read_component(path, "clip_l")
    vocab, hidden = t["text_model.embeddings.token_embedding.weight"].shape
    layers = len({k.split(".")[3] for k in t if k.startswith("text_model.encoder.layers.")})
    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=t["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=hidden // 64,
        max_position_embeddings=t["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
        # openai/clip-vit-large-patch14 (and FLUX.1's text_encoder) config values:
        bos_token_id=0, pad_token_id=1, eos_token_id=2)
    model = CLIPTextModel(cfg).float().eval()
    # transformers 5.x's CLIPTextModel has no `text_model.` level any more.
    sd = {k.removeprefix("text_model."): torch.from_numpy(v.copy()) for k, v in t.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model


def t5_reference(path):
    """transformers T5EncoderModel (float32, eval) holding the T5 tensors of `path`."""
    import torch
    from transformers import T5Config, T5EncoderModel

    t = fixtures.read_component(path, "t5xxl")
    t.pop("encoder.embed_tokens.weight", None)  # duplicate of shared.weight, tied in the model
    vocab, d_model = t["shared.weight"].shape
    buckets, heads = t["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    inner = t["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    layers = len({k.split(".")[2] for k in t if k.startswith("encoder.block.")})
    cfg = T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, num_heads=heads, num_layers=layers,
        d_ff=t["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", layer_norm_epsilon=1e-6,
        dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
    model = T5EncoderModel(cfg).float().eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in t.items()}, strict=False)
    assert not unexpected and missing == ["encoder.embed_tokens.weight"], (missing, unexpected)
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    return model


def _round_activation(x, big: str):
    """The rounding ggml's CPU matmul applies to F32 activations for weights of type `big`."""
    import torch

    if big == "f16":
        return x.half().float()
    if big in QUANT:  # quantize_row_q8_0: per 32 values, d = amax/127 kept in F16, q = rne(x·127/amax)
        shape = x.shape
        b = x.reshape(-1, 32)
        amax = b.abs().amax(1, keepdim=True)
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        return (torch.round(b * inv) * (amax / 127.0).half().float()).reshape(shape)
    return x


def _gelu_table(x):
    """ggml_gelu on CPU: 0 below -10, x above 10, else an F16 table of tanh-GELU at F16(x)."""
    import torch

    h = x.half().double()
    g = (0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * h * (1 + 0.044715 * h * h)))).float().half().float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, g))


def _quick_gelu_table(x):
    """ggml_gelu_quick on CPU: an F16 table of x·sigmoid(1.702x) at F16(x)."""
    import torch

    h = x.half().double()
    return (h * torch.sigmoid(1.702 * h)).float().half().float()


def ggml_arithmetic(model, big: str):
    """Makes `model` round its activations as ggml's CPU backend does for `big` weights."""
    import torch

    class Table(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x)

    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(lambda m, args: (_round_activation(args[0], big),))
    for mod in list(model.modules()):
        if hasattr(mod, "activation_fn") and isinstance(mod.activation_fn, torch.nn.Module):  # CLIP MLP
            mod.activation_fn = Table(_quick_gelu_table)
        if hasattr(mod, "act") and isinstance(mod.act, torch.nn.Module):  # T5 gated FF
            mod.act = Table(_gelu_table)
    return model


def clip_forward(model, ids):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(ids, np.int64))[None])
    return out.pooler_output[0].numpy().astype(np.float32)


def t5_forward(model, ids):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(ids, np.int64))[None])
    return out.last_hidden_state[0].numpy().astype(np.float32)


def rms_rel(a, ref) -> float:
    """RMS of (a − ref) relative to the RMS of ref."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((a - ref) ** 2) / np.mean(ref ** 2)))


def max_rel(a, ref) -> float:
    """max |a − ref| relative to max |ref|."""
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


class References:
    """Reference models per (network, weight type, arithmetic), built on first use."""

    def __init__(self):
        self._cache = {}

    def get(self, net: str, big: str, emulate: bool):
        key = (net, big, emulate)
        if key not in self._cache:
            build = clip_reference if net == "clip" else t5_reference
            m = build(model_path(big))
            self._cache[key] = ggml_arithmetic(m, big) if emulate else m
        return self._cache[key]

    def outputs(self, net: str, big: str, ids):
        """(exact reference output, RMS and max relative error of ggml's arithmetic model;
        both 0 for F32 weights)."""
        fwd = clip_forward if net == "clip" else t5_forward
        ref = fwd(self.get(net, big, False), ids)
        if big == "f32":
            return ref, 0.0, 0.0
        emu = fwd(self.get(net, big, True), ids)
        return ref, rms_rel(emu, ref), max_rel(emu, ref)


def main():
    import torch

    torch.set_num_threads(2)
    refs = References()
    out = {}
    for net, cases in (("clip", clip_cases()), ("t5", t5_cases())):
        for name, big, ids in cases:
            ref, err, emax = refs.outputs(net, big, ids)
            key = f"{net}_{name}"
            out[key + "_ids"] = np.asarray(ids, np.int32)
            out[key + "_out"] = ref
            out[key + "_model_err"] = np.float64(err)
            out[key + "_model_max"] = np.float64(emax)
            print(f"{key}: {big} n={len(ids)} max|out|={np.abs(ref).max():.3f} "
                  f"ggml-arithmetic error rms {err:.2e} max {emax:.2e}")
    np.savez_compressed(GOLDENS, **out)
    print(f"wrote {GOLDENS} ({os.path.getsize(GOLDENS)} bytes)")


if __name__ == "__main__":
    main()
