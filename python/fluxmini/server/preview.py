"""Cheap previews of a generation in progress: a fixed linear map of the 16 latent channels to RGB.

No VAE decode: each latent pixel becomes one RGB pixel (``rgb = latent^T @ FACTORS + BIAS``, in
[-1, 1]), upscaled 8x to the image's size. The factors are the published FLUX.1 latent-to-RGB
table of ComfyUI (``comfy/latent_formats.py``, class ``Flux``: ``latent_rgb_factors`` and
``latent_rgb_factors_bias``), a least-squares fit of the FLUX VAE's decoded colours on its
latents; stable-diffusion.cpp's server previews use the same table. It applies to the latent in
flow-matching space (after the VAE scale and shift), which is what the sampler's callback gives.
On the tiny random test models the colours mean nothing, but the preview is still the latent's
layout.
"""

from __future__ import annotations

import numpy as np

# [16 channels, RGB]
FACTORS = np.array([
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
], dtype=np.float32)
BIAS = np.array([-0.0329, -0.0718, -0.0851], dtype=np.float32)


def latent_to_rgb(latent: np.ndarray) -> np.ndarray:
    """``[16, h, w]`` latent -> ``[h, w, 3]`` uint8."""
    x = np.asarray(latent, np.float32)
    if x.ndim != 3 or x.shape[0] != FACTORS.shape[0]:
        raise ValueError(f"expected a [16, h, w] latent, got shape {list(x.shape)}")
    rgb = np.einsum("chw,ck->hwk", x, FACTORS) + BIAS
    return np.clip((rgb + 1.0) * 127.5, 0, 255).astype(np.uint8)


def preview_image(latent: np.ndarray, size):
    """A PIL image of the latent at ``size`` (W, H), nearest-neighbour upscaled (cheap, honest)."""
    from PIL import Image

    img = Image.fromarray(latent_to_rgb(latent), "RGB")
    resample = getattr(Image, "Resampling", Image).NEAREST
    return img.resize(tuple(size), resample)


def preview_steps(total: int, k: int) -> set:
    """The steps (1..total) after which to send a preview when k previews are asked for: spread
    evenly, never the last step (the final image follows it)."""
    if k <= 0 or total <= 1:
        return set()
    k = min(k, total - 1)
    return {max(1, round(total * (j + 1) / (k + 1))) for j in range(k)} - {total}
