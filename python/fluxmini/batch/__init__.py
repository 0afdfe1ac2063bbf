"""Batch generation: many prompts on one machine, or across a Ray cluster.

:func:`run` takes jobs (a ``JOBS.jsonl`` path or job dicts; see :mod:`fluxmini.batch.jobs`),
writes one PNG per image into ``out_dir`` under a name made of the job index and the seed
(``000007_42.png``), with the metadata ``fluxmini generate`` writes, and appends one record per
image (or per bad job) to ``out_dir/results.jsonl``. A re-run skips the images already there:
PNGs are written to a temp file and renamed, so a file under its final name is complete and a
killed batch loses only the images in flight.

Local mode (default): this process loads the model once and encodes each distinct prompt once.
Ray mode (``ray=True`` or an address): Ray Data sends the jobs to a pool of actors, each with the
model loaded once; the images come back to this process, which writes them (no shared disk
needed). The same job gives the same bytes in both modes and through ``FluxMini.generate``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterator, Optional

from ..errors import FluxMiniValueError
from .jobs import RESULTS_FILE, Job, Store, image_key, parse_jobs

__all__ = ["run", "parse_jobs", "RESULTS_FILE"]


def run(jobs, out_dir, *, model, ray=None, workers: Optional[int] = None, threads: Optional[int] = None,
        defaults: Optional[dict] = None, clip_l=None, t5xxl=None, vae=None, backend: str = "cpu",
        low_memory: Optional[bool] = None, progress: bool = True, cache_dir=None,
        max_memory=None) -> Iterator[dict]:
    """Generate every image of ``jobs`` into ``out_dir``; yields one record per image or bad job.

    The work happens while the iterator is consumed (``for rec in run(...)``, ``list(run(...))``).

    Args:
        jobs: a JOBS.jsonl path (one JSON object per line) or an iterable of job dicts.
        out_dir: the output folder (created if needed); results.jsonl lives there.
        model: the FLUX.1-mini GGUF path (in Ray mode, the path on every worker node), or an
            ``owner/repo:QUANT`` reference. clip_l, t5xxl, vae, backend: as ``FluxMini.load``.
        ray: None for local mode; True (or "") for Ray: the running Ray, else RAY_ADDRESS, else
            a local one; or a cluster address ("auto", "host:6379", "ray://host:10001").
        workers: Ray actors (default: one per node). Local mode runs one process: 1 or None.
        threads: CPU threads per model (local default: physical cores; Ray default: the
            smallest node's CPUs divided by the workers per node). Ray reserves ``threads``
            CPUs per actor.
        defaults: job fields used where a job does not set them (e.g. ``{"steps": 4}``).
        low_memory: release the text encoders while the transformer works and the reverse
            (default: True locally, where prompts are encoded in groups; False in Ray, where an
            actor receives one job at a time).
        progress: a progress bar over images on stderr (tqdm when installed) with images/hour
            and the ETA.
        cache_dir: a folder for the prompt-embedding cache, shared by runs and workers (in Ray
            mode a path on every node; a shared disk is safe), as ``FluxMini.load``'s.
        max_memory: each model's memory budget, as ``FluxMini.load``.

    Records (dicts, also appended to results.jsonl): ``key`` (output stem, or the job index for
    a bad job), ``status`` ("ok", "error", or "skipped" for an image already complete; skipped
    ones are not written again), ``index``, ``line`` (in JOBS.jsonl), ``job`` (its fields after
    defaults), ``seed``, ``file``, ``timings`` (seconds), ``host`` and ``pid`` of the worker,
    ``error``.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise FluxMiniValueError(f"workers must be a positive integer, got {workers!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise FluxMiniValueError(f"threads must be a positive integer, got {threads!r}")
    if ray is False:
        ray = None
    if ray is not None and not isinstance(ray, (bool, str)):
        raise FluxMiniValueError(f"ray must be None, True or a cluster address string, got {type(ray).__name__}")
    if ray is None and workers not in (None, 1):
        raise FluxMiniValueError("workers > 1 needs Ray (ray=True or an address); local mode runs one "
                                 "process, whose threads are set with threads=")
    if not isinstance(model, (str, os.PathLike)):
        raise FluxMiniValueError(f"model must be a path, got {type(model).__name__}")
    model = os.fspath(model)
    from ..validation import max_memory_arg

    max_memory = max_memory_arg(max_memory) or None
    parsed = parse_jobs(jobs, defaults)
    store = Store(out_dir)
    return _run(parsed, store, model=model, ray=ray, workers=workers, threads=threads,
                # the component files and the budget, passed on to each worker's FluxMini.load
                files={"clip_l": clip_l, "t5xxl": t5xxl, "vae": vae, "max_memory": max_memory}, backend=backend,
                low_memory=low_memory, progress=progress, cache_dir=cache_dir)


def _base_record(job: Job) -> dict:
    return {"index": job.index, "line": job.line, "job": job.params if job.params is not None else job.raw}


def _run(parsed, store: Store, *, model, ray, workers, threads, files, backend, low_memory, progress, cache_dir):
    by_index = {j.index: j for j in parsed}
    tasks, skipped = [], []
    n_images = 0
    for job in parsed:
        if job.error is not None:
            continue
        pending = []
        for seed in job.seeds:
            n_images += 1
            key = image_key(job.index, seed)
            (skipped if store.has_image(key) else pending).append((key, seed))
        if pending:
            tasks.append({"index": job.index, "params": job.params, "seeds": [s for _, s in pending]})

    for job in parsed:
        if job.error is not None:
            rec = {"key": job.key, "status": "error", **_base_record(job), "error": job.error}
            store.append(rec)
            yield rec
    for key, seed in skipped:
        job = by_index[int(key.split("_")[0])]
        rec = {"key": key, "status": "ok", **_base_record(job), "seed": seed, "file": key + ".png"}
        # a kill between the rename and the append leaves a complete image without a record
        recovered = store.append({**rec, "recovered": True})
        yield {**rec, "status": "skipped", **({"recovered": True} if recovered else {})}
    if not tasks:
        return
    bar = _Progress(n_images, len(skipped), enabled=progress)
    try:
        if ray is None:
            results = _local_results(tasks, model, files, backend, threads, low_memory, cache_dir)
        else:
            from .ray_mode import ray_results

            results = ray_results(tasks, model, files, backend, ray, workers, threads, low_memory, cache_dir)
        for rec, data in results:
            job = by_index[rec["index"]]
            key = rec["key"]
            if rec["status"] == "ok":
                if store.has_image(key) or key in store.ok_keys:
                    continue  # a retried Ray task delivered an image twice: written once
                store.write_png(key, data)
            rec = {"key": key, "status": rec["status"], **_base_record(job),
                   **{k: v for k, v in rec.items() if k not in ("key", "status", "index")}}
            store.append(rec)
            bar.update(ok=rec["status"] == "ok")
            yield rec
    finally:
        bar.close()


def _local_results(tasks, model, files, backend, threads, low_memory, cache_dir):
    from .worker import Generator

    gen = Generator(model, backend=backend, threads=threads,
                    low_memory=True if low_memory is None else low_memory, cache_dir=cache_dir, **files)
    yield from gen.process(tasks)


# --------------------------------------------------------------------------- progress


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _Progress:
    """Images done of the total, images per hour and the ETA from the images made in this run.

    A tqdm bar when tqdm is importable, else one line per image on stderr.
    """

    def __init__(self, total: int, done: int, *, enabled: bool, stream=None):
        self.total, self.done, self.errors = total, done, 0
        self.new = 0
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.perf_counter()
        self.bar = None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            self.bar = tqdm(total=total, initial=done, desc="batch", unit="img", file=self.stream,
                            dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
            self.bar.set_postfix_str(self._rate_text(), refresh=True)

    def _rate_text(self) -> str:
        elapsed = time.perf_counter() - self.t0
        if self.new == 0 or elapsed <= 0:
            return "-- img/h, ETA --"
        per_hour = self.new / elapsed * 3600.0
        left = max(0, self.total - self.done)
        text = f"{per_hour:.0f} img/h, ETA {_hms(left / (per_hour / 3600.0))}"
        return text + (f", {self.errors} failed" if self.errors else "")

    def update(self, ok: bool) -> None:
        self.done += 1
        self.new += 1
        self.errors += 0 if ok else 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(self._rate_text(), refresh=False)
            self.bar.update(1)
        else:
            print(f"fluxmini batch: {self.done}/{self.total} images, {self._rate_text()}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
