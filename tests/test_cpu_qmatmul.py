"""The quantized matmul kernel (csrc/cpu_qmatmul.cpp, Q4_0, Q4_1 and Q8_0 weights) against numpy,
on every instruction-set path this CPU runs, each forced.

Weights are quantized and dequantized by the gguf package (an independent implementation of
ggml's Q4_0, Q4_1 and Q8_0). Activations are quantized as ggml's CPU backend does for these (blocks of
32, scale = max|x| / 127, round half to even), here in numpy. With both operands' rounded values,
the product is computed in float64: the kernel's integer block sums are exact, so it may differ
only by the F32 scaling and summation of the block results: |got − ref| ≤ 1e-5·Σ|ŵ·x̂| (measured
≤ 2e-7 of it). Against the unquantized activations the difference is the activation rounding
itself, bounded per output by Σ_blocks Σ|ŵ|·d_a/2; that bound must hold too.

Paths: avx512vnni (vpdpbusd zmm), avxvnni (vpdpbusd ymm, VEX), avx2 (vpmaddubsw + vpmaddwd) and
portable (plain C++). Each test runs on every path this CPU has (which paths that is, is itself
checked against /proc/cpuinfo); a path the CPU lacks is skipped with the reason.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

import fixtures  # tests/ on sys.path
from fluxmini import _core


TYPES = {"q4_0": QT.Q4_0, "q4_1": QT.Q4_1, "q8_0": QT.Q8_0}


def quantized(w: np.ndarray, type_name: str = "q4_0"):
    """ggml block bytes [n, row bytes] and their dequantized values (gguf's implementation)."""
    raw = quantize(w.astype(np.float32), TYPES[type_name])
    return np.ascontiguousarray(raw), dequantize(raw, TYPES[type_name]).astype(np.float64)


def quantize_activations(x: np.ndarray):
    """ggml's Q8_0 rounding of activations, returned dequantized (float64) with the block scales."""
    rows, k = x.shape
    b = x.astype(np.float32).reshape(rows, k // 32, 32)
    amax = np.abs(b).max(axis=2, keepdims=True)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(b * inv)
    d = (amax / np.float32(127.0)).astype(np.float32)
    return (q * d).astype(np.float64).reshape(rows, k), d.reshape(rows, k // 32).astype(np.float64)


PATHS = ["avx512vnni", "avxvnni", "avx2", "portable"]
VECTOR_PATHS = PATHS[:-1]


def require(path: str):
    if path not in _core.testing.qmatmul_paths():
        pytest.skip(f"this CPU lacks the {path} path (its paths: {', '.join(_core.testing.qmatmul_paths())})")


SHAPES = [  # (rows, k, n)
    (1, 32, 8),       # one block, one row (the modulation vectors are single rows)
    (7, 288, 24),     # 9 blocks, one pass over k; 7 rows = a tile of 6 and one of 1
    (7, 2336, 24),    # 73 blocks: three passes over k of 25 + 25 + 23 blocks (F32 sums carried across)
    (13, 1024, 72),   # 72 columns: a chunk of 64 and one of 8 (zmm: units of 16 and a half unit)
    (64, 256, 136),
    (20, 512, 40),    # zmm: one tile of two units and one of a half unit
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("type_name", list(TYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_product_of_the_rounded_operands(shape, type_name, path):
    require(path)
    rows, k, n = shape
    rng = np.random.default_rng(rows * 1000 + n)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = (rng.standard_normal((rows, k)) * rng.uniform(0.1, 10, (rows, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (scale 0)
    bias = rng.standard_normal(n).astype(np.float32)
    raw, w_hat = quantized(w, type_name)
    x_hat, d = quantize_activations(x)
    got = _core.testing.qmatmul(type_name, raw, x, bias, threads=2, kernels=path)
    assert got.shape == (rows, n) and got.dtype == np.float32
    ref = x_hat @ w_hat.T + bias
    mag = np.abs(x_hat) @ np.abs(w_hat).T + np.abs(bias)
    assert np.all(np.abs(got - ref) <= 1e-5 * mag), float(np.max(np.abs(got - ref) / mag))
    # Against unquantized activations: within half a rounding step of every activation block.
    half_step = (np.abs(w_hat).reshape(n, k // 32, 32).sum(axis=2) @ (d / 2).T).T  # [rows, n]
    exact = x.astype(np.float64) @ w_hat.T + bias
    assert np.all(np.abs(got - exact) <= half_step * 1.001 + 1e-5 * mag)


@pytest.mark.parametrize("type_name", list(TYPES))
def test_q8_0_extreme_bytes_and_activations(type_name):
    """Weights and activations at the ends of their ranges (Q8_0 bytes ±127 and -128, Q4 nibbles 0
    and 15, activations ±127): the AVX2 path's int16 sums are at their largest (no saturation
    allowed), and every path must still give the float64 product."""
    rng = np.random.default_rng(11)
    n, k, rows = 24, 256, 9
    w = np.where(rng.random((n, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    w[:, ::7] *= 0.01  # the block maximum sets the scale; most values sit at ±max
    raw, w_hat = quantized(w, type_name)
    if type_name == "q8_0":  # one quant of -128 in a row (ggml's quantizer never writes it; files may)
        blocks = raw.reshape(n, k // 32, 34)
        blocks[0, 0, 2] = 0x80
        w_hat = dequantize(raw, TYPES[type_name]).astype(np.float64)
    x = np.where(rng.random((rows, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    x[1] = 1.0  # all activations +127 against all weights of one sign: the largest sums
    x_hat, _ = quantize_activations(x)
    ref = x_hat @ w_hat.T
    mag = np.abs(x_hat) @ np.abs(w_hat).T
    for path in _core.testing.qmatmul_paths():
        got = _core.testing.qmatmul(type_name, raw, x, None, threads=1, kernels=path)
        assert np.all(np.abs(got - ref) <= 1e-5 * mag), (path, float(np.max(np.abs(got - ref) / mag)))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("type_name", list(TYPES))
def test_thread_counts_give_identical_results(type_name, path):
    require(path)
    rng = np.random.default_rng(3)
    raw, _ = quantized(rng.standard_normal((48, 512)).astype(np.float32), type_name)
    x = rng.standard_normal((20, 512)).astype(np.float32)
    one = _core.testing.qmatmul(type_name, raw, x, None, threads=1, kernels=path)
    for t in (2, 3, 4):
        np.testing.assert_array_equal(_core.testing.qmatmul(type_name, raw, x, None, threads=t, kernels=path), one)


@pytest.mark.parametrize("type_name", list(TYPES))
def test_vector_paths_agree_bit_for_bit(type_name):
    """The vector paths compute the same integer sums and the same float steps in the same order
    (cpu_qmatmul.cpp), so a model gives the same numbers whichever one a CPU has."""
    have = [p for p in VECTOR_PATHS if p in _core.testing.qmatmul_paths()]
    if len(have) < 2:
        pytest.skip(f"this CPU has {len(have)} vector path(s): nothing to compare")
    rng = np.random.default_rng(4)
    raw, _ = quantized(rng.standard_normal((72, 640)).astype(np.float32), type_name)
    x = rng.standard_normal((15, 640)).astype(np.float32)
    outs = {p: _core.testing.qmatmul(type_name, raw, x, None, threads=2, kernels=p) for p in have}
    for p in have[1:]:
        np.testing.assert_array_equal(outs[p], outs[have[0]], err_msg=f"{p} vs {have[0]}")


def test_paths_match_the_cpu_flags():
    """The kernel's own detection (cpuid + xgetbv) against the flags Linux reports (which it clears
    where the OS does not save the registers' state)."""
    flags = fixtures.cpuinfo_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags (not Linux)")
    expect = ["portable"]
    if {"avx2", "fma", "f16c"} <= flags:
        expect.insert(0, "avx2")
        if "avx_vnni" in flags:
            expect.insert(0, "avxvnni")
        if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
            expect.insert(0, "avx512vnni")
    assert _core.testing.qmatmul_paths() == expect
    print("qmatmul paths on this CPU:", expect)


def test_bad_arguments_raise():
    from fluxmini.errors import FluxMiniValueError

    raw, _ = quantized(np.ones((8, 64), np.float32))
    with pytest.raises(FluxMiniValueError):
        _core.testing.qmatmul("q4_0", raw, np.zeros((2, 32), np.float32))  # k mismatch
    with pytest.raises(FluxMiniValueError):
        _core.testing.qmatmul("q4_0", raw[:4], np.zeros((2, 64), np.float32))  # n not a multiple of 8
    with pytest.raises(FluxMiniValueError):
        _core.testing.qmatmul("q4_0", raw, np.zeros((2, 64), np.float32), np.zeros(3, np.float32))  # bias size
    with pytest.raises(FluxMiniValueError):
        _core.testing.qmatmul("q8_0", raw, np.zeros((2, 64), np.float32))  # Q4_0 bytes given as Q8_0
    with pytest.raises(FluxMiniValueError):
        _core.testing.qmatmul("q5_0", raw, np.zeros((2, 64), np.float32))
    with pytest.raises(FluxMiniValueError, match="unknown kernels"):
        _core.testing.qmatmul("q4_0", raw, np.zeros((2, 64), np.float32), kernels="avx1024")


def test_engine_path_follows_fluxmini_kernels(monkeypatch):
    """FLUXMINI_KERNELS: unset / auto -> the fastest vector path (ggml's matmul where there is none);
    each path this CPU has can be forced; an unknown value or a path the CPU lacks is a
    FluxMiniValueError naming what the CPU runs, also from FluxMini.load."""
    from fluxmini.errors import FluxMiniValueError

    have = _core.testing.qmatmul_paths()
    best = have[0] if have[0] != "portable" else "ggml"
    monkeypatch.delenv("FLUXMINI_KERNELS", raising=False)
    assert _core.testing.qmatmul_engine_path() == best
    for value, want in [("auto", best), ("ggml", "ggml")] + [(p, p) for p in have]:
        monkeypatch.setenv("FLUXMINI_KERNELS", value)
        assert _core.testing.qmatmul_engine_path() == want
    monkeypatch.setenv("FLUXMINI_KERNELS", "avx1024")
    with pytest.raises(FluxMiniValueError, match="not a kernel choice"):
        _core.testing.qmatmul_engine_path()
    # A CPU without AVX-512 and AVX-VNNI (pretended): forcing them fails, auto takes AVX2.
    monkeypatch.setenv("FLUXMINI_CPU_WITHOUT", "avx512vnni,avxvnni")
    for lacking in ("avx512vnni", "avxvnni"):
        monkeypatch.setenv("FLUXMINI_KERNELS", lacking)
        with pytest.raises(FluxMiniValueError, match="this CPU lacks") as e:
            _core.testing.qmatmul_engine_path()
        assert "avx2, portable" in str(e.value) or "avx2" not in have
    monkeypatch.delenv("FLUXMINI_KERNELS")
    assert _core.testing.qmatmul_engine_path() == ("avx2" if "avx2" in have else "ggml")
    monkeypatch.setenv("FLUXMINI_CPU_WITHOUT", "avx2")  # no vector path at all: ggml's matmul
    assert _core.testing.qmatmul_engine_path() == "ggml"
    assert _core.testing.qmatmul_paths() == ["portable"]


def test_model_load_rejects_a_bad_kernel_choice(monkeypatch, tmp_path):
    from fluxmini.errors import FluxMiniValueError
    from fluxmini.model import FluxMini

    path = fixtures.write_model(tmp_path / "m.gguf", big_type="q4_0")
    monkeypatch.setenv("FLUXMINI_KERNELS", "avx-512")
    with pytest.raises(FluxMiniValueError, match="FLUXMINI_KERNELS='avx-512' is not a kernel choice"):
        FluxMini.load(path, components=["diffusion"])
    monkeypatch.setenv("FLUXMINI_KERNELS", "avx512vnni")
    monkeypatch.setenv("FLUXMINI_CPU_WITHOUT", "avx512vnni")
    with pytest.raises(FluxMiniValueError, match="this CPU lacks AVX-512 VNNI"):
        FluxMini.load(path, components=["diffusion"])


DESCRIPTION = {"avx512vnni": "AVX-512 VNNI", "avxvnni": "AVX-VNNI", "avx2": "AVX2", "portable": "plain C++"}


@pytest.mark.parametrize("name", ["q4_0", "q8_0"])
def test_engine_on_every_path(monkeypatch, name):
    """The engine's Q4_0 / Q8_0 linears on each path (FLUXMINI_KERNELS forced), against the
    transformer goldens (diffusers' reference) next to ggml's matmul (FLUXMINI_KERNELS=ggml):
    every path meets test_flux's tolerance and is as close to the reference as ggml (within 1.5x
    of its error: both quantize the same activations the same way; ggml also rounds the block
    scales to F16) while differing from it (so our kernel did run); the vector paths agree bit
    for bit; `fluxmini info` names the path."""
    import make_flux_goldens as G
    from fluxmini.model import FluxMini
    from test_flux import tolerance

    goldens = np.load(G.GOLDENS)
    i = next(k for k, c in enumerate(G.CASES) if c[0] == name)
    _, h, w, sigma, guidance, _, _ = G.CASES[i]
    args = (goldens[f"c{i}_latent"], sigma, guidance, goldens[f"c{i}_t5"], goldens[f"c{i}_pooled"])
    ref = goldens[f"c{i}_out"]

    def run(kernels):
        monkeypatch.setenv("FLUXMINI_KERNELS", kernels)
        model = FluxMini.load(G.model_path(name), components=["diffusion"], threads=2)
        return model.transformer(*args), model.info()["kernels"]

    def err(a):
        return float(np.abs(a - ref).max() / np.abs(ref).max())

    theirs, info = run("ggml")
    assert info.startswith("matmul: ggml")
    assert err(theirs) <= tolerance(name)
    vector = {}
    for path in PATHS:
        if path not in _core.testing.qmatmul_paths():
            print(f"skipped {path}: this CPU lacks it")
            continue
        ours, info = run(path)
        assert f"Q4_0/Q4_1/Q8_0 matmul: fluxmini ({DESCRIPTION[path]})" in info
        assert err(ours) <= tolerance(name), (path, err(ours))
        assert err(ours) <= 1.5 * err(theirs) and err(theirs) <= 1.5 * err(ours), (path, err(ours), err(theirs))
        assert not np.array_equal(ours, theirs), path
        if path in VECTOR_PATHS:
            vector[path] = ours
    for path, out in vector.items():
        np.testing.assert_array_equal(out, next(iter(vector.values())), err_msg=path)


def test_portable_conv_passes_the_same_tests():
    """The plain C++ convolution (what CPUs without AVX2 run) passes test_cpu_conv.py's tests too:
    FLUXMINI_KERNELS=portable selects it (the quantized matmul's paths are forced per test above)."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        os.path.join(here, "test_cpu_conv.py")],
                       env=dict(os.environ, FLUXMINI_KERNELS="portable"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout
    # and it really ran the portable version:
    check = subprocess.run([sys.executable, "-c",
                            "from fluxmini import _core; print(_core.testing.cpu_conv2d_available())"],
                           env=dict(os.environ, FLUXMINI_KERNELS="portable"), capture_output=True, text=True)
    assert check.stdout.split() == ["False"], check.stdout + check.stderr


@pytest.fixture(scope="module")
def q4_model_file(tmp_path_factory):
    """A Q4_0 transformer with ~80 MB of weights (written once: quantizing in numpy is slow)."""
    import fluxmini
    from fluxmini.inventory import ModelDims

    dims = ModelDims(flux=fluxmini.inventory.FluxDims(hidden=1024, depth=2, depth_single=2, context_dim=64, vec_dim=32))
    return fixtures.write_model(tmp_path_factory.mktemp("q4") / "q4.gguf", dims=dims, components=["diffusion"],
                                big_type="q4_0")


GROWN_CODE = """
import json, sys
import fluxmini

def rss_anon_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

model = fluxmini.FluxMini.load(sys.argv[1], components=["diffusion"])
before = rss_anon_kb()
model.load_weights("diffusion")
print(json.dumps({"grown": (rss_anon_kb() - before) * 1024, "kernels": model.info()["kernels"],
                  "bytes": model.info()["components"]["diffusion"]["bytes"]}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc/self/status")
@pytest.mark.parametrize("cpu", ["this", "avx512-without-avxvnni", "avx2-only"])
def test_weights_stay_in_place_where_our_kernel_runs(q4_model_file, cpu):
    """Where our kernel runs, Q4_0 weights are used in place from the file mapping: loading them
    grows anonymous memory by far less than their size, on this CPU and as on CPUs without AVX-VNNI
    (AVX-512 VNNI only, e.g. AMD Zen 4) or without either VNNI (AVX2 only); with ggml's matmul
    (FLUXMINI_KERNELS=ggml) they are copied into ggml's repacked layout (about their size). Each
    load in a fresh process: in a long-lived one, glibc reuses freed memory without growing RSS."""
    import json
    import subprocess
    import sys

    lacks = {"this": "", "avx512-without-avxvnni": "avxvnni", "avx2-only": "avx512vnni,avxvnni"}[cpu]
    want = {"this": _core.testing.qmatmul_paths()[0], "avx512-without-avxvnni": "avx512vnni", "avx2-only": "avx2"}[cpu]
    if want not in _core.testing.qmatmul_paths() or want == "portable":
        pytest.skip(f"this CPU lacks the {want} path")

    def grown(kernels):
        env = dict(os.environ, FLUXMINI_KERNELS=kernels, FLUXMINI_CPU_WITHOUT=lacks,
                   PYTHONPATH=os.pathsep.join(sys.path))
        r = subprocess.run([sys.executable, "-c", GROWN_CODE, str(q4_model_file)], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    ours, theirs = grown("auto"), grown("ggml")
    assert f"fluxmini ({DESCRIPTION[want]})" in ours["kernels"] and theirs["kernels"].startswith("matmul: ggml")
    assert ours["bytes"] > 20e6
    assert ours["grown"] < 0.1 * ours["bytes"], ours
    assert theirs["grown"] > 0.5 * ours["bytes"], theirs  # the repacked copy: the check can see a copy


@pytest.mark.parametrize("path", PATHS)
def test_engine_q4_1_against_exact_weights(monkeypatch, tmp_path, path):
    """Q4_1 (no transformer goldens): the engine with this kernel (each path) and with ggml's
    matmul, each against the exact result for the same weights (the engine on an F32 copy of the
    dequantized weights, written by fluxmini.convert.quantize). Both only round activations the
    same way, so their errors must be alike (within 1.5x) and small (≤ 3e-2, test_flux's bound for
    4-bit)."""
    require(path)
    from fluxmini.convert import quantize
    from fluxmini.model import FluxMini

    path_file = fixtures.write_model(tmp_path / "q4_1.gguf", big_type="q4_1")
    exact_path = tmp_path / "q4_1-as-f32.gguf"
    quantize(path_file, exact_path, "f32", pure=True, progress=False)
    rng = np.random.default_rng(5)
    d = FluxMini.load(path_file, components=["diffusion"]).config["diffusion"]
    args = (rng.standard_normal((16, 10, 8)).astype(np.float32), 0.6, 3.5,
            rng.standard_normal((9, d["context_dim"])).astype(np.float32),
            rng.standard_normal(d["vec_dim"]).astype(np.float32))
    exact = FluxMini.load(exact_path, components=["diffusion"], threads=2).transformer(*args)
    monkeypatch.setenv("FLUXMINI_KERNELS", path)
    ours = FluxMini.load(path_file, components=["diffusion"], threads=2).transformer(*args)
    monkeypatch.setenv("FLUXMINI_KERNELS", "ggml")
    theirs = FluxMini.load(path_file, components=["diffusion"], threads=2).transformer(*args)

    def err(a):
        return float(np.abs(a - exact).max() / np.abs(exact).max())

    assert 0 < err(ours) <= 3e-2 and 0 < err(theirs) <= 3e-2, (err(ours), err(theirs))
    assert err(ours) <= 1.5 * err(theirs) and err(theirs) <= 1.5 * err(ours), (err(ours), err(theirs))
    assert not np.array_equal(ours, theirs)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("type_name", list(TYPES))
def test_f16_activation_scales_as_ggml_stores_them(type_name, path):
    """f16_scales (compat="sd.cpp"'s T5, docs/MODEL.md §4.7): the same Q8_0 codes, each block's
    scale rounded to F16 (numpy's float16 cast, round to nearest even, subnormals included, as
    ggml's FP32_TO_FP16). Blocks of small values make some scales F16 subnormals."""
    require(path)
    rng = np.random.default_rng(7)
    rows, k, n = 5, 256, 16
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = (rng.standard_normal((rows, k)) * 10.0 ** rng.uniform(-5, 0.5, (rows, k // 32)).repeat(32, 1)).astype(np.float32)
    raw, w_hat = quantized(w, type_name)
    b = x.reshape(rows, k // 32, 32)
    amax = np.abs(b).max(axis=2, keepdims=True)
    q = np.rint(b * (np.float32(127.0) / amax))  # codes as quantize_activations makes them
    d = amax / np.float32(127.0)
    d16 = d.astype(np.float16).astype(np.float64)
    assert np.any(d16 < 2.0 ** -14) and np.any(d16 != d)  # subnormal and rounded scales occur
    x_hat16 = (q.astype(np.float64) * d16).reshape(rows, k)
    ref = x_hat16 @ w_hat.T
    mag = np.abs(x_hat16) @ np.abs(w_hat).T
    got = _core.testing.qmatmul(type_name, raw, x, None, threads=2, kernels=path, f16_scales=True)
    assert np.all(np.abs(got - ref) <= 1e-5 * mag), float(np.max(np.abs(got - ref) / mag))
    # the F32 scales give the other product, further from this reference than the bar
    plain = _core.testing.qmatmul(type_name, raw, x, None, threads=2, kernels=path)
    assert np.max(np.abs(plain - ref) / mag) > 2e-5
