"""Ray mode: Ray Data spreads the jobs over a pool of actors, each holding a loaded model.

``from_items(tasks)`` -> ``map_batches(RayGenerator, compute=ActorPoolStrategy(size=workers),
num_cpus=threads, batch_size=1)`` -> rows streamed back to the driver, which writes the files.
Ray Data restarts an actor that dies and retries its task (its defaults for actor pools:
``max_restarts=-1``, ``max_task_retries=-1``); an image a retried task delivers again is written
once by the driver. Ray is imported only here.
"""

from __future__ import annotations

import json
import math
from typing import Iterator, Optional, Tuple

import numpy as np

from ..errors import FluxMiniError, FluxMiniFileError, FluxMiniRuntimeError, FluxMiniValueError

INSTALL_HINT = 'pip install "fluxmini[ray]"'


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise FluxMiniRuntimeError(f"Ray mode needs Ray Data ({e}): {INSTALL_HINT}") from None
    return ray


class RayGenerator:
    """A Ray Data actor: one model per actor, rows of JSON tasks in, (record, PNG) rows out."""

    def __init__(self, model, files, backend, threads, low_memory, cache_dir=None):
        from .worker import Generator

        # threads explicit: Ray's CPU count is a logical reservation, not a limit on the engine
        self.gen = Generator(model, backend=backend, threads=threads, low_memory=low_memory, cache_dir=cache_dir,
                             **files)

    def __call__(self, batch):
        for text in batch["task"]:
            task = json.loads(str(text))
            for rec, data in self.gen.process([task]):
                yield {"record": np.array([json.dumps(rec)], dtype=object),
                       "png": np.array([data if data is not None else b""], dtype=object)}


def _init(ray, address) -> bool:
    """Connect (or start a local Ray); True when this call started it."""
    if ray.is_initialized():
        return False
    kwargs = {"ignore_reinit_error": True, "log_to_driver": False}
    if isinstance(address, str) and address:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except Exception as e:  # ConnectionError and Ray's own errors: the user needs the address
        raise FluxMiniRuntimeError(f"cannot connect to Ray at {address or '(default)'}: {e}") from None
    return True


def _cpu_nodes(ray):
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]


def _check_nodes(ray, nodes, paths: dict, threads: int) -> None:
    """The model files exist on every node that can host a worker, else an error naming them."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .worker import check_model_files, node_name

    @ray.remote(num_cpus=0)
    def probe(paths):
        try:
            check_model_files(paths)
        except FluxMiniFileError as e:
            return node_name(), str(e)
        return node_name(), None

    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths)
            for n in nodes if n["Resources"].get("CPU", 0) >= threads]
    problems = [(host, err) for host, err in ray.get(refs) if err]
    if problems:
        raise FluxMiniFileError("; ".join(err for _, err in problems))


def ray_results(tasks, model, files, backend, address, workers: Optional[int], threads: Optional[int],
                low_memory, cache_dir=None) -> Iterator[Tuple[dict, Optional[bytes]]]:
    ray = import_ray()
    started = _init(ray, address)
    try:
        nodes = _cpu_nodes(ray)
        if not nodes:
            raise FluxMiniRuntimeError("the Ray cluster has no node with a CPU to run batch workers")
        if workers is None:
            workers = len(nodes)
        if threads is None:
            per_node = math.ceil(workers / len(nodes))
            threads = max(1, int(min(n["Resources"]["CPU"] for n in nodes)) // per_node)
        most = max(int(n["Resources"]["CPU"]) for n in nodes)
        if threads > most:
            raise FluxMiniValueError(f"threads={threads} is more than the CPUs of any Ray node ({most}): "
                                     "no worker could start; lower --threads")
        paths = {k: v for k, v in files.items() if k != "max_memory"}  # files holds the budget too
        _check_nodes(ray, nodes, {"model": model, **paths}, threads)

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts images
        items = [{"task": json.dumps(t)} for t in tasks]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            RayGenerator,
            fn_constructor_args=(model, files, backend, threads, bool(low_memory), cache_dir),
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=threads,
            batch_size=1,
        )
        try:
            # Block by block without prefetching: iter_rows() holds each row back until the next
            # block is ready (measured: one whole image late), which delays the driver's write of a
            # finished image, so a killed driver would lose it, and skews the progress bar.
            for block in ds.iter_batches(batch_size=None, prefetch_batches=0, batch_format="numpy"):
                for record, data in zip(block["record"], block["png"]):
                    rec = json.loads(str(record))
                    yield rec, (bytes(data) if rec.get("status") == "ok" else None)
        except FluxMiniError:
            raise
        except Exception as e:  # an actor that cannot start (e.g. the model is missing on its node)
            cause = _fluxmini_cause(e)
            if cause is not None:
                raise type(cause)(str(cause)) from None
            raise FluxMiniRuntimeError(f"the Ray batch failed: {type(e).__name__}: {e}") from e
    finally:
        if started:
            ray.shutdown()


def _fluxmini_cause(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, FluxMiniError):
            return e
        nxt = getattr(e, "cause", None)
        e = nxt if isinstance(nxt, BaseException) else (e.__cause__ or e.__context__)
    return None
