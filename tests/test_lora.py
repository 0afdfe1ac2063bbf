"""LoRA at run time (python/fluxmini/lora.py, csrc/network.cpp set_adapters, linear() in csrc/layers.cpp).

One set of random low-rank factors, given per BFL (fused) layer, is written in each format the
engine reads, and the engine's transformer output is compared with:

* diffusers' FluxTransformer2DModel + ``load_lora_adapter`` (PEFT), for the formats diffusers
  reads (diffusers/PEFT, kohya), within the F32 bound of tests/test_flux.py (1e-4 relative) and,
  for Q8_0/Q4_0 models, its quantized bound (3e-2, same reasoning: the reference runs on the
  dequantized weights);
* a torch reference of the FluxKits formula for XLabs files: diffusers + PEFT for the parts that
  are ordinary LoRAs (qkv_lora*, double-block proj_lora*, single-block qkv_lora on linear1's first
  3·hidden rows) plus a forward hook on each single block's proj_out (BFL linear2) adding
  ``proj_lora(out)`` to its output, as FluxKits' SingleStreamBlockLoraProcessor does;
* each other: all four formats of the same factors give the same output (1e-5 relative: the
  same graph, up to float32 rounding of alpha/rank folded into the factors).

Every LoRA here moves the output by far more than the tolerances (asserted), so a LoRA that is
ignored fails.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import make_flux_goldens as G
from fluxmini.errors import FluxMiniError, FluxMiniFileError, FluxMiniValueError
from fluxmini.model import FluxMini
from fluxmini.safetensors_io import write_safetensors

RANK = 4
TOL = {"f32": 1e-4, "q8_0": 3e-2, "q4_0": 3e-2}  # tests/test_flux.py, same reasons
SAME = 1e-5                                       # two files of the same factors
EFFECT = 3e-2                                     # least relative change a test LoRA makes
CASE = (12, 10, 0.7, 3.5, 9, 11)                  # latent h, w, sigma, guidance, text tokens, seed

_MODELS: dict = {}


def engine(name: str = "f32") -> FluxMini:
    if name not in _MODELS:
        _MODELS[name] = FluxMini.load(G.model_path(name), components=["diffusion"], threads=2)
    m = _MODELS[name]
    m.set_loras(None)
    return m


def inputs(name: str = "f32"):
    h, w, sigma, guidance, n_txt, seed = CASE
    latent, t5, pooled = G.case_inputs(h, w, n_txt, seed, G.model_dims(name).flux)
    return latent, sigma, guidance, t5, pooled


def run(m: FluxMini, name: str = "f32") -> np.ndarray:
    return m.transformer(*inputs(name))


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------------------------
# Factors and file writers

def dims():
    f = G.model_dims("f32").flux
    h = f.hidden
    return h, 4 * h, f.depth, f.depth_single


def factors(seed: int, full: bool = True) -> dict:
    """{BFL layer: (down [r, in], up [out, r])} in float32. full=False: only what XLabs can say
    (qkv and proj of the double blocks, the q/k/v rows of linear1: its MLP rows are zero)."""
    h, m, depth, single = dims()
    rng = np.random.default_rng(seed)

    def pair(n_in, n_out, gain=0.5):
        a = (rng.standard_normal((RANK, n_in)) / np.sqrt(n_in)).astype(np.float32)
        b = (gain * rng.standard_normal((n_out, RANK)) / np.sqrt(RANK)).astype(np.float32)
        return a, b
    out = {}
    for i in range(depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            out[p + "attn.qkv"] = pair(h, 3 * h)
            out[p + "attn.proj"] = pair(h, h)
            if full:
                out[p + "mlp.0"] = pair(h, m)
                out[p + "mlp.2"] = pair(m, h)
                out[p + "mod.lin"] = pair(h, 6 * h, 0.05)
    for i in range(single):
        p = f"single_blocks.{i}."
        a, b = pair(h, 3 * h + m)
        if not full:
            b[3 * h:] = 0
        out[p + "linear1"] = (a, b)
        if full:
            out[p + "linear2"] = pair(h + m, h)
            out[p + "modulation.lin"] = pair(h, 3 * h, 0.05)
    if full:
        out["img_in"] = pair(64, h)
        out["txt_in"] = pair(64, h)
        out["time_in.in_layer"] = pair(256, h, 0.05)
        out["vector_in.out_layer"] = pair(h, h, 0.05)
        out["guidance_in.in_layer"] = pair(256, h, 0.05)
        out["final_layer.linear"] = pair(h, 64)
        out["final_layer.adaLN_modulation.1"] = pair(h, 2 * h, 0.05)
    return out


def _diffusers_parts(name: str):
    """diffusers module(s) of one BFL layer: [(module, (row_a, row_b))]."""
    h, m, _, _ = dims()
    k = name.split(".")
    if k[0] == "double_blocks":
        tb, s, rest = f"transformer_blocks.{k[1]}.", k[2].split("_")[0], ".".join([k[2].split("_", 1)[1]] + k[3:])
        if rest == "attn.qkv":
            names = ["to_q", "to_k", "to_v"] if s == "img" else ["add_q_proj", "add_k_proj", "add_v_proj"]
            return [(tb + "attn." + n, (j * h, (j + 1) * h)) for j, n in enumerate(names)]
        ff = "ff" if s == "img" else "ff_context"
        single = {"attn.proj": "attn.to_out.0" if s == "img" else "attn.to_add_out",
                  "mlp.0": f"{ff}.net.0.proj", "mlp.2": f"{ff}.net.2",
                  "mod.lin": "norm1.linear" if s == "img" else "norm1_context.linear"}[rest]
        return [(tb + single, None)]
    if k[0] == "single_blocks":
        tb, rest = f"single_transformer_blocks.{k[1]}.", ".".join(k[2:])
        if rest == "linear1":
            return [(tb + "attn.to_q", (0, h)), (tb + "attn.to_k", (h, 2 * h)), (tb + "attn.to_v", (2 * h, 3 * h)),
                    (tb + "proj_mlp", (3 * h, 3 * h + m))]
        return [(tb + {"linear2": "proj_out", "modulation.lin": "norm.linear"}[rest], None)]
    return [({"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
              "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
              "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
              "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
              "final_layer.adaLN_modulation.1": "norm_out.linear"}[name], None)]


def peft_dict(f: dict, alpha: float | None = None) -> dict:
    """diffusers/PEFT keys (split q/k/v/proj_mlp; all-zero parts left out: missing parts are zero).
    With alpha the ups are divided by alpha/rank so the effective factors stay the same."""
    h = dims()[0]
    c = 1.0 if alpha is None else RANK / alpha
    out = {}
    for name, (a, b) in f.items():
        if name == "final_layer.adaLN_modulation.1":
            b = np.concatenate([b[h:], b[:h]])  # diffusers' norm_out is (scale, shift)
        for mod, rows in _diffusers_parts(name):
            part = b if rows is None else b[rows[0]:rows[1]]
            if not part.any():
                continue
            out[f"transformer.{mod}.lora_A.weight"] = a.copy()
            out[f"transformer.{mod}.lora_B.weight"] = np.ascontiguousarray(part * c)
    return out


def peft_metadata(sd: dict, alpha: float) -> dict:
    """What diffusers saves as ``lora_adapter_metadata``: the LoraConfig, keys prefixed by component."""
    modules = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in sd})
    return {"transformer.r": RANK, "transformer.lora_alpha": alpha, "transformer.target_modules": modules}


def kohya_dict(f: dict, alpha: float) -> dict:
    out = {}
    for name, (a, b) in f.items():
        k = "lora_unet_" + name.replace(".", "_")
        out[k + ".lora_down.weight"] = a
        out[k + ".lora_up.weight"] = b * (RANK / alpha)
        out[k + ".alpha"] = np.array(alpha, np.float32)
    return out


def bfl_dict(f: dict) -> dict:
    out = {}
    for name, (a, b) in f.items():
        out[f"diffusion_model.{name}.lora_A.weight"] = a
        out[f"diffusion_model.{name}.lora_B.weight"] = b
    return out


def xlabs_dict(f: dict, single_proj: dict | None = None) -> dict:
    """FluxKits keys of the XLabs-expressible factors (factors(full=False)); single_proj:
    {block: (down, up)} for the single blocks' output-residual proj_lora."""
    h = dims()[0]
    out = {}
    for name, (a, b) in f.items():
        k = name.split(".")
        if k[0] == "double_blocks":
            n = {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1", "txt_attn.qkv": "qkv_lora2",
                 "txt_attn.proj": "proj_lora2"}[".".join(k[2:])]
        else:
            assert k[2] == "linear1" and not b[3 * h:].any()
            n, b = "qkv_lora", b[:3 * h]
        out[f"{k[0]}.{k[1]}.processor.{n}.down.weight"] = a
        out[f"{k[0]}.{k[1]}.processor.{n}.up.weight"] = np.ascontiguousarray(b)
    for i, (a, b) in (single_proj or {}).items():
        out[f"single_blocks.{i}.processor.proj_lora.down.weight"] = a
        out[f"single_blocks.{i}.processor.proj_lora.up.weight"] = b
    return out


def write(path, tensors: dict, metadata=None) -> str:
    write_safetensors(path, tensors, metadata=metadata)
    return str(path)


def write_gguf(path, tensors: dict) -> str:
    import gguf

    w = gguf.GGUFWriter(str(path), "lora")
    for k, v in tensors.items():
        w.add_tensor(k, np.asarray(v, np.float32).reshape(-1) if v.ndim == 0 else v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# ----------------------------------------------------------------------------------------------
# Reference (torch + diffusers + peft)

def reference(name: str, peft_sd: dict | None, metadata: dict | None = None, network_alphas=None, scale=1.0,
              hooks: dict | None = None):
    """diffusers' output with the PEFT state dict loaded as an adapter (its scale `scale`), and
    hooks {single block: (down, up)} adding up(down(out)) to that block's proj_out output."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    model = G.reference_model(G.model_path(name))
    if peft_sd:
        sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in peft_sd.items()}
        model.load_lora_adapter(sd, prefix="transformer", adapter_name="t", metadata=metadata,
                                network_alphas=network_alphas)
        model.set_adapters(["t"], weights=[scale])
    for i, (a, b) in (hooks or {}).items():
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        model.single_transformer_blocks[i].proj_out.register_forward_hook(
            lambda mod, args, out, ta=ta, tb=tb: out + (out @ ta.T) @ tb.T)
    return G.reference_forward(model, *inputs(name))


# ----------------------------------------------------------------------------------------------
# Against diffusers

@pytest.mark.parametrize("name", ["f32", "q8_0", "q4_0"])
def test_peft_matches_diffusers(tmp_path, name):
    f = factors(1)
    alpha = 8.0
    sd = peft_dict(f, alpha)
    md = peft_metadata(sd, alpha)
    path = write(tmp_path / "peft.safetensors", sd, {"lora_adapter_metadata": json.dumps(md), "format": "pt"})
    m = engine(name)
    base = run(m, name)
    m.set_loras([(path, 0.8)])
    got = run(m, name)
    want = reference(name, sd, metadata=md, scale=0.8)
    assert rel(want, base) > EFFECT
    err = rel(got, want)
    assert err <= TOL[name], f"{name}: relative error {err:.3g} against diffusers + PEFT"


def test_kohya_matches_diffusers(tmp_path):
    """kohya keys (BFL names, .alpha), read by diffusers' own kohya converter. Without linear1:
    that converter splits it with FLUX.1-dev's hard-coded widths (3072, 12288), which the tiny
    model does not have (linear1 in kohya form is covered by test_formats_agree)."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from diffusers import FluxPipeline

    f = {k: v for k, v in factors(2).items() if not k.endswith("linear1")}
    sd = kohya_dict(f, alpha=2.0)
    # diffusers' kohya converter drops the final layer's .alpha ("TODO: alphas"), i.e. uses scale 1
    # there; kohya's (and sd.cpp's) meaning is alpha/rank, so give those two alpha = rank.
    for k in ("final_layer.linear", "final_layer.adaLN_modulation.1"):
        u = "lora_unet_" + k.replace(".", "_")
        sd[u + ".lora_up.weight"] = f[k][1]
        sd[u + ".alpha"] = np.array(float(RANK), np.float32)
    path = write(tmp_path / "kohya.safetensors", sd)
    m = engine()
    m.set_loras([(path, -0.6)])
    got = run(m)
    sd = FluxPipeline.lora_state_dict(path)
    sd = sd[0] if isinstance(sd, tuple) else sd
    sd = {(k if k.startswith("transformer.") else "transformer." + k): v.numpy() for k, v in sd.items()}
    assert len(sd) == 2 * sum(len(_diffusers_parts(k)) for k in f)  # diffusers converted every key
    want = reference("f32", sd, scale=-0.6)
    assert rel(want, run(engine())) > EFFECT
    err = rel(got, want)
    assert err <= TOL["f32"], f"relative error {err:.3g} against diffusers' kohya reading"


def test_xlabs_matches_fluxkits_formula(tmp_path):
    h, m_, _, single = dims()
    f = factors(3, full=False)
    rng = np.random.default_rng(33)
    proj = {i: ((rng.standard_normal((RANK, h)) / np.sqrt(h)).astype(np.float32),
                (0.5 * rng.standard_normal((h, RANK)) / np.sqrt(RANK)).astype(np.float32)) for i in range(single)}
    path = write(tmp_path / "xlabs.safetensors", xlabs_dict(f, proj))
    m = engine()
    m.set_loras([path])
    got = run(m)
    want = reference("f32", peft_dict(f), hooks=proj)
    without_proj = reference("f32", peft_dict(f))
    assert rel(want, without_proj) > EFFECT  # the output residual matters
    err = rel(got, want)
    assert err <= TOL["f32"], f"relative error {err:.3g} against the FluxKits formula"


# ----------------------------------------------------------------------------------------------
# Equivalences

def test_formats_agree(tmp_path):
    f = factors(4, full=False)
    paths = {
        "peft": write(tmp_path / "p.safetensors", peft_dict(f, 2.0),
                      {"lora_adapter_metadata": json.dumps(peft_metadata(peft_dict(f, 2.0), 2.0))}),
        "kohya": write(tmp_path / "k.safetensors", kohya_dict(f, 16.0)),
        "bfl": write(tmp_path / "b.safetensors", bfl_dict(f)),
        "xlabs": write(tmp_path / "x.safetensors", xlabs_dict(f)),
        "bfl_gguf": write_gguf(tmp_path / "b.gguf", bfl_dict(f)),
        "kohya_gguf": write_gguf(tmp_path / "k.gguf", kohya_dict(f, 16.0)),
    }
    m = engine()
    base = run(m)
    outs = {}
    for k, p in paths.items():
        m.set_loras([(p, 1.3)])
        outs[k] = run(m)
    assert rel(outs["bfl"], base) > EFFECT
    for k, y in outs.items():
        assert rel(y, outs["bfl"]) <= SAME, k
    # the full set (MLPs, modulations, embedders, final layer) in the three formats that have it
    f = factors(5)
    full = {"peft": write(tmp_path / "pf.safetensors", peft_dict(f)),
            "kohya": write(tmp_path / "kf.safetensors", kohya_dict(f, RANK)),
            "bfl": write(tmp_path / "bf.safetensors", bfl_dict(f))}
    outs = {}
    for k, p in full.items():
        m.set_loras([p])
        outs[k] = run(m)
    for k, y in outs.items():
        assert rel(y, outs["bfl"]) <= SAME, k


def test_scale_zero_is_no_lora_and_set_is_cheap(tmp_path):
    p = write(tmp_path / "b.safetensors", bfl_dict(factors(6)))
    m = engine()
    base = run(m)
    m.set_loras([(p, 0.0)])
    np.testing.assert_array_equal(run(m), base)
    m.set_loras([(p, 1.0)])
    with_lora = run(m)
    assert rel(with_lora, base) > EFFECT
    assert m.loras == [(p, 1.0)]
    assert m.set_loras([(p, 1.0)]) == [] and m.loras == [(p, 1.0)]  # same set: nothing reloaded
    np.testing.assert_array_equal(run(m), with_lora)
    m.set_loras([])
    np.testing.assert_array_equal(run(m), base)  # removed exactly


def test_two_loras_are_their_sum(tmp_path):
    f1, f2 = factors(7), factors(8)
    s1, s2 = 0.7, -1.3
    both = {k: (np.concatenate([f1[k][0], f2[k][0]]), np.concatenate([s1 * f1[k][1], s2 * f2[k][1]], axis=1))
            for k in f1}
    p1 = write(tmp_path / "1.safetensors", bfl_dict(f1))
    p2 = write(tmp_path / "2.safetensors", kohya_dict(f2, 2.0))
    p12 = write(tmp_path / "12.safetensors", bfl_dict(both))
    m = engine()
    m.set_loras([(p1, s1), (p2, s2)])
    two = run(m)
    m.set_loras([p12])
    one = run(m)
    m.set_loras([(p1, s1)])
    assert rel(run(m), one) > EFFECT
    assert rel(two, one) <= SAME


def test_factor_types_kept(tmp_path):
    """F16 and BF16 factors are used as stored (the engine's buffer holds their own bytes: half of
    F32's) and give the F32 result of the same (rounded) values within F16 activation rounding."""
    import gguf

    f = factors(9)
    m = engine()
    p32 = write(tmp_path / "f32.safetensors", bfl_dict(f))
    m.set_loras([p32])
    y32, bytes32 = run(m), m.lora_bytes()
    sd16 = {k: v.astype(np.float16) for k, v in bfl_dict(f).items()}
    m.set_loras([write(tmp_path / "f16.safetensors", sd16)])
    y16, bytes16 = run(m), m.lora_bytes()
    assert bytes16 * 2 == bytes32
    sdbf = {k: gguf.quants.quantize(v, gguf.GGMLQuantizationType.BF16) for k, v in bfl_dict(f).items()}
    path_bf = tmp_path / "bf16.gguf"
    w = gguf.GGUFWriter(str(path_bf), "lora")
    for k, v in sdbf.items():
        w.add_tensor(k, v, raw_shape=v.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m.set_loras([str(path_bf)])
    ybf, bytesbf = run(m), m.lora_bytes()
    assert bytesbf == bytes16
    # F16: ggml rounds the activations fed to F16 factors to F16 too (2e-3, tests/test_flux.py's
    # F16 bound); BF16 values have 8 mantissa bits (relative rounding 2^-9 per factor): 1e-2.
    assert rel(y16, y32) <= 2e-3
    assert rel(ybf, y32) <= 1e-2


# ----------------------------------------------------------------------------------------------
# Bad inputs

def _dev_lora(tmp_path) -> str:
    """kohya keys of a FLUX.1-dev-shaped LoRA (19 double, 38 single blocks) at this width."""
    h = dims()[0]
    rng = np.random.default_rng(10)
    sd = {}
    for kind, n, outs in (("double_blocks", 19, {"img_attn_qkv": 3 * h}), ("single_blocks", 38, {"linear1": 3 * h + 4 * h})):
        for i in range(n):
            for lay, o in outs.items():
                k = f"lora_unet_{kind}_{i}_{lay}"
                sd[k + ".lora_down.weight"] = rng.standard_normal((RANK, h)).astype(np.float32) * 0.05
                sd[k + ".lora_up.weight"] = rng.standard_normal((o, RANK)).astype(np.float32) * 0.05
    return write(tmp_path / "dev.safetensors", sd)


def test_flux_dev_lora_refused_unless_not_strict(tmp_path):
    p = _dev_lora(tmp_path)
    m = engine()
    base = run(m)
    with pytest.raises(FluxMiniValueError) as e:
        m.set_loras([p])
    msg = str(e.value)
    assert "2 double and 3 single blocks" in msg and "FLUX.1-dev" in msg and "strict=False" in msg
    assert "lora_unet_double_blocks_2_img_attn_qkv" in msg
    np.testing.assert_array_equal(run(m), base)  # nothing applied
    report = m.set_loras([p], strict=False)
    (path, keys), = report
    names = {k for k, _ in keys}
    assert len(names) == 2 * ((19 - 2) + (38 - 3))
    assert "lora_unet_single_blocks_37_linear1.lora_up.weight" in names
    assert "lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight" not in names
    assert rel(run(m), base) > 1e-3


def test_shape_mismatch_names_the_tensor(tmp_path):
    f = factors(11)
    sd = bfl_dict(f)
    sd["diffusion_model.double_blocks.1.txt_mlp.0.lora_A.weight"] = np.zeros((RANK, 300), np.float32)
    m = engine()
    with pytest.raises(FluxMiniValueError, match=r"double_blocks\.1\.txt_mlp\.0\.lora_A\.weight"):
        m.set_loras([write(tmp_path / "bad.safetensors", sd)])
    sd = peft_dict(f)
    sd["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] = np.zeros((100, RANK), np.float32)
    with pytest.raises(FluxMiniValueError, match=r"to_k\.lora_B\.weight"):
        m.set_loras([write(tmp_path / "bad2.safetensors", sd)])
    sd = bfl_dict(f)
    sd["diffusion_model.img_in.lora_B.weight"] = np.zeros((256, RANK + 1), np.float32)
    with pytest.raises(FluxMiniValueError, match=r"img_in\.lora_B\.weight"):
        m.set_loras([write(tmp_path / "bad3.safetensors", sd)])


def test_bad_files(tmp_path):
    m = engine()
    good = write(tmp_path / "good.safetensors", bfl_dict(factors(12)))
    # NaN in a factor
    sd = bfl_dict(factors(12))
    sd["diffusion_model.single_blocks.2.linear2.lora_B.weight"][3, 1] = np.nan
    with pytest.raises(FluxMiniValueError, match=r"single_blocks\.2\.linear2\.lora_B\.weight.*NaN"):
        m.set_loras([write(tmp_path / "nan.safetensors", sd)])
    # not a LoRA: a model file
    with pytest.raises(FluxMiniValueError, match="not a LoRA"):
        m.set_loras([str(G.model_path("f32"))])
    with pytest.raises(FluxMiniValueError, match="not a LoRA"):
        m.set_loras([write(tmp_path / "w.safetensors", {"img_in.weight": np.zeros((8, 8), np.float32)})])
    # truncated (safetensors and GGUF)
    data = open(good, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(FluxMiniFileError):
        m.set_loras([str(cut)])
    g = write_gguf(tmp_path / "g.gguf", bfl_dict(factors(12)))
    data = open(g, "rb").read()
    cutg = tmp_path / "cut.gguf"
    cutg.write_bytes(data[: len(data) // 2])
    with pytest.raises(FluxMiniFileError):
        m.set_loras([str(cutg)])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(FluxMiniFileError):
        m.set_loras([str(garbage)])
    with pytest.raises(FluxMiniFileError, match="not found"):
        m.set_loras([str(tmp_path / "missing.safetensors")])
    # unsupported adapter kinds are reported, not dropped
    sd = bfl_dict(factors(12))
    sd["diffusion_model.img_in.hada_w1_a"] = np.zeros((2, 2), np.float32)
    with pytest.raises(FluxMiniValueError, match="hada_w1_a"):
        m.set_loras([write(tmp_path / "loha.safetensors", sd)])
    # bad arguments
    for bad in ([(good, float("nan"))], [(good, "1")], [3], [(good, 1.0, 2.0)]):
        with pytest.raises(FluxMiniValueError):
            m.set_loras(bad)
    # nothing was applied by any of these
    m.set_loras([good])
    assert m.loras == [(good, 1.0)]
    for exc in (FluxMiniFileError, FluxMiniValueError):
        assert issubclass(exc, FluxMiniError)


def test_cli_lora_argument():
    from fluxmini.lora import parse_lora_arg

    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_arg("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert parse_lora_arg("C:/x/style.safetensors:-1.5") == ("C:/x/style.safetensors", -1.5)
    assert parse_lora_arg("C:/x/style.safetensors") == ("C:/x/style.safetensors", 1.0)
    with pytest.raises(FluxMiniValueError):
        parse_lora_arg("a.safetensors:nan")


# ----------------------------------------------------------------------------------------------
# End to end: generate(loras=...), the PNG metadata, the CLI

def test_generate_with_lora_and_metadata(tmp_path):
    import subprocess
    import sys

    import fluxmini
    import make_pipeline_goldens as ref

    model_path = str(ref.model_path())
    tiny = FluxMini.load(model_path, threads=2)
    p = write(tmp_path / "style.safetensors", bfl_dict(factors(13)))
    kw = dict(width=32, height=32, steps=2, seed=5, t5_length=16, progress=False)
    plain = np.asarray(tiny.generate("a fox", **kw))
    with_lora = tiny.generate("a fox", loras=[(p, 0.8)], **kw)
    assert tiny.loras == []  # one call only
    assert with_lora.info["loras"] == "style.safetensors:0.8"
    assert np.abs(np.asarray(with_lora).astype(int) - plain).max() > 0
    np.testing.assert_array_equal(np.asarray(tiny.generate("a fox", **kw)), plain)
    loaded = FluxMini.load(model_path, threads=2, loras=[(p, 0.8)])
    np.testing.assert_array_equal(np.asarray(loaded.generate("a fox", **kw)), np.asarray(with_lora))

    out = tmp_path / "o.png"
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(fluxmini.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([pkg_parent, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "fluxmini.cli", "generate", "-m", model_path, "-p", "a fox", "-o",
                        str(out), "-W", "32", "-H", "32", "--steps", "2", "-s", "5", "-t", "2", "--t5-length", "16",
                        "-q", "--lora", f"{p}:0.8"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert fluxmini.read_metadata(out)["loras"] == "style.safetensors:0.8"
    from PIL import Image

    with Image.open(out) as im:
        np.testing.assert_array_equal(np.asarray(im), np.asarray(with_lora))
    # --lora-mode merge (an F32 model): the same image up to float32 summation order, i.e. at most
    # one level where a pixel sits at a rounding boundary
    r = subprocess.run([sys.executable, "-m", "fluxmini.cli", "generate", "-m", model_path, "-p", "a fox", "-o",
                        str(out), "-W", "32", "-H", "32", "--steps", "2", "-s", "5", "-t", "2", "--t5-length", "16",
                        "-q", "--lora", f"{p}:0.8", "--lora-mode", "merge"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert np.abs(np.asarray(im).astype(int) - np.asarray(with_lora)).max() <= 1
    dev = _dev_lora(tmp_path)
    r = subprocess.run([sys.executable, "-m", "fluxmini.cli", "generate", "-m", model_path, "-o", str(out),
                        "--lora", dev], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "FLUX.1-dev" in r.stderr and "Traceback" not in r.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_server_lora_field(tmp_path):
    """``lora`` names files of the server's --lora-dir only; the image equals generate(loras=...)."""
    import base64
    import io

    from PIL import Image

    import fluxmini
    import make_pipeline_goldens as ref
    from serverutil import LiveServer, request

    model_path = ref.model_path()
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    p = write(lora_dir / "style.safetensors", bfl_dict(factors(14)))
    outside = write(tmp_path / "outside.safetensors", bfl_dict(factors(14)))
    (lora_dir / "link.safetensors").symlink_to(outside)
    write(lora_dir / "dev.safetensors", {k: v for k, v in _read_all(_dev_lora(tmp_path)).items()})
    s = LiveServer(model_path, "--lora-dir", lora_dir, log_dir=tmp_path)
    try:
        body = {"prompt": "a fox", "size": "32x32", "steps": 2, "seed": 5, "t5_length": 16,
                "lora": [{"path_or_name": "style", "scale": 0.8}]}
        status, _, raw = request("POST", s.port, "/v1/images/generations", body)
        assert status == 200, raw
        png = base64.b64decode(json.loads(raw)["data"][0]["b64_json"])
        with Image.open(io.BytesIO(png)) as im:
            got = np.asarray(im.convert("RGB"))
            assert im.text.get("loras") == "style.safetensors:0.8"
        tiny = fluxmini.FluxMini.load(str(model_path), threads=1)
        want = tiny.generate("a fox", width=32, height=32, steps=2, seed=5, t5_length=16, progress=False,
                             loras=[(p, 0.8)])
        np.testing.assert_array_equal(got, np.asarray(want))
        for bad, code in (([{"path_or_name": outside}], 400), ([{"path_or_name": "../outside"}], 400),
                          ([{"path_or_name": "link"}], 400), ([{"path_or_name": "nothere"}], 400),
                          ([{"path_or_name": "style", "scale": "x"}], 400), ("style", 400),
                          ([{"path_or_name": "dev"}], 400)):
            status, _, raw = request("POST", s.port, "/v1/images/generations",
                                     {"prompt": "a", "size": "16x16", "steps": 1, "lora": bad})
            assert status == code, (bad, raw)
            assert json.loads(raw)["error"]["message"]
    finally:
        s.stop()
    assert "Traceback" not in s.log()


def _read_all(path) -> dict:
    from fluxmini.safetensors_io import SafetensorsFile

    sf = SafetensorsFile(path)
    out = {k: sf.tensor(k) for k in sf.entries}
    sf.close()
    return out


def test_text_encoder_lora_equals_merged_weights(tmp_path):
    """CLIP-L LoRAs (kohya ``lora_te1_*`` with .alpha, diffusers ``text_encoder.*``) against the
    same CLIP with W + scale·B·A merged into its file in float64 (an independent route: no adapter
    code involved). F32: float32 summation order only (1e-5)."""
    import fixtures
    import make_pipeline_goldens as ref
    from fluxmini.inventory import LAYOUT_PREFIXES

    base = fluxmini_load(ref.model_path())
    pre = LAYOUT_PREFIXES["gpustack"]["clip_l"]
    h, m = 64, 128  # tiny_dims().clip
    rng = np.random.default_rng(15)
    mk = lambda i, o: ((rng.standard_normal((RANK, i)) / np.sqrt(i)).astype(np.float32),  # noqa: E731
                       (0.5 * rng.standard_normal((o, RANK))).astype(np.float32))
    layers = {"text_model.encoder.layers.0.self_attn.q_proj": mk(h, h),
              "text_model.encoder.layers.1.mlp.fc1": mk(h, m)}
    alpha, scale = 2.0, 0.7
    sd = {}
    k0 = "lora_te1_" + "text_model.encoder.layers.0.self_attn.q_proj".replace(".", "_")
    a, b = layers["text_model.encoder.layers.0.self_attn.q_proj"]
    sd[k0 + ".lora_down.weight"], sd[k0 + ".lora_up.weight"] = a, b
    sd[k0 + ".alpha"] = np.array(alpha, np.float32)
    a, b = layers["text_model.encoder.layers.1.mlp.fc1"]
    sd["text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_A.weight"] = a
    sd["text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_B.weight"] = b
    path = write(tmp_path / "te.safetensors", sd)
    eff = {"text_model.encoder.layers.0.self_attn.q_proj": scale * alpha / RANK,
           "text_model.encoder.layers.1.mlp.fc1": scale}  # PEFT without alpha: 1
    ref_vals = {name: fixtures.tensor_values(1234, f"clip_l:{name}.weight", (layers[name][1].shape[0],
                                                                             layers[name][0].shape[1]))
                for name in layers}
    merged = [(pre + name + ".weight", (ref_vals[name].astype(np.float64)
                                        + eff[name] * layers[name][1].astype(np.float64)
                                        @ layers[name][0].astype(np.float64)).astype(np.float32))
              for name in layers]
    merged_path = fixtures.write_model(tmp_path / "merged.gguf", big_type="f32", components=("clip_l",),
                                       skip={n for n, _ in merged}, extra=merged)
    ids = base.tokenize_clip("a red fox in the snow")
    plain = base.encode_clip(ids)
    base.set_loras([(path, scale)])
    got = base.encode_clip(ids)
    want = fluxmini_load(merged_path, components=["clip_l"]).encode_clip(ids)
    assert rel(want, plain) > EFFECT
    assert rel(got, want) <= 1e-5


def fluxmini_load(path, components=None):
    return FluxMini.load(str(path), threads=2, components=components)


# ----------------------------------------------------------------------------------------------
# Merge mode (F16/F32 weights)

@pytest.mark.parametrize("name", ["f32", "f16"])
def test_merge_equals_runtime_and_unmerge_is_exact(tmp_path, name):
    """mode="merge" adds scale·B·A into copies of the adapted weights: the output equals the
    run-time adapters' within float32 summation order for F32 weights (bound 1e-5; a different
    computation moves it by > EFFECT) and within F16 rounding of the merged weights for F16 ones
    (each merged weight rounded to F16 once, relative 2⁻¹¹; tests/test_flux.py's F16 bound 2e-3).
    Removing the LoRAs, or changing them, makes the layers read the file's weights again: the
    base output comes back bit for bit. XLabs' output adapters (proj_lora) stay run-time."""
    h = dims()[0]
    single = dims()[3]
    rng = np.random.default_rng(41)
    proj = {i: ((rng.standard_normal((RANK, h)) / np.sqrt(h)).astype(np.float32),
                (0.5 * rng.standard_normal((h, RANK)) / np.sqrt(RANK)).astype(np.float32)) for i in range(single)}
    p = write(tmp_path / "b.safetensors", bfl_dict(factors(16)))
    px = write(tmp_path / "x.safetensors", xlabs_dict(factors(17, full=False), proj))
    m = FluxMini.load(G.model_path(name), components=["diffusion"], threads=2)
    base = run(m, name)
    bound = {"f32": 1e-5, "f16": 2e-3}[name]
    runtimes = []
    for loras in ([(p, 0.8)], [(p, 0.8), (px, -0.5)]):
        m.set_loras(loras)
        runtime = run(m, name)
        runtimes.append(runtime)
        runtime_bytes = m.lora_bytes()
        m.set_loras(loras, mode="merge")
        merged = run(m, name)
        assert rel(runtime, base) > EFFECT
        assert rel(merged, runtime) <= bound, f"{name}: merged vs run-time {rel(merged, runtime):.3g}"
        assert m.lora_bytes() > runtime_bytes  # the merged copies are counted
        m.release("diffusion")  # the merge is redone from the adapters when the weights come back
        np.testing.assert_array_equal(run(m, name), merged)
        m.set_loras([])
        np.testing.assert_array_equal(run(m, name), base)
        assert m.lora_bytes() == 0
    m.set_loras([(p, 0.8)], mode="merge")
    m.set_loras([(p, 0.8)])  # merged -> run-time: the file's weights plus the adapters
    np.testing.assert_array_equal(run(m, name), runtimes[0])


def test_merge_refused_on_quantized_weights(tmp_path):
    p = write(tmp_path / "b.safetensors", bfl_dict(factors(18)))
    m = engine("q8_0")
    m.set_loras([(p, 0.5)])
    before = run(m, "q8_0")
    with pytest.raises(FluxMiniValueError, match="merging needs F16 or F32 weights"):
        m.set_loras([(p, 0.8)], mode="merge")
    assert m.loras == [(p, 0.5)]  # nothing changed
    np.testing.assert_array_equal(run(m, "q8_0"), before)
    with pytest.raises(FluxMiniValueError, match="lora_mode"):
        m.set_loras([(p, 0.8)], mode="fast")
    with pytest.raises(FluxMiniValueError, match="lora_mode"):
        FluxMini.load(G.model_path("q8_0"), components=["diffusion"], lora_mode="merged")


# ----------------------------------------------------------------------------------------------
# T5 LoRAs

def test_t5_lora_matches_peft(tmp_path):
    """T5 LoRAs in the two key forms the reader takes for T5 (kohya ``lora_te3_`` / ``lora_te2_``
    with .alpha and T5's own module names; diffusers' ``text_encoder_2.*`` PEFT keys, the name of
    FLUX.1's T5 in diffusers) against transformers' T5EncoderModel with the same factors injected
    by PEFT (``inject_adapter_in_model``). F32 weights: the bound of the T5 goldens against
    transformers (tests/test_text_encoders.py: torch's float32 paths differ by up to 2.2e-5 of
    O(1) outputs; 1e-4 absolute), relative to the output's largest value."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import make_text_goldens as T

    path = str(T.model_path("f32"))
    m = FluxMini.load(path, components=["t5xxl"], threads=2)
    d, ff = 64, 96  # tiny_dims().t5
    rng = np.random.default_rng(19)
    mods = {"encoder.block.0.layer.0.SelfAttention.q": (d, d), "encoder.block.0.layer.0.SelfAttention.o": (d, d),
            "encoder.block.1.layer.0.SelfAttention.v": (d, d), "encoder.block.0.layer.1.DenseReluDense.wi_0": (d, ff),
            "encoder.block.1.layer.1.DenseReluDense.wo": (ff, d)}
    f = {k: ((rng.standard_normal((RANK, i)) / np.sqrt(i)).astype(np.float32),
             (0.5 * rng.standard_normal((o, RANK))).astype(np.float32)) for k, (i, o) in mods.items()}
    alpha, scale = 2.0, 0.7
    ids = np.random.default_rng(5).integers(0, 1000, 11).astype(np.int32)
    plain = m.encode_t5(ids)

    def reference(eff_alpha):
        model = T.t5_reference(path)
        cfg = peft.LoraConfig(r=RANK, lora_alpha=eff_alpha, target_modules=list(mods), lora_dropout=0.0)
        model = peft.inject_adapter_in_model(cfg, model)
        sd = {}
        for k, (a, b) in f.items():
            sd[f"{k}.lora_A.weight"] = torch.from_numpy(a)
            sd[f"{k}.lora_B.weight"] = torch.from_numpy(scale * b)  # the user's multiplier
        res = peft.set_peft_model_state_dict(model, sd)
        assert not getattr(res, "unexpected_keys", [])
        return T.t5_forward(model.eval(), ids)

    want = reference(alpha)
    assert rel(want, plain) > EFFECT
    for prefix in ("lora_te3_", "lora_te2_"):
        sd = {}
        for k, (a, b) in f.items():
            u = prefix + k.replace(".", "_")
            sd[u + ".lora_down.weight"], sd[u + ".lora_up.weight"] = a, b
            sd[u + ".alpha"] = np.array(alpha, np.float32)
        m.set_loras([(write(tmp_path / f"{prefix}.safetensors", sd), scale)])
        err = float(np.abs(m.encode_t5(ids) - want).max() / np.abs(want).max())
        assert err <= 1e-4, f"{prefix}: relative error {err:.3g} against transformers + PEFT"
    sd = {}
    for k, (a, b) in f.items():
        sd[f"text_encoder_2.{k}.lora_A.weight"], sd[f"text_encoder_2.{k}.lora_B.weight"] = a, b
    m.set_loras([(write(tmp_path / "peft.safetensors", sd), scale)])  # PEFT without alpha: scale 1 per adapter
    want1 = reference(RANK)
    err = float(np.abs(m.encode_t5(ids) - want1).max() / np.abs(want1).max())
    assert err <= 1e-4, f"text_encoder_2.*: relative error {err:.3g} against transformers + PEFT"

