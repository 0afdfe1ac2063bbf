"""The fused CPU attention kernel (csrc/cpu_attention.cpp) against numpy in float64, on every
instruction-set path this CPU runs, each forced; and the networks with it.

Reference: softmax(scale·q·kᵀ + mask)·v per head, in float64 from the same F32 inputs. The
kernel works in F32 (Qᵀ pre-scaled by scale·log2 e, dot products and sums by fused multiply-adds,
2^x by a polynomial of relative error ≤ 1.6e-7). An output is a weighted mean of the values v;
rounding a score s by a few units of 2⁻²⁴·|s| moves its weight by that relative amount, so we
require |got − ref| ≤ (2e-6 + 2⁻²²·max|s|)·max|v| (measured ≤ 1.7e-6·max|v| for scores up to
±15, d up to 512, where the bound is ≥ 4.4e-6; 7.7e-5·max|v| for scores of ±5500, bound 1.3e-3). A wrong index, tile or rescale
gives errors of order max|v|.

Paths: avx512 (zmm, 16 queries per register), avx2 (ymm, 8), portable (plain C++). Every path
computes each query with the same operations in the same order, so all paths must agree bit for
bit, whatever the thread count. A path the CPU lacks is skipped with the reason (which paths the
CPU has is itself checked against /proc/cpuinfo).
"""

from __future__ import annotations

import numpy as np
import pytest

import fixtures  # tests/ on sys.path
import make_flux_goldens as FG
import make_vae_goldens as VG
from fluxmini import _core
from fluxmini.errors import FluxMiniValueError
from fluxmini.model import FluxMini

PATHS = ["avx512", "avx2", "portable"]
TOL = 2e-6  # of max|v|, plus 2^-22·max|s|: see the module docstring


def require(path: str):
    if path not in _core.testing.attention_paths():
        pytest.skip(f"this CPU lacks the {path} path (its paths: {', '.join(_core.testing.attention_paths())})")


def reference(q, k, v, mask=None, scale=1.0):
    """q [Lq, H, d], k/v [Lk, H, d], mask [Lq, Lk] or [H', Lq, Lk] -> [Lq, H, d], float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("ihc,jhc->hij", q, k) * scale
    if mask is not None:
        m = np.asarray(mask, np.float64)
        if m.ndim == 3:  # head h takes mask h % H', as ggml broadcasts
            m = np.tile(m, (q.shape[1] // m.shape[0], 1, 1))
        s = s + m
    s = s - s.max(axis=2, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=2, keepdims=True)
    return np.einsum("hij,jhc->ihc", p, v)


def inputs(lq, lk, heads, d, seed, spread=3.0):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((lq, heads, d)) * spread).astype(np.float32)
    k = rng.standard_normal((lk, heads, d)).astype(np.float32)
    v = rng.standard_normal((lk, heads, d)).astype(np.float32)
    return q, k, v


def check(got, q, k, v, mask=None, scale=1.0):
    ref = reference(q, k, v, mask, scale)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.isfinite(got).all()
    s_max = np.abs(np.einsum("ihc,jhc->hij", q.astype(np.float64), k.astype(np.float64)) * scale).max()
    err = np.abs(got - ref).max() / np.abs(v).max()
    assert err <= TOL + 2.0 ** -22 * s_max, f"error {err:.3g} of max|v| (largest |score| {s_max:.3g})"
    return err


SHAPES = [  # (Lq, Lk, heads, d)
    (1, 1, 1, 1),
    (7, 13, 3, 5),        # everything odd; d not a multiple of the 4-channel register tile
    (97, 65, 2, 128),     # a query block of 96 + 1 query, a key tile of 64 + 1 key (Flux's d)
    (200, 300, 2, 64),    # several blocks and tiles, partial last ones (T5 / CLIP's d)
    (40, 129, 1, 512),    # the VAE's one head of width 512
    (300, 17, 24, 128),   # Flux's 24 heads, fewer keys than one tile
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(shape, path):
    require(path)
    lq, lk, heads, d = shape
    q, k, v = inputs(lq, lk, heads, d, seed=lq * 31 + lk)
    scale = 1.0 / np.sqrt(d)
    got = _core.testing.attention(q, k, v, scale=scale, threads=2, kernels=path)
    check(got, q, k, v, scale=scale)


@pytest.mark.parametrize("path", PATHS)
def test_masks(path):
    """An additive mask [Lq, Lk] (causal, -inf above the diagonal: the first query sees one key,
    every later key tile is all -inf for it) and per head [H', Lq, Lk] (a finite bias, and keys
    < 100 hidden from the last queries: their first tiles are all -inf)."""
    require(path)
    lq, lk, heads, d = 150, 150, 4, 32
    q, k, v = inputs(lq, lk, heads, d, seed=5)
    causal = np.triu(np.full((lq, lk), -np.inf, np.float32), 1)
    got = _core.testing.attention(q, k, v, causal, scale=0.2, threads=2, kernels=path)
    check(got, q, k, v, causal, 0.2)
    np.testing.assert_allclose(got[0], v[0], rtol=0, atol=1e-6)  # softmax of one key: its value
    rng = np.random.default_rng(6)
    bias = (rng.standard_normal((2, lq, lk)) * 4).astype(np.float32)
    bias[:, -10:, :100] = -np.inf
    got = _core.testing.attention(q, k, v, bias, scale=0.2, threads=2, kernels=path)
    check(got, q, k, v, bias, 0.2)


@pytest.mark.parametrize("path", PATHS)
def test_large_scores_do_not_overflow(path):
    """Scores of ±5500 (a softmax nearly one-hot) stay finite and within the bound."""
    require(path)
    q, k, v = inputs(20, 70, 2, 16, seed=8, spread=300.0)
    got = _core.testing.attention(q, k, v, scale=1.0, threads=1, kernels=path)
    check(got, q, k, v)


def test_views_of_a_fused_tensor():
    """q, k, v as strided views of one [L, H, 3d] array (as the Flux graph reads them) give the
    contiguous inputs' result bit for bit."""
    rng = np.random.default_rng(9)
    qkv = rng.standard_normal((77, 3, 3 * 40)).astype(np.float32)
    q, k, v = qkv[:, :, :40], qkv[:, :, 40:80], qkv[:, :, 80:]
    got = _core.testing.attention(q, k, v, scale=0.3, threads=2)
    want = _core.testing.attention(*(np.ascontiguousarray(a) for a in (q, k, v)), scale=0.3, threads=2)
    np.testing.assert_array_equal(got, want)
    check(got, q, k, v, scale=0.3)


@pytest.mark.parametrize("path", PATHS)
def test_thread_counts_give_identical_results(path):
    require(path)
    q, k, v = inputs(250, 140, 3, 72, seed=10)
    one = _core.testing.attention(q, k, v, scale=0.1, threads=1, kernels=path)
    for threads in (2, 3, 7):
        np.testing.assert_array_equal(_core.testing.attention(q, k, v, scale=0.1, threads=threads, kernels=path), one)


def test_paths_agree_bit_for_bit():
    have = _core.testing.attention_paths()
    for shape in [(97, 65, 2, 128), (7, 13, 3, 5), (40, 129, 1, 512)]:
        q, k, v = inputs(*shape, seed=11)
        mask = np.random.default_rng(12).standard_normal((shape[0], shape[1])).astype(np.float32)
        outs = {p: _core.testing.attention(q, k, v, mask, scale=0.125, threads=2, kernels=p) for p in have}
        for p in have:
            np.testing.assert_array_equal(outs[p], outs["portable"], err_msg=f"{p} vs portable, {shape}")


def test_paths_match_the_cpu_flags():
    flags = fixtures.cpuinfo_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags (not Linux)")
    assert _core.testing.attention_paths() == fixtures.float_kernel_paths(flags)


def test_engine_path_follows_the_environment(monkeypatch):
    """Unset / auto: the fastest vector path (ggml's flash attention where there is none);
    FLUXMINI_KERNELS forces one (ggml: ggml's); FLUXMINI_ATTENTION=ggml keeps our matmul but
    ggml's attention; an unknown FLUXMINI_ATTENTION is a FluxMiniValueError, also at load."""
    have = _core.testing.attention_paths()
    best = have[0] if have[0] != "portable" else "ggml"
    monkeypatch.delenv("FLUXMINI_KERNELS", raising=False)
    monkeypatch.delenv("FLUXMINI_ATTENTION", raising=False)
    assert _core.testing.attention_engine_path() == best
    qpaths = _core.testing.qmatmul_paths()
    for kernels, want in [("auto", best), ("ggml", "ggml"), ("portable", "portable"), ("avx2", "avx2"),
                          ("avxvnni", "avx2"), ("avx512vnni", "avx512")]:
        if kernels not in ("auto", "ggml") and kernels not in qpaths:
            continue
        monkeypatch.setenv("FLUXMINI_KERNELS", kernels)
        assert _core.testing.attention_engine_path() == want, kernels
    monkeypatch.delenv("FLUXMINI_KERNELS")
    monkeypatch.setenv("FLUXMINI_ATTENTION", "ggml")
    assert _core.testing.attention_engine_path() == "ggml"
    monkeypatch.setenv("FLUXMINI_ATTENTION", "flash")
    with pytest.raises(FluxMiniValueError, match="FLUXMINI_ATTENTION"):
        _core.testing.attention_engine_path()
    with pytest.raises(FluxMiniValueError, match="FLUXMINI_ATTENTION"):
        FluxMini.load(FG.model_path("f32"), components=["diffusion"], threads=1)


def test_bad_arguments_raise():
    q = np.zeros((4, 2, 8), np.float32)
    with pytest.raises(FluxMiniValueError):
        _core.testing.attention(q, q[:, :1], q)  # heads differ
    with pytest.raises(FluxMiniValueError):
        _core.testing.attention(q, q, q[:3])  # k and v lengths differ
    with pytest.raises(FluxMiniValueError):
        _core.testing.attention(q, q, q, np.zeros((4, 5), np.float32))  # mask shape
    with pytest.raises(FluxMiniValueError):
        _core.testing.attention(q, q, q, np.zeros((3, 4, 4), np.float32))  # 2 heads, 3 mask heads
    with pytest.raises(FluxMiniValueError):
        _core.testing.attention(q[:, :, ::2], q, q)  # d not contiguous
    with pytest.raises(FluxMiniValueError):
        _core.testing.attention(q, q, q, kernels="ggml")
    with pytest.raises(FluxMiniValueError):
        _core.testing.bench_attention(8, 1, 8, True, 1, 1, kernels="avx1024")


# ---- the networks with each path ---------------------------------------------------------------


def flux_case(name: str):
    i = next(k for k, c in enumerate(FG.CASES) if c[0] == name)
    return i, FG.CASES[i]


@pytest.mark.parametrize("name", ["f32", "q4_0"])
@pytest.mark.parametrize("attention", ["avx512", "avx2", "portable", "ggml"])
def test_flux_goldens_with_each_attention(name, attention, monkeypatch):
    """The tiny Flux against its diffusers goldens (tests/test_flux.py's tolerances: 1e-4 for F32
    weights, 3e-2 for Q4_0) with our attention on each path, forced by FLUXMINI_KERNELS (F32
    weights use no quantized matmul, so only the attention changes there), and with ggml's flash
    attention (FLUXMINI_ATTENTION=ggml). `kernels` in info() names the attention in use."""
    if attention == "ggml":
        monkeypatch.setenv("FLUXMINI_ATTENTION", "ggml")
    else:
        require(attention)
        kernels = {"avx512": "avx512vnni", "avx2": "avx2", "portable": "portable"}[attention]
        if kernels not in _core.testing.qmatmul_paths():
            pytest.skip(f"FLUXMINI_KERNELS={kernels} is not a path this CPU runs")
        monkeypatch.setenv("FLUXMINI_KERNELS", kernels)
    goldens = np.load(FG.GOLDENS)
    i, (_, h, w, sigma, guidance, _, _) = flux_case(name)
    m = FluxMini.load(FG.model_path(name), components=["diffusion"], threads=2)
    desc = {"avx512": "fluxmini (AVX-512)", "avx2": "fluxmini (AVX2)", "portable": "fluxmini (plain C++)",
            "ggml": "ggml"}[attention]
    assert f"attention: {desc}" in m.info()["kernels"]
    got = m.transformer(goldens[f"c{i}_latent"], sigma, guidance, goldens[f"c{i}_t5"], goldens[f"c{i}_pooled"])
    ref = goldens[f"c{i}_out"]
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert err <= {"f32": 1e-4, "q4_0": 3e-2}[name], err


@pytest.mark.parametrize("attention", ["auto", "ggml"])
def test_vae_goldens_with_each_attention(attention, monkeypatch):
    """The tiny VAE (tests/test_vae.py's 1e-4 for F32) with our attention (one head of the top
    width) and with ggml's chunked explicit softmax; the 48x48 encode has 2304 positions, more
    than one chunk of the latter."""
    monkeypatch.setenv("FLUXMINI_ATTENTION", attention)
    goldens = np.load(VG.GOLDENS)
    m = FluxMini.load(VG.model_path("f32"), components=["vae"], threads=2)
    for case in VG.CASES:
        if case[0] != "f32":
            continue
        x = VG.case_input(case)
        got = m.vae_decode(x, tiling=False) if case[1] == "decode" else m.vae_encode(x, tiling=False)
        ref = goldens[VG.case_key(case)]
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        assert err <= 1e-4, (VG.case_key(case), err)
