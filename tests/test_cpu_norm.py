"""The VAE's fused GroupNorm + scale and shift (+ SiLU) kernel (csrc/cpu_norm.cpp) against float64 numpy.

Cases: one, two and three channels per group; planes that are and are not multiples of the
vector width and of the kernel's 256-value runs; with and without gamma / beta; SiLU on and off;
a group whose mean is 10^5 times its spread (the statistics are taken about the group's first
value, so the variance does not cancel); thread counts (each group is one thread's, so results
must not change). Every path this CPU runs (avx2, portable) is forced in turn.

Tolerance: the kernel rounds the mean to F32, subtracts in F32 and applies one fused
multiply-add with a = rstd·gamma rounded to F32; SiLU adds a polynomial exp (relative error
≤ 1.6e-7) and a division. The error is therefore bounded by a few F32 roundings of the terms it
combines: we require |got − ref| ≤ 1e-6·(|t| + |beta| + |mean·a|) + 1e-7, t = (x − mean)·a
(measured: at most 3.5e-7 of it). A wrong group, channel, statistic or a missing tail gives
errors of the order of |t| itself.
"""

from __future__ import annotations

import numpy as np
import pytest

from fluxmini import _core

PATHS = ["avx2", "portable"]


def require(path: str):
    if path not in _core.testing.norm_paths():
        pytest.skip(f"this CPU lacks the {path} path (its paths: {', '.join(_core.testing.norm_paths())})")


def norm_ref(x, gamma, beta, groups, eps, silu):
    """float64 GroupNorm (torch.nn.GroupNorm: biased variance) and the magnitudes the bound uses."""
    x = np.asarray(x, np.float64)
    c = x.shape[0]
    g = x.reshape(groups, -1)
    mean = g.mean(axis=1)
    var = ((g - mean[:, None]) ** 2).mean(axis=1)
    rstd = 1.0 / np.sqrt(var + eps)
    per = c // groups
    mean_c = np.repeat(mean, per)[:, None, None]
    a = np.repeat(rstd, per)[:, None, None] * (np.ones(c) if gamma is None else np.asarray(gamma, np.float64))[:, None, None]
    b = (np.zeros(c) if beta is None else np.asarray(beta, np.float64))[:, None, None]
    t = (x - mean_c) * a
    y = t + b
    if silu:
        y = y / (1.0 + np.exp(-y))
    mag = np.abs(t) + np.abs(b) + np.abs(mean_c * a)
    return y, mag


CASES = [  # (C, H, W, groups)
    (32, 5, 7, 32),    # one channel a group, plane 35: a vector tail
    (64, 16, 16, 32),  # two channels, plane 256: whole runs
    (96, 9, 33, 32),   # three channels: 891 values a group, runs and a tail
    (8, 1, 3, 4),      # planes shorter than a vector
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_float64_reference(case, silu, path):
    require(path)
    c, h, w, groups = case
    rng = np.random.default_rng(sum(case) + silu)
    x = (rng.standard_normal((c, h, w)) * 3 + rng.standard_normal((c, 1, 1))).astype(np.float32)
    gamma = rng.standard_normal(c).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    ref, mag = norm_ref(x, gamma, beta, groups, 1e-6, silu)
    got = _core.testing.group_norm_f32(x, gamma, beta, groups, eps=1e-6, silu=silu, threads=2, kernels=path)
    assert got.shape == x.shape and got.dtype == np.float32
    err = np.abs(got - ref)
    assert np.all(err <= 1e-6 * mag + 1e-7), float(np.max((err - 1e-7) / mag))


@pytest.mark.parametrize("path", PATHS)
def test_without_gamma_beta_large_mean_and_thread_counts(path):
    require(path)
    rng = np.random.default_rng(5)
    # mean 1000, spread 0.01: E[x²] − E[x]² in F32 (or even in double from F32 sums) would lose
    # every digit of the variance
    x = (1000.0 + 0.01 * rng.standard_normal((16, 12, 20))).astype(np.float32)
    one = _core.testing.group_norm_f32(x, None, None, 8, eps=1e-12, silu=False, threads=1, kernels=path)
    for t in (2, 3, 8):
        np.testing.assert_array_equal(
            _core.testing.group_norm_f32(x, None, None, 8, eps=1e-12, silu=False, threads=t, kernels=path), one)
    ref, mag = norm_ref(x, None, None, 8, 1e-12, False)
    assert np.all(np.abs(one - ref) <= 1e-6 * mag + 1e-7)
    # the variance itself: each group's output has unit spread (the F32 mean only shifts a group)
    spread = one.reshape(8, -1).astype(np.float64).std(axis=1)
    np.testing.assert_allclose(spread, 1.0, rtol=1e-4)


def test_bad_arguments_raise():
    from fluxmini.errors import FluxMiniValueError

    x = np.zeros((6, 2, 2), np.float32)
    with pytest.raises(FluxMiniValueError):
        _core.testing.group_norm_f32(x, None, None, 4)  # 6 channels in 4 groups
    with pytest.raises(FluxMiniValueError):
        _core.testing.group_norm_f32(x, np.ones(5, np.float32), None, 3)  # gamma size
    with pytest.raises(FluxMiniValueError):
        _core.testing.group_norm_f32(x, None, None, 3, kernels="avx1024")
