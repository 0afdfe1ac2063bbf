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
