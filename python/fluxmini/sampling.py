"""Flow-matching sampler pieces for FLUX.1-mini: sigma schedules, img2img start, Euler loop.

Spec: ``docs/MODEL.md`` §4 (sampler and schedules), §4.2 (initial latent), §5.3 (img2img).

Two schedules (both ``steps + 1`` values running from 1 down to exactly 0, returned as
**float32**, the precision every reference implementation keeps its sigmas in):

* ``compat=None`` — the reference schedule of BFL's ``flux`` code, FluxKits and diffusers'
  ``FluxPipeline``: sigmas ``linspace(1, 1/N, N)`` shifted with a resolution-dependent ``mu``
  (:func:`bfl_mu` of the image token count), then a final 0. Computed in float64 and rounded
  once to float32; diffusers computes the shift in float32, so the two agree to within a few
  float32 ulps (about 2e-7).
* ``compat="sd.cpp"`` and ``compat="llama-box"`` — stable-diffusion.cpp's discrete schedule
  with its ``FluxFlowDenoiser`` (``docs/MODEL.md`` §4.4): ``mu`` fixed at 1.15 for
  guidance-distilled models, ``N`` timesteps ``t_k = 999 - k*999/(N-1)`` and
  ``sigma_k = shift(mu, (t_k + 1)/1000)``, then 0. Upstream sd.cpp (stable-diffusion-cpp-python
  0.4.7) evaluates the shift in float; the fork llama-box v0.0.86 pins ([FORK-86]) in a
  float/double mix (float grid, ``std::exp(float)``, the rest in double, stored as float), so
  a third of the values differ by one float32 ulp. Both are reproduced operation by operation:
  identical float32 values to a g++/glibc build of each expression for every N from 1 to 1000.

The Euler loop is the plain flow-matching update ``x <- x + (sigma_{i+1} - sigma_i) * v``
with ``v = model(x, sigma_i)`` (``docs/MODEL.md`` §4.3): the same numbers for both schedules.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import numpy as np

from .errors import Cancelled, FluxMiniValueError
from .validation import COMPAT_MODES, MAX_STEPS, compat_arg, int_arg, steps_arg

__all__ = [
    "time_shift",
    "bfl_mu",
    "sigmas",
    "img2img_start",
    "noised_start",
    "euler_sample",
    "COMPAT_MODES",
    "MAX_STEPS",
]

# diffusers FLUX.1-dev scheduler config (calculate_shift defaults)
_BASE_SEQ_LEN = 256
_MAX_SEQ_LEN = 4096
_BASE_SHIFT = 0.5
_MAX_SHIFT = 1.15

# sd.cpp's DiscreteSchedule / FluxFlowDenoiser constants
_SDCPP_TIMESTEPS = 1000
_SDCPP_T_MAX = _SDCPP_TIMESTEPS - 1


# --------------------------------------------------------------------------- validation


def _float_arg(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise FluxMiniValueError(
            f"{name} must be a real number, got {type(value).__name__} ({value!r})"
        )
    value = float(value)
    if not math.isfinite(value):
        raise FluxMiniValueError(f"{name} must be finite, got {value}")
    return value


# --------------------------------------------------------------------------- schedules


def time_shift(mu, t):
    """The FLUX time shift ``exp(mu) / (exp(mu) + (1/t - 1))``, with ``shift(mu, 0) = 0``.

    ``t`` is a number or an array of numbers in ``[0, 1]``; evaluated in float64. Returns a
    Python float for a scalar ``t``, else a float64 array of ``t``'s shape. ``shift(mu, 1) = 1``
    for every ``mu``.
    """
    mu = _float_arg(mu, "mu")
    scalar = np.ndim(t) == 0
    try:
        tt = np.asarray(t, dtype=np.float64)
    except (TypeError, ValueError):
        raise FluxMiniValueError(f"t must be a number or an array of numbers, got {t!r}") from None
    if not np.all((tt >= 0.0) & (tt <= 1.0)):  # also rejects NaN
        raise FluxMiniValueError("t must lie in [0, 1]")
    e = math.exp(mu)
    out = np.zeros_like(tt)
    pos = tt > 0.0
    out[pos] = e / (e + (1.0 / tt[pos] - 1.0))
    return float(out) if scalar else out


def bfl_mu(image_tokens) -> float:
    """Resolution-dependent shift ``mu`` of the reference (BFL/diffusers) schedule.

    ``mu = 0.5 + (1.15 - 0.5) * (L - 256) / (4096 - 256)`` for ``L`` image tokens
    (``(height//16) * (width//16)`` for a pixel size), written as diffusers'
    ``calculate_shift`` computes it (``L*m + b``) so the float64 value is identical.
    1024x1024 -> 1.15, 512x512 -> 0.63. Not clamped: larger images get larger ``mu``, as in
    BFL's and diffusers' code.
    """
    tokens = int_arg(image_tokens, "image_tokens")
    if tokens < 0:
        raise FluxMiniValueError(f"image_tokens must be >= 0, got {tokens}")
    m = (_MAX_SHIFT - _BASE_SHIFT) / (_MAX_SEQ_LEN - _BASE_SEQ_LEN)
    b = _BASE_SHIFT - m * _BASE_SEQ_LEN
    return tokens * m + b


def _bfl_sigmas(steps: int, width: int, height: int) -> np.ndarray:
    mu = bfl_mu((height // 16) * (width // 16))
    t = np.linspace(1.0, 1.0 / steps, steps)
    out = np.empty(steps + 1, dtype=np.float32)
    out[:steps] = time_shift(mu, t)
    out[steps] = 0.0
    return out


def _sdcpp_sigmas(steps: int, mu_fixed: float, fork: bool) -> np.ndarray:
    # DiscreteScheduler::get_sigmas, all in float:
    #   n == 1: { t_to_sigma(999), 0 }
    #   step = (float)999 / (float)(n - 1);  t_i = 999 - step * i
    f32 = np.float32
    if steps == 1:
        t = np.array([_SDCPP_T_MAX], dtype=np.float32)
    else:
        step = f32(_SDCPP_T_MAX) / f32(steps - 1)
        t = f32(_SDCPP_T_MAX) - step * np.arange(steps, dtype=np.float32)
    # FluxFlowDenoiser::t_to_sigma: t = t + 1; flux_time_shift(shift, 1.0f, t / TIMESTEPS), float
    t = (t + f32(1)) / f32(_SDCPP_TIMESTEPS)
    # expf is taken as correctly rounded (float64 exp rounded to float32): glibc's expf gives the
    # same float for mu = 1.15 and 1.0.
    e = f32(math.exp(float(f32(mu_fixed))))
    out = np.empty(steps + 1, dtype=np.float32)
    out[steps] = 0.0
    if fork:
        # llama-box's flux_time_shift: std::exp(mu) / (std::exp(mu) + std::pow((1.0 / t - 1.0), sigma)):
        # std::exp(float) is float; 1.0 / t - 1.0 and the rest are double; the result is stored as float.
        d = 1.0 / t.astype(np.float64) - 1.0
        out[:steps] = float(e) / (float(e) + d)
    else:
        # upstream: ::expf(mu) / (::expf(mu) + ::powf((1.0f / t - 1.0f), sigma)), all float, and
        # powf(x, 1.0f) is x exactly.
        d = f32(1) / t - f32(1)
        out[:steps] = e / (e + d)
    return out


def sigmas(steps, width, height, compat=None, *, mu_fixed: float = 1.15) -> np.ndarray:
    """The ``steps + 1`` sigmas (1 ... 0) of a ``width`` x ``height`` pixel generation.

    Args:
        steps: number of Euler steps, 1..1000.
        width, height: image size in pixels (positive integers). Only the reference schedule
            depends on them (through the image token count ``(height//16) * (width//16)``).
        compat: ``None`` for the reference BFL/diffusers schedule, ``"sd.cpp"`` or
            ``"llama-box"`` for stable-diffusion.cpp's discrete FLUX schedule (module docstring).
        mu_fixed: the fixed shift of the ``"sd.cpp"`` schedule: 1.15 for guidance-distilled
            models such as FLUX.1-mini/dev (sd.cpp uses 1.0 for models without guidance
            input). Ignored when ``compat`` is None.

    Returns:
        float32 array of shape ``(steps + 1,)``, strictly decreasing, first value 1.0 and last
        value exactly 0.0.

    Raises:
        FluxMiniValueError: a bad argument.
    """
    steps = steps_arg(steps)
    width = int_arg(width, "width")
    height = int_arg(height, "height")
    if width < 1 or height < 1:
        raise FluxMiniValueError(f"width and height must be positive, got {width}x{height}")
    compat = compat_arg(compat)
    if compat is None:
        return _bfl_sigmas(steps, width, height)
    mu_fixed = _float_arg(mu_fixed, "mu_fixed")
    return _sdcpp_sigmas(steps, mu_fixed, fork=compat == "llama-box")


# --------------------------------------------------------------------------- img2img


def img2img_start(sigmas, steps, strength, compat=None) -> int:
    """Index of the first sigma an img2img run starts from.

    The run denoises with ``sigmas[start:]`` (``len(sigmas) - 1 - start`` Euler steps) from
    ``noised_start(latent, noise, sigmas[start])``.

    * ``compat=None`` (diffusers ``FluxImg2ImgPipeline.get_timesteps``):
      ``init = min(steps * strength, steps)`` (float64),
      ``start = int(max(steps - init, 0))``. strength 1 starts at index 0 (pure noise); a
      strength so small that no step is left (``start == steps``) is an error, as in
      diffusers.
    * ``compat="sd.cpp"`` or ``"llama-box"`` (stable-diffusion.cpp's img2img, the same in both):
      ``t_enc = (size_t)(steps * strength)`` with the product in float32, ``t_enc`` lowered
      to ``steps - 1`` when it equals ``steps``, ``start = steps - t_enc - 1``. So sd.cpp runs
      ``t_enc + 1`` steps: strength 1 runs all ``steps`` from sigma 1, strength 0 still runs
      the last (almost no-op) step.

    Args:
        sigmas: the full schedule from :func:`sigmas` for the same ``steps`` and ``compat``
            (only its length is checked: ``steps + 1``).
        steps: the step count the schedule was made for.
        strength: 0 <= strength <= 1.
        compat: ``None``, ``"sd.cpp"`` or ``"llama-box"``.

    Returns:
        ``start``, an int with ``0 <= start <= steps - 1``.

    Raises:
        FluxMiniValueError: a bad argument, or (``compat=None``) a strength that leaves no
            denoising step.
    """
    steps = steps_arg(steps)
    compat = compat_arg(compat)
    strength = _float_arg(strength, "strength")
    if not 0.0 <= strength <= 1.0:
        raise FluxMiniValueError(f"strength must be between 0 and 1, got {strength}")
    n_sigmas = np.shape(sigmas)
    if len(n_sigmas) != 1 or n_sigmas[0] != steps + 1:
        raise FluxMiniValueError(
            f"sigmas must be a 1-D schedule of steps + 1 = {steps + 1} values, got shape {n_sigmas}"
        )
    if compat is None:
        init_timestep = min(steps * strength, steps)
        start = int(max(steps - init_timestep, 0))
        if start >= steps:
            raise FluxMiniValueError(
                f"strength {strength} with {steps} steps leaves no denoising step; "
                f"use strength >= 1/steps = {1.0 / steps:.4g} or more steps"
            )
        return start
    t_enc = int(np.float32(steps) * np.float32(strength))
    if t_enc >= steps:
        t_enc = steps - 1
    return steps - t_enc - 1


def noised_start(latent, noise, sigma) -> np.ndarray:
    """The starting point ``sigma * noise + (1 - sigma) * latent`` (float32).

    As diffusers' ``scale_noise`` and sd.cpp's ``FluxFlowDenoiser::noise_scaling`` compute it:
    ``sigma`` and ``1 - sigma`` rounded to float32, products and sum in float32. Returns a new
    array; the inputs are not modified. With ``sigma == 1`` it is exactly ``noise``.
    """
    sigma = _float_arg(sigma, "sigma")
    if not 0.0 <= sigma <= 1.0:
        raise FluxMiniValueError(f"sigma must be between 0 and 1, got {sigma}")
    latent = np.asarray(latent, dtype=np.float32)
    noise = np.asarray(noise, dtype=np.float32)
    if latent.shape != noise.shape:
        raise FluxMiniValueError(
            f"latent and noise shapes differ: {latent.shape} vs {noise.shape}"
        )
    s = np.float32(sigma)
    out = noise * s
    out += latent * (np.float32(1.0) - s)
    return out


# --------------------------------------------------------------------------- Euler


def euler_sample(
    model_fn: Callable[[np.ndarray, float], np.ndarray],
    x,
    sigmas,
    callback: Optional[Callable[[int, int, np.ndarray], object]] = None,
    *,
    sdcpp_form: bool = False,
) -> np.ndarray:
    """Flow-matching Euler integration over ``sigmas``.

    For ``i = 0 .. len(sigmas) - 2``: ``v = model_fn(x, sigma_i)`` and
    ``x += (sigma_{i+1} - sigma_i) * v``, the step size taken as the float32 difference of the
    float32 sigmas (as diffusers and sd.cpp do). Then ``callback(i, total, x)`` with ``i`` the
    0-based index of the step just done and ``total = len(sigmas) - 1``; a callback that
    returns ``False`` (any falsy value other than ``None``) stops the run by raising
    :class:`fluxmini.errors.Cancelled`.

    The schedule should end with 0 (all of :func:`sigmas`' do), so the result is the final
    latent as is.

    ``sdcpp_form`` (the compat modes): the same step written as stable-diffusion.cpp's
    k-diffusion Euler, ``denoised = x - sigma_i * v``, ``x += (x - denoised) / sigma_i * (sigma_{i+1}
    - sigma_i)``, each operation in float32: the same value up to rounding, and sd.cpp's latents
    bit for bit (docs/MODEL.md §4.3, §4.7). A step from sigma 0 takes the plain form.

    Args:
        model_fn: ``model_fn(x, sigma) -> v``; gets the current float32 state (do not keep or
            modify it) and sigma as a Python float; returns the velocity, an array of
            ``x``'s shape.
        x: starting latent; copied to a new float32 array, the caller's array is untouched.
        sigmas: 1-D sequence of at least one finite value.
        callback: optional progress/cancel hook; it receives the live state array, which the
            next step updates in place (copy it to keep it).

    Returns:
        the final latent, float32, ``x``'s shape.

    Raises:
        Cancelled: the callback returned False.
        FluxMiniValueError: bad ``sigmas`` or a velocity of the wrong shape.
    """
    sig = np.asarray(sigmas, dtype=np.float32)
    if sig.ndim != 1 or sig.size < 1:
        raise FluxMiniValueError("sigmas must be a 1-D sequence of at least one value")
    if not np.all(np.isfinite(sig)):
        raise FluxMiniValueError("sigmas must be finite")
    x = np.array(x, dtype=np.float32, copy=True)
    total = sig.size - 1
    if total == 0:
        return x
    scratch = np.empty_like(x)
    steps_dt = sig[1:] - sig[:-1]  # float32 differences
    sig_list = [float(s) for s in sig]
    for i in range(total):
        v = model_fn(x, sig_list[i])
        if np.shape(v) != x.shape:
            raise FluxMiniValueError(
                f"model_fn returned shape {np.shape(v)}, expected {x.shape} (step {i})"
            )
        if sdcpp_form and sig[i] != 0:
            v = np.asarray(v, dtype=np.float32)
            denoised = x - sig[i] * v
            x += (x - denoised) / sig[i] * steps_dt[i]
        else:
            np.multiply(v, steps_dt[i], out=scratch, casting="same_kind")
            x += scratch
        if callback is not None:
            result = callback(i, total, x)
            if result is not None and not result:
                raise Cancelled(f"cancelled by the callback after step {i + 1} of {total}")
    return x
