"""The quantized matmul kernel (csrc/cpu_qmatmul.cpp, Q4_0, Q4_1 and Q8_0 weights) against numpy.

Weights are quantized and dequantized by the gguf package (an independent implementation of
ggml's Q4_0, Q4_1 and Q8_0). Activations are quantized as ggml's CPU backend does for these (blocks of
32, scale = max|x| / 127, round half to even), here in numpy. With both operands' rounded values,
the product is computed in float64: the kernel's integer block sums are exact, so it may differ
only by the F32 scaling and summation of the block results: |got − ref| ≤ 1e-5·Σ|ŵ·x̂| (measured
≤ 2e-7 of it). Against the unquantized activations the difference is the activation rounding
itself, bounded per output by Σ_blocks Σ|ŵ|·d_a/2; that bound must hold too.

The kernel runs where the CPU has AVX-VNNI; elsewhere the same functions run plain C++, so the
tests check whichever this machine uses (test_engine_uses_the_kernel says which).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

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


SHAPES = [  # (rows, k, n)
    (1, 32, 8),       # one block, one row (the modulation vectors are single rows)
    (7, 288, 24),     # 9 blocks: two passes over k of 5 + 4 blocks; 7 rows = a tile of 6 and one of 1
    (13, 1024, 72),   # 72 columns: a chunk of 64 and one of 8
    (64, 256, 136),
]


@pytest.mark.parametrize("type_name", list(TYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_product_of_the_rounded_operands(shape, type_name):
    rows, k, n = shape
    rng = np.random.default_rng(rows * 1000 + n)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = (rng.standard_normal((rows, k)) * rng.uniform(0.1, 10, (rows, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (scale 0)
    bias = rng.standard_normal(n).astype(np.float32)
    raw, w_hat = quantized(w, type_name)
    x_hat, d = quantize_activations(x)
    got = _core.testing.qmatmul(type_name, raw, x, bias, threads=2)
    assert got.shape == (rows, n) and got.dtype == np.float32
    ref = x_hat @ w_hat.T + bias
    mag = np.abs(x_hat) @ np.abs(w_hat).T + np.abs(bias)
    assert np.all(np.abs(got - ref) <= 1e-5 * mag), float(np.max(np.abs(got - ref) / mag))
    # Against unquantized activations: within half a rounding step of every activation block.
    half_step = (np.abs(w_hat).reshape(n, k // 32, 32).sum(axis=2) @ (d / 2).T).T  # [rows, n]
    exact = x.astype(np.float64) @ w_hat.T + bias
    assert np.all(np.abs(got - exact) <= half_step * 1.001 + 1e-5 * mag)


@pytest.mark.parametrize("type_name", list(TYPES))
def test_thread_counts_give_identical_results(type_name):
    rng = np.random.default_rng(3)
    raw, _ = quantized(rng.standard_normal((48, 512)).astype(np.float32), type_name)
    x = rng.standard_normal((20, 512)).astype(np.float32)
    one = _core.testing.qmatmul(type_name, raw, x, None, threads=1)
    for t in (2, 3, 4):
        np.testing.assert_array_equal(_core.testing.qmatmul(type_name, raw, x, None, threads=t), one)


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


@pytest.mark.parametrize("name", ["q4_0", "q8_0"])
def test_engine_uses_the_kernel(monkeypatch, name):
    """On a CPU with AVX-VNNI the engine's Q4_0 / Q4_1 / Q8_0 linears run this kernel (FLUXMINI_KERNELS=ggml
    gives ggml's matmul): on the transformer goldens (diffusers' reference) both meet test_flux's
    tolerance and are equally close to the reference (within 1.5x of each other's error: both
    quantize the same activations the same way; ggml also rounds the block scales to F16), and
    they differ, so the kernel did run."""
    import make_flux_goldens as G
    from fluxmini.model import FluxMini
    from test_flux import tolerance

    goldens = np.load(G.GOLDENS)
    i = next(k for k, c in enumerate(G.CASES) if c[0] == name)
    _, h, w, sigma, guidance, _, _ = G.CASES[i]
    args = (goldens[f"c{i}_latent"], sigma, guidance, goldens[f"c{i}_t5"], goldens[f"c{i}_pooled"])
    ref = goldens[f"c{i}_out"]
    ours_model = FluxMini.load(G.model_path(name), components=["diffusion"], threads=2)
    ours = ours_model.transformer(*args)
    monkeypatch.setenv("FLUXMINI_KERNELS", "ggml")
    theirs_model = FluxMini.load(G.model_path(name), components=["diffusion"], threads=2)
    theirs = theirs_model.transformer(*args)
    # what `fluxmini info` reports
    assert ("matmul: fluxmini (AVX-VNNI)" in ours_model.info()["kernels"]) == _core.testing.cpu_qmatmul_available()
    assert theirs_model.info()["kernels"].startswith("matmul: ggml")

    def err(a):
        return float(np.abs(a - ref).max() / np.abs(ref).max())

    assert err(ours) <= tolerance(name) and err(theirs) <= tolerance(name)
    assert err(ours) <= 1.5 * err(theirs) and err(theirs) <= 1.5 * err(ours), (err(ours), err(theirs))
    assert _core.testing.cpu_qmatmul_available() == (not np.array_equal(ours, theirs))


def test_portable_versions_pass_the_same_tests():
    """The plain C++ versions of both CPU kernels (what CPUs without AVX2 / AVX-VNNI run) pass
    this file's and test_cpu_conv.py's tests too: FLUXMINI_KERNELS=portable selects them (and
    makes the engine use ggml's kernels, which test_engine_uses_the_kernel then checks)."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        os.path.join(here, "test_cpu_qmatmul.py"), os.path.join(here, "test_cpu_conv.py"),
                        "-k", "not portable_versions"],
                       env=dict(os.environ, FLUXMINI_KERNELS="portable"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout
    # and they really ran the portable versions:
    check = subprocess.run([sys.executable, "-c", "from fluxmini import _core; "
                            "print(_core.testing.cpu_qmatmul_available(), _core.testing.cpu_conv2d_available())"],
                           env=dict(os.environ, FLUXMINI_KERNELS="portable"), capture_output=True, text=True)
    assert check.stdout.split() == ["False", "False"], check.stdout + check.stderr


def test_engine_q4_1_against_exact_weights(monkeypatch, tmp_path):
    """Q4_1 (no transformer goldens): the engine with this kernel and with ggml's matmul, each
    against the exact result for the same weights (the engine on an F32 copy of the dequantized
    weights, written by fluxmini.convert.quantize). Both only round activations the same way, so
    their errors must be alike (within 1.5x) and small (≤ 3e-2, test_flux's bound for 4-bit)."""
    import fixtures
    from fluxmini.convert import quantize
    from fluxmini.model import FluxMini

    path = fixtures.write_model(tmp_path / "q4_1.gguf", big_type="q4_1")
    exact_path = tmp_path / "q4_1-as-f32.gguf"
    quantize(path, exact_path, "f32", pure=True, progress=False)
    rng = np.random.default_rng(5)
    d = FluxMini.load(path, components=["diffusion"]).config["diffusion"]
    args = (rng.standard_normal((16, 10, 8)).astype(np.float32), 0.6, 3.5,
            rng.standard_normal((9, d["context_dim"])).astype(np.float32),
            rng.standard_normal(d["vec_dim"]).astype(np.float32))
    exact = FluxMini.load(exact_path, components=["diffusion"], threads=2).transformer(*args)
    ours = FluxMini.load(path, components=["diffusion"], threads=2).transformer(*args)
    monkeypatch.setenv("FLUXMINI_KERNELS", "ggml")
    theirs = FluxMini.load(path, components=["diffusion"], threads=2).transformer(*args)

    def err(a):
        return float(np.abs(a - exact).max() / np.abs(exact).max())

    assert 0 < err(ours) <= 3e-2 and 0 < err(theirs) <= 3e-2, (err(ours), err(theirs))
    assert err(ours) <= 1.5 * err(theirs) and err(theirs) <= 1.5 * err(ours), (err(ours), err(theirs))
    assert _core.testing.cpu_qmatmul_available() == (not np.array_equal(ours, theirs))
