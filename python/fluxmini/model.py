"""FluxMini: a loaded FLUX.1-mini model (the Python face of the C++ engine)."""

from __future__ import annotations

import os
from typing import Iterable, Optional

import numpy as np

from .engine import Engine
from .errors import FluxMiniFileError, FluxMiniValueError

COMPONENTS = ("diffusion", "clip_l", "t5xxl", "vae")


def _core():
    try:
        from . import _core as core
    except ImportError as e:  # the extension was not built or ggml's library is missing
        raise ImportError(
            f"fluxmini's C++ engine could not be imported ({e}); reinstall with `pip install .` "
            "so the extension is built against the pinned libggml-python"
        ) from e
    return core


def _version() -> str:
    from ._version import __version__

    return __version__


def _token_ids(ids) -> np.ndarray:
    """Token ids as int32, refusing values a cast would wrap (the engine checks the vocab range)."""
    a = np.asarray(ids)
    if a.dtype.kind not in "iu":
        raise FluxMiniValueError(f"token ids must be integers, got an array of {a.dtype}")
    i32 = np.iinfo(np.int32)
    if a.size and (a.min() < i32.min or a.max() > i32.max):
        raise FluxMiniValueError(f"token ids {a.min()}..{a.max()} do not fit in 32 bits: they are not token ids")
    return a.astype(np.int32)


def _path_arg(value, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, (str, os.PathLike)):
        raise FluxMiniValueError(f"{what} must be a path, got {type(value).__name__}")
    path = os.fspath(value)
    if not os.path.exists(path):
        raise FluxMiniFileError(f"{what} file not found: {path} (check the path)")
    return path


class FluxMini(Engine):
    """A FLUX.1-mini model loaded from a GGUF file (plus optional split component files).

    Loading maps the files and checks every tensor's shape; weights are read on first use.
    One model may be used from several threads: calls into the engine are serialised.
    """

    def __init__(self, core_model, paths: dict):
        self._m = core_model
        self.paths = paths

    @classmethod
    def load(cls, path, *, clip_l=None, t5xxl=None, vae=None, backend: str = "cpu",
             threads: Optional[int] = None, components: Optional[Iterable[str]] = None,
             flash_attn: bool = True, verbose: int = 0) -> "FluxMini":
        """Open a model.

        path: a FLUX.1-mini GGUF (gpustack's single file, sd.cpp names, or diffusion-only).
        clip_l / t5xxl / vae: split component files (GGUF or safetensors).
        backend: "cpu", "cuda", "metal" or "auto". threads: CPU threads (default: physical cores).
        components: the components that must be present (default: all four).
        """
        if not isinstance(backend, str):
            raise FluxMiniValueError("backend must be a string: cpu, cuda, metal or auto")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise FluxMiniValueError(f"threads must be a positive integer, got {threads!r}")
        comps = list(COMPONENTS if components is None else components)
        for c in comps:
            if c not in COMPONENTS:
                raise FluxMiniValueError(f"unknown component {c!r}; components are {', '.join(COMPONENTS)}")
        paths = {"model": _path_arg(path, "model"), "clip_l": _path_arg(clip_l, "clip_l"),
                 "t5xxl": _path_arg(t5xxl, "t5xxl"), "vae": _path_arg(vae, "vae")}
        if not paths["model"]:
            raise FluxMiniValueError("no model file given: pass the path of a FLUX.1-mini GGUF file")
        core = _core()
        m = core.Model(paths["model"], paths["clip_l"], paths["t5xxl"], paths["vae"], backend,
                       threads or 0, comps, bool(flash_attn), int(verbose))
        if m.backend not in ("cpu", "cuda"):  # CUDA checked on an H100 (benchmarks/gpu_check.sh); Metal never run
            import warnings

            warnings.warn(f"the {m.backend} backend is experimental in fluxmini {_version()}: its results have not "
                          "been checked against the reference yet (see README, 'GPU builds'); CPU and CUDA are checked",
                          RuntimeWarning, stacklevel=2)
        return cls(m, paths)

    # ------------------------------------------------------------------ description
    def info(self) -> dict:
        """Components found, tensors per type, parameters, bytes and inferred hyper-parameters."""
        comps = {c["name"]: c for c in self._m.info()}
        return {"backend": self._m.backend, "backend_description": self._m.backend_description,
                "threads": self._m.threads, "kernels": self._m.kernels, "components": comps,
                "ignored_tensors": list(self._m.ignored_tensors)}

    def info_table(self) -> str:
        info = self.info()
        lines = [f"backend: {info['backend']} ({info['backend_description']}), threads: {info['threads']}",
                 f"kernels: {info['kernels']}", ""]
        header = f"{'component':<10} {'tensors':>7} {'parameters':>15} {'bytes':>15}  types"
        lines += [header, "-" * len(header)]
        for name in COMPONENTS:
            c = info["components"][name]
            if not c["present"]:
                lines.append(f"{name:<10} {'-':>7} {'-':>15} {'-':>15}  (not found)")
                continue
            n = sum(c["tensors_per_type"].values())
            types = ", ".join(f"{k}: {v}" for k, v in sorted(c["tensors_per_type"].items()))
            lines.append(f"{name:<10} {n:>7} {c['parameters']:>15,} {c['bytes']:>15,}  {types}")
        lines.append("")
        for name in COMPONENTS:
            c = info["components"][name]
            if c["present"]:
                cfg = ", ".join(f"{k}={v}" for k, v in c["config"].items())
                lines.append(f"{name}: {cfg}")
                lines.append(f"  from: {', '.join(c['sources'])}")
        if info["ignored_tensors"]:
            ign = info["ignored_tensors"]
            more = f" (+{len(ign) - 5} more)" if len(ign) > 5 else ""
            lines.append(f"ignored tensors: {', '.join(ign[:5])}{more}")
        return "\n".join(lines)

    @property
    def threads(self) -> int:
        return self._m.threads

    @threads.setter
    def threads(self, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise FluxMiniValueError(f"threads must be a positive integer, got {n!r}")
        self._m.threads = n

    @property
    def config(self) -> dict:
        return {name: c["config"] for name, c in self.info()["components"].items() if c["present"]}

    # ------------------------------------------------------------------ networks
    def transformer(self, latent, sigma: float, guidance: float, t5, pooled) -> np.ndarray:
        """One Flux evaluation: latent [16, h, w], t5 [L, 4096], pooled [768] -> velocity [16, h, w]."""
        return self._m.transformer(np.asarray(latent, np.float32), float(sigma), float(guidance),
                                   np.asarray(t5, np.float32), np.asarray(pooled, np.float32))

    def encode_clip(self, ids) -> np.ndarray:
        """CLIP-L pooled output [hidden] for 77 token ids."""
        return self._m.encode_clip(_token_ids(ids))

    def encode_t5(self, ids) -> np.ndarray:
        """T5 last hidden state [len(ids), d_model]."""
        return self._m.encode_t5(_token_ids(ids))

    def vae_decode(self, z, *, tiling=None, tile: int = 0, overlap: int = -1) -> np.ndarray:
        """VAE decode: z [16, h, w] in VAE space -> image [3, 8h, 8w] (unclamped, about [-1, 1]).

        tiling: None = automatic (tiles when an untiled pass would need too much memory), True, False.
        tile: largest tile side in latent pixels (0 = default 72); overlap: least overlap of
        neighbouring tiles in latent pixels (-1 = default min(16, tile / 4)).
        """
        mode = -1 if tiling is None else int(bool(tiling))
        return self._m.vae_decode(np.asarray(z, np.float32), mode, int(tile), int(overlap))

    def vae_encode(self, image, *, tiling=None, tile: int = 0, overlap: int = -1) -> np.ndarray:
        """VAE encode: image [3, H, W] in [-1, 1] -> latent mean [16, H/8, W/8] (tiling as vae_decode)."""
        mode = -1 if tiling is None else int(bool(tiling))
        return self._m.vae_encode(np.asarray(image, np.float32), mode, int(tile), int(overlap))

    def tokenize_clip(self, prompt: str) -> np.ndarray:
        from .tokenizers import tokenize_clip

        return tokenize_clip(prompt)

    def tokenize_t5(self, prompt: str, length: int = 512) -> np.ndarray:
        from .tokenizers import tokenize_t5

        return tokenize_t5(prompt, length)

    # ------------------------------------------------------------------ pipeline
    def generate(self, prompt: str = "", **kwargs):
        """Text-to-image (image-to-image with ``init_image=``) -> ``PIL.Image.Image``.

        Keyword arguments (see :func:`fluxmini.pipeline.generate`): width, height (512, multiples
        of 16, at most 2048), steps=20, guidance=3.5, seed=42 (None: random), compat=None or
        "sd.cpp", t5_length, noise, init_image, strength=0.75, progress=True, callback,
        low_memory=False, verbose=False, vae_tiling. The image's ``info`` holds the generation
        parameters (saved as PNG text by :func:`fluxmini.imageio.save_png`).
        """
        from .pipeline import generate

        return generate(self, prompt, **kwargs)

    # ------------------------------------------------------------------ memory
    def load_weights(self, component: str) -> None:
        self._check_component(component)
        self._m.load(component)

    def release(self, component: str) -> None:
        """Free a component's weights and compute memory (it reloads on next use)."""
        self._check_component(component)
        self._m.release(component)

    def interrupt(self) -> None:
        """Abort the computation in progress (safe from any thread)."""
        self.note_interrupt_request()  # lets generate() tell this from Ctrl-C
        self._m.interrupt()

    @staticmethod
    def _check_component(component: str) -> None:
        if component not in COMPONENTS:
            raise FluxMiniValueError(f"unknown component {component!r}; components are {', '.join(COMPONENTS)}")
