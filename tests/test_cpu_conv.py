"""The CPU convolution kernel (csrc/cpu_conv.cpp) against a float64 numpy convolution.

The kernel is a blocked F32 GEMM over an im2col matrix it packs from the image panel by panel
(16 output pixels of one row), so the cases cover: widths that are and are not multiples of 16
(partial panels), output channels that are not multiples of the register tile's rows (6 on the
AVX2 path, 16 on the AVX-512 path), stride 2, 1x1 kernels, padding larger than the image, and
K = k²·Cin large enough for several k blocks, the last not a multiple of 16 (the weights are
transposed 16 x 16 in registers, the rest one by one); F16 kernels as F16 files hold them. Every path this
CPU runs (avx512, avx2, portable) is forced in turn; the two vector paths multiply and add the
same products in the same order, so they must agree bit for bit.

Tolerance: float32 summation of K products in blocks. Its error is bounded by about
K·2^-24·Σ|x·w| and in practice near √K·2^-24·Σ|x·w|; we require |got − ref| ≤ 2e-6·Σ|x·w| + 1e-30,
where Σ|x·w| is the convolution of |x| with |w| (+|b|) (measured: at most 2.1e-7 of it). A wrong
index, a missing panel or a stale accumulator gives errors of the order of Σ|x·w| itself.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import fixtures  # tests/ on sys.path
from fluxmini import _core


def conv_ref(x, w, b, stride, pad):
    """float64 convolution (cross-correlation, as torch.nn.Conv2d) and the same of |x|, |w|, |b|."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    cout, cin, k, _ = w.shape
    _, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.zeros((cout, oh, ow))
    mag = np.zeros((cout, oh, ow))
    for ky in range(k):
        for kx in range(k):
            patch = xp[:, ky:ky + stride * (oh - 1) + 1:stride, kx:kx + stride * (ow - 1) + 1:stride]
            out += np.einsum("oc,chw->ohw", w[:, :, ky, kx], patch)
            mag += np.einsum("oc,chw->ohw", np.abs(w[:, :, ky, kx]), np.abs(patch))
    if b is not None:
        out += np.asarray(b, np.float64)[:, None, None]
        mag += np.abs(np.asarray(b, np.float64))[:, None, None]
    return out, mag


CASES = [  # (Cin, H, W, Cout, k, stride, pad)
    (3, 7, 37, 13, 3, 1, 1),    # partial panel (37 = 2·16 + 5), 13 = 2·6 + 1 channels
    (5, 16, 16, 6, 3, 1, 1),    # whole panels and tiles only
    (4, 9, 33, 12, 3, 2, 0),    # stride 2 without padding (the encoder's downsampling)
    (8, 5, 17, 7, 1, 1, 0),     # 1x1 (the resnet shortcuts)
    (300, 1, 77, 130, 1, 1, 0), # 1x1 on a 1-pixel-high image: an F32 linear (layers.cpp), 77 tokens
    (300, 6, 20, 5, 3, 1, 1),   # K = 2700: k blocks of 256 and one of 140 (not a multiple of 16), Cout < 6
    (2, 1, 1, 3, 3, 1, 1),      # one pixel, all neighbours padding
    (16, 12, 40, 32, 3, 2, 1),  # stride 2 with padding
    (2, 3, 4, 4, 3, 1, 2),      # padding of 2: whole rows and columns of zeros
]


PATHS = ["avx512", "avx2", "portable"]


def require(path: str):
    if path not in _core.testing.conv_paths():
        pytest.skip(f"this CPU lacks the {path} path (its paths: {', '.join(_core.testing.conv_paths())})")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_float64_reference(case, path):
    require(path)
    cin, h, w, cout, k, s, p = case
    rng = np.random.default_rng(sum(case))
    x = rng.standard_normal((cin, h, w)).astype(np.float32)
    kern = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    ref, mag = conv_ref(x, kern, bias, s, p)
    got = _core.testing.conv2d_f32(x, kern, bias, stride=s, pad=p, threads=2, kernels=path)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.all(np.abs(got - ref) <= 2e-6 * mag + 1e-30), float(np.max(np.abs(got - ref) / mag))


@pytest.mark.parametrize("path", PATHS)
def test_without_bias_and_thread_counts_give_identical_results(path):
    """Each output sums its products in one order whatever the split of pixels over threads."""
    require(path)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((24, 11, 45)).astype(np.float32)
    kern = rng.standard_normal((20, 24, 3, 3)).astype(np.float32)
    one = _core.testing.conv2d_f32(x, kern, None, stride=1, pad=1, threads=1, kernels=path)
    for t in (2, 3, 5):
        np.testing.assert_array_equal(_core.testing.conv2d_f32(x, kern, None, stride=1, pad=1, threads=t,
                                                               kernels=path), one)
    ref, mag = conv_ref(x, kern, None, 1, 1)
    assert np.all(np.abs(one - ref) <= 2e-6 * mag)


@pytest.mark.parametrize("path", PATHS)
def test_f16_kernels_match_their_widened_values(path):
    """F16 kernels are widened as blocks are packed (F16 VAE files): the result is the float64
    convolution of the F16 values themselves, within the F32 bound above, and equals the F32
    kernel holding the same values bit for bit (the same products in the same order)."""
    require(path)
    rng = np.random.default_rng(11)
    for cin, h, w, cout, k, s, p in [(40, 9, 37, 21, 3, 1, 1), (300, 6, 20, 5, 3, 1, 1), (8, 5, 17, 16, 1, 1, 0)]:
        x = rng.standard_normal((cin, h, w)).astype(np.float32)
        kern16 = rng.standard_normal((cout, cin, k, k)).astype(np.float16)
        bias = rng.standard_normal(cout).astype(np.float32)
        ref, mag = conv_ref(x, kern16.astype(np.float64), bias, s, p)
        got = _core.testing.conv2d_f32(x, kern16, bias, stride=s, pad=p, threads=2, kernels=path)
        assert np.all(np.abs(got - ref) <= 2e-6 * mag + 1e-30), float(np.max(np.abs(got - ref) / mag))
        same = _core.testing.conv2d_f32(x, kern16.astype(np.float32), bias, stride=s, pad=p, threads=2, kernels=path)
        np.testing.assert_array_equal(got, same)


def test_vector_paths_agree_bit_for_bit():
    have = [p for p in _core.testing.conv_paths() if p != "portable"]
    if len(have) < 2:
        pytest.skip(f"one vector path on this CPU ({have})")
    rng = np.random.default_rng(8)
    for cin, h, w, cout, k, s, p in [(16, 12, 40, 37, 3, 1, 1), (300, 6, 20, 5, 3, 2, 1), (8, 5, 17, 16, 1, 1, 0)]:
        x = rng.standard_normal((cin, h, w)).astype(np.float32)
        kern = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
        bias = rng.standard_normal(cout).astype(np.float32)
        outs = [_core.testing.conv2d_f32(x, kern, bias, stride=s, pad=p, threads=2, kernels=q) for q in have]
        np.testing.assert_array_equal(outs[0], outs[1])


def test_paths_match_the_cpu_flags_and_the_engine_choice():
    flags = fixtures.cpuinfo_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags (not Linux)")
    expect = fixtures.float_kernel_paths(flags)
    assert _core.testing.conv_paths() == expect
    if not os.environ.get("FLUXMINI_KERNELS"):
        assert _core.testing.conv_engine_path() == expect[0]


def test_bad_arguments_raise():
    from fluxmini.errors import FluxMiniValueError

    x = np.zeros((3, 4, 4), np.float32)
    with pytest.raises(FluxMiniValueError):
        _core.testing.conv2d_f32(x, np.zeros((2, 4, 3, 3), np.float32), None)  # Cin mismatch
    with pytest.raises(FluxMiniValueError):
        _core.testing.conv2d_f32(x, np.zeros((2, 3, 3, 3), np.float32), np.zeros(3, np.float32))  # bias size
    with pytest.raises(FluxMiniValueError):
        _core.testing.conv2d_f32(x, np.zeros((2, 3, 9, 9), np.float32), None)  # kernel larger than the padded image
    with pytest.raises(FluxMiniValueError):
        _core.testing.conv2d_f32(x, np.zeros((2, 3, 3, 3), np.float32), None, kernels="avx1024")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", [(3, 4, 5, 7), (20, 9, 17, 18), (40, 8, 16, 16), (2, 1, 1, 3)],
                         ids=lambda c: "x".join(map(str, c)))
def test_upsample_conv_matches_conv_of_the_upsampled_image(case, path):
    """conv3x3(upsample2x(x)) as one op (the decoder's Upsample2D): per output parity a 2x2
    convolution of x with the 3x3 kernel's taps summed. Reference: the float64 convolution of the
    nearest-neighbour upsampled image, within the same bound as above (summing taps in F32 adds
    one rounding per tap of |w|, inside 2e-6·Σ|x·w|)."""
    require(path)
    cin, h, w, cout = case
    rng = np.random.default_rng(sum(case))
    x = rng.standard_normal((cin, h, w)).astype(np.float32)
    kern = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    up = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    ref, mag = conv_ref(up, kern, bias, 1, 1)
    got = _core.testing.upsample_conv2d_f32(x, kern, bias, threads=2, kernels=path)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.all(np.abs(got - ref) <= 2e-6 * mag + 1e-30), float(np.max(np.abs(got - ref) / mag))
    np.testing.assert_array_equal(_core.testing.upsample_conv2d_f32(x, kern, bias, threads=3, kernels=path), got)
