"""The generating side of a batch: a model loaded once, prompts encoded once, PNG bytes out.

"Encoded once" is the model's prompt-embedding cache (:mod:`fluxmini.embedding_cache`, through
:func:`fluxmini.pipeline.encode_prompt`): in memory for the worker's life, and across runs and
workers with ``cache_dir``.

Local mode runs one :class:`Generator` in the calling process; Ray mode one per actor. Both
produce the same bytes for a job: :func:`fluxmini.pipeline.run` with the prompt's conditioning
and :func:`fluxmini.imageio.save_png`'s encoding, as ``fluxmini generate`` writes a file.

Memory order (``low_memory``): the prompts of a group of tasks are encoded together while only
the text encoders are loaded; those are released before the transformer and VAE are loaded for
the group's images, which stay loaded until the next group needs the text encoders again. The
peak is the larger of (CLIP-L + T5) and (transformer + VAE) instead of their sum. A group whose
prompts are all cached loads no text encoder.
"""

from __future__ import annotations

import io
import os
import socket
import time
from collections import OrderedDict
from typing import Iterator, List, Optional, Tuple

from ..errors import FluxMiniError, FluxMiniFileError

#: distinct prompts encoded together (and held) per group: ~8 MB each for T5-XXL at 512 tokens
TEXT_GROUP = 16


def png_bytes(image, metadata: dict) -> bytes:
    from ..imageio import save_png

    buf = io.BytesIO()
    save_png(image, buf, metadata)
    return buf.getvalue()


def node_name() -> str:
    return socket.gethostname()


def check_model_files(paths: dict) -> None:
    """Every given model file exists here, else FluxMiniFileError naming this node."""
    from ..hub import is_hub_reference

    for what, path in paths.items():
        if path is None or (what == "model" and is_hub_reference(path) and not os.path.exists(path)):
            continue
        if not os.path.isfile(path):
            raise FluxMiniFileError(
                f"{what} file not found on node {node_name()}: {path} (every node that runs batch "
                "workers needs the model files at the same path: copy them there or use a shared disk)")


def _cond_key(params: dict) -> Tuple:
    return params["prompt"], params["t5_length"], params["compat"]


class Generator:
    """A loaded model that turns tasks into (record, png bytes) pairs.

    A task is a dict: ``index`` (job index), ``params`` (validated job) and ``seeds`` (the images
    still to make). Records carry ``key``, ``index``, ``seed``, ``file``, ``status`` ("ok" or
    "error"), ``error``, ``timings``, ``host`` and ``pid``.
    """

    def __init__(self, model: str, *, clip_l=None, t5xxl=None, vae=None, backend: str = "cpu",
                 threads: Optional[int] = None, low_memory: bool = True, cache_dir=None, max_memory=None):
        from ..model import FluxMini
        from ..hub import resolve_model

        check_model_files({"model": model, "clip_l": clip_l, "t5xxl": t5xxl, "vae": vae})
        path = resolve_model(model)
        t0 = time.perf_counter()
        self.model = FluxMini.load(path, clip_l=clip_l, t5xxl=t5xxl, vae=vae, backend=backend, threads=threads,
                                   cache_dir=cache_dir, max_memory=max_memory)
        self.load_seconds = time.perf_counter() - t0
        self.low_memory = bool(low_memory)

    def process(self, tasks: List[dict]) -> Iterator[Tuple[dict, Optional[bytes]]]:
        """Generate every pending image of ``tasks``, grouped by prompt (first appearance order)."""
        groups: "OrderedDict[Tuple, List[dict]]" = OrderedDict()
        for t in tasks:
            groups.setdefault(_cond_key(t["params"]), []).append(t)
        keys = list(groups)
        for start in range(0, len(keys), TEXT_GROUP):
            chunk = keys[start:start + TEXT_GROUP]
            encoded = self._encode(chunk)
            for ck in chunk:
                cond, text_seconds = encoded[ck]
                for task in groups[ck]:
                    for seed in task["seeds"]:
                        yield self._one(task, seed, cond, text_seconds)
                        text_seconds = 0.0  # reported with the first image that used it

    def _encode(self, keys: List[Tuple]) -> dict:
        """{key: (Conditioning or the FluxMiniError it raised, seconds of text encoding)}; cached
        prompts take 0 s and load nothing."""
        from ..pipeline import cached_prompt, encode_prompt

        out, missing = {}, []
        for k in keys:
            prompt, t5_length, compat = k
            try:
                cond = cached_prompt(self.model, prompt, t5_length=t5_length, compat=compat)
            except FluxMiniError as e:
                cond = e
            if cond is None:
                missing.append(k)
            else:
                out[k] = (cond, 0.0)
        if missing and self.low_memory:
            # the text encoders are about to load: free the transformer and VAE first
            self.model.release("diffusion")
            self.model.release("vae")
        for k in missing:
            prompt, t5_length, compat = k
            t0 = time.perf_counter()
            try:
                cond = encode_prompt(self.model, prompt, t5_length=t5_length, compat=compat)
            except FluxMiniError as e:
                cond = e
            out[k] = (cond, time.perf_counter() - t0)
        if missing and self.low_memory:
            self.model.release("clip_l")
            self.model.release("t5xxl")
        return out

    def _one(self, task: dict, seed: int, cond, text_seconds: float) -> Tuple[dict, Optional[bytes]]:
        from ..pipeline import run
        from .jobs import image_key

        key = image_key(task["index"], seed)
        rec = {"key": key, "index": task["index"], "seed": seed, "host": node_name(), "pid": os.getpid()}
        t0 = time.perf_counter()
        try:
            if isinstance(cond, Exception):
                raise cond
            params = {k: v for k, v in task["params"].items()
                      if k not in ("prompt", "count", "seed", "t5_length")}
            res = run(self.model, conditioning=cond, seed=seed, progress=False, low_memory=False, **params)
            data = png_bytes(res.image, res.metadata)
        except FluxMiniError as e:
            rec.update(status="error", error=str(e))
            return rec, None
        except Exception as e:  # a bug must not stop the batch: record it with its type
            rec.update(status="error", error=f"{type(e).__name__}: {e}")
            return rec, None
        tm = res.timings
        rec.update(status="ok", file=key + ".png", timings={
            "text_encoding": round(text_seconds, 4),
            "load": round(tm.get("load", 0.0), 4),
            "sampling": round(sum(tm.get("steps", [])), 4),
            "vae_decode": round(tm.get("vae_decode", 0.0), 4),
            "total": round(time.perf_counter() - t0 + text_seconds, 4),
        })
        return rec, data
