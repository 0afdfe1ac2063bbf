"""Argument checks: every public entry point validates its arguments with these before any work.

Each helper returns the normalised value or raises :class:`fluxmini.FluxMiniValueError` naming
the argument, the value and what would be accepted. The pipeline, the sampler and the noise
generator share them, so an argument means the same and fails the same way everywhere.
"""

from __future__ import annotations

import math
import numbers
import operator
import secrets

import numpy as np

from .errors import FluxMiniValueError

#: latent channels of the FLUX autoencoder
LATENT_CHANNELS = 16
#: largest width or height accepted, in pixels
MAX_SIZE = 2048
#: width and height when none is given
DEFAULT_SIZE = 512
#: the largest step count accepted (sd.cpp's discrete grid has 1000 timesteps)
MAX_STEPS = 1000
#: accepted values of ``compat`` (docs/MODEL.md §10): None, the reference (BFL/diffusers);
#: "sd.cpp", stable-diffusion.cpp as stable-diffusion-cpp-python 0.4.7 ships it; "llama-box",
#: the stable-diffusion.cpp fork llama-box v0.0.86 embeds
COMPAT_MODES = (None, "sd.cpp", "llama-box")
#: T5 sequence length of the reference (BFL/diffusers), of compat="sd.cpp" and of compat="llama-box"
T5_LENGTH = 512
T5_LENGTH_SDCPP = 256
T5_LENGTH_LLAMA_BOX = 255
#: seeds are unsigned 64-bit numbers (stable-diffusion.cpp's Philox key)
SEED_MAX = (1 << 64) - 1


def int_arg(value, name: str) -> int:
    """An integer argument (numpy integers too, bools not)."""
    if isinstance(value, (bool, np.bool_)):
        raise FluxMiniValueError(f"{name} must be an integer, got a bool ({value!r})")
    try:
        return operator.index(value)
    except TypeError:
        raise FluxMiniValueError(f"{name} must be an integer, got {type(value).__name__} ({value!r})") from None


def real_arg(value, name: str) -> float:
    """A finite real number (ints and numpy floats too, bools not), as a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise FluxMiniValueError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise FluxMiniValueError(f"{name} must be finite, got {value}")
    return value


def seed_arg(seed) -> int:
    """A seed that must be given: an integer in [0, 2**64 - 1] (the noise generator's)."""
    seed = int_arg(seed, "seed")
    if seed < 0 or seed > SEED_MAX:
        raise FluxMiniValueError(
            f"seed must be in [0, 2**64 - 1], got {seed} "
            "(pick a random seed yourself if you want a random one)"
        )
    return seed


def seed_or_random(seed) -> int:
    """A generation's seed: None draws a random 32-bit one, anything else as :func:`seed_arg`."""
    if seed is None:
        return secrets.randbelow(1 << 32)
    s = int_arg(seed, "seed")
    if s < 0 or s > SEED_MAX:
        raise FluxMiniValueError(f"seed must be in [0, 2**64 - 1] (or None for a random seed), got {s}")
    return s


def steps_arg(steps) -> int:
    steps = int_arg(steps, "steps")
    if not 1 <= steps <= MAX_STEPS:
        raise FluxMiniValueError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    return steps


def compat_arg(compat):
    if compat is not None and not (isinstance(compat, str) and compat in COMPAT_MODES):
        raise FluxMiniValueError(f"compat must be None, 'sd.cpp' or 'llama-box', got {compat!r}")
    return compat


def image_side(value, name: str) -> int:
    """A width or height in pixels: a multiple of 16 from 16 to MAX_SIZE."""
    v = int_arg(value, name)
    if v < 16 or v > MAX_SIZE:
        raise FluxMiniValueError(f"{name} must be between 16 and {MAX_SIZE} pixels, got {v}")
    if v % 16:
        lo, hi = v // 16 * 16, (v // 16 + 1) * 16
        alt = f"{lo} or {hi}" if lo >= 16 and hi <= MAX_SIZE else str(max(lo, 16))
        raise FluxMiniValueError(f"{name} must be a multiple of 16 pixels, got {v} (use {alt})")
    return v


def t5_length_arg(t5_length, compat) -> int:
    """T5 tokens: None gives the default of the compat mode."""
    if t5_length is None:
        return {"sd.cpp": T5_LENGTH_SDCPP, "llama-box": T5_LENGTH_LLAMA_BOX}.get(compat, T5_LENGTH)
    from .tokenizers import T5_MAX_LENGTH

    n = int_arg(t5_length, "t5_length")
    if not 1 <= n <= T5_MAX_LENGTH:
        raise FluxMiniValueError(f"t5_length must be between 1 and {T5_MAX_LENGTH}, got {n}")
    return n


def noise_arg(noise, h: int, w: int) -> np.ndarray:
    """A caller's starting noise: a finite float array [16, h, w], copied as float32."""
    try:
        a = np.array(noise, dtype=np.float32, copy=True)
    except (TypeError, ValueError):
        raise FluxMiniValueError("noise must be a float array of shape [16, height/8, width/8]") from None
    want = (LATENT_CHANNELS, h, w)
    if a.shape != want:
        raise FluxMiniValueError(f"noise must have shape {list(want)} (16, height/8, width/8), got {list(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise FluxMiniValueError("noise contains NaN or infinite values")
    return a


#: the smallest memory budget accepted (MiB): below it not even CLIP-L and a small image fit
MIN_MAX_MEMORY_MIB = 256
_MEMORY_UNITS = {"": 1, "m": 1, "mb": 1, "mib": 1, "g": 1024, "gb": 1024, "gib": 1024}


def max_memory_arg(value, name: str = "max_memory") -> int:
    """A memory budget in MiB: an integer (MiB) or a string such as ``"1024"``, ``"1536M"``,
    ``"1.5G"``, ``"2GiB"`` (M and G are MiB and GiB); None gives 0, the automatic budget."""
    if value is None:
        return 0
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(num):]
        if unit not in _MEMORY_UNITS or not num:
            raise FluxMiniValueError(f"{name} must be a size in MiB such as 1024, 1536M or 1.5G, got {value!r}")
        try:
            mib = float(num) * _MEMORY_UNITS[unit]
        except ValueError:
            raise FluxMiniValueError(f"{name} must be a size in MiB such as 1024, 1536M or 1.5G, "
                                     f"got {value!r}") from None
        if not math.isfinite(mib):
            raise FluxMiniValueError(f"{name} must be a finite size, got {value!r}")
        mib = int(mib)
    else:
        mib = int_arg(value, name)
    if mib < MIN_MAX_MEMORY_MIB:
        raise FluxMiniValueError(f"{name} is {mib} MiB; at least {MIN_MAX_MEMORY_MIB} MiB is needed "
                                 "(leave it unset for the automatic budget)")
    if mib > (1 << 40):
        raise FluxMiniValueError(f"{name} is {mib} MiB, more than any machine has")
    return mib
