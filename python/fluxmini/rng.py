"""Seeded Gaussian noise that matches stable-diffusion.cpp's default "cuda" RNG.

stable-diffusion.cpp (and llama-box, which embeds it) draws its starting noise with a CPU
imitation of ``torch.randn(..., device="cuda")``: Philox-4x32-10 counters turned into normal
values with one half of a Box-Muller transform (spec: ``docs/MODEL.md`` §A.3). This module
reproduces that generator with numpy, vectorised over the elements, so that a seed gives the
same starting latent as those programs.

The generator, for a 64-bit ``seed``, a 32-bit ``offset`` and ``n`` values:

* element ``i`` (``0 <= i < n``) starts from the counter ``(offset, 0, i, 0)`` and the key
  ``(seed & 0xFFFFFFFF, seed >> 32)``;
* ten Philox rounds; after each of the first nine the key words are bumped by the Weyl
  constants ``0x9E3779B9`` and ``0xBB67AE85`` (mod 2**32);
* only the first two output words ``c0, c1`` are used:
  ``u = float(c0)*A + A/2``, ``v = float(c1)*B + B/2`` with ``A = 2.3283064e-10f`` and
  ``B = A*6.2831855f``, and the value is ``sqrt(-2*log(u)) * sin(v)``.

Floating point. stable-diffusion.cpp does the Box-Muller step in ``float``. Here every step is
a single-precision operation with round-to-nearest: the uint32 -> float32 conversions, the
products and sums (numpy float32 arithmetic, which is IEEE exact), ``sqrt`` (float32, IEEE
exact) and ``log``/``sin``, which are evaluated in float64 and rounded once to float32. The
latter is deliberate: numpy's float32 ``log``/``sin`` ufuncs use SIMD approximations whose last
bit depends on the CPU, whereas a float64 evaluation rounded to float32 gives the correctly
rounded float32 result on every machine (numpy's float32 ufuncs differ from glibc's
``logf``/``sinf`` in ~20% of these values). So the output is the same on every platform.
Against a C build of the same steps on glibc 2.36, 1.5% of the values differ, by at most 3
float32 ulps (2.4e-7), because glibc's ``logf``/``sinf`` are not correctly rounded in about
1% of cases; a build whose unqualified ``log``/``sin`` resolve to the double functions
differs in ~30% of the values, again by at most 3 ulps (4.8e-7). Which one a given
stable-diffusion.cpp binary does depends on its compiler, standard library and libm, so
bit-identity with every build is not possible; the difference is invisible in an image.

A1111's ``rng_philox.py`` (the Python original that stable-diffusion.cpp ported) evaluates
the Box-Muller step in float64 from the exact counter words, and the seed-0 values printed in
its docstring match an exact evaluation; ours differ from them by up to ~6e-7 because of the
float32 steps above.

sd.cpp draws the whole initial-noise tensor with one call right after seeding, i.e. with
offset 0, in ggml memory order (x fastest, then y, then channel): :func:`initial_noise`.

``box_muller="double"`` (what ``compat="sd.cpp"`` uses) follows stable-diffusion-cpp-python
0.4.7's build instead: there ``log(u)`` and ``sin(v)`` of the float ``u``, ``v`` resolve to the
double functions, so ``s = float(sqrt(-2.0 * log(double(u))))`` and the value is
``float(double(s) * sin(double(v)))``, each rounded to float32 once. Against the noise that
build dumped (seed 42, 16x32x32) this gives all 16,384 values bit for bit; the float steps
above differ in 31% of them by at most 4.8e-7 (docs/MODEL.md §4.7).
"""

from __future__ import annotations


import numpy as np

from .errors import FluxMiniValueError
from .validation import compat_arg, int_arg, seed_arg

__all__ = ["philox_randn", "initial_noise"]

_MASK32 = 0xFFFFFFFF
_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_ROUNDS = 10

# Box-Muller constants, exactly as single-precision literals (C++ `2.3283064e-10f`,
# `2.3283064e-10f * 6.2831855f` folded in float, and each halved in float).
_A = np.float32(2.3283064e-10)
_B = np.float32(_A * np.float32(6.2831855))
_A_HALF = np.float32(_A / np.float32(2))
_B_HALF = np.float32(_B / np.float32(2))
_MINUS_TWO = np.float32(-2.0)

# Elements processed per block: keeps the temporaries in cache and bounds memory for huge n.
_BLOCK = 1 << 14

_U32_MAX = (1 << 32) - 1


def _key_schedule(seed: int) -> list[tuple[np.uint64, np.uint64]]:
    """The (k0, k1) key words used by each of the ten rounds."""
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    keys = []
    for _ in range(_ROUNDS):
        keys.append((np.uint64(k0), np.uint64(k1)))
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return keys


def _philox_block(keys, offset: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Philox words c0, c1 (uint64 arrays of 32-bit values) of elements [start, start+count)."""
    mask = np.uint64(_MASK32)
    sh = np.uint64(32)
    c2 = np.arange(start, start + count, dtype=np.uint64)

    # Round 1, with c0 = offset and c1 = c3 = 0 the same for every element.
    k0, k1 = keys[0]
    p = int(offset) * int(_M0)
    q = c2 * _M1
    c0 = q >> sh
    c0 ^= k0
    c1 = q & mask
    c2 = np.full(count, ((p >> 32) ^ int(k1)) & _MASK32, dtype=np.uint64)
    c3 = np.full(count, p & _MASK32, dtype=np.uint64)

    p = np.empty(count, dtype=np.uint64)
    for k0, k1 in keys[1:]:
        np.multiply(c0, _M0, out=p)
        np.multiply(c2, _M1, out=q)
        # new c0 = hi(q) ^ c1 ^ k0 ; new c1 = lo(q)
        np.right_shift(q, sh, out=c0)
        c0 ^= c1
        c0 ^= k0
        np.bitwise_and(q, mask, out=c1)
        # new c2 = hi(p) ^ c3 ^ k1 ; new c3 = lo(p)
        np.right_shift(p, sh, out=c2)
        c2 ^= c3
        c2 ^= k1
        np.bitwise_and(p, mask, out=c3)
    return c0, c1


def _box_muller(c0: np.ndarray, c1: np.ndarray, out: np.ndarray, double: bool = False) -> None:
    """out[:] = sqrt(-2 log u) * sin(v), each operation rounded to float32 (``double``: the
    log, sqrt, sin and product in float64 from the float32 u, v, s; module docstring)."""
    # uint32 -> float32 with round-to-nearest-even: the float64 value is exact, the cast rounds.
    x = c0.astype(np.float64).astype(np.float32)
    y = c1.astype(np.float64).astype(np.float32)
    u = x * _A
    u += _A_HALF
    v = y * _B
    v += _B_HALF
    if double:
        s = np.sqrt(-2.0 * np.log(u.astype(np.float64))).astype(np.float32)
        out[:] = s.astype(np.float64) * np.sin(v.astype(np.float64))  # one rounding, on assignment
        return
    log_u = np.log(u.astype(np.float64)).astype(np.float32)
    s = np.sqrt(log_u * _MINUS_TWO)
    sin_v = np.sin(v.astype(np.float64)).astype(np.float32)
    np.multiply(s, sin_v, out=out)


def philox_randn(seed: int, n: int, offset: int = 0, *, box_muller: str = "float") -> np.ndarray:
    """``n`` standard-normal float32 values from stable-diffusion.cpp's "cuda" RNG.

    Equivalent to sd.cpp's ``PhiloxRNG::manual_seed(seed)`` followed by ``offset`` calls of
    ``randn`` whose results are thrown away and then ``randn(n)``: element ``i`` of a call
    depends only on ``(seed, offset, i)``.

    Args:
        seed: 0 <= seed <= 2**64 - 1. (sd.cpp turns a negative seed into a random one; here
            the caller picks the random seed.)
        n: number of values, 0 <= n <= 2**32 (the element index is a 32-bit counter word).
        offset: 0 <= offset <= 2**32 - 1, the index of the ``randn`` call after seeding.
        box_muller: ``"float"`` (every step in float32) or ``"double"`` (log, sqrt, sin and the
            product in float64, as stable-diffusion-cpp-python 0.4.7's build; module docstring).

    Returns:
        float32 array of shape ``(n,)``.

    Raises:
        FluxMiniValueError: an argument is not an integer or is out of range.
    """
    seed = seed_arg(seed)
    n = int_arg(n, "n")
    offset = int_arg(offset, "offset")
    if n < 0 or n > (1 << 32):
        raise FluxMiniValueError(f"n must be in [0, 2**32], got {n}")
    if offset < 0 or offset > _U32_MAX:
        raise FluxMiniValueError(f"offset must be in [0, 2**32 - 1], got {offset}")
    if box_muller not in ("float", "double"):
        raise FluxMiniValueError(f'box_muller must be "float" or "double", got {box_muller!r}')

    out = np.empty(n, dtype=np.float32)
    keys = _key_schedule(seed)
    for start in range(0, n, _BLOCK):
        count = min(_BLOCK, n - start)
        c0, c1 = _philox_block(keys, offset, start, count)
        _box_muller(c0, c1, out[start : start + count], box_muller == "double")
    return out


def initial_noise(seed: int, channels: int, h: int, w: int, compat=None) -> np.ndarray:
    """The starting noise sd.cpp draws for a ``[channels, h, w]`` latent.

    One ``randn`` call of ``channels*h*w`` values right after seeding (offset 0), laid out in
    ggml memory order (x fastest, then y, then channel), which is C order for the returned
    ``[channels, h, w]`` array. For FLUX: ``channels = 16``, ``h = height/8``, ``w = width/8``.
    ``compat="sd.cpp"`` takes the Box-Muller step in double as stable-diffusion-cpp-python
    0.4.7 does (``box_muller="double"``); None and ``"llama-box"`` in float32.

    Raises:
        FluxMiniValueError: bad seed, or a dimension that is not a positive integer.
    """
    dims = []
    for name, value in (("channels", channels), ("h", h), ("w", w)):
        value = int_arg(value, name)
        if value < 1:
            raise FluxMiniValueError(f"{name} must be a positive integer, got {value}")
        dims.append(value)
    c, hh, ww = dims
    if c * hh * ww > (1 << 32):
        raise FluxMiniValueError(f"noise tensor too large: {c}x{hh}x{ww} values")
    mode = "double" if compat_arg(compat) == "sd.cpp" else "float"
    return philox_randn(seed, c * hh * ww, 0, box_muller=mode).reshape(c, hh, ww)
