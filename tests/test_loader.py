"""Loading every file layout, inferring hyper-parameters, and refusing bad files cleanly.

Bad-input cases run in a subprocess: a crash (segfault, abort) there fails the test instead of
killing the test run.
"""

import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fixtures
import fluxmini
from fluxmini.inventory import LAYOUT_PREFIXES, ModelDims, T5Dims, tiny_dims

DIMS = tiny_dims()


def expected_config(d: ModelDims):
    f, c, t, v = d.flux, d.clip, d.t5, d.vae
    return {
        "diffusion": {"hidden": f.hidden, "heads": f.hidden // f.head_dim, "head_dim": f.head_dim,
                      "double_blocks": f.depth, "single_blocks": f.depth_single,
                      "mlp_hidden": int(f.hidden * f.mlp_ratio), "latent_channels": f.in_channels // 4,
                      "context_dim": f.context_dim, "vec_dim": f.vec_dim, "guidance_embed": int(f.guidance)},
        "clip_l": {"vocab": c.vocab, "positions": c.positions, "hidden": c.hidden, "heads": c.hidden // 64,
                   "layers": c.layers, "mlp": c.mlp},
        "t5xxl": {"vocab": t.vocab, "d_model": t.d_model, "heads": t.heads, "d_kv": t.d_kv, "d_ff": t.d_ff,
                  "layers": t.layers, "buckets": t.buckets},
        "vae": {"z_channels": v.z_channels, "base_channels": v.ch, "top_channels": v.ch * v.ch_mult[-1],
                "levels": len(v.ch_mult), "res_blocks": v.num_res_blocks, "has_encoder": 1},
    }


def check_model(model, dims=DIMS):
    exp = expected_config(dims)
    info = model.info()
    for comp, cfg in exp.items():
        c = info["components"][comp]
        assert c["present"], comp
        assert c["config"] == cfg, comp
        n_expected = len(fluxmini.inventory.component_tensors(comp, dims))
        if comp == "t5xxl" and dims.t5.duplicate_embed:
            n_expected -= 1  # the duplicate embedding table is ignored
        assert sum(c["tensors_per_type"].values()) == n_expected, comp
        params = sum(int(np.prod(s)) for n, s in fluxmini.inventory.component_tensors(comp, dims)
                     if n != "encoder.embed_tokens.weight")
        assert c["parameters"] == params, comp


@pytest.fixture(scope="module")
def gpustack_f32():
    return fixtures.cached_model("loader-gpustack-f32")


@pytest.mark.parametrize("layout", ["gpustack", "sd.cpp"])
@pytest.mark.parametrize("big_type", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_single_file_layouts_and_types(layout, big_type):
    path = fixtures.cached_model(f"loader-{layout}-{big_type}", layout=layout, big_type=big_type)
    model = fluxmini.FluxMini.load(path)
    check_model(model)
    info = model.info()
    # Big weights carry the requested type; counted per component, as written.
    types = info["components"]["diffusion"]["tensors_per_type"]
    assert types.get(big_type, 0) > 0
    assert info["ignored_tensors"] == [LAYOUT_PREFIXES[layout]["t5xxl"] + "encoder.embed_tokens.weight"]


def test_bytes_per_component_match_file(gpustack_f32):
    model = fluxmini.FluxMini.load(gpustack_f32)
    total = sum(c["bytes"] for c in model.info()["components"].values())
    # F32 data of every used tensor; the file also holds the header, padding and the ignored table.
    used = sum(int(np.prod(s)) * 4 for comp in fluxmini.inventory.COMPONENTS
               for n, s in fluxmini.inventory.component_tensors(comp, DIMS) if n != "encoder.embed_tokens.weight")
    assert total == used
    assert total < os.path.getsize(gpustack_f32)


def test_split_files_gguf_and_safetensors(tmp_path):
    diff_bare = fixtures.write_model(tmp_path / "diffusion.gguf", components=["diffusion"], bare=True)
    diff_pref = fixtures.write_model(tmp_path / "diffusion_prefixed.gguf", components=["diffusion"])
    clip = fixtures.component_safetensors(tmp_path / "clip_l.safetensors", "clip_l", dtype="f16")
    t5 = fixtures.component_safetensors(tmp_path / "t5xxl.safetensors", "t5xxl", dtype="bf16")
    vae = fixtures.component_safetensors(tmp_path / "ae.safetensors", "vae")
    for diff in (diff_bare, diff_pref):
        model = fluxmini.FluxMini.load(diff, clip_l=clip, t5xxl=t5, vae=vae)
        check_model(model)
        comps = model.info()["components"]
        assert comps["clip_l"]["tensors_per_type"] == {"f16": len(fluxmini.inventory.clip_tensors(DIMS.clip))}
        assert set(comps["t5xxl"]["tensors_per_type"]) == {"bf16"}
        assert comps["vae"]["sources"] == [str(vae)]


def test_split_files_with_sdcpp_prefixes_and_gguf_encoders(tmp_path):
    diff = fixtures.write_model(tmp_path / "d.gguf", components=["diffusion"], bare=True)
    clip = fixtures.component_safetensors(tmp_path / "c.safetensors", "clip_l", prefix="text_encoders.clip_l.transformer.")
    t5 = fixtures.write_model(tmp_path / "t5.gguf", components=["t5xxl"], layout="sd.cpp", big_type="q8_0")
    vae = fixtures.component_safetensors(tmp_path / "v.safetensors", "vae", prefix="vae.")
    check_model(fluxmini.FluxMini.load(diff, clip_l=clip, t5xxl=t5, vae=vae))


def test_clip_without_text_model_level(tmp_path):
    # transformers 5.x writes CLIPTextModel weights as "embeddings.*", "encoder.layers.*", ...
    gguf_path = fixtures.cached_model("loader-gpustack-f32")
    clip = fixtures.component_safetensors(tmp_path / "clip.safetensors", "clip_l")
    data = fixtures.read_component(gguf_path, "clip_l")
    fixtures.write_safetensors(clip, {k[len("text_model."):]: v for k, v in data.items()})
    model = fluxmini.FluxMini.load(gguf_path, clip_l=clip)
    c = model.info()["components"]["clip_l"]
    assert c["sources"] == [str(clip)] and c["config"] == expected_config(DIMS)["clip_l"]


def test_unused_integer_tensors_are_ignored(tmp_path):
    # HF CLIP checkpoints carry position_ids as int64; nothing uses it, so it must not fail.
    tensors = {}
    for name, shape in fluxmini.inventory.clip_tensors(DIMS.clip):
        tensors[name] = fixtures.tensor_values(1, name, shape)
    clip = fixtures.write_safetensors(tmp_path / "clip.safetensors", tensors)
    with open(clip, "rb") as f:
        data = f.read()
    hlen = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + hlen])
    end = max(v["data_offsets"][1] for v in header.values())
    header["text_model.embeddings.position_ids"] = {"dtype": "I64", "shape": [1, 77], "data_offsets": [end, end + 77 * 8]}
    hj = json.dumps(header).encode()
    with open(clip, "wb") as f:
        f.write(struct.pack("<Q", len(hj)) + hj + data[8 + hlen:] + np.arange(77, dtype=np.int64).tobytes())
    diff = fixtures.cached_model("loader-gpustack-f32")
    model = fluxmini.FluxMini.load(diff, clip_l=clip)
    assert "text_model.embeddings.position_ids" in model.info()["ignored_tensors"]


def test_hyper_parameters_come_from_shapes(tmp_path):
    dims = ModelDims(
        flux=fluxmini.inventory.FluxDims(hidden=384, depth=1, depth_single=2, context_dim=96, vec_dim=64, guidance=False),
        clip=fluxmini.inventory.ClipDims(hidden=128, layers=3, mlp=256),
        t5=T5Dims(d_model=96, layers=3, heads=6, d_kv=8, d_ff=160, duplicate_embed=False),
        vae=fluxmini.inventory.VaeDims(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2),
    )
    path = fixtures.write_model(tmp_path / "other.gguf", dims=dims)
    check_model(fluxmini.FluxMini.load(path), dims)


def test_k_quant_tensors_load(tmp_path):
    # gguf-py cannot quantize to Q4_K; random block bytes are a valid Q4_K tensor for loading.
    name = "model.diffusion_model.double_blocks.0.img_mlp.2.weight"  # rows of 1024 = 4 super-blocks
    rows, cols = 256, 1024
    raw = np.random.default_rng(0).integers(0, 255, size=(rows, cols // 256 * 144), dtype=np.uint8)
    path = tmp_path / "k.gguf"
    import gguf

    w = gguf.GGUFWriter(str(path), "t")
    for full, shape in fixtures_iter(skip={name}):
        w.add_tensor(full, fixtures.tensor_values(0, full, shape))
    w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    model = fluxmini.FluxMini.load(path)
    assert model.info()["components"]["diffusion"]["tensors_per_type"]["q4_K"] == 1


def fixtures_iter(skip=()):
    for comp in fluxmini.inventory.COMPONENTS:
        for n, s in fluxmini.inventory.component_tensors(comp, DIMS):
            full = LAYOUT_PREFIXES["gpustack"][comp] + n
            if full not in skip:
                yield full, s


def test_components_argument_and_missing_component(tmp_path):
    diff = fixtures.write_model(tmp_path / "d.gguf", components=["diffusion", "clip_l", "t5xxl"])
    with pytest.raises(fluxmini.FluxMiniValueError, match=r"no vae weights.*vae=PATH"):
        fluxmini.FluxMini.load(diff)
    model = fluxmini.FluxMini.load(diff, components=["diffusion"])
    assert not model.info()["components"]["vae"]["present"]
    with pytest.raises(fluxmini.FluxMiniValueError, match="no vae weights"):
        model.vae_decode(np.zeros((16, 4, 4), np.float32))


def test_threads_default_is_physical_cores(gpustack_f32):
    model = fluxmini.FluxMini.load(gpustack_f32)
    assert model.threads == fluxmini._core.physical_cores()
    model.threads = 1
    assert model.threads == 1
    with pytest.raises(fluxmini.FluxMiniValueError):
        model.threads = 0


def test_backend_choice(gpustack_f32):
    assert "cpu" in fluxmini._core.available_backends()
    assert fluxmini.FluxMini.load(gpustack_f32, backend="auto").info()["backend"] in ("cpu", "cuda", "metal")
    if "cuda" not in fluxmini._core.available_backends():
        with pytest.raises(fluxmini.FluxMiniRuntimeError, match="no cuda backend.*GGML_CUDA"):
            fluxmini.FluxMini.load(gpustack_f32, backend="cuda")
    with pytest.raises(fluxmini.FluxMiniValueError, match="unknown backend"):
        fluxmini.FluxMini.load(gpustack_f32, backend="tpu")


def rss_anon_kb():
    """Anonymous resident memory of this process (Linux: RssAnon in /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("/proc/self/status has no RssAnon line (Linux >= 4.5 has it)")


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="measures anonymous memory through Linux's /proc/self/status")


@linux_only
def test_f32_weights_are_used_in_place(tmp_path):
    # A bigger diffusion model so the effect is far above allocator noise: its F32 weights must
    # stay in the file mapping, not be copied into anonymous memory.
    dims = ModelDims(flux=fluxmini.inventory.FluxDims(hidden=1024, depth=2, depth_single=2, context_dim=64, vec_dim=32))
    path = fixtures.write_model(tmp_path / "big.gguf", dims=dims, components=["diffusion"])
    model = fluxmini.FluxMini.load(path, components=["diffusion"])
    weights = model.info()["components"]["diffusion"]["bytes"]
    before = rss_anon_kb()
    model.load_weights("diffusion")
    grown = (rss_anon_kb() - before) * 1024
    assert weights > 150e6
    assert grown < 0.1 * weights, (grown, weights)


@linux_only
@pytest.mark.parametrize("kernels", ["default", "ggml"])
def test_q4_0_weights_are_not_widened(tmp_path, kernels):
    """Q4_0 weights never become F32/F16 copies. Where fluxmini's matmul kernel runs (the engine
    says so in info()["kernels"]) they are used in place from the file mapping; with ggml's
    matmul (FLUXMINI_KERNELS=ggml, and the default on a CPU without a fluxmini path) ggml copies
    them into its repacked buffer, which is the size of the Q4_0 data. Both paths are checked on
    every machine; each in its own process, as the kernel choice is read once per process."""
    dims = ModelDims(flux=fluxmini.inventory.FluxDims(hidden=1024, depth=2, depth_single=2, context_dim=64, vec_dim=32))
    path = fixtures.write_model(tmp_path / "q4.gguf", dims=dims, components=["diffusion"], big_type="q4_0")
    code = textwrap.dedent(f"""
        import json, fluxmini
        def rss_anon_kb():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))
        model = fluxmini.FluxMini.load({str(path)!r}, components=["diffusion"])
        before = rss_anon_kb()
        model.load_weights("diffusion")
        print(json.dumps({{"grown": (rss_anon_kb() - before) * 1024, "kernels": model.info()["kernels"],
                           "bytes": model.info()["components"]["diffusion"]["bytes"]}}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("FLUXMINI_KERNELS", None)
    if kernels != "default":
        env["FLUXMINI_KERNELS"] = kernels
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    grown, q4_bytes = res["grown"], res["bytes"]
    assert q4_bytes > 40e6
    if "matmul: fluxmini" in res["kernels"]:
        assert kernels == "default"
        # in place: only small F32 tensors (biases, norms) and allocator noise
        assert grown < 0.1 * q4_bytes, (grown, q4_bytes, res["kernels"])
    else:
        # repacked copy = the Q4_0 data (plus small F32 tensors); an F32 or F16 copy is 4-8x larger
        assert grown < 1.5 * q4_bytes, (grown, q4_bytes, res["kernels"])


# ------------------------------------------------------------------------------ bad input

def load_in_subprocess(path, **kwargs):
    code = textwrap.dedent(f"""
        import json, sys
        import fluxmini
        try:
            fluxmini.FluxMini.load({str(path)!r}, **{kwargs!r})
            print(json.dumps({{"ok": True}}))
        except fluxmini.FluxMiniError as e:
            print(json.dumps({{"ok": False, "cls": type(e).__name__, "msg": str(e),
                               "bases": [b.__name__ for b in type(e).__mro__]}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, f"crashed (rc {r.returncode}): {r.stderr[-2000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def expect_error(path, cls, *patterns, **kwargs):
    res = load_in_subprocess(path, **kwargs)
    assert not res["ok"], "a bad file was accepted"
    assert res["cls"] == cls, res
    for p in patterns:
        assert p.lower() in res["msg"].lower(), (p, res["msg"])
    return res


def test_missing_file(tmp_path):
    res = expect_error(tmp_path / "nope.gguf", "FluxMiniFileError", "not found", "nope.gguf")
    assert "OSError" in res["bases"]


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"hello world, definitely not a model" * 10)
    expect_error(p, "FluxMiniFileError", "neither a gguf nor a safetensors")
    (tmp_path / "empty.gguf").write_bytes(b"")
    expect_error(tmp_path / "empty.gguf", "FluxMiniFileError", "empty")


@pytest.mark.parametrize("fraction", [0.0005, 0.003, 0.01, 0.5, 0.999])
def test_truncated_gguf(tmp_path, gpustack_f32, fraction):
    data = gpustack_f32.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: max(8, int(len(data) * fraction))])
    res = expect_error(p, "FluxMiniFileError", "truncated")
    assert "download it again" in res["msg"]


def test_tensor_offset_past_end(tmp_path, gpustack_f32):
    # Rewrite the offset field of the first tensor info to point far past the end.
    import gguf

    r = gguf.GGUFReader(str(gpustack_f32))
    t = r.tensors[0]
    data = bytearray(gpustack_f32.read_bytes())
    name = t.name.encode()
    pos = data.index(struct.pack("<Q", len(name)) + name)
    pos += 8 + len(name)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    pos += 4 + 8 * n_dims + 4
    struct.pack_into("<Q", data, pos, len(data) * 4 // 32 * 32)
    p = tmp_path / "off.gguf"
    p.write_bytes(bytes(data))
    expect_error(p, "FluxMiniFileError", t.name, "past the end")


def test_huge_counts_in_header(tmp_path, gpustack_f32):
    data = bytearray(gpustack_f32.read_bytes()[:4096])
    struct.pack_into("<Q", data, 8, 2**62)  # n_tensors
    p = tmp_path / "count.gguf"
    p.write_bytes(bytes(data))
    expect_error(p, "FluxMiniFileError", "damaged")


def test_required_tensor_missing(tmp_path):
    name = "model.diffusion_model.double_blocks.1.txt_attn.proj.weight"
    p = fixtures.write_model(tmp_path / "m.gguf", skip={name})
    expect_error(p, "FluxMiniValueError", "double_blocks.1.txt_attn.proj.weight", "lack")


def test_wrong_shape(tmp_path):
    p = fixtures.write_model(tmp_path / "m.gguf", override_shapes={"single_blocks.2.linear2.weight": (256, 1000)})
    expect_error(p, "FluxMiniValueError", "single_blocks.2.linear2.weight", "[256, 1000]", "[256, 1280]")


def test_unsupported_type(tmp_path):
    name = "model.diffusion_model.single_blocks.0.modulation.lin.weight"
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "t")
    for full, shape in fixtures_iter(skip={name}):
        w.add_tensor(full, fixtures.tensor_values(0, full, shape))
    w.add_tensor(name, np.zeros((768, 256), np.int32))  # an integer weight
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    expect_error(tmp_path / "m.gguf", "FluxMiniValueError", name, "cannot compute", "quantize")


def test_unknown_type_id(tmp_path, gpustack_f32):
    import gguf

    r = gguf.GGUFReader(str(gpustack_f32))
    t = r.tensors[3]
    data = bytearray(gpustack_f32.read_bytes())
    name = t.name.encode()
    pos = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    struct.pack_into("<I", data, pos + 4 + 8 * n_dims, 4)  # type id 4 was removed from ggml (Q4_2)
    p = tmp_path / "type.gguf"
    p.write_bytes(bytes(data))
    expect_error(p, "FluxMiniFileError", "unknown type id 4")


def test_bad_safetensors(tmp_path, gpustack_f32):
    clip = fixtures.component_safetensors(tmp_path / "clip.safetensors", "clip_l")
    data = clip.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    res = load_in_subprocess(gpustack_f32, clip_l=str(tmp_path / "cut.safetensors"))
    assert res["cls"] == "FluxMiniFileError" and "truncated" in res["msg"], res
    bad = bytearray(data)
    bad[8:12] = b"{{{{"
    (tmp_path / "json.safetensors").write_bytes(bytes(bad))
    res = load_in_subprocess(gpustack_f32, clip_l=str(tmp_path / "json.safetensors"))
    assert res["cls"] == "FluxMiniFileError" and "not valid json" in res["msg"].lower(), res
    hdr = bytearray(data)
    struct.pack_into("<Q", hdr, 0, 2**40)
    (tmp_path / "hdr.safetensors").write_bytes(bytes(hdr))
    res = load_in_subprocess(gpustack_f32, clip_l=str(tmp_path / "hdr.safetensors"))
    assert res["cls"] == "FluxMiniFileError" and "header claims" in res["msg"], res


def test_wrong_file_for_component(tmp_path, gpustack_f32):
    vae_only = fixtures.write_model(tmp_path / "vae.gguf", components=["vae"], bare=True)
    res = load_in_subprocess(gpustack_f32, clip_l=str(vae_only))
    assert res["cls"] == "FluxMiniValueError" and "holds no clip_l tensors" in res["msg"], res


def test_split_component_replaces_main_files(tmp_path, gpustack_f32):
    clip = fixtures.component_safetensors(tmp_path / "clip.safetensors", "clip_l", dtype="f16")
    model = fluxmini.FluxMini.load(gpustack_f32, clip_l=clip)
    c = model.info()["components"]["clip_l"]
    assert c["sources"] == [str(clip)] and set(c["tensors_per_type"]) == {"f16"}


def test_duplicate_tensor_in_two_files(tmp_path):
    # The same diffusion tensor in the main file and again in a file given for no component.
    diff = fixtures.write_model(tmp_path / "a.gguf", components=["diffusion", "clip_l"])
    res = load_in_subprocess(diff, t5xxl=str(fixtures.write_model(tmp_path / "b.gguf", components=["t5xxl", "diffusion"])),
                             components=["diffusion"])
    assert res["ok"], res  # diffusion names in a T5 file are ignored, not merged


def test_bad_arguments(gpustack_f32):
    with pytest.raises(fluxmini.FluxMiniValueError):
        fluxmini.FluxMini.load(gpustack_f32, threads=-1)
    with pytest.raises(fluxmini.FluxMiniValueError, match="unknown component"):
        fluxmini.FluxMini.load(gpustack_f32, components=["unet"])
    with pytest.raises(fluxmini.FluxMiniValueError):
        fluxmini.FluxMini.load(None)


def test_token_ids_that_would_wrap_are_refused(gpustack_f32):
    # 2**32 + 5 would become 5 in a plain int32 cast and be accepted as a valid id.
    model = fluxmini.FluxMini.load(gpustack_f32)
    with pytest.raises(fluxmini.FluxMiniValueError, match="32 bits"):
        model.encode_t5(np.array([2**32 + 5, 1], np.int64))
    with pytest.raises(fluxmini.FluxMiniValueError, match="integers"):
        model.encode_t5(np.array([1.5, 1.0]))


def test_cli_info(gpustack_f32):
    r = subprocess.run([sys.executable, "-m", "fluxmini.cli", "info", str(gpustack_f32)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for comp in ("diffusion", "clip_l", "t5xxl", "vae"):
        assert comp in out
    assert "double_blocks=2" in out and "single_blocks=3" in out and "d_model=64" in out
    r = subprocess.run([sys.executable, "-m", "fluxmini.cli", "info", "/nonexistent.gguf"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 2 and "not found" in r.stderr
