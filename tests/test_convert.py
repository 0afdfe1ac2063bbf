"""Converter, quantizer, size prediction and random models (fluxmini.convert), on tiny models.

The diffusers -> BFL mapping is checked against diffusers' own single-file conversion code (the
BFL -> diffusers direction), so the mapping is not just assumed; those tests skip without
torch/diffusers.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from fluxmini import convert as C  # noqa: E402
from fluxmini.convert import random_model as C_random, type_rules as C_types  # noqa: E402
from fluxmini.errors import FluxMiniError, FluxMiniFileError, FluxMiniValueError  # noqa: E402
from fluxmini.inventory import COMPONENTS, LAYOUT_PREFIXES, ModelDims, component_tensors, tiny_dims  # noqa: E402
from fluxmini.safetensors_io import SafetensorsFile, write_safetensors  # noqa: E402

# The source dtypes of the tiny fixtures: the same as gpustack's sources (TencentARC BF16 diffusion,
# F16 CLIP and T5, F32 ae), so predictions with the default SOURCE_TYPES apply.
SOURCE_DTYPES = {"diffusion": "BF16", "clip_l": "F16", "t5xxl": "F16", "vae": "F32"}


def read_gguf(path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (type name, float32 values in PyTorch shape)."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        # one long row: gguf.quants works in groups of 16 rows, slow for short rows
        vals = gguf.quants.dequantize(np.asarray(t.data).reshape(1, -1), t.tensor_type).astype(np.float32)
        vals = vals.reshape(shape)
        out[t.name] = (t.tensor_type.name.lower(), vals)
    return out


def gguf_kv(path) -> dict[str, str]:
    r = gguf.GGUFReader(str(path))
    out = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        out[name] = bytes(f.parts[f.data[0]]).decode()
    return out


def strip_layout(tensors: dict, layout: str) -> dict[str, dict]:
    """{component: {bare name: value}} from full names."""
    out = {c: {} for c in COMPONENTS}
    for name, v in tensors.items():
        for c in COMPONENTS:
            p = LAYOUT_PREFIXES[layout][c]
            if name.startswith(p):
                out[c][name[len(p):]] = v
                break
        else:
            raise AssertionError(f"{name} has no {layout} prefix")
    return out


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    """Tiny BFL/HF-named safetensors, one per component, without T5's duplicate embedding.

    Returns (paths, values as stored) — values read back, so BF16/F16 rounding is included."""
    d = tmp_path_factory.mktemp("src")
    dims = tiny_dims()
    dims.t5.duplicate_embed = False
    rng = np.random.default_rng(1)
    paths, values = {}, {}
    prefixes = {"diffusion": "", "clip_l": "", "t5xxl": "", "vae": "vae."}  # any known prefix is accepted
    for comp in COMPONENTS:
        sd = {prefixes[comp] + n: C.random_tensor(rng, n, s) for n, s in component_tensors(comp, dims)}
        paths[comp] = str(d / f"{comp}.safetensors")
        write_safetensors(paths[comp], sd, SOURCE_DTYPES[comp])
        sf = SafetensorsFile(paths[comp])
        values[comp] = {n[len(prefixes[comp]):]: sf.tensor(n) for n in sf.entries}
    return paths, values


# docs/MODEL.md §1.1's table of the types in gpustack's files, typed in here independently of the
# converter's own VARIANTS: (diffusion large weights, CLIP-L, T5-XXL). The VAE's type is F16 in
# every file (its kernels stay F32 in quantized files by the row rule below; GroupNorm γ F16).
GPUSTACK_TABLE = {
    "FP16": ("f16", "f16", "f16"),
    "Q8_0": ("q8_0", "f16", "q8_0"),
    "pure-Q8_0": ("q8_0", "q8_0", "q8_0"),
    "Q4_1": ("q4_1", "f16", "q4_1"),
    "Q4_0": ("q4_0", "f16", "q4_0"),
    "pure-Q4_0": ("q4_0", "q4_0", "q4_0"),
}
FLUX_EMBEDDERS = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


def expected_type(variant: str, comp: str, name: str, shape, source: str) -> str:
    """The type docs/MODEL.md §1.1/§1.4 say a tensor has in a gpustack file: biases, Flux norm
    scales and embedders keep their source type; in a quantized file so does any tensor whose rows
    do not fill 32-blocks; everything else takes its component's type from the table."""
    large, clip, t5 = GPUSTACK_TABLE[variant]
    if name.endswith((".bias", ".scale")) or (comp == "diffusion" and name.startswith(FLUX_EMBEDDERS)):
        return source
    if large != "f16" and shape[-1] % 32:
        return source
    return {"diffusion": large, "clip_l": clip, "t5xxl": t5, "vae": "f16"}[comp]


@pytest.mark.parametrize("variant", list(GPUSTACK_TABLE))
def test_full_size_plan_types_are_the_table_types(variant):
    """The converter's plan for the real 880 tensors gives every tensor the table's type, and the
    table's spot values hold: VAE 3x3 kernels F32 in quantized files, GroupNorm γ F16, T5 norms
    in T5's type, CLIP LayerNorm quantized only in pure files."""
    source = {"diffusion": "f32", "clip_l": "f16", "t5xxl": "f16", "vae": "f32"}  # gpustack's sources
    plan = C.plan_tensors(None, variant)
    assert len(plan) == 880
    for comp, full, bare, shape, t in plan:
        assert t == expected_type(variant, comp, bare, shape, source[comp]), (variant, full, shape)
    by_name = {bare: t for comp, _, bare, _, t in plan}
    large, clip, _ = GPUSTACK_TABLE[variant]
    assert by_name["decoder.conv_in.weight"] == ("f16" if variant == "FP16" else "f32")
    assert by_name["decoder.norm_out.weight"] == "f16"
    assert by_name["encoder.block.0.layer.0.layer_norm.weight"] == large
    assert by_name["text_model.final_layer_norm.weight"] == clip


def run_convert(out, paths, **kw):
    kw.setdefault("progress", False)
    return C.convert(out, diffusion=paths["diffusion"], clip_l=paths["clip_l"], t5xxl=paths["t5xxl"],
                     vae=paths["vae"], **kw)


# ---------------------------------------------------------------------------------------------
# sizes

@pytest.mark.parametrize("variant", list(C.VARIANTS))
def test_full_size_prediction_matches_model_md(variant):
    assert C.predict_file_size(None, variant) == C.GPUSTACK_SIZES[variant]
    plan = C.plan_tensors(None, variant)
    assert len(plan) == 880
    head, _, _ = C.gguf_header([(full, shape, t) for _, full, _, shape, t in plan])
    assert len(head) == 88_704


def test_full_size_numbers_are_model_md_numbers():
    # the table in docs/MODEL.md §1.1, typed in independently of GPUSTACK_SIZES
    assert C.predict_file_size(ModelDims(), "FP16") == 16_690_011_936
    assert C.predict_file_size(ModelDims(), "Q8_0") == 9_349_852_832
    assert C.predict_file_size(ModelDims(), "pure-Q8_0") == 9_234_579_808
    assert C.predict_file_size(ModelDims(), "Q4_1") == 5_846_275_104
    assert C.predict_file_size(ModelDims(), "Q4_0") == 5_345_764_000
    assert C.predict_file_size(ModelDims(), "pure-Q4_0") == 5_169_011_808
    # type names resolve like the variants: q4_0 keeps CLIP-L F16, pure quantizes it
    assert C.predict_file_size(None, "q4_0") == 5_345_764_000
    assert C.predict_file_size(None, C.resolve_types("q4_0", pure=True)) == 5_169_011_808
    # the upstream layout only renames the text encoders: longer names, a bigger header
    assert C.predict_file_size(None, "Q4_0", "sd.cpp") > 5_345_764_000


# ---------------------------------------------------------------------------------------------
# BFL-named sources

@pytest.mark.parametrize("layout", ["gpustack", "sd.cpp"])
def test_convert_bfl_f32_round_trip(tmp_path, tiny_sources, layout):
    paths, values = tiny_sources
    out = tmp_path / "m.gguf"
    res = run_convert(out, paths, layout=layout, type="f32")
    got = strip_layout(read_gguf(out), layout)
    dims = tiny_dims()
    for comp in COMPONENTS:
        inv = dict(component_tensors(comp, dims))
        inv.pop("encoder.embed_tokens.weight", None)  # dropped by default
        assert set(got[comp]) == set(inv), comp
        for name, (t, v) in got[comp].items():
            assert v.shape == inv[name]
            np.testing.assert_array_equal(v, values[comp][name], err_msg=name)
            # kept tensors keep the source type (BF16 held as F32), the rest is F32
            src = SOURCE_DTYPES[comp].lower().replace("bf16", "f32")  # BF16 sources are held as F32
            # an F32 file keeps every tensor F32 but BF16/F16 sources' kept types (docs/MODEL.md §1.4)
            kept = name.endswith((".bias", ".scale")) or (comp == "diffusion" and name.startswith(FLUX_EMBEDDERS))
            assert t == (src if kept else "f32"), name
    kv = gguf_kv(out)
    assert kv == {"fluxmini.architecture": "flux-mini", "fluxmini.quantization": "f32",
                  "fluxmini.layout": layout,
                  "fluxmini.source": "diffusion.safetensors, clip_l.safetensors, t5xxl.safetensors, "
                                     "vae.safetensors"}
    assert res.size == os.path.getsize(out)
    assert res.size == C.predict_file_size(dims, res.types, layout, False, metadata=res.metadata)


@pytest.mark.parametrize("variant", list(C.VARIANTS))
def test_variant_types_and_size(tmp_path, tiny_sources, variant):
    paths, values = tiny_sources
    out = tmp_path / "m.gguf"
    res = run_convert(out, paths, variant=variant, keep_t5_duplicate=True)
    main, clip, t5, vae = C.VARIANTS[variant]
    types = {"diffusion": main, "clip_l": clip, "t5xxl": t5, "vae": vae}
    full = read_gguf(out)
    got = strip_layout(full, "gpustack")
    dims = tiny_dims()
    for comp in COMPONENTS:
        inv = dict(component_tensors(comp, dims))
        assert set(got[comp]) == set(inv)
        for name, (t, v) in got[comp].items():
            want = expected_type(variant, comp, name, inv[name], SOURCE_DTYPES[comp].lower().replace("bf16", "f32"))
            assert t == want, (variant, name)
    # spot checks of docs/MODEL.md §1.1's table
    g = {n: t for n, (t, _) in full.items()}
    q = "q" in main
    assert g["model.diffusion_model.img_in.weight"] == "f32"
    assert g["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"] == main
    assert g["first_stage_model.decoder.conv_in.weight"] == ("f32" if q else "f16")
    assert g["first_stage_model.decoder.norm_out.weight"] == "f16"
    assert g["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.bias"] == "f16"
    assert g["cond_stage_model.1.transformer.encoder.block.0.layer.0.layer_norm.weight"] == t5
    # the duplicate embedding is written from shared.weight, which the source lacks
    assert set(got["t5xxl"]) >= {"encoder.embed_tokens.weight"}
    # the exact size is predicted without writing
    assert os.path.getsize(out) == C.predict_file_size(dims, variant, metadata=res.metadata)
    if main == "q8_0":  # values survive within Q8_0's step (see test_quantize_q8_0_round_trip)
        w = got["diffusion"]["double_blocks.1.txt_mlp.2.weight"][1]
        ref = values["diffusion"]["double_blocks.1.txt_mlp.2.weight"]
        assert np.abs(w - ref).max() <= np.abs(ref).max() / 127


def test_convert_options(tmp_path, tiny_sources):
    paths, _ = tiny_sources
    r = run_convert(tmp_path / "a.gguf", paths, type="q8_0", clip_l_type="q4_0", t5xxl_type="f16", vae_type="q8_0")
    assert r.types == {"diffusion": "q8_0", "clip_l": "q4_0", "t5xxl": "f16", "vae": "q8_0"}
    g = {n: t for n, (t, _) in read_gguf(r.path).items()}
    assert g["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight"] == "q4_0"
    assert g["cond_stage_model.1.transformer.shared.weight"] == "f16"
    assert g["first_stage_model.decoder.mid.attn_1.q.weight"] == "f32"  # 1x1 conv: ne[0]=1 stays source
    assert g["first_stage_model.encoder.norm_out.weight"] == "q8_0"
    assert C.resolve_types("f16") == {c: "f16" for c in COMPONENTS}
    assert C.resolve_types(variant="pure_q8_0") == dict(zip(COMPONENTS, C.VARIANTS["pure-Q8_0"]))


# ---------------------------------------------------------------------------------------------
# quantize

def test_quantize_q8_0_round_trip(tmp_path):
    src = tmp_path / "f32.gguf"
    dims = tiny_dims()
    C.write_random_model(src, dims, layout="sd.cpp", types="f32", seed=3)
    out = tmp_path / "q8.gguf"
    res = C.quantize(src, out, "q8_0", pure=True, vae_type="q8_0", progress=False)
    assert res.layout == "sd.cpp"  # kept from the input
    a, b = read_gguf(src), read_gguf(out)
    assert set(a) == set(b)  # including T5's duplicate, which the input has
    n_q = 0
    for name, (ta, va) in a.items():
        tb, vb = b[name]
        if tb == "f32":  # kept tensors are copied
            np.testing.assert_array_equal(va, vb)
            continue
        assert tb == "q8_0", name
        n_q += 1
        # Q8_0: per block of 32, d = amax/127 rounded to fp16 (relative error <= 2^-11), q = round(x/d)
        # in [-127, 127]; so |q*d16 - x| <= d/2 + 127*|d16 - d| <= d * (0.5 + 127 * 2^-11) < 0.57 d.
        blocks_a = va.reshape(-1, 32)
        blocks_b = vb.reshape(-1, 32)
        d = np.abs(blocks_a).max(axis=1, keepdims=True) / 127
        assert (np.abs(blocks_b - blocks_a) <= 0.57 * d + 1e-12).all(), name
    assert n_q > 100
    assert res.size == os.path.getsize(out)


def test_quantize_keeps_quantized_kept_tensors_and_requantizes(tmp_path):
    src = tmp_path / "q4.gguf"
    C.make_random(src, "pure-Q4_0", dims=tiny_dims(), progress=False)
    out = tmp_path / "f16.gguf"
    C.quantize(src, out, "f16", progress=False)
    a, b = read_gguf(src), read_gguf(out)
    name = "cond_stage_model.1.transformer.encoder.block.0.layer.1.DenseReluDense.wo.weight"
    assert a[name][0] == "q4_0" and b[name][0] == "f16"
    np.testing.assert_array_equal(a[name][1].astype(np.float16), b[name][1])
    bias = "model.diffusion_model.single_blocks.0.linear1.bias"
    assert a[bias][0] == b[bias][0] == "f32"
    np.testing.assert_array_equal(a[bias][1], b[bias][1])


# ---------------------------------------------------------------------------------------------
# make-random

def test_make_random_tiny(tmp_path):
    dims = tiny_dims()
    (p,) = C.make_random(tmp_path / "r.gguf", "Q4_0", dims=dims, progress=False, seed=5)
    assert os.path.getsize(p) == C.predict_file_size(dims, "Q4_0")
    r = gguf.GGUFReader(p)
    assert not [k for k in r.fields if not k.startswith("GGUF.")]  # n_kv = 0, like gpustack
    got = read_gguf(p)
    plan = C.plan_tensors(dims, "Q4_0")
    assert [(full, t) for _, full, _, _, t in plan] == [(n, t) for n, (t, _) in got.items()]
    for _, full, bare, shape, _ in plan:
        v = got[full][1]
        assert np.isfinite(v).all()
        scale = C_random._random_scale(bare, shape)
        if scale is not None and v.size >= 1 << 16:  # pool-made: the scale of random_tensor
            assert abs(v.std() / scale - 1) < 0.1, full
    # same seed, same file
    (q,) = C.make_random(tmp_path / "s.gguf", "Q4_0", dims=dims, progress=False, seed=5)
    with open(p, "rb") as f1, open(q, "rb") as f2:
        assert f1.read() == f2.read()


def test_make_random_split(tmp_path):
    dims = tiny_dims()
    paths = C.make_random(tmp_path / "split", "Q8_0", dims=dims, progress=False, split=True)
    assert [os.path.basename(p) for p in paths] == ["diffusion_model.gguf", "clip_l.gguf", "t5xxl.gguf", "vae.gguf"]
    for comp, p in zip(COMPONENTS, paths):
        names = list(read_gguf(p))
        assert names == [n for n, _ in component_tensors(comp, dims)]  # bare names
        assert os.path.getsize(p) == C.predict_file_size(dims, "Q8_0", components=[comp], bare=True)
    # the split files convert back into one file
    res = C.convert(tmp_path / "one.gguf", diffusion=paths[0], clip_l=paths[1], t5xxl=paths[2], vae=paths[3],
                    variant="Q8_0", keep_t5_duplicate=True, progress=False)
    one = read_gguf(res.path)
    for comp, p in zip(COMPONENTS, paths):
        for n, (t, v) in read_gguf(p).items():
            t2, v2 = one[LAYOUT_PREFIXES["gpustack"][comp] + n]
            assert t == t2
            np.testing.assert_array_equal(v, v2)
    assert res.size == C.predict_file_size(dims, "Q8_0", metadata=res.metadata)


# ---------------------------------------------------------------------------------------------
# bad inputs

def _write_component(path, comp, mutate=None, dtype="F32"):
    rng = np.random.default_rng(0)
    dims = tiny_dims()
    dims.t5.duplicate_embed = False
    sd = {n: C.random_tensor(rng, n, s) for n, s in component_tensors(comp, dims)}
    if mutate:
        mutate(sd)
    write_safetensors(path, sd, dtype)
    return str(path)


def test_missing_tensor(tmp_path, tiny_sources):
    paths = dict(tiny_sources[0])
    paths["diffusion"] = _write_component(tmp_path / "d.safetensors", "diffusion",
                                          lambda sd: sd.pop("double_blocks.1.img_attn.qkv.weight"))
    with pytest.raises(FluxMiniValueError) as e:
        run_convert(tmp_path / "o.gguf", paths)
    msg = str(e.value)
    assert "diffusion model (d.safetensors)" in msg and "missing" in msg
    assert "double_blocks.1.img_attn.qkv.weight" in msg
    assert not (tmp_path / "o.gguf").exists() and not (tmp_path / "o.gguf.part").exists()


def test_wrong_shape(tmp_path, tiny_sources):
    paths = dict(tiny_sources[0])
    paths["t5xxl"] = _write_component(
        tmp_path / "t.safetensors", "t5xxl",
        lambda sd: sd.__setitem__("encoder.block.1.layer.1.DenseReluDense.wo.weight", np.zeros((64, 95), np.float32)))
    with pytest.raises(FluxMiniValueError, match=r"T5-XXL \(t.safetensors\).*wrong shape.*"
                                                 r"encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight is "
                                                 r"\[64, 95\], expected \[64, 96\]"):
        run_convert(tmp_path / "o.gguf", paths)


def test_unknown_and_ignored_names(tmp_path, tiny_sources):
    paths = dict(tiny_sources[0])

    def extra(sd):
        sd["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.float32)  # ignored
        sd["text_projection.weight"] = np.zeros((64, 64), np.float32)  # ignored
        sd["logit_scale"] = np.zeros((), np.float32)  # ignored
        sd["text_model.encoder.layers.0.mystery.weight"] = np.zeros((4,), np.float32)

    paths["clip_l"] = _write_component(tmp_path / "c.safetensors", "clip_l", extra)
    with pytest.raises(FluxMiniValueError) as e:
        run_convert(tmp_path / "o.gguf", paths)
    msg = str(e.value)
    assert "CLIP-L (c.safetensors): 1 unknown tensor(s): text_model.encoder.layers.0.mystery.weight" in msg
    assert "position_ids" not in msg and "text_projection" not in msg
    # without the stranger the ignored tensors are dropped
    paths["clip_l"] = _write_component(
        tmp_path / "c2.safetensors", "clip_l",
        lambda sd: (extra(sd), sd.pop("text_model.encoder.layers.0.mystery.weight")))
    got = read_gguf(run_convert(tmp_path / "o.gguf", paths).path)
    assert not [n for n in got if "position_ids" in n or "projection" in n or "logit" in n]


def test_wrong_file_for_component(tmp_path, tiny_sources):
    paths = dict(tiny_sources[0])
    paths["t5xxl"] = paths["vae"]  # VAE names with the vae. prefix
    with pytest.raises(FluxMiniValueError, match=r"T5-XXL \(vae.safetensors\).*missing.*is it the right file"):
        run_convert(tmp_path / "o.gguf", paths)


def test_components_that_do_not_fit(tmp_path, tiny_sources):
    paths = dict(tiny_sources[0])
    dims = tiny_dims()
    dims.clip.hidden = 96
    rng = np.random.default_rng(0)
    paths["clip_l"] = str(tmp_path / "c.safetensors")
    write_safetensors(paths["clip_l"], {n: C.random_tensor(rng, n, s) for n, s in component_tensors("clip_l", dims)})
    with pytest.raises(FluxMiniValueError, match="pooled vector of width 64 but CLIP-L makes 96"):
        run_convert(tmp_path / "o.gguf", paths)


def test_bad_files(tmp_path, tiny_sources):
    paths = dict(tiny_sources[0])
    # not a safetensors file at all
    junk = tmp_path / "junk.safetensors"
    junk.write_text("this is a text file, not weights\n" * 4)
    with pytest.raises(FluxMiniFileError, match="junk.safetensors: not a safetensors file"):
        run_convert(tmp_path / "o.gguf", {**paths, "vae": str(junk)})
    # truncated header: the length field promises more JSON than the file has
    good = open(paths["vae"], "rb").read()
    n = int.from_bytes(good[:8], "little")
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good[: 8 + n // 2])
    with pytest.raises(FluxMiniFileError, match="trunc.safetensors: truncated safetensors file"):
        run_convert(tmp_path / "o.gguf", {**paths, "vae": str(trunc)})
    # truncated data
    trunc.write_bytes(good[: len(good) - 100])
    with pytest.raises(FluxMiniFileError, match="truncated safetensors file.*ends at byte"):
        run_convert(tmp_path / "o.gguf", {**paths, "vae": str(trunc)})
    # a file shorter than the length field
    trunc.write_bytes(b"\x01\x02")
    with pytest.raises(FluxMiniFileError, match="not a safetensors file"):
        SafetensorsFile(trunc)
    # missing file, pickle, no input, broken GGUF
    with pytest.raises(FluxMiniFileError, match="no such file"):
        run_convert(tmp_path / "o.gguf", {**paths, "vae": str(tmp_path / "nope.safetensors")})
    (tmp_path / "w.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(FluxMiniFileError, match="pickle"):
        run_convert(tmp_path / "o.gguf", {**paths, "vae": str(tmp_path / "w.ckpt")})
    with pytest.raises(FluxMiniValueError, match="no input for: VAE"):
        C.convert(tmp_path / "o.gguf", diffusion=paths["diffusion"], clip_l=paths["clip_l"],
                  t5xxl=paths["t5xxl"], progress=False)
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\xff" * 20)
    with pytest.raises(FluxMiniFileError, match="bad.gguf: not a readable GGUF file"):
        C.quantize(tmp_path / "bad.gguf", tmp_path / "o.gguf")
    (p,) = C.make_random(tmp_path / "r.gguf", "Q4_0", dims=tiny_dims(), progress=False)
    data = open(p, "rb").read()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(FluxMiniFileError, match=r"cut.gguf: (truncated GGUF file|not a readable GGUF file, "
                                                r"damaged or truncated)"):
        C.quantize(tmp_path / "cut.gguf", tmp_path / "o.gguf")
    with pytest.raises(FluxMiniValueError, match="unknown tensor type"):
        run_convert(tmp_path / "o.gguf", paths, type="q3_k")
    with pytest.raises(FluxMiniValueError, match="output .* is also an input"):
        run_convert(paths["vae"], paths)
    assert all(issubclass(e, FluxMiniError) for e in (FluxMiniFileError, FluxMiniValueError))


# ---------------------------------------------------------------------------------------------
# other inputs: GGUF components, an all-in-one file, shards

def test_gguf_inputs_and_all_in_one(tmp_path, tiny_sources):
    paths, values = tiny_sources
    first = run_convert(tmp_path / "a.gguf", paths, type="f32", keep_t5_duplicate=True)
    # a GGUF with a component's tensors under an all-in-one prefix works as that component's input
    res = C.convert(tmp_path / "b.gguf", model=first.path, vae=paths["vae"], layout="sd.cpp", type="f32",
                    keep_t5_duplicate=True, progress=False)
    a, b = read_gguf(first.path), read_gguf(res.path)
    sa, sb = strip_layout(a, "gpustack"), strip_layout(b, "sd.cpp")
    for comp in COMPONENTS:
        assert set(sa[comp]) == set(sb[comp])
        for n in sa[comp]:
            assert sa[comp][n][0] == sb[comp][n][0]
            np.testing.assert_array_equal(sa[comp][n][1], sb[comp][n][1])
    # an all-in-one file given as one component's input: the other components are skipped
    res = run_convert(tmp_path / "c.gguf", {**paths, "t5xxl": first.path}, type="f32")
    c = strip_layout(read_gguf(res.path), "gpustack")
    np.testing.assert_array_equal(c["t5xxl"]["shared.weight"][1], values["t5xxl"]["shared.weight"])


def test_sharded_folder(tmp_path, tiny_sources):
    paths, values = tiny_sources
    sf = SafetensorsFile(paths["diffusion"])
    names = list(sf.entries)
    folder = tmp_path / "transformer"
    folder.mkdir()
    half = len(names) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[half:]}
    wm = {}
    for fname, part in shards.items():
        write_safetensors(folder / fname, {n: sf.tensor(n) for n in part}, "F32")
        wm.update({n: fname for n in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    # the pipeline root works too (it has a transformer/ subfolder)
    res = run_convert(tmp_path / "o.gguf", {**paths, "diffusion": str(tmp_path)}, type="f32")
    got = strip_layout(read_gguf(res.path), "gpustack")["diffusion"]
    for n, (_, v) in got.items():
        np.testing.assert_array_equal(v, values["diffusion"][n])


def test_bf16_and_fp8_reading(tmp_path):
    from fluxmini.safetensors_io import bits_to_float32, float32_to_bf16_bits

    x = np.array([1.0, -2.5, 3.1415927, 1e-3, 65504.0, -0.0], np.float32)
    bits = float32_to_bf16_bits(x)
    back = bits_to_float32(bits, "BF16")
    assert np.abs(back - x).max() <= np.abs(x).max() * 2 ** -8
    e5m2 = np.array([0x3C, 0xC0, 0x00], np.uint8)  # 1.0, -2.0, 0
    np.testing.assert_array_equal(bits_to_float32(e5m2, "F8_E5M2"), [1.0, -2.0, 0.0])
    e4m3 = np.array([0x38, 0xC0, 0x7E, 0x01], np.uint8)  # 1.0, -2.0, 448, 2^-9
    np.testing.assert_array_equal(bits_to_float32(e4m3, "F8_E4M3"), [1.0, -2.0, 448.0, 2.0 ** -9])


def test_cli_subcommands():
    import argparse

    from fluxmini.cli import convert as cli_convert, make_random as cli_make_random, quantize as cli_quantize

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    for command in (cli_convert, cli_quantize, cli_make_random):
        command.add_parser(sub)
    a = p.parse_args(["convert", "--diffusion-model", "d", "--clip_l", "c", "--t5xxl", "t", "--vae", "v",
                      "-o", "o.gguf", "--layout", "sd.cpp", "--type", "Q4_0", "--clip-l-type", "f16",
                      "--keep-t5-duplicate"])
    assert (a.func, a.diffusion_model, a.clip_l, a.t5xxl, a.vae, a.output, a.layout, a.type, a.clip_l_type,
            a.keep_t5_duplicate) == (cli_convert.run, "d", "c", "t", "v", "o.gguf", "sd.cpp", "q4_0", "f16", True)
    a = p.parse_args(["quantize", "in.gguf", "out.gguf", "--type", "q8_0"])
    assert (a.func, a.input, a.output, a.type, a.layout) == (cli_quantize.run, "in.gguf", "out.gguf", "q8_0", None)
    a = p.parse_args(["make-random", "-o", "x", "--variant", "pure-Q8_0", "--seed", "3", "--split"])
    assert (a.func, a.output, a.variant, a.seed, a.split, a.layout) == (cli_make_random.run, "x", "pure-Q8_0", 3,
                                                                      True, "gpustack")


def test_cli_make_random_runs(tmp_path, capsys):
    import argparse

    from fluxmini.cli import make_random as cli_make_random

    p = argparse.ArgumentParser()
    cli_make_random.add_parser(p.add_subparsers(dest="command"))
    a = p.parse_args(["make-random", "-o", str(tmp_path / "r.gguf"), "--tiny", "-q"])
    assert a.func(a) == 0
    assert os.path.getsize(tmp_path / "r.gguf") == C.predict_file_size(tiny_dims(), "Q4_0")


def test_cli_output_folder_is_created_and_an_unwritable_one_is_a_clear_error(tmp_path, capsys):
    from fluxmini.cli import main

    out = tmp_path / "new" / "deeper" / "r.gguf"
    assert main(["make-random", "-o", str(out), "--tiny", "-q"]) == 0
    assert os.path.getsize(out) == C.predict_file_size(tiny_dims(), "Q4_0")
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    capsys.readouterr()
    assert main(["make-random", "-o", str(blocker / "r.gguf"), "--tiny", "-q"]) == 2  # no traceback
    err = capsys.readouterr().err
    assert err.startswith("fluxmini: error: cannot write ") and "r.gguf" in err


def test_failed_write_keeps_the_existing_file(tmp_path):
    """A write that fails part-way (here: a tensor missing at close) leaves PATH as it was and no
    partial file beside it."""
    out = tmp_path / "model.gguf"
    out.write_bytes(b"the user's old model")
    w = C.StreamingWriter(out)
    w.declare("a", (4, 32), "f32")
    w.declare("b", (4, 32), "f32")
    w.begin()
    w.write(np.zeros((4, 32), np.float32))
    with pytest.raises(FluxMiniValueError, match="closed after 1 of 2 tensors"):
        w.close()
    assert out.read_bytes() == b"the user's old model"
    assert sorted(os.listdir(tmp_path)) == ["model.gguf"]


def test_disk_full_is_a_file_error_and_keeps_the_existing_file(tmp_path):
    """The file-size limit (RLIMIT_FSIZE, in a child process) makes writes fail as a full disk
    does: make_random raises FluxMiniFileError, the old file stays, no partial file is left."""
    import subprocess
    import sys

    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")
    code = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the limit kills the process
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
from fluxmini import convert as C
from fluxmini.errors import FluxMiniFileError
from fluxmini.inventory import tiny_dims
try:
    C.make_random({str(out)!r}, "F16", dims=tiny_dims(), progress=False)
except FluxMiniFileError as e:
    print("FluxMiniFileError:", e)
"""
    assert C.predict_file_size(tiny_dims(), "F16") > 65536  # (the write must hit the limit)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("FluxMiniFileError: writing ") and "File too large" in r.stdout, r.stdout
    assert "nothing was written" in r.stdout
    assert out.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["model.gguf"]


# ---------------------------------------------------------------------------------------------
# diffusers-named sources, checked with diffusers' own BFL -> diffusers conversion

class _TorchWithTinySplit:
    """diffusers' convert_flux_transformer_checkpoint_to_diffusers hard-codes FLUX's width (3072) when
    it splits single_blocks.N.linear1 into q, k, v, mlp; this stands in for the torch module inside
    diffusers' single_file_utils and scales that one split to the tiny width. Everything else is
    diffusers' code unchanged."""

    def __init__(self, torch, hidden):
        self._torch, self._h = torch, hidden

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def split(self, t, sizes, dim=0):
        if tuple(sizes) == (3072, 3072, 3072, 12288):
            sizes = (self._h, self._h, self._h, 4 * self._h)
        return self._torch.split(t, sizes, dim=dim)


def test_diffusers_names_checked_by_diffusers(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.loaders import single_file_utils as sfu

    dims = tiny_dims()
    f = dims.flux
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=f.in_channels, num_layers=f.depth,
                                num_single_layers=f.depth_single, attention_head_dim=f.head_dim,
                                num_attention_heads=f.hidden // f.head_dim, joint_attention_dim=f.context_dim,
                                pooled_projection_dim=f.vec_dim, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    v = dims.vae
    vae_config = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=tuple(v.ch * m for m in v.ch_mult),
                      layers_per_block=v.num_res_blocks, latent_channels=v.z_channels, norm_num_groups=32,
                      use_quant_conv=False, use_post_quant_conv=False)
    ae = AutoencoderKL(**vae_config)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=dims.clip.vocab, hidden_size=dims.clip.hidden, intermediate_size=dims.clip.mlp,
        num_hidden_layers=dims.clip.layers, num_attention_heads=2, max_position_embeddings=dims.clip.positions))
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=dims.t5.vocab, d_model=dims.t5.d_model, d_kv=dims.t5.d_kv, d_ff=dims.t5.d_ff,
        num_layers=dims.t5.layers, num_heads=dims.t5.heads, relative_attention_num_buckets=dims.t5.buckets,
        feed_forward_proj="gated-gelu"))
    with torch.no_grad():  # the default init leaves some tensors zero or one: make all distinct
        for m in (tr, ae, clip, t5):
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
    sds = {name: {k: t.detach().numpy().copy() for k, t in m.state_dict().items()}
           for name, m in (("diffusion", tr), ("vae", ae), ("clip_l", clip), ("t5xxl", t5))}
    paths = {}
    for comp, sd in sds.items():
        paths[comp] = str(tmp_path / f"{comp}.safetensors")
        write_safetensors(paths[comp], sd, "F32")
    out = tmp_path / "m.gguf"
    C.convert(out, **paths, type="f32", progress=False)
    got = strip_layout(read_gguf(out), "gpustack")

    # diffusion: ours (diffusers -> BFL), then diffusers' (BFL -> diffusers), must give the original
    bfl = {"model.diffusion_model." + n: torch.from_numpy(val) for n, (_, val) in got["diffusion"].items()}
    monkeypatch.setattr(sfu, "torch", _TorchWithTinySplit(torch, f.hidden))
    back = sfu.convert_flux_transformer_checkpoint_to_diffusers(bfl)
    monkeypatch.undo()
    assert set(back) == set(sds["diffusion"])
    for k, val in sds["diffusion"].items():
        np.testing.assert_array_equal(back[k].numpy(), val, err_msg=k)

    # VAE: ours (diffusers -> CompVis), then diffusers' (CompVis -> diffusers)
    ldm = {"first_stage_model." + n: torch.from_numpy(val) for n, (_, val) in got["vae"].items()}
    back = sfu.convert_ldm_vae_checkpoint(ldm, vae_config)
    assert set(back) == set(sds["vae"])
    for k, val in sds["vae"].items():
        np.testing.assert_array_equal(back[k].numpy(), val, err_msg=k)
    assert got["vae"]["decoder.mid.attn_1.q.weight"][1].shape == (64, 64, 1, 1)

    # CLIP-L and T5: Hugging Face's own names are our inventory's (with text_model. for CLIP)
    for comp, extra in (("clip_l", "text_model."), ("t5xxl", "")):
        sd = dict(sds[comp])
        sd.pop("encoder.embed_tokens.weight", None)
        assert {extra + k if not k.startswith(extra) else k for k in sd} == set(got[comp])
        for k, val in sd.items():
            np.testing.assert_array_equal(got[comp][k if k.startswith(extra) else extra + k][1], val)

    # a diffusers part missing: named with the fused tensor it belongs to
    sd = dict(sds["diffusion"])
    del sd["single_transformer_blocks.2.proj_mlp.weight"]
    write_safetensors(paths["diffusion"], sd, "F32")
    with pytest.raises(FluxMiniValueError, match=r"single_transformer_blocks\.2\.proj_mlp\.weight \(part of "
                                                 r"single_blocks\.2\.linear1\.weight\)"):
        C.convert(tmp_path / "x.gguf", **paths, progress=False)


def test_llama_cpp_t5_names(tmp_path, tiny_sources):
    """city96-style T5 GGUFs use llama.cpp names; gguf-py's own name map makes the fixture."""
    paths, values = tiny_sources
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, tiny_dims().t5.layers)
    t5 = tmp_path / "t5-llama.gguf"
    w = C.StreamingWriter(t5, {"general.architecture": "t5encoder"})
    order = list(values["t5xxl"])
    for n in order:
        w.declare(names.get_name(n, try_suffixes=(".weight",)), values["t5xxl"][n].shape, "q8_0"
                  if values["t5xxl"][n].ndim == 2 and values["t5xxl"][n].shape[1] % 32 == 0 else "f32")
    w.begin()
    for (full, shape, t), n in zip(w.tensors, order):
        w.write(C_types._encode_flat(values["t5xxl"][n], t))
    w.close()
    assert "enc.blk.1.ffn_gate.weight" in [n for n, _, _ in w.tensors]
    res = run_convert(tmp_path / "o.gguf", {**paths, "t5xxl": str(t5)}, type="f32")
    got = strip_layout(read_gguf(res.path), "gpustack")["t5xxl"]
    src = read_gguf(t5)
    for n in order:
        t, v = src[names.get_name(n, try_suffixes=(".weight",))]
        assert got[n][0] == "f32"
        np.testing.assert_array_equal(got[n][1], v)


def test_progress_without_tqdm(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    C.make_random(tmp_path / "r.gguf", "Q4_0", dims=tiny_dims(), progress=True)
    err = capsys.readouterr().err
    assert "make-random:" in err and "100.0%" in err


@pytest.mark.parametrize("layout", ["gpustack", "sd.cpp"])
def test_engine_runs_converted_file_like_the_sources(tmp_path, layout):
    """The engine (when built) gives the same numbers from our single file as from the separate
    source files it loads directly. Types are chosen equal to the sources' so the arithmetic is the
    same (a BF16 source's embedders become F32, which changes the engine's rounding)."""
    from fluxmini import FluxMini  # the engine must be built: a broken build fails here

    dims = tiny_dims()
    dims.t5.duplicate_embed = False
    rng = np.random.default_rng(7)
    paths = {}
    for comp, dt, prefix in (("diffusion", "F32", "model.diffusion_model."), ("clip_l", "F16", ""),
                             ("t5xxl", "F16", ""), ("vae", "F32", "")):
        sd = {n: C.random_tensor(rng, n, s) for n, s in component_tensors(comp, dims)}
        if comp == "diffusion":
            sd = {prefix + n: v for n, v in sd.items()}
        paths[comp] = str(tmp_path / f"{comp}.safetensors")
        write_safetensors(paths[comp], sd, dt)
    res = run_convert(tmp_path / "m.gguf", paths, layout=layout, type="f32", clip_l_type="f16", t5xxl_type="f16")
    direct = FluxMini.load(tmp_path / "diffusion.safetensors", clip_l=paths["clip_l"], t5xxl=paths["t5xxl"],
                           vae=paths["vae"])
    ours = FluxMini.load(res.path)
    ids = direct.tokenize_clip("a photo of a cat")
    pooled = direct.encode_clip(ids)
    np.testing.assert_array_equal(ours.encode_clip(ids), pooled)
    ids5 = direct.tokenize_t5("a photo of a cat", 16)
    t5 = direct.encode_t5(ids5)
    np.testing.assert_array_equal(ours.encode_t5(ids5), t5)
    lat = np.random.default_rng(0).standard_normal((16, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(ours.transformer(lat, 0.6, 3.5, t5, pooled),
                                  direct.transformer(lat, 0.6, 3.5, t5, pooled))
    np.testing.assert_array_equal(ours.vae_decode(lat), direct.vae_decode(lat))
