"""linear() (csrc/layers.cpp) on its own, through fluxmini._core.testing.linear: every network's
linear layer, including the low-rank adapters a LoRA will fill, against numpy in float64."""

from __future__ import annotations

import numpy as np
import pytest

from fluxmini import _core
from fluxmini.errors import FluxMiniValueError


def _reference(x, w, b, adapters):
    y = x.astype(np.float64) @ w.astype(np.float64).T
    if b is not None:
        y += b
    for down, up, scale in adapters:
        y += scale * (x.astype(np.float64) @ down.astype(np.float64).T) @ up.astype(np.float64).T
    return y


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_with_adapters(with_bias):
    """y = x·Wᵀ + b + Σ scale·(x·downᵀ)·upᵀ in float32 (relative error ≤ 1e-5 against float64:
    sums of 96 products, measured ~1e-7)."""
    rng = np.random.default_rng(3)
    rows, n_in, n_out = 5, 96, 40
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32) if with_bias else None
    adapters = [(rng.standard_normal((4, n_in)).astype(np.float32), rng.standard_normal((n_out, 4)).astype(np.float32), 0.5),
                (rng.standard_normal((2, n_in)).astype(np.float32), rng.standard_normal((n_out, 2)).astype(np.float32), 1.0)]
    for ads in ([], adapters[:1], adapters):
        got = _core.testing.linear(x, w, b, ads, threads=2)
        want = _reference(x, w, b, ads)
        assert got.shape == (rows, n_out)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # the adapters change the result by what they add (a test that they are applied at all)
    plain = _core.testing.linear(x, w, b, [], threads=1)
    with_one = _core.testing.linear(x, w, b, adapters[:1], threads=1)
    delta = _reference(x, np.zeros_like(w), None, adapters[:1])
    assert np.abs((with_one - plain) - delta).max() <= 1e-5 * np.abs(delta).max()


def test_linear_bad_shapes():
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(FluxMiniValueError):
        _core.testing.linear(x, np.zeros((3, 7), np.float32))
    with pytest.raises(FluxMiniValueError):
        _core.testing.linear(x, np.zeros((3, 8), np.float32), None,
                             [(np.zeros((2, 8), np.float32), np.zeros((3, 4), np.float32), 1.0)])


def _round(a, factor_type):
    """float32 values rounded to `factor_type` as the engine stores them (round to nearest even)."""
    a = np.asarray(a, np.float32)
    if factor_type == "f16":
        return a.astype(np.float16).astype(np.float32)
    if factor_type == "bf16":
        bits = a.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        return bits.astype(np.uint32).view(np.float32)
    return a


@pytest.mark.parametrize("factor_type", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("kernels", ["portable", "avx2", "avxvnni", "avx512vnni", "ggml"])
def test_adapter_kernel_paths(factor_type, kernels):
    """The LoRA kernels (csrc/cpu_lora.cpp: down and up products) on every path this CPU runs, and
    ggml's route, against numpy in float64: row ranges of a fused output (with tails that fill no
    whole vector), token counts that fill no whole tile, a rank above the up kernel's chunk of 64,
    an output adapter (XLabs' proj_lora) after the input ones, F32/F16/BF16 factors. The reference
    uses the factors rounded to their type. Ours reads the F32 activation as it is and keeps h in
    F32: float32 accumulation only (measured ≤ 4e-7 of the adapters' change; bound 1e-5). ggml's
    route rounds the activation fed to F16/BF16 factors to their type (its mul_mat converts x: the
    reference does the same there) and the low-rank product h too, which the reference does not
    (measured 4.1e-3 of the change for BF16, 2.4e-4 for F16; bounds 2⁻⁷, 2⁻⁹)."""
    if kernels != "ggml" and kernels not in _core.testing.qmatmul_paths():
        pytest.skip(f"this CPU does not run the {kernels} path (covered on CPUs that do)")
    rng = np.random.default_rng(11)
    rows, n_in, n_out = 7, 40, 181
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32) / np.sqrt(n_in)
    b = rng.standard_normal(n_out).astype(np.float32)

    def pair(rank, n_rows, src=n_in):
        return (rng.standard_normal((rank, src)).astype(np.float32) / np.sqrt(src),
                rng.standard_normal((n_rows, rank)).astype(np.float32))
    ads = [(*pair(5, 61), 0.7, 0), (*pair(3, 47), -1.1, 61), (*pair(70, n_out), 0.3, 0),
           (*pair(4, n_out, n_out), 0.5, 0, True), (*pair(2, 73), 1.5, 108)]
    got = _core.testing.linear(x, w, b, ads, threads=3, factor_type=factor_type, kernels=kernels)
    plain = _core.testing.linear(x, w, b, [], threads=3, factor_type=factor_type, kernels=kernels)
    act = (lambda a: a) if factor_type == "f32" or kernels != "ggml" else (lambda a: _round(a, factor_type))
    y = x.astype(np.float64) @ w.astype(np.float64).T + b
    for on_output in (False, True):
        src = y.copy() if on_output else x.astype(np.float64)
        for a in ads:
            if len(a) > 4 and a[4] == on_output or len(a) == 4 and not on_output:
                down, up, scale, row0 = (_round(a[0], factor_type), _round(a[1], factor_type)) + a[2:4]
                h = act(src.astype(np.float32)).astype(np.float64) @ down.astype(np.float64).T
                y[:, row0:row0 + up.shape[0]] += scale * h @ up.astype(np.float64).T
    change = np.abs(y - plain).max()
    bound = 1e-5 if kernels != "ggml" else {"f32": 1e-5, "f16": 2.0 ** -9, "bf16": 2.0 ** -7}[factor_type]
    err = np.abs(got - y).max() / change
    assert change > 1.0
    assert err <= bound, f"{kernels}/{factor_type}: error {err:.3g} of the adapters' change"


@pytest.mark.parametrize("factor_type", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("kernels", ["portable", "avx2", "avxvnni", "avx512vnni"])
def test_lora_down_kernel(factor_type, kernels):
    """The LoRA down-product kernel (csrc/cpu_lora.cpp) on its own, on every path this CPU runs,
    against numpy in float64 with the factor rounded to its type and the F32 activation as it is:
    widths with a tail that fills no whole vector (203 = 12·16 + 11 = 25·8 + 3; 1100: three of
    the kernel's blocks of 512), every rank up to 9 and token counts up to 9 (tails of the 4-rank
    / 2-rank and 4-token tiles) and 37 (two of its groups of 32), the tokens split over 1 and 3
    threads. Only float32 accumulation differs: the error of each h is bounded by
    BOUND · Σ_i |x_i·down_i| (the sum's condition; measured ≤ 1.8e-7 on the vector paths and
    ≤ 2.1e-7 on the portable one; bound 1e-6, below which a lost or doubled term cannot hide)."""
    if kernels not in _core.testing.qmatmul_paths():
        pytest.skip(f"this CPU does not run the {kernels} path (covered on CPUs that do)")
    rng = np.random.default_rng(5)
    for n_in in (203, 1100, 16, 3):
        for ranks in range(1, 10):
            down = _round(rng.standard_normal((ranks, n_in)).astype(np.float32), factor_type)
            for tokens in (1, 2, 3, 4, 5, 9, 37):
                x = rng.standard_normal((tokens, n_in)).astype(np.float32)
                want = x.astype(np.float64) @ down.astype(np.float64).T
                scale = np.abs(x.astype(np.float64)) @ np.abs(down.astype(np.float64)).T
                for threads in (1, 3):
                    h, times = _core.testing.lora_down(x, down, factor_type, kernels, threads)
                    assert h.shape == (tokens, ranks) and len(times) == 1
                    err = (np.abs(h - want) / scale).max()
                    assert err <= 1e-6, f"{kernels}/{factor_type} in={n_in} R={ranks} n={tokens}: {err:.3g}"
