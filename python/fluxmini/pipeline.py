"""Text-to-image and image-to-image for FLUX.1-mini, and the ``generate`` / ``demo`` commands.

The pipeline (MODEL.md §4, Appendix A.1):

1. tokenize the prompt for CLIP-L (77 ids) and T5 (``t5_length`` ids);
2. CLIP-L pooled vector and T5 hidden states; with ``low_memory`` the text encoders' weights
   are released before the transformer's work starts;
3. starting noise ``[16, H/8, W/8]`` from stable-diffusion.cpp's Philox generator for the seed
   (or the caller's ``noise``);
4. flow-matching Euler over the sigma schedule, one transformer pass per step with the distilled
   guidance (no CFG pass); with ``low_memory`` the transformer's weights are released afterwards;
5. VAE decode of ``z / 0.3611 + 0.1159``, pixels ``trunc(clamp((x + 1) / 2) * 255)``.

img2img encodes the init image first (``z = 0.3611 * (mean - 0.1159)``), starts at the sigma
:func:`fluxmini.sampling.img2img_start` picks for ``strength`` from
``sigma * noise + (1 - sigma) * z`` and runs the remaining steps.

``compat="sd.cpp"`` reproduces the stable-diffusion.cpp that llama-box v0.0.86 embeds (the
thxCode fork based on upstream 9578fdcc, MODEL.md [FORK-86]) — the runtime gpustack's
FLUX.1-mini GGUFs were made for: its discrete schedule with a fixed mu = 1.15
(:func:`fluxmini.sampling.sigmas`), T5 sequences of 255 tokens, no VAE shift
(``z / 0.3611`` to decode, ``0.3611 * mean`` to encode) and its img2img start index. Known
differences from that program: img2img uses the VAE posterior mean where sd.cpp adds
``exp(logvar / 2) * noise`` (our VAE encoder returns the mean only); prompts are plain text
(sd.cpp's ``(word:1.2)`` emphasis syntax and ``<lora:...>`` tags are not parsed); prompts longer
than 254 T5 tokens are truncated where sd.cpp encodes further 255-token chunks. Upstream
stable-diffusion.cpp differs from the fork in T5 length (256) and, since 2025-10-23, applies
the VAE shift; it is not what compat follows.

Cancellation: a ``callback`` returning False raises :class:`fluxmini.Cancelled` after that
step; :meth:`FluxMini.interrupt` from another thread raises ``Cancelled`` too; Ctrl-C raises
``KeyboardInterrupt`` (also when it arrives during a native computation, which the engine stops
at once). The model stays usable after any of them.
"""

from __future__ import annotations

import argparse
import math
import numbers
import operator
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .errors import Cancelled, FluxMiniFileError, FluxMiniValueError
from . import sampling
from .imageio import array_to_image, image_to_array, load_image, save_png

__all__ = [
    "generate",
    "run",
    "encode_prompt",
    "Conditioning",
    "Result",
    "resolve_model",
    "hub_filename",
    "add_generate_subcommand",
    "LATENT_CHANNELS",
    "MAX_SIZE",
    "VAE_SCALE",
    "VAE_SHIFT",
]

#: latent channels of the FLUX autoencoder
LATENT_CHANNELS = 16
#: largest width or height accepted, in pixels
MAX_SIZE = 2048
#: the FLUX VAE latent scale and shift (MODEL.md §4.6)
VAE_SCALE = 0.3611
VAE_SHIFT = 0.1159
#: T5 sequence length of the reference (BFL/diffusers) and of compat="sd.cpp" (llama-box fork)
T5_LENGTH = 512
T5_LENGTH_SDCPP = 255
DEFAULT_SIZE = 512

_F32_SCALE = np.float32(VAE_SCALE)
_F32_SHIFT = np.float32(VAE_SHIFT)


# --------------------------------------------------------------------------- validation


def _int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise FluxMiniValueError(f"{name} must be an integer, got a bool ({value!r})")
    try:
        return operator.index(value)
    except TypeError:
        raise FluxMiniValueError(f"{name} must be an integer, got {type(value).__name__} ({value!r})") from None


def _real(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise FluxMiniValueError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise FluxMiniValueError(f"{name} must be finite, got {value}")
    return value


def _check_side(value, name: str) -> int:
    v = _int(value, name)
    if v < 16 or v > MAX_SIZE:
        raise FluxMiniValueError(f"{name} must be between 16 and {MAX_SIZE} pixels, got {v}")
    if v % 16:
        lo, hi = v // 16 * 16, (v // 16 + 1) * 16
        alt = f"{lo} or {hi}" if lo >= 16 and hi <= MAX_SIZE else str(max(lo, 16))
        raise FluxMiniValueError(f"{name} must be a multiple of 16 pixels, got {v} (use {alt})")
    return v


def _check_seed(seed) -> int:
    if seed is None:
        return secrets.randbelow(1 << 32)
    s = _int(seed, "seed")
    if s < 0 or s >= 1 << 64:
        raise FluxMiniValueError(f"seed must be in [0, 2**64 - 1] (or None for a random seed), got {s}")
    return s


def _check_t5_length(t5_length, compat) -> int:
    if t5_length is None:
        return T5_LENGTH_SDCPP if compat == "sd.cpp" else T5_LENGTH
    from .tokenizers import T5_MAX_LENGTH

    n = _int(t5_length, "t5_length")
    if not 1 <= n <= T5_MAX_LENGTH:
        raise FluxMiniValueError(f"t5_length must be between 1 and {T5_MAX_LENGTH}, got {n}")
    return n


def _check_noise(noise, h: int, w: int) -> np.ndarray:
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


# --------------------------------------------------------------------------- results


@dataclass
class Conditioning:
    """Encoded prompt: T5 hidden states ``[t5_length, d]`` and the CLIP pooled vector ``[d]``."""

    prompt: str
    t5_length: int
    t5: np.ndarray
    pooled: np.ndarray
    seconds: float = 0.0


@dataclass
class Result:
    """Everything a generation produced.

    image: the RGB picture (its ``info`` holds the metadata; :func:`fluxmini.read_metadata`
    reads it). decoded: the VAE output ``[3, H, W]`` float32 before the byte conversion.
    latent: the final latent ``[16, H/8, W/8]`` (flow-matching space, before the VAE scale).
    timings: seconds per stage (``load``: reading weights into memory, which happens on first
    use; ``vae_encode``, ``text_encoding``, ``steps`` (a list), ``vae_decode``: compute alone;
    ``total``) and ``peak_rss_mb`` where the platform reports it.
    """

    image: object
    decoded: np.ndarray
    latent: np.ndarray
    seed: Optional[int]
    metadata: dict
    timings: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- reporting


def _peak_rss_mb() -> Optional[float]:
    """Peak resident memory of this process in MiB (None where the platform does not say).

    Linux: VmHWM of /proc/self/status (ru_maxrss there keeps the high-water mark of the process
    image before exec, e.g. of a big parent that started this one). Elsewhere ru_maxrss.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024.0  # bytes on macOS, KiB elsewhere


class _Reporter:
    """Progress bar (tqdm when importable, else a stderr line per step) and verbose timings."""

    def __init__(self, progress: bool, verbose: bool, stream=None):
        self.progress = bool(progress)
        self.verbose = bool(verbose)
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None

    def log(self, msg: str) -> None:
        if not self.verbose:
            return
        if self.bar is not None:
            self.bar.write(f"fluxmini: {msg}", file=self.stream)
        else:
            print(f"fluxmini: {msg}", file=self.stream, flush=True)

    def start_steps(self, total: int) -> None:
        if not self.progress:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, desc="sampling", unit="step", file=self.stream, leave=False,
                        dynamic_ncols=True)

    def step(self, i: int, total: int, seconds: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.log(f"step {i}/{total}: {seconds:.3f} s")
        elif self.progress or self.verbose:
            print(f"fluxmini: step {i}/{total} ({seconds:.3f} s)", file=self.stream, flush=True)

    def end_steps(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --------------------------------------------------------------------------- engine calls


def _native(model, fn, *args, **kwargs):
    """Call into the engine. Its exceptions pass through as they are: Cancelled when the call's
    CancelToken was cancelled (FluxMini.interrupt() included), KeyboardInterrupt for Ctrl-C."""
    return fn(*args, **kwargs)


def _load(model, *components: str) -> float:
    """Load components' weights now (they load lazily otherwise) and return the seconds taken,
    so that stage timings measure compute alone, as other engines report theirs."""
    load = getattr(model, "load_weights", None)
    if load is None:
        return 0.0
    t0 = time.perf_counter()
    for c in components:
        _native(model, load, c)
    return time.perf_counter() - t0


def _release(model, component: str) -> None:
    release = getattr(model, "release", None)
    if release is not None:
        release(component)


def _model_name(model) -> str:
    paths = getattr(model, "paths", None) or {}
    p = paths.get("model") if isinstance(paths, dict) else None
    return os.path.basename(p) if p else "unknown"


# --------------------------------------------------------------------------- pipeline


def encode_prompt(model, prompt: str = "", *, t5_length=None, compat=None, low_memory: bool = False,
                  verbose: bool = False) -> Conditioning:
    """Tokenize and encode a prompt once (reusable for several seeds with ``run(conditioning=)``).

    t5_length: T5 ids (None: 512, or 255 with ``compat="sd.cpp"``). low_memory: release the
    text encoders' weights afterwards.
    """
    from .tokenizers import tokenize_clip, tokenize_t5

    compat = sampling._check_compat(compat)
    if not isinstance(prompt, str):
        raise FluxMiniValueError(f"prompt must be a string, got {type(prompt).__name__}")
    n = _check_t5_length(t5_length, compat)
    t0 = time.perf_counter()
    clip_ids = tokenize_clip(prompt)
    t5_ids = tokenize_t5(prompt, n)
    pooled = np.asarray(_native(model, model.encode_clip, clip_ids), dtype=np.float32)
    t5 = np.asarray(_native(model, model.encode_t5, t5_ids), dtype=np.float32)
    if low_memory:
        _release(model, "clip_l")
        _release(model, "t5xxl")
    dt = time.perf_counter() - t0
    if verbose:
        print(f"fluxmini: text encoding (CLIP-L + T5, {n} tokens): {dt:.3f} s", file=sys.stderr, flush=True)
    return Conditioning(prompt=prompt, t5_length=n, t5=t5, pooled=pooled, seconds=dt)


def _prepare_init(init_image, width, height):
    """Load the init image; width/height default to its size; resize when they differ."""
    img = load_image(init_image)
    w0, h0 = img.size
    if width is None and height is None:
        width, height = w0, h0
        for name, v in (("width", w0), ("height", h0)):
            if v % 16 or not 16 <= v <= MAX_SIZE:
                raise FluxMiniValueError(
                    f"the init image is {w0}x{h0}; its {name} is not a multiple of 16 between 16 and "
                    f"{MAX_SIZE}: pass width= and height= (multiples of 16) to resize it, e.g. "
                    f"{max(16, min(MAX_SIZE, w0 // 16 * 16))}x{max(16, min(MAX_SIZE, h0 // 16 * 16))}")
    elif width is None:
        width = round(w0 * height / h0 / 16) * 16 if h0 else 16
        width = max(16, min(MAX_SIZE, width))
    elif height is None:
        height = round(h0 * width / w0 / 16) * 16 if w0 else 16
        height = max(16, min(MAX_SIZE, height))
    width = _check_side(width, "width")
    height = _check_side(height, "height")
    if (w0, h0) != (width, height):
        import warnings

        from PIL import Image

        warnings.warn(f"fluxmini: the init image is {w0}x{h0}; resized to {width}x{height}", stacklevel=3)
        resample = getattr(Image, "Resampling", Image).LANCZOS
        img = img.resize((width, height), resample)
    return img, width, height


def run(model, prompt: str = "", *, width=None, height=None, steps=20, guidance=3.5, seed=42,
        compat=None, t5_length=None, noise=None, init_image=None, strength=0.75, progress=True,
        callback: Optional[Callable] = None, low_memory: bool = False, verbose: bool = False,
        vae_tiling=None, negative_prompt=None, conditioning: Optional[Conditioning] = None,
        model_name: Optional[str] = None) -> Result:
    """Generate one image; returns a :class:`Result` (see :func:`generate` for the arguments).

    conditioning: a prompt encoded with :func:`encode_prompt` (then ``prompt`` and
    ``t5_length`` are taken from it). model_name: the model name written into the metadata
    (default: the model file's name).
    """
    t_start = time.perf_counter()
    # ---- validate everything before any work
    if negative_prompt:
        raise FluxMiniValueError(
            "negative prompts are not supported: FLUX.1-mini is guidance-distilled and runs one "
            "pass per step without classifier-free guidance (cfg 1), where a negative prompt has no effect")
    compat = sampling._check_compat(compat)
    if conditioning is not None:
        if not isinstance(conditioning, Conditioning):
            raise FluxMiniValueError("conditioning must come from fluxmini.pipeline.encode_prompt")
        prompt = conditioning.prompt
    elif not isinstance(prompt, str):
        raise FluxMiniValueError(f"prompt must be a string, got {type(prompt).__name__}")
    steps = sampling._check_steps(steps)
    guidance = _real(guidance, "guidance")
    if guidance < 0:
        raise FluxMiniValueError(f"guidance must be >= 0, got {guidance}")
    if callback is not None and not callable(callback):
        raise FluxMiniValueError("callback must be callable: callback(step, total, latent)")
    if vae_tiling not in (None, True, False):
        raise FluxMiniValueError("vae_tiling must be None (automatic), True or False")
    t5_len = conditioning.t5_length if conditioning is not None else _check_t5_length(t5_length, compat)
    img2img = init_image is not None
    if img2img:
        init_img, width, height = _prepare_init(init_image, width, height)
        strength = _real(strength, "strength")
    else:
        width = _check_side(DEFAULT_SIZE if width is None else width, "width")
        height = _check_side(DEFAULT_SIZE if height is None else height, "height")
    h, w = height // 8, width // 8
    noise_given = noise is not None
    if noise_given:
        noise = _check_noise(noise, h, w)
        seed_used = None  # the seed draws nothing when the noise is given
    else:
        seed_used = _check_seed(seed)
    sig = sampling.sigmas(steps, width, height, compat)
    start = sampling.img2img_start(sig, steps, strength, compat) if img2img else 0
    tiling_kw = {"tiling": vae_tiling}

    rep = _Reporter(progress, verbose)
    timings: dict = {"load": 0.0}

    def load(what: str, *components: str) -> None:
        dt = _load(model, *components)
        timings["load"] += dt
        if dt >= 0.05:
            rep.log(f"{what} weights loaded: {dt:.3f} s")

    # ---- img2img: encode the init image first (its VAE can be released before the rest)
    latent0 = None
    if img2img:
        load("VAE", "vae")
        t0 = time.perf_counter()
        mean = np.asarray(_native(model, model.vae_encode, image_to_array(init_img), **tiling_kw), np.float32)
        if mean.shape != (LATENT_CHANNELS, h, w):
            raise FluxMiniValueError(f"the VAE encoder returned shape {mean.shape}, expected {(LATENT_CHANNELS, h, w)}")
        latent0 = _F32_SCALE * mean if compat == "sd.cpp" else _F32_SCALE * (mean - _F32_SHIFT)
        if low_memory:
            _release(model, "vae")
        timings["vae_encode"] = time.perf_counter() - t0
        rep.log(f"VAE encode ({width}x{height}): {timings['vae_encode']:.3f} s")

    # ---- text
    if conditioning is None:
        load("CLIP-L + T5", "clip_l", "t5xxl")
        conditioning = encode_prompt(model, prompt, t5_length=t5_len, compat=compat,
                                     low_memory=low_memory, verbose=False)
        timings["text_encoding"] = conditioning.seconds
        rep.log(f"text encoding (CLIP-L + T5, {t5_len} tokens): {conditioning.seconds:.3f} s")
    elif low_memory:
        _release(model, "clip_l")
        _release(model, "t5xxl")
    t5, pooled = conditioning.t5, conditioning.pooled

    # ---- starting point
    if noise is None:
        from .rng import initial_noise

        noise = initial_noise(seed_used, LATENT_CHANNELS, h, w)
    x0 = sampling.noised_start(latent0, noise, float(sig[start])) if img2img else noise
    run_sigmas = sig[start:]
    total = len(run_sigmas) - 1

    # ---- sampling
    step_times: list = []
    timings["steps"] = step_times
    last = [time.perf_counter()]

    def model_fn(x, sigma):
        return _native(model, model.transformer, x, sigma, guidance, t5, pooled)

    def on_step(i, n, x):
        now = time.perf_counter()
        step_times.append(now - last[0])
        rep.step(i + 1, n, step_times[-1])
        result = None
        if callback is not None:
            result = callback(i + 1, n, x.copy())
        last[0] = time.perf_counter()
        return result

    load("diffusion model", "diffusion")
    rep.start_steps(total)
    try:
        last[0] = time.perf_counter()
        latent = sampling.euler_sample(model_fn, x0, run_sigmas, on_step)
    finally:
        rep.end_steps()
    if step_times:
        rep.log(f"sampling: {total} steps, {sum(step_times):.3f} s ({sum(step_times) / total:.3f} s/step)")
    if low_memory:
        _release(model, "diffusion")

    # ---- decode
    load("VAE", "vae")
    t0 = time.perf_counter()
    z = latent / _F32_SCALE if compat == "sd.cpp" else latent / _F32_SCALE + _F32_SHIFT
    decoded = np.asarray(_native(model, model.vae_decode, z, **tiling_kw), np.float32)
    if decoded.shape != (3, height, width):
        raise FluxMiniValueError(f"the VAE decoder returned shape {decoded.shape}, expected {(3, height, width)}")
    if low_memory:
        _release(model, "vae")
    timings["vae_decode"] = time.perf_counter() - t0
    rep.log(f"VAE decode ({width}x{height}): {timings['vae_decode']:.3f} s")

    # ---- image + metadata
    from . import __version__

    meta = {
        "prompt": prompt,
        "seed": seed_used,
        "steps": steps,
        "guidance": guidance,
        "width": width,
        "height": height,
        "model": model_name if model_name is not None else _model_name(model),
        "compat": compat,
        "sampler": "euler",
        "schedule": "sd.cpp discrete (mu 1.15)" if compat == "sd.cpp" else "flux shift (resolution mu)",
        "t5_length": t5_len,
        "mode": "img2img" if img2img else "txt2img",
        "noise": "custom" if noise_given else "seed",
        "fluxmini_version": __version__,
    }
    if img2img:
        meta["strength"] = strength
        meta["start_step"] = start
        meta["init_image"] = (os.path.basename(os.fspath(init_image))
                              if isinstance(init_image, (str, os.PathLike)) else "image")
    image = array_to_image(decoded)
    from .imageio import metadata_text

    image.info.update(metadata_text(meta))
    timings["total"] = time.perf_counter() - t_start
    rss = _peak_rss_mb()
    if rss is not None:
        timings["peak_rss_mb"] = rss
    rep.log(f"total {timings['total']:.3f} s" + (f", peak RSS {rss:.0f} MB" if rss is not None else ""))
    return Result(image=image, decoded=decoded, latent=latent, seed=seed_used, metadata=meta, timings=timings)


def generate(model, prompt: str = "", *, width=None, height=None, steps=20, guidance=3.5, seed=42,
             compat=None, t5_length=None, noise=None, init_image=None, strength=0.75, progress=True,
             callback: Optional[Callable] = None, low_memory: bool = False, verbose: bool = False,
             vae_tiling=None, negative_prompt=None):
    """Text-to-image (or image-to-image with ``init_image``); returns a ``PIL.Image.Image``.

    Args:
        model: a :class:`fluxmini.FluxMini` with all four components.
        prompt: the text (may be empty).
        width, height: pixels, multiples of 16 from 16 to 2048. Default 512x512, or for img2img
            the init image's size (an init image of another size is resized to width x height,
            with a warning).
        steps: Euler steps (1..1000). guidance: FLUX's distilled guidance (3.5); one model
            pass per step, no classifier-free guidance.
        seed: the noise seed (0 .. 2**64-1), the same starting noise as stable-diffusion.cpp and
            llama-box for that seed; None picks a random one (written into the metadata).
        compat: None (reference BFL/diffusers behaviour) or ``"sd.cpp"`` (the llama-box v0.0.86
            stable-diffusion.cpp fork: discrete schedule, T5 length 255, no VAE shift; see the
            module docstring).
        t5_length: T5 tokens (default 512, or 255 with ``compat="sd.cpp"``).
        noise: float32 ``[16, height/8, width/8]`` starting noise instead of the seed's.
        init_image: img2img input (PIL image, path or uint8 ``[H, W, 3]`` array).
        strength: img2img strength in [0, 1] (1 = start from pure noise).
        progress: a tqdm bar over the steps (a stderr line per step without tqdm).
        callback: ``callback(step, total, latent)`` after each step (step counts from 1,
            latent is a copy of the current ``[16, h, w]`` state); returning False cancels.
        low_memory: release the text encoders' weights before sampling, the transformer's
            before the VAE decode, and the VAE's at the end (they reload on next use).
        verbose: per-stage timings and the peak RSS on stderr.
        vae_tiling: None (automatic), True or False.
        negative_prompt: not supported (FLUX.1-mini runs without CFG); a non-empty value is an
            error.

    Returns:
        the RGB image; its ``info`` carries the generation parameters, which
        :func:`fluxmini.imageio.save_png` writes as PNG text and :func:`fluxmini.read_metadata`
        reads back.

    Raises:
        FluxMiniValueError: a bad argument (checked before any work is done).
        Cancelled: the callback returned False, or :meth:`FluxMini.interrupt` was called.
        KeyboardInterrupt: Ctrl-C.
    """
    return run(model, prompt, width=width, height=height, steps=steps, guidance=guidance, seed=seed,
               compat=compat, t5_length=t5_length, noise=noise, init_image=init_image,
               strength=strength, progress=progress, callback=callback, low_memory=low_memory,
               verbose=verbose, vae_tiling=vae_tiling, negative_prompt=negative_prompt).image


# --------------------------------------------------------------------------- Hugging Face references

_HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*):(?P<quant>[A-Za-z0-9_.-]+)$")


def is_hub_reference(ref: str) -> bool:
    """True for ``owner/repo:QUANT`` (or ``owner/repo:file.gguf``) strings."""
    return isinstance(ref, str) and _HUB_REF.match(ref) is not None


def hub_filename(repo: str, quant: str) -> str:
    """The GGUF file name a ``repo:QUANT`` reference means, in gpustack's naming.

    ``gpustack/FLUX.1-mini-GGUF`` + ``Q4_0`` -> ``FLUX.1-mini-Q4_0.gguf``; ``pure-q8_0`` ->
    ``FLUX.1-mini-pure-Q8_0.gguf``; ``F16`` -> ``...-FP16.gguf``; a name ending in ``.gguf`` is
    taken as the file name itself.
    """
    if quant.lower().endswith(".gguf"):
        return quant
    base = re.sub(r"[-_.]gguf$", "", repo.split("/", 1)[1], flags=re.IGNORECASE)
    pure = quant.lower().startswith("pure-")
    q = quant[5:] if pure else quant
    q = q.upper()
    if q == "F16":
        q = "FP16"
    return f"{base}-{'pure-' if pure else ''}{q}.gguf"


def _manual_download_help(repo: str, filename: str) -> str:
    return (f"download it by hand from https://huggingface.co/{repo}/resolve/main/{filename} "
            f"(or run `huggingface-cli download {repo} {filename} --local-dir .`, `hf download` in "
            f"huggingface_hub 1.0 and later) and pass its path "
            f"with -m ./{filename}")


def resolve_model(ref) -> str:
    """A model argument as a local path: an existing file as is, ``owner/repo:QUANT`` through
    ``huggingface_hub`` (download or local cache).

    Raises:
        FluxMiniFileError: not a file and not a reference, or the reference cannot be fetched
            (``huggingface_hub`` missing, offline, no such file); the message says how to
            download the file by hand.
    """
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str):
        raise FluxMiniValueError(f"model must be a path or owner/repo:QUANT, got {type(ref).__name__}")
    if os.path.exists(ref) or not is_hub_reference(ref):
        if not os.path.isfile(ref):
            raise FluxMiniFileError(
                f"model file not found: {ref} (give a GGUF path or a Hugging Face reference such as "
                "gpustack/FLUX.1-mini-GGUF:Q4_0)")
        return ref
    m = _HUB_REF.match(ref)
    repo, filename = m.group("repo"), hub_filename(m.group("repo"), m.group("quant"))
    try:
        import huggingface_hub
    except ImportError:
        raise FluxMiniFileError(
            f"{ref} is a Hugging Face reference, which needs the huggingface_hub package "
            f"(pip install 'fluxmini[hub]'); or {_manual_download_help(repo, filename)}") from None
    try:
        return huggingface_hub.hf_hub_download(repo_id=repo, filename=filename)
    except Exception as e:  # offline, no such repo/file, HTTP errors: all mean the same to the user
        reason = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
        raise FluxMiniFileError(
            f"could not get {filename} from https://huggingface.co/{repo} ({reason}); "
            f"{_manual_download_help(repo, filename)}") from None


# --------------------------------------------------------------------------- command line


def _output_paths(output: str, count: int) -> list:
    root, ext = os.path.splitext(output)
    return [output] + [f"{root}_{k}{ext}" for k in range(1, count)]


def _count_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"-n is the number of images here, got {text!r} (negative prompts, sd.cpp's -n, are not "
            "supported: FLUX.1-mini runs without classifier-free guidance)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"the image count must be at least 1, got {n}")
    return n


def _cmd_generate(args) -> int:
    from .model import FluxMini

    if args.count > 1 and args.noise_file:
        raise FluxMiniValueError("--noise and -n COUNT > 1 cannot be combined")
    seed = args.seed if args.seed is None or args.seed >= 0 else None  # sd.cpp: a negative seed is random
    if seed is None:
        seed = secrets.randbelow(1 << 32)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise FluxMiniFileError(f"the output folder does not exist: {out_dir}")
    path = resolve_model(args.model)
    t0 = time.perf_counter()
    model = FluxMini.load(path, clip_l=args.clip_l, t5xxl=args.t5xxl, vae=args.vae, backend=args.backend,
                          threads=args.threads, verbose=1 if args.verbose else 0)
    if args.verbose:
        print(f"fluxmini: loaded {path} ({model.info()['backend']}, {model.threads} threads) in "
              f"{time.perf_counter() - t0:.3f} s", file=sys.stderr)
    low_memory = not args.keep_weights
    noise = None
    if args.noise_file:
        try:
            noise = np.load(args.noise_file)
        except (OSError, ValueError) as e:
            raise FluxMiniFileError(f"cannot read the noise file {args.noise_file}: {e}") from None
    cond = encode_prompt(model, args.prompt, t5_length=args.t5_length, compat=args.compat,
                         low_memory=low_memory, verbose=args.verbose)
    for k, out in enumerate(_output_paths(args.output, args.count)):
        res = run(model, conditioning=cond, width=args.width, height=args.height, steps=args.steps,
                  guidance=args.guidance, seed=seed + k, compat=args.compat, noise=noise,
                  init_image=args.init_img, strength=args.strength, progress=not args.quiet,
                  low_memory=low_memory, verbose=args.verbose, vae_tiling=args.vae_tiling)
        save_png(res.image, out, res.metadata)
        seed_txt = f"seed {res.seed}" if res.seed is not None else "custom noise"
        print(f"fluxmini: wrote {out} ({res.image.size[0]}x{res.image.size[1]}, {seed_txt}, "
              f"{res.timings['total']:.1f} s)")
    return 0


def _cmd_demo(args) -> int:
    import gc
    import tempfile

    from .convert import write_random_model
    from .inventory import tiny_dims
    from .model import FluxMini

    with tempfile.TemporaryDirectory(prefix="fluxmini-demo-") as tmp:
        path = os.path.join(tmp, "tiny-random.gguf")
        t0 = time.perf_counter()
        write_random_model(path, tiny_dims(), types="f32", seed=0)
        model = FluxMini.load(path, threads=args.threads)
        res = run(model, args.prompt, width=args.size, height=args.size, steps=args.steps, seed=args.seed,
                  progress=not args.quiet, verbose=args.verbose, model_name="tiny random model (fluxmini demo)")
        del model
        gc.collect()  # unmap the temporary file before its folder goes
    save_png(res.image, args.output, res.metadata)
    print(f"fluxmini demo: wrote {args.output} ({args.size}x{args.size}, {args.steps} steps, "
          f"{time.perf_counter() - t0:.1f} s).")
    print("The picture is noise: it comes from a tiny model with RANDOM weights, built on the fly. "
          "This only checks that fluxmini is installed and runs end to end (tokenizers, text encoders, "
          "transformer, sampler, VAE, PNG). For real pictures get a FLUX.1-mini GGUF, e.g. "
          "`fluxmini generate -m gpustack/FLUX.1-mini-GGUF:Q4_0 -p \"a cat\"`.")
    return 0


def add_generate_subcommand(subparsers) -> None:
    """Register ``fluxmini generate`` and ``fluxmini demo``."""
    g = subparsers.add_parser(
        "generate", help="make an image from a prompt (txt2img, or img2img with -i)",
        description="Generate an image with FLUX.1-mini. Defaults: Euler, 20 steps, guidance 3.5, "
                    "512x512, seed 42, the reference (BFL/diffusers) schedule.")
    g.add_argument("-m", "--model", required=True,
                   help="FLUX.1-mini GGUF file, or a Hugging Face reference owner/repo:QUANT such as "
                        "gpustack/FLUX.1-mini-GGUF:Q4_0 (needs the [hub] extra)")
    g.add_argument("-p", "--prompt", default="", help="the prompt (default: empty)")
    g.add_argument("-o", "--output", default="output.png",
                   help="output PNG (default output.png); with -n N also OUT_1.png ... OUT_{N-1}.png")
    g.add_argument("-W", "--width", type=int, default=None,
                   help="width in pixels, a multiple of 16 (default 512, or the init image's width)")
    g.add_argument("-H", "--height", type=int, default=None,
                   help="height in pixels, a multiple of 16 (default 512, or the init image's height)")
    g.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    g.add_argument("--guidance", type=float, default=3.5, help="distilled guidance (default 3.5)")
    g.add_argument("-s", "--seed", type=int, default=42, help="seed (default 42; negative = random)")
    g.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    g.add_argument("--backend", default="cpu", help="cpu, cuda, metal or auto (default cpu)")
    g.add_argument("--compat", choices=["sd.cpp"], default=None,
                   help="reproduce llama-box v0.0.86's stable-diffusion.cpp (discrete mu 1.15 schedule, "
                        "T5 length 255, no VAE shift) for the same image as there for a seed")
    g.add_argument("--t5-length", "--t5_length", dest="t5_length", type=int, default=None,
                   help="T5 tokens (default 512, or 255 with --compat sd.cpp)")
    g.add_argument("-i", "--init-img", "--init_img", dest="init_img", default=None,
                   help="init image for img2img")
    g.add_argument("--strength", type=float, default=0.75, help="img2img strength (default 0.75)")
    g.add_argument("--clip_l", "--clip-l", dest="clip_l", default=None, help="separate CLIP-L file")
    g.add_argument("--t5xxl", default=None, help="separate T5-XXL file")
    g.add_argument("--vae", default=None, help="separate VAE file")
    g.add_argument("-n", "--count", "-b", "--batch-count", dest="count", type=_count_arg, default=1,
                   help="number of images, seeds SEED, SEED+1, ... (default 1)")
    g.add_argument("--vae-tiling", dest="vae_tiling", action="store_const", const=True, default=None,
                   help="decode the VAE in tiles (default: automatic for large images)")
    g.add_argument("--keep-weights", action="store_true",
                   help="keep every component's weights in memory (default: release the text encoders "
                        "before sampling and the transformer before the VAE, to lower the peak memory)")
    g.add_argument("--noise", dest="noise_file", default=None,
                   help="a .npy float32 [16, H/8, W/8] starting noise instead of the seed's")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("-v", "--verbose", action="store_true", help="per-stage timings and peak memory on stderr")
    g.set_defaults(func=_cmd_generate)

    d = subparsers.add_parser(
        "demo", help="check the install: run the whole pipeline on a tiny random model (the image is noise)",
        description="Builds a tiny FLUX-shaped model with random weights in a temporary folder, runs "
                    "text encoding, sampling and VAE decoding on it and writes a PNG. The picture is "
                    "noise because the weights are random; nothing is downloaded.")
    d.add_argument("-o", "--output", default="demo.png", help="output PNG (default demo.png)")
    d.add_argument("-p", "--prompt", default="a photo of a cat", help=argparse.SUPPRESS)
    d.add_argument("--size", type=int, default=64, help="width and height in pixels (default 64)")
    d.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    d.add_argument("-s", "--seed", type=int, default=42, help="seed (default 42)")
    d.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    d.add_argument("-v", "--verbose", action="store_true", help="per-stage timings")
    d.set_defaults(func=_cmd_demo)
