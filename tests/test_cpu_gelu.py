"""The tanh GELU kernel (csrc/cpu_gelu.cpp) against float64 numpy.

Reference: GELU(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) in float64 (docs/MODEL.md §3.5;
torch's gelu(approximate="tanh")). The kernel computes x / (1 + e^(−2u)) in F32 with a polynomial
exp (relative error ≤ 1.6e-7) on the avx2 path and std::exp on the portable one.

Tolerance: |got − ref| ≤ 3e-7·|x|. The result is x times a sigmoid in [0, 1] computed from F32
roundings of 2u, its exp, a sum and a division; each is a few 1e-8 relative, and the sigmoid's
sensitivity to the rounding of 2u is at most its slope, 1/4, times |2u|·1.2e-7, which for the
x where the sigmoid is neither 0 nor 1 keeps the error a small multiple of 1e-7·|x| (measured on
this suite's values: at most 1.26e-7·|x|, both paths, Intel Xeon with AVX-512). A wrong constant,
a missing factor or a lost tail gives errors of the order of |x|·1e-3 or more (the F16 table
ggml's CPU GELU reads has 2.5e-4 relative median error).

Exact values checked by hand: x ≤ −10 gives 0 (F32 tanh(u) is −1 there: u ≤ −44.2), x ≥ 10 gives
x (the sigmoid rounds to 1), 0 gives 0, NaN stays NaN. Thread counts must not change any bit
(each value is computed alone).
"""

from __future__ import annotations

import numpy as np
import pytest

from fluxmini import _core

PATHS = ["avx2", "portable"]


def require(path: str):
    if path not in _core.testing.norm_paths():
        pytest.skip(f"this CPU lacks the {path} path (its paths: {', '.join(_core.testing.norm_paths())})")


def gelu_ref(x):
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def values():
    rng = np.random.default_rng(7)
    return np.concatenate([
        rng.standard_normal(200_003) * 3.0,      # the activations' range; odd count: a vector tail
        np.linspace(-12.0, 12.0, 48_001),         # through both cut-offs
        [-9.99, -9.5, -5.0, -1e-3, 1e-30, 9.5],  # near the edges and tiny
    ]).astype(np.float32)


@pytest.mark.parametrize("path", PATHS)
def test_gelu_matches_float64(path):
    require(path)
    x = values()
    got = _core.testing.gelu_tanh_f32(x, threads=2, kernels=path).astype(np.float64)
    ref = gelu_ref(x)
    err = np.abs(got - ref)
    bound = 3e-7 * np.abs(x.astype(np.float64))
    worst = int(np.argmax(err - bound))
    assert np.all(err <= bound), f"{path}: x={x[worst]!r}: got {got[worst]!r}, float64 {ref[worst]!r}"


@pytest.mark.parametrize("path", PATHS)
def test_gelu_exact_values(path):
    require(path)
    x = np.array([0.0, -10.0, -10.5, -1e4, -3e38, 10.0, 12.5, 1e4, 3e38, np.nan, -np.nan, 1.0], np.float32)
    got = _core.testing.gelu_tanh_f32(x, kernels=path)
    assert np.array_equal(got[:5], np.zeros(5, np.float32))
    assert np.array_equal(got[5:9], x[5:9])
    assert np.isnan(got[9]) and np.isnan(got[10])
    # GELU(1) = 0.5·(1 + tanh(√(2/π)·1.044715)) = 0.841191990... (float64 by hand from the formula)
    assert abs(float(got[11]) - 0.8411919906082768) <= 3e-7


@pytest.mark.parametrize("path", PATHS)
def test_gelu_threads_do_not_change_bits(path):
    require(path)
    x = values()[:12_345].reshape(5, 2469)  # any shape: the values are split by index
    one = _core.testing.gelu_tanh_f32(x, threads=1, kernels=path)
    assert one.shape == x.shape
    for threads in (2, 3, 7):
        assert np.array_equal(one, _core.testing.gelu_tanh_f32(x, threads=threads, kernels=path)), threads


def test_gelu_unknown_path_is_an_error():
    with pytest.raises(ValueError, match="not a path this CPU runs"):
        _core.testing.gelu_tanh_f32(np.zeros(3, np.float32), kernels="avx9")


@pytest.mark.parametrize("kernels", ["auto", "portable", "ggml"])
def test_engine_names_its_gelu(kernels, monkeypatch):
    """info()["kernels"] says which GELU a model's graphs use: ours on the path of its matmul
    kernels (plain C++ with FLUXMINI_KERNELS=portable, else AVX2 where the CPU has it), ggml's
    where ggml's matmul runs. (The goldens with each forced path: tests/test_cpu_attention.py.)"""
    import make_flux_goldens as FG  # tests/ on sys.path
    from fluxmini.model import FluxMini

    monkeypatch.setenv("FLUXMINI_KERNELS", kernels)
    m = FluxMini.load(FG.model_path("q4_0"), components=["diffusion"], threads=2)
    own = "matmul: fluxmini" in m.info()["kernels"]
    want = ("ggml" if not own else
            "fluxmini (plain C++)" if kernels == "portable" or "avx2" not in _core.testing.norm_paths() else
            "fluxmini (AVX2)")
    assert f"GELU: {want}" in m.info()["kernels"], m.info()["kernels"]
    # auto takes our matmul where the CPU has one of its vector paths (x86-64 with AVX2)
    vector_paths = set(_core.testing.qmatmul_paths()) - {"portable"}
    assert own == (kernels == "portable" or (kernels == "auto" and bool(vector_paths)))
