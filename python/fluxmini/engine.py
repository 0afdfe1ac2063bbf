"""The engine interface: what the pipeline needs from a model.

:class:`fluxmini.FluxMini` implements it on the C++ engine; tests implement it with fakes that
record the calls. The pipeline (:mod:`fluxmini.pipeline`) calls nothing else on a model.
"""

from __future__ import annotations

import abc
import os

import numpy as np


class Engine(abc.ABC):
    """The four networks of FLUX.1-mini and their weights' lifetime (cancellation is per call:
    the implementation's calls raise Cancelled or KeyboardInterrupt, which the pipeline passes on).

    ``paths`` maps "model" (and the split component names) to the files the weights came from.
    """

    paths: dict = {}

    # ------------------------------------------------------------------ networks
    @abc.abstractmethod
    def encode_clip(self, ids) -> np.ndarray:
        """CLIP-L pooled output [hidden] for 77 token ids."""

    @abc.abstractmethod
    def encode_t5(self, ids, *, compat=None) -> np.ndarray:
        """T5 last hidden state [len(ids), d_model]; ``compat="sd.cpp"`` with stable-diffusion.cpp's
        arithmetic where it differs (docs/MODEL.md §4.7). The pipeline passes ``compat`` only
        when it is "sd.cpp"."""

    @abc.abstractmethod
    def transformer(self, latent, sigma: float, guidance: float, t5, pooled) -> np.ndarray:
        """One Flux evaluation: latent [16, h, w] -> velocity [16, h, w]."""

    @abc.abstractmethod
    def vae_encode(self, image, *, tiling=None) -> np.ndarray:
        """Image [3, H, W] in [-1, 1] -> latent mean [16, H/8, W/8]."""

    @abc.abstractmethod
    def vae_decode(self, z, *, tiling=None) -> np.ndarray:
        """Latent [16, h, w] in VAE space -> image [3, 8h, 8w]."""

    # ------------------------------------------------------------------ weights
    def load_weights(self, component: str) -> None:
        """Read a component's weights now (they are read on first use otherwise)."""

    def release(self, component: str) -> None:
        """Free a component's weights (they are read again on next use)."""

    @property
    def loras(self) -> list:
        """The LoRA adapters applied now, [(path, scale)] (written into image metadata)."""
        return []

    # ------------------------------------------------------------------ prompt-embedding cache
    #: a :class:`fluxmini.embedding_cache.EmbeddingCache` that encode_prompt uses, or None
    embedding_cache = None

    def text_identity(self):
        """Bytes that identify everything the text encoders' outputs depend on besides the token
        ids (weights, text-encoder LoRAs, kernels), or None: the embedding cache is then not used."""
        return None

    # ------------------------------------------------------------------ description
    @property
    def name(self) -> str:
        """The model file's name (written into image metadata), or "unknown"."""
        p = self.paths.get("model") if isinstance(self.paths, dict) else None
        return os.path.basename(p) if p else "unknown"
