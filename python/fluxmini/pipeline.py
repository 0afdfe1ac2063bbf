"""Text-to-image and image-to-image for FLUX.1-mini.

The pipeline (docs/MODEL.md §4, §A.1):

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

``compat="sd.cpp"`` reproduces stable-diffusion.cpp as stable-diffusion-cpp-python 0.4.7 ships
it (docs/MODEL.md [SDC-047], §4.7): its discrete schedule with a fixed mu = 1.15 evaluated in
float (:func:`fluxmini.sampling.sigmas`), T5 sequences of 256 tokens, the VAE scale and shift as
above, and output bytes rounded instead of truncated. ``compat="llama-box"`` reproduces the
stable-diffusion.cpp that llama-box v0.0.86 embeds (the thxCode fork based on upstream 9578fdcc,
[FORK-86]) — the runtime gpustack's FLUX.1-mini GGUFs were made for: the same schedule in its
float/double mix, T5 sequences of 255 tokens, no VAE shift (``z / 0.3611`` to decode,
``0.3611 * mean`` to encode) and truncated bytes; no running copy of it was available to check
against, so it follows that source as read. Both take sd.cpp's img2img start index. Known
differences from both programs: img2img uses the VAE posterior mean where sd.cpp adds
``exp(logvar / 2) * noise`` (our VAE encoder returns the mean only); prompts are plain text
(sd.cpp's ``(word:1.2)`` emphasis syntax and ``<lora:...>`` tags are not parsed); prompts longer
than one T5 chunk are truncated where sd.cpp encodes further chunks.

Several images (:func:`run_batch`, ``fluxmini generate -n N``) share the prompt encoding and go
stage by stage: every image is sampled, then every image is decoded, so each component's weights
are read once for the whole batch; ``low_memory`` releases them between stages, not between images.

The model is any :class:`fluxmini.engine.Engine` (:class:`fluxmini.FluxMini`); the pipeline
calls nothing else on it.

Cancellation: a ``callback`` returning False raises :class:`fluxmini.Cancelled` after that
step; :meth:`FluxMini.interrupt` from another thread raises ``Cancelled`` too; Ctrl-C raises
``KeyboardInterrupt`` (also when it arrives during a native computation, which the engine stops
at once). The model stays usable after any of them.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

from . import sampling
from .engine import Engine
from .errors import Cancelled, FluxMiniValueError
from .imageio import array_to_image, image_to_array, load_image
from .progress import StepReporter, peak_rss_mb
from .validation import (DEFAULT_SIZE, LATENT_CHANNELS, MAX_SIZE, T5_LENGTH, T5_LENGTH_LLAMA_BOX, T5_LENGTH_SDCPP,
                         compat_arg, image_side, noise_arg, real_arg, seed_or_random, steps_arg, t5_length_arg)

__all__ = [
    "generate",
    "run",
    "run_batch",
    "encode_prompt",
    "cached_prompt",
    "Conditioning",
    "Result",
    "LATENT_CHANNELS",
    "MAX_SIZE",
    "T5_LENGTH",
    "T5_LENGTH_SDCPP",
    "T5_LENGTH_LLAMA_BOX",
    "VAE_SCALE",
    "VAE_SHIFT",
]

#: the FLUX VAE latent scale and shift (docs/MODEL.md §4.6)
VAE_SCALE = 0.3611
VAE_SHIFT = 0.1159

_F32_SCALE = np.float32(VAE_SCALE)
_F32_SHIFT = np.float32(VAE_SHIFT)


# --------------------------------------------------------------------------- results


@dataclass
class Conditioning:
    """Encoded prompt: T5 hidden states ``[t5_length, d]`` and the CLIP pooled vector ``[d]``
    (read-only arrays when the model has an embedding cache, which shares them: copy to change)."""

    prompt: str
    t5_length: int
    t5: np.ndarray
    pooled: np.ndarray
    seconds: float = 0.0  #: text encoding (compute alone; 0 when the embedding cache had the prompt)
    load_seconds: float = 0.0  #: reading the text encoders' weights for this call
    cached: Optional[str] = None  #: "memory" or "disk" when the embedding cache had it, else None


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


# --------------------------------------------------------------------------- engine calls


def _engine(model) -> Engine:
    if not isinstance(model, Engine):
        raise FluxMiniValueError(f"model must be a fluxmini.FluxMini (a fluxmini.engine.Engine), "
                                 f"got {type(model).__name__}")
    return model


def _native(model, fn, *args, **kwargs):
    """Call into the engine. Its exceptions pass through as they are: Cancelled when the call's
    CancelToken was cancelled (FluxMini.interrupt() included), KeyboardInterrupt for Ctrl-C."""
    return fn(*args, **kwargs)


def _load(model: Engine, *components: str) -> float:
    """Load components' weights now (they load lazily otherwise) and return the seconds taken,
    so that stage timings measure compute alone, as other engines report theirs."""
    t0 = time.perf_counter()
    for c in components:
        _native(model, model.load_weights, c)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- pipeline


def encode_prompt(model, prompt: str = "", *, t5_length=None, compat=None, low_memory: bool = False,
                  verbose: bool = False) -> Conditioning:
    """Tokenize and encode a prompt once (reusable for several seeds with ``run(conditioning=)``).

    t5_length: T5 ids (None: the mode's default, see :func:`generate`). low_memory: release the
    text encoders' weights afterwards.

    The one place prompts are encoded: the model's embedding cache (:mod:`fluxmini.embedding_cache`)
    is checked first, and a prompt found there is not encoded at all, nor are the text encoders'
    weights read (``seconds`` and ``load_seconds`` 0, ``cached`` says where it was found).
    """
    t0 = time.perf_counter()
    model, n, clip_ids, t5_ids, cache, key, hit = _lookup(model, prompt, t5_length, compat)
    if hit is not None:
        if low_memory:  # weights an earlier call left loaded
            model.release("clip_l")
            model.release("t5xxl")
        if verbose:
            print(f"fluxmini: text encoding: cached ({hit.cached}, {time.perf_counter() - t0:.3f} s to look up)",
                  file=sys.stderr, flush=True)
        return hit
    load_seconds = _load(model, "clip_l", "t5xxl")
    t0 = time.perf_counter()
    pooled = np.asarray(_native(model, model.encode_clip, clip_ids), dtype=np.float32)
    # sd.cpp's T5 arithmetic (docs/MODEL.md §4.7); other engines may take no compat argument
    t5_kw = {"compat": "sd.cpp"} if compat_arg(compat) == "sd.cpp" else {}
    t5 = np.asarray(_native(model, model.encode_t5, t5_ids, **t5_kw), dtype=np.float32)
    dt = time.perf_counter() - t0
    if low_memory:
        model.release("clip_l")
        model.release("t5xxl")
    if cache is not None:
        t5, pooled = cache.put(key, t5, pooled)
    if verbose:
        print(f"fluxmini: text encoding (CLIP-L + T5, {n} tokens): {dt:.3f} s"
              + (f" (weights loaded: {load_seconds:.3f} s)" if load_seconds >= 0.05 else ""),
              file=sys.stderr, flush=True)
    return Conditioning(prompt=prompt, t5_length=n, t5=t5, pooled=pooled, seconds=dt, load_seconds=load_seconds)


def cached_prompt(model, prompt: str = "", *, t5_length=None, compat=None) -> Optional[Conditioning]:
    """The prompt's conditioning if the model's embedding cache has it, else None (nothing is
    encoded or loaded either way). Arguments as :func:`encode_prompt`."""
    return _lookup(model, prompt, t5_length, compat)[-1]


def _lookup(model, prompt, t5_length, compat):
    """Arguments checked, the token ids, the model's embedding cache and this prompt's key there
    ((None, None) where the model has no cache), and the cached Conditioning or None."""
    from .tokenizers import tokenize_clip, tokenize_t5

    model = _engine(model)
    compat = compat_arg(compat)
    if not isinstance(prompt, str):
        raise FluxMiniValueError(f"prompt must be a string, got {type(prompt).__name__}")
    n = t5_length_arg(t5_length, compat)
    clip_ids = tokenize_clip(prompt)
    t5_ids = tokenize_t5(prompt, n)
    cache = getattr(model, "embedding_cache", None)
    identity = model.text_identity() if cache is not None else None
    if identity is None:
        return model, n, clip_ids, t5_ids, None, None, None
    from .embedding_cache import entry_key

    key = entry_key(identity, compat, clip_ids, t5_ids)
    found = cache.get(key)
    hit = None
    if found is not None:
        where, t5, pooled = found
        hit = Conditioning(prompt=prompt, t5_length=n, t5=t5, pooled=pooled, seconds=0.0, cached=where)
    return model, n, clip_ids, t5_ids, cache, key, hit


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
    width = image_side(width, "width")
    height = image_side(height, "height")
    if (w0, h0) != (width, height):
        import warnings

        from PIL import Image

        warnings.warn(f"fluxmini: the init image is {w0}x{h0}; resized to {width}x{height}", stacklevel=4)
        resample = getattr(Image, "Resampling", Image).LANCZOS
        img = img.resize((width, height), resample)
    return img, width, height


@dataclass
class _Settings:
    """Validated arguments of one generation (shared by every image of a batch)."""

    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    compat: Optional[str]
    t5_length: int
    init_img: object  # the (resized) PIL init image for img2img, else None
    init_image: object  # as given, for the metadata
    strength: float
    sigmas: np.ndarray
    start: int
    vae_tiling: Optional[bool]
    callback: Optional[Callable]
    model_name: Optional[str]


def _settings(prompt, width, height, steps, guidance, compat, t5_length, init_image, strength, callback,
              vae_tiling, negative_prompt, conditioning, model_name) -> _Settings:
    """Every argument checked before any work is done."""
    if negative_prompt:
        raise FluxMiniValueError(
            "negative prompts are not supported: FLUX.1-mini is guidance-distilled and runs one "
            "pass per step without classifier-free guidance (cfg 1), where a negative prompt has no effect")
    compat = compat_arg(compat)
    if conditioning is not None:
        if not isinstance(conditioning, Conditioning):
            raise FluxMiniValueError("conditioning must come from fluxmini.pipeline.encode_prompt")
        prompt = conditioning.prompt
    elif not isinstance(prompt, str):
        raise FluxMiniValueError(f"prompt must be a string, got {type(prompt).__name__}")
    steps = steps_arg(steps)
    guidance = real_arg(guidance, "guidance")
    if guidance < 0:
        raise FluxMiniValueError(f"guidance must be >= 0, got {guidance}")
    if callback is not None and not callable(callback):
        raise FluxMiniValueError("callback must be callable: callback(step, total, latent)")
    if vae_tiling not in (None, True, False):
        raise FluxMiniValueError("vae_tiling must be None (automatic), True or False")
    t5_len = conditioning.t5_length if conditioning is not None else t5_length_arg(t5_length, compat)
    init_img = None
    if init_image is not None:
        init_img, width, height = _prepare_init(init_image, width, height)
        strength = real_arg(strength, "strength")
    else:
        width = image_side(DEFAULT_SIZE if width is None else width, "width")
        height = image_side(DEFAULT_SIZE if height is None else height, "height")
    sig = sampling.sigmas(steps, width, height, compat)
    start = sampling.img2img_start(sig, steps, strength, compat) if init_img is not None else 0
    return _Settings(prompt=prompt, width=width, height=height, steps=steps, guidance=guidance, compat=compat,
                     t5_length=t5_len, init_img=init_img, init_image=init_image, strength=strength, sigmas=sig,
                     start=start, vae_tiling=vae_tiling, callback=callback, model_name=model_name)


def _stages(model: Engine, st: _Settings, starts: list, conditioning: Optional[Conditioning], progress: bool,
            verbose: bool, low_memory: bool) -> Iterator[Result]:
    """The stages for one image per starting point ``(seed or None, noise or None)``, in order:
    img2img encode, text, sampling of every image, decoding of every image (yielded as decoded).

    Each component's weights are loaded once; with ``low_memory`` they are released after their
    stage (the VAE's before the last image is yielded, so a caller that takes only what it needs
    still leaves the memory as a single run does).
    """
    t_start = time.perf_counter()
    h, w = st.height // 8, st.width // 8
    tiling_kw = {"tiling": st.vae_tiling}
    rep = StepReporter(progress, verbose)
    first: dict = {"load": 0.0}  # shared stages, reported with the first image

    def load(what: str, *components: str) -> float:
        dt = _load(model, *components)
        if dt >= 0.05:
            rep.log(f"{what} weights loaded: {dt:.3f} s")
        return dt

    # ---- img2img: encode the init image first (its VAE can be released before the rest)
    latent0 = None
    if st.init_img is not None:
        first["load"] += load("VAE", "vae")
        t0 = time.perf_counter()
        mean = np.asarray(_native(model, model.vae_encode, image_to_array(st.init_img), **tiling_kw), np.float32)
        if mean.shape != (LATENT_CHANNELS, h, w):
            raise FluxMiniValueError(f"the VAE encoder returned shape {mean.shape}, expected {(LATENT_CHANNELS, h, w)}")
        latent0 = _F32_SCALE * mean if st.compat == "llama-box" else _F32_SCALE * (mean - _F32_SHIFT)
        if low_memory:
            model.release("vae")
        first["vae_encode"] = time.perf_counter() - t0
        rep.log(f"VAE encode ({st.width}x{st.height}): {first['vae_encode']:.3f} s")

    # ---- text (the embedding cache may have it: then no text encoder is loaded)
    if conditioning is None:
        conditioning = encode_prompt(model, st.prompt, t5_length=st.t5_length, compat=st.compat,
                                     low_memory=low_memory, verbose=False)
        first["load"] += conditioning.load_seconds
        if conditioning.load_seconds >= 0.05:
            rep.log(f"CLIP-L + T5 weights loaded: {conditioning.load_seconds:.3f} s")
        first["text_encoding"] = conditioning.seconds
        if conditioning.cached:
            rep.log(f"text encoding: cached ({conditioning.cached})")
        else:
            rep.log(f"text encoding (CLIP-L + T5, {st.t5_length} tokens): {conditioning.seconds:.3f} s")
    elif low_memory:
        model.release("clip_l")
        model.release("t5xxl")
    t5, pooled = conditioning.t5, conditioning.pooled

    # ---- sampling, every image
    run_sigmas = st.sigmas[st.start:]
    total = len(run_sigmas) - 1

    def model_fn(x, sigma):
        return _native(model, model.transformer, x, sigma, st.guidance, t5, pooled)

    first["load"] += load("diffusion model", "diffusion")
    shared = time.perf_counter() - t_start  # img2img encode, text, loads: counted for the first image
    sampled = []  # (seed, noise given, latent, timings)
    for seed_used, noise in starts:
        t_image = time.perf_counter()
        timings: dict = {"load": 0.0}
        noise_given = noise is not None
        if noise is None:
            from .rng import initial_noise

            noise = initial_noise(seed_used, LATENT_CHANNELS, h, w, st.compat)
        x0 = sampling.noised_start(latent0, noise, float(run_sigmas[0])) if latent0 is not None else noise
        step_times: list = []
        timings["steps"] = step_times
        last = [time.perf_counter()]

        def on_step(i, n, x):
            now = time.perf_counter()
            step_times.append(now - last[0])
            rep.step(i + 1, n, step_times[-1])
            result = None
            if st.callback is not None:
                result = st.callback(i + 1, n, x.copy())
            last[0] = time.perf_counter()
            return result

        rep.start_steps(total)
        try:
            last[0] = time.perf_counter()
            latent = sampling.euler_sample(model_fn, x0, run_sigmas, on_step, sdcpp_form=st.compat is not None)
        finally:
            rep.end_steps()
        if step_times:
            rep.log(f"sampling: {total} steps, {sum(step_times):.3f} s ({sum(step_times) / total:.3f} s/step)")
        timings["total"] = time.perf_counter() - t_image
        sampled.append((seed_used, noise_given, latent, timings))
    if low_memory:
        model.release("diffusion")

    # ---- decode, every image
    t0 = time.perf_counter()
    first["load"] += load("VAE", "vae")
    shared += time.perf_counter() - t0
    for k, (seed_used, noise_given, latent, timings) in enumerate(sampled):
        t0 = time.perf_counter()
        z = latent / _F32_SCALE if st.compat == "llama-box" else latent / _F32_SCALE + _F32_SHIFT
        decoded = np.asarray(_native(model, model.vae_decode, z, **tiling_kw), np.float32)
        if decoded.shape != (3, st.height, st.width):
            raise FluxMiniValueError(f"the VAE decoder returned shape {decoded.shape}, "
                                     f"expected {(3, st.height, st.width)}")
        last_image = k == len(sampled) - 1
        if low_memory and last_image:
            model.release("vae")
        timings["vae_decode"] = time.perf_counter() - t0
        rep.log(f"VAE decode ({st.width}x{st.height}): {timings['vae_decode']:.3f} s")
        image, meta = _image(model, st, decoded, seed_used, noise_given)
        timings["total"] += time.perf_counter() - t0
        if k == 0:  # the shared stages count for the first image
            timings.update(first)
            timings["total"] += shared
        rss = peak_rss_mb()
        if rss is not None:
            timings["peak_rss_mb"] = rss
        rep.log(f"total {timings['total']:.3f} s" + (f", peak RSS {rss:.0f} MB" if rss is not None else ""))
        yield Result(image=image, decoded=decoded, latent=latent, seed=seed_used, metadata=meta, timings=timings)


def _image(model: Engine, st: _Settings, decoded: np.ndarray, seed_used, noise_given: bool):
    """The RGB picture and its metadata."""
    from ._version import __version__
    from .imageio import metadata_text

    meta = {
        "prompt": st.prompt,
        "seed": seed_used,
        "steps": st.steps,
        "guidance": st.guidance,
        "width": st.width,
        "height": st.height,
        "model": st.model_name if st.model_name is not None else model.name,
        "compat": st.compat,
        "sampler": "euler",
        "schedule": "flux shift (resolution mu)" if st.compat is None else "sd.cpp discrete (mu 1.15)",
        "t5_length": st.t5_length,
        "mode": "img2img" if st.init_img is not None else "txt2img",
        "noise": "custom" if noise_given else "seed",
        "fluxmini_version": __version__,
    }
    loras = getattr(model, "loras", None)
    if loras:
        meta["loras"] = ", ".join(f"{os.path.basename(p)}:{s:g}" for p, s in loras)
    if st.init_img is not None:
        meta["strength"] = st.strength
        meta["start_step"] = st.start
        meta["init_image"] = (os.path.basename(os.fspath(st.init_image))
                              if isinstance(st.init_image, (str, os.PathLike)) else "image")
    image = array_to_image(decoded, rounded=st.compat == "sd.cpp")
    image.info.update(metadata_text(meta))
    return image, meta


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
    model = _engine(model)
    st = _settings(prompt, width, height, steps, guidance, compat, t5_length, init_image, strength, callback,
                   vae_tiling, negative_prompt, conditioning, model_name)
    if noise is not None:
        start = (None, noise_arg(noise, st.height // 8, st.width // 8))  # the seed draws nothing then
    else:
        start = (seed_or_random(seed), None)
    (result,) = _stages(model, st, [start], conditioning, progress, verbose, low_memory)
    return result


def run_batch(model, prompt: str = "", *, seeds, width=None, height=None, steps=20, guidance=3.5,
              compat=None, t5_length=None, init_image=None, strength=0.75, progress=True,
              callback: Optional[Callable] = None, low_memory: bool = False, verbose: bool = False,
              vae_tiling=None, negative_prompt=None, conditioning: Optional[Conditioning] = None,
              model_name: Optional[str] = None) -> Iterator[Result]:
    """One image per seed, with everything else shared; yields :class:`Result` s in seed order.

    The prompt is encoded once; all images are sampled, then all are decoded, so each
    component's weights are read once for the batch and ``low_memory`` releases them between
    stages, not between images (the first image arrives after every image was sampled). Each
    result's ``timings`` are its own; the first one's also hold the shared stages and ``load``
    (the later ones' ``load`` is 0: nothing is read again). Arguments as :func:`run`; every
    argument is checked before this returns, before any work.
    """
    model = _engine(model)
    st = _settings(prompt, width, height, steps, guidance, compat, t5_length, init_image, strength, callback,
                   vae_tiling, negative_prompt, conditioning, model_name)
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise FluxMiniValueError(f"seeds must be a list of seeds, got {type(seeds).__name__}")
    starts = [(seed_or_random(s), None) for s in seeds]
    if not starts:
        raise FluxMiniValueError("seeds is empty: give at least one seed")
    return _stages(model, st, starts, conditioning, progress, verbose, low_memory)


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
        compat: None (reference BFL/diffusers behaviour), ``"sd.cpp"`` (stable-diffusion.cpp as
            stable-diffusion-cpp-python 0.4.7 ships it: discrete schedule, T5 length 256, pixels
            rounded) or ``"llama-box"`` (the llama-box v0.0.86 stable-diffusion.cpp fork: T5 length
            255, no VAE shift); see the module docstring.
        t5_length: T5 tokens (default 512; 256 with ``compat="sd.cpp"``, 255 with "llama-box").
        noise: float32 ``[16, height/8, width/8]`` starting noise instead of the seed's.
        init_image: img2img input (PIL image, path or uint8 ``[H, W, 3]`` array).
        strength: img2img strength in [0, 1] (1 = start from pure noise).
        progress: a tqdm bar over the steps on a terminal (a stderr line per step otherwise).
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
