"""FluxMini: a loaded FLUX.1-mini model (the Python face of the C++ engine)."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterable, Optional

import numpy as np

from .engine import Engine
from .errors import FluxMiniFileError, FluxMiniValueError
from .validation import compat_arg

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


def _tile_arg(tile) -> tuple[int, int]:
    """vae_decode/vae_encode's tile: a side or (height, width) -> (tile, tile_w) for the engine."""
    if isinstance(tile, (tuple, list)):
        if len(tile) != 2:
            raise FluxMiniValueError(f"tile must be a side or (height, width) in latent pixels, not {tile!r}")
        return int(tile[0]), int(tile[1])
    return int(tile), 0


def _path_arg(value, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, (str, os.PathLike)):
        raise FluxMiniValueError(f"{what} must be a path, got {type(value).__name__}")
    path = os.fspath(value)
    if not os.path.exists(path):
        raise FluxMiniFileError(f"{what} file not found: {path} (check the path)")
    return path


class CancelToken:
    """Cancels one call: pass it as ``model.generate(..., cancel=token)`` (or to ``transformer``,
    ``encode_clip``, ``encode_t5``, ``vae_decode``, ``vae_encode``) and call :meth:`cancel` from
    any thread. The engine stops at once (between two graph nodes) and the call raises
    :class:`fluxmini.Cancelled`; other calls, running or later, are not affected. A cancelled
    token stays cancelled: use a new one per call.
    """

    __slots__ = ("_native",)

    def __init__(self):
        self._native = _core().CancelToken()

    def cancel(self) -> None:
        self._native.cancel()

    @property
    def cancelled(self) -> bool:
        return self._native.cancelled


def _cancel_arg(cancel) -> Optional[CancelToken]:
    if cancel is not None and not isinstance(cancel, CancelToken):
        raise FluxMiniValueError(f"cancel must be a fluxmini.CancelToken or None, got {type(cancel).__name__}")
    return cancel


class FluxMini(Engine):
    """A FLUX.1-mini model loaded from a GGUF file (plus optional split component files).

    Loading maps the files and checks every tensor's shape; weights are read on first use.
    One model may be used from several threads: calls into the engine are serialised.
    """

    def __init__(self, core_model, paths: dict):
        self._m = core_model
        self.paths = paths
        # Tokens of the calls in progress (what interrupt() cancels), and per thread the token of
        # its cancel_scope() (a generate() in progress).
        self._calls: list = []
        self._calls_lock = threading.Lock()
        self._scope = threading.local()
        # LoRAs applied now: [(path, scale)], the identity of that set (files' size and mtime, so
        # set_loras() of the same set is free), and the adapters' bytes in the engine.
        self._loras: list = []
        self._lora_key: tuple = ()
        self._lora_lock = threading.Lock()
        # The prompt-embedding cache (memory only until load() is given a cache_dir), the
        # fingerprint of the text encoders' weights (computed on first use) and that of the
        # text-encoder LoRAs applied now (b"" for none).
        from .embedding_cache import EmbeddingCache

        self.embedding_cache = EmbeddingCache()
        self._text_weights_fp: Optional[bytes] = None
        self._text_lora_fp = b""
        self._lora_mode = "runtime"

    @classmethod
    def load(cls, path, *, clip_l=None, t5xxl=None, vae=None, backend: str = "cpu",
             threads: Optional[int] = None, components: Optional[Iterable[str]] = None,
             flash_attn: bool = True, verbose: int = 0, loras=None, lora_strict: bool = True,
             cache_dir=None, cache_max_bytes: Optional[int] = None,
             cache_memory_bytes: Optional[int] = None, lora_mode: str = "runtime",
             max_memory=None) -> "FluxMini":
        """Open a model.

        path: a FLUX.1-mini GGUF (gpustack's single file, sd.cpp names, or diffusion-only).
        clip_l / t5xxl / vae: split component files (GGUF or safetensors).
        backend: "cpu", "cuda", "metal" or "auto". threads: CPU threads (default: physical cores).
        components: the components that must be present (default: all four).
        loras: LoRA adapters to apply at run time, e.g. ``[("style.safetensors", 0.8)]`` (see
        :meth:`set_loras`); lora_strict: refuse a LoRA with keys that match no layer; lora_mode:
        how :meth:`set_loras` applies them by default, "runtime" or "merge" (F16/F32 models).
        cache_dir: a folder that keeps prompt embeddings between processes (default: none; they
        are always kept in memory for the model's life, see :mod:`fluxmini.embedding_cache`);
        cache_max_bytes: that folder's bound (default 1 GiB, least recently used entries go
        first); cache_memory_bytes: the memory level's bound (default 128 MiB, 0 turns it off).
        max_memory: the memory budget, MiB or a string such as "1.5G" (None: the cgroup limit or
        the available memory); under a tight budget weights are dropped from memory as soon as
        they were used, compute buffers are freed between stages and the VAE tiles to fit.
        """
        from .validation import max_memory_arg

        max_memory_mib = max_memory_arg(max_memory)
        if not isinstance(backend, str):
            raise FluxMiniValueError("backend must be a string: cpu, cuda, metal or auto")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise FluxMiniValueError(f"threads must be a positive integer, got {threads!r}")
        comps = list(COMPONENTS if components is None else components)
        for c in comps:
            _check_component(c)
        paths = {"model": _path_arg(path, "model"), "clip_l": _path_arg(clip_l, "clip_l"),
                 "t5xxl": _path_arg(t5xxl, "t5xxl"), "vae": _path_arg(vae, "vae")}
        if not paths["model"]:
            raise FluxMiniValueError("no model file given: pass the path of a FLUX.1-mini GGUF file")
        from .embedding_cache import EmbeddingCache

        cache = EmbeddingCache(cache_dir, max_bytes=cache_max_bytes, memory_bytes=cache_memory_bytes)
        core = _core()
        m = core.Model(paths["model"], paths["clip_l"], paths["t5xxl"], paths["vae"], backend,
                       threads or 0, comps, bool(flash_attn), int(verbose), max_memory_mib)
        if m.backend not in ("cpu", "cuda"):  # CUDA checked on an H100 (benchmarks/gpu_check.sh); Metal never run
            import warnings

            warnings.warn(f"the {m.backend} backend is experimental in fluxmini {_version()}: its results have not "
                          "been checked against the reference yet (see README, 'GPU builds'); CPU and CUDA are checked",
                          RuntimeWarning, stacklevel=2)
        model = cls(m, paths)
        model.embedding_cache = cache
        model._lora_mode = _lora_mode_arg(lora_mode)
        if loras:
            model.set_loras(loras, strict=lora_strict)
        return model

    # ------------------------------------------------------------------ description
    def info(self) -> dict:
        """Components found, tensors per type, parameters, bytes and inferred hyper-parameters;
        ``memory``: the memory policy; per component ``placement``: where its weights live
        (in place in the file mapping, or copied into memory, and why)."""
        comps = {c["name"]: c for c in self._m.info()}
        for name, c in comps.items():
            c["placement"] = self._m.placement(name) if c["present"] else []
        return {"backend": self._m.backend, "backend_description": self._m.backend_description,
                "threads": self._m.threads, "kernels": self._m.kernels, "components": comps,
                "ignored_tensors": list(self._m.ignored_tensors), "memory": self._m.memory()}

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
        lines.append(f"memory: {info['memory']['description']}")
        for name in COMPONENTS:
            rows = info["components"][name].get("placement") or []
            for r in rows:
                lines.append(f"  {name:<10} {r['where']:<9} {r['bytes'] / 2**20:9.1f} MiB {r['count']:>5} tensors: "
                             f"{r['reason']}")
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
    # Every engine call below takes ``cancel``: a :class:`CancelToken` that stops it (None: the
    # token of this thread's generate() in progress, or a token of its own that interrupt() reaches).
    def transformer(self, latent, sigma: float, guidance: float, t5, pooled, *, cancel=None) -> np.ndarray:
        """One Flux evaluation: latent [16, h, w], t5 [L, 4096], pooled [768] -> velocity [16, h, w]."""
        args = (np.asarray(latent, np.float32), float(sigma), float(guidance), np.asarray(t5, np.float32),
                np.asarray(pooled, np.float32))
        with self._call(cancel) as token:
            return self._m.transformer(*args, cancel=token)

    def encode_clip(self, ids, *, cancel=None) -> np.ndarray:
        """CLIP-L pooled output [hidden] for 77 token ids."""
        ids = _token_ids(ids)
        with self._call(cancel) as token:
            return self._m.encode_clip(ids, cancel=token)

    def encode_t5(self, ids, *, compat=None, cancel=None) -> np.ndarray:
        """T5 last hidden state [len(ids), d_model]. ``compat="sd.cpp"``: with stable-diffusion.cpp's
        arithmetic where it differs (F16 activation scales, ``wo``'s 1/32 pre-scale;
        docs/MODEL.md §4.7)."""
        ids = _token_ids(ids)
        sdcpp = compat_arg(compat) == "sd.cpp"
        with self._call(cancel) as token:
            return self._m.encode_t5(ids, sdcpp, cancel=token)

    def vae_decode(self, z, *, tiling=None, tile=0, overlap: int = -1, cancel=None) -> np.ndarray:
        """VAE decode: z [16, h, w] in VAE space -> image [3, 8h, 8w] (unclamped, about [-1, 1]).

        tiling: None = automatic (tiles when an untiled pass would need too much memory), True, False.
        tile: largest tile side in latent pixels, or (height, width) (0 = default 72); overlap: least
        overlap of neighbouring tiles in latent pixels (-1 = default min(16, tile / 4) per axis).
        """
        mode = -1 if tiling is None else int(bool(tiling))
        z = np.asarray(z, np.float32)
        with self._call(cancel) as token:
            return self._m.vae_decode(z, mode, *_tile_arg(tile), int(overlap), cancel=token)

    def vae_encode(self, image, *, tiling=None, tile=0, overlap: int = -1, cancel=None) -> np.ndarray:
        """VAE encode: image [3, H, W] in [-1, 1] -> latent mean [16, H/8, W/8] (tiling as vae_decode)."""
        mode = -1 if tiling is None else int(bool(tiling))
        image = np.asarray(image, np.float32)
        with self._call(cancel) as token:
            return self._m.vae_encode(image, mode, *_tile_arg(tile), int(overlap), cancel=token)

    def tokenize_clip(self, prompt: str) -> np.ndarray:
        from .tokenizers import tokenize_clip

        return tokenize_clip(prompt)

    def tokenize_t5(self, prompt: str, length: int = 512) -> np.ndarray:
        from .tokenizers import tokenize_t5

        return tokenize_t5(prompt, length)

    # ------------------------------------------------------------------ pipeline
    def generate(self, prompt: str = "", *, cancel=None, loras=None, **kwargs):
        """Text-to-image (image-to-image with ``init_image=``) -> ``PIL.Image.Image``.

        cancel: a :class:`CancelToken` that stops this call (and no other) when cancelled from
        any thread; :meth:`interrupt` stops it too.

        Keyword arguments (see :func:`fluxmini.pipeline.generate`): width, height (512, multiples
        of 16, at most 2048), steps=20, guidance=3.5, seed=42 (None: random), compat=None,
        "sd.cpp" or "llama-box", t5_length, noise, init_image, strength=0.75, progress=True, callback,
        low_memory=False, verbose=False, vae_tiling. The image's ``info`` holds the generation
        parameters (saved as PNG text by :func:`fluxmini.imageio.save_png`).

        loras: LoRAs for this call only (as :meth:`set_loras`); those set before come back after.
        The LoRAs belong to the model, not the call: threads sharing a model should not pass
        different ``loras`` at the same time (the server runs one request at a time).
        """
        from .pipeline import generate

        if loras is None:
            with self.cancel_scope(cancel):
                return generate(self, prompt, **kwargs)
        before, before_key = self._loras, self._lora_key
        self.set_loras(loras)
        try:
            with self.cancel_scope(cancel):
                return generate(self, prompt, **kwargs)
        finally:
            self.set_loras(before, strict=before_key[1] if before_key else True,
                           mode=before_key[2] if before_key else None)

    # ------------------------------------------------------------------ LoRA
    @property
    def loras(self) -> list:
        """The LoRAs applied now: [(path, scale)]."""
        return list(self._loras)

    def set_loras(self, loras, *, strict: bool = True, mode: Optional[str] = None) -> list:
        """Apply LoRA adapters, replacing those applied before (None or [] removes them). Cheap
        when the set (files, scales, mode) is unchanged.

        loras: a path, a (path, scale) pair, or a list of paths / (path, scale) pairs (scale:
        the multiplier, negative allowed; default 1). Formats: FluxKits/XLabs, kohya,
        diffusers/PEFT and BFL/ComfyUI, in safetensors or GGUF (see :mod:`fluxmini.lora`).
        strict: refuse a LoRA with tensors that match no layer of this model (e.g. one made for
        FLUX.1-dev); with strict=False they are skipped and reported in the return value.
        mode: "runtime" (the default, or the model's ``lora_mode``): extra graph nodes per adapted
        layer, the base weights untouched. "merge": W + scale·B·A computed once into copies of the
        adapted weights (F16/F32 weights only: a quantized layer is a FluxMiniValueError), so
        steps cost what they cost without LoRA; the file's weights are never written, and removing
        or changing the LoRAs makes the layers read them again (exactly the base model). XLabs'
        single-block ``proj_lora`` (an adapter on a layer's output) stays run-time.

        Returns [(path, [(tensor, reason), ...])]: the unmatched tensors of each LoRA.
        """
        from . import lora as L

        items = L.lora_list(loras)
        key = []
        for path, scale in items:
            try:
                st = os.stat(path)
            except OSError as e:
                raise FluxMiniFileError(f"LoRA file not found: {path} ({e.strerror or e})") from e
            key.append((os.path.realpath(path), st.st_size, st.st_mtime_ns, scale))
        mode = self._lora_mode if mode is None else _lora_mode_arg(mode)
        key = (tuple(key), bool(strict), mode) if key else ()
        with self._lora_lock:
            if key == self._lora_key:
                return []
            layers = L.ModelLayers.of(self._m, [c["name"] for c in self._m.info() if c["present"]])
            parsed, report = [], []
            for path, scale in items:
                lf = L.read_lora(path, layers)
                if lf.unmatched:
                    if strict:
                        raise FluxMiniValueError(L.unmatched_message(lf, layers))
                    report.append((path, list(lf.unmatched)))
                if not lf.adapters:
                    raise FluxMiniValueError(f"{os.path.basename(path)}: no tensor of this LoRA matches a layer of "
                                             "this model; nothing would change")
                parsed.append((lf, scale))
            per_comp = L.engine_items(parsed)
            merge = mode == "merge"
            if merge:  # every component's checks first, so a refusal changes nothing
                for comp in layers.linears:
                    self._m.check_adapters(comp, per_comp.get(comp, []), True)
            for comp in layers.linears:
                self._m.set_adapters(comp, per_comp.get(comp, []), merge)
            self._loras = items
            self._lora_key = key
            self._text_lora_fp = _adapters_fingerprint(per_comp, ("clip_l", "t5xxl"))
            return report

    def lora_bytes(self) -> int:
        """Memory the applied LoRAs take in the engine: their factors, and in merge mode the
        merged copies of the weights they change."""
        return sum(self._m.adapter_bytes(c["name"]) + self._m.merged_bytes(c["name"]) for c in self._m.info()
                   if c["present"] and c["name"] != "vae")

    # ------------------------------------------------------------------ prompt-embedding cache
    def text_identity(self) -> bytes:
        """What CLIP-L's and T5's outputs depend on besides the token ids: the fingerprint of their
        weights (read once, see :func:`fluxmini.embedding_cache.weights_fingerprint`), the
        text-encoder LoRAs applied now, the backend and kernels, and fluxmini's version."""
        import hashlib

        from .embedding_cache import weights_fingerprint

        if self._text_weights_fp is None:
            present = {c["name"] for c in self._m.info() if c["present"]}
            rows = [(f"{c}:{name}", t, ne, path, off, n) for c in ("clip_l", "t5xxl") if c in present
                    for name, _file_name, t, ne, path, off, n in self._m.tensor_table(c)]
            self._text_weights_fp = weights_fingerprint(rows)
        h = hashlib.sha256(self._text_weights_fp)
        for part in (self._text_lora_fp, self._m.backend.encode(), self._m.kernels.encode(), _version().encode()):
            h.update(len(part).to_bytes(8, "little") + part)
        return h.digest()

    def loaded_components(self) -> list:
        """The components whose weights are in memory now (see :meth:`load_weights`, :meth:`release`)."""
        return [c["name"] for c in self._m.info() if c["present"] and self._m.weight_bytes(c["name"]) > 0]

    # ------------------------------------------------------------------ memory
    def load_weights(self, component: str) -> None:
        _check_component(component)
        self._m.load(component)

    def release(self, component: str) -> None:
        """Free a component's weights and compute memory (it reloads on next use)."""
        _check_component(component)
        self._m.release(component)

    # ------------------------------------------------------------------ cancellation
    @contextlib.contextmanager
    def cancel_scope(self, cancel=None):
        """Run this thread's engine calls inside the block as one call: under ``cancel`` (or a new
        token), which :meth:`interrupt` reaches for as long as the block runs. Yields the token."""
        token = _cancel_arg(cancel) or CancelToken()
        outer = getattr(self._scope, "token", None)
        self._scope.token = token
        try:
            with self._registered(token):
                yield token
        finally:
            self._scope.token = outer

    @contextlib.contextmanager
    def _call(self, cancel):
        """The native token one engine call runs under: the caller's, this thread's scope's, or a
        new one registered for interrupt() while the call runs."""
        token = _cancel_arg(cancel) or getattr(self._scope, "token", None)
        if token is not None:
            yield token._native
            return
        token = CancelToken()
        with self._registered(token):
            yield token._native

    @contextlib.contextmanager
    def _registered(self, token: CancelToken):
        with self._calls_lock:
            self._calls.append(token)
        try:
            yield
        finally:
            with self._calls_lock:
                self._calls.remove(token)

    def interrupt(self) -> None:
        """Cancel every call in progress on this model, from any thread: generate() calls and engine
        calls running now (they raise :class:`fluxmini.Cancelled`). Calls made later are not
        affected; to cancel one call only, pass it a :class:`CancelToken`."""
        with self._calls_lock:
            calls = list(self._calls)
        for token in calls:
            token.cancel()


def _adapters_fingerprint(per_comp: dict, components) -> bytes:
    """SHA-256 of the adapters the engine was given for some components (b"" when none): the
    exact factors and scales, so the embedding cache tells apart any two text-encoder LoRA sets."""
    import hashlib

    items = [(c, a) for c in components for a in per_comp.get(c, [])]
    if not items:
        return b""
    h = hashlib.sha256()
    for comp, (target, row0, on_output, scale, dtype, down, up) in items:
        h.update(repr((comp, target, int(row0), bool(on_output), float(scale), dtype)).encode())
        for arr in (down, up):
            a = np.ascontiguousarray(arr)
            h.update(repr((a.dtype.str, a.shape)).encode() + a.tobytes())
    return h.digest()
def _lora_mode_arg(mode) -> str:
    if mode not in ("runtime", "merge"):
        raise FluxMiniValueError(f'lora_mode must be "runtime" or "merge", got {mode!r}')
    return mode


def _check_component(component) -> None:
    """Component names are converted (and unknown ones refused) by the engine; only the type is
    checked here."""
    if not isinstance(component, str):
        raise FluxMiniValueError(f"a component name must be a string ({', '.join(COMPONENTS)}), "
                                 f"got {type(component).__name__}")
