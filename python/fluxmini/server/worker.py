"""One worker thread that runs every generation on the one model, in arrival order.

The event loop never computes: a request becomes a :class:`Job` whose events (progress, previews,
finished images, the end) the worker hands to the loop with ``call_soon_threadsafe``. The queue
of waiting jobs is bounded (``max_queue``); :meth:`Worker.submit` refuses a job beyond it.

Cancelling a job (its client went away) drops it from the queue if it waits; if it runs, the
sampler's callback returns False at the next step, which ends that generation with
:class:`fluxmini.Cancelled` and leaves the model ready for the next job. Only the job's own flag
is read, so no other job is touched.
"""

from __future__ import annotations

import base64
import io
import secrets
import sys
import threading
import time
import traceback
from collections import deque
from typing import Callable, Optional

from ..errors import Cancelled, FluxMiniError, FluxMiniValueError
from .params import ApiError, ImageRequest
from .preview import preview_image, preview_steps


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("queue full")
        self.retry_after = retry_after


class Job:
    """One request: its checked parameters and the events the worker sends back to the loop."""

    def __init__(self, req: ImageRequest, post: Callable[[dict], None]):
        self.req = req
        self._post = post
        self.cancelled = threading.Event()
        self.state = "queued"  # queued -> running -> done
        # the engine-level token of this job's generation: cancelling it stops the engine at
        # once (mid text encoding or VAE decode too), and no other job
        self.token = None

    def cancel(self) -> None:
        self.cancelled.set()
        token = self.token
        if token is not None:
            token.cancel()

    def post(self, event: dict) -> None:
        self._post(event)


def encode_image(image, fmt: str, compression: int, metadata: Optional[dict] = None) -> bytes:
    """The image file's bytes: PNG with the generation parameters as text chunks, or JPEG/WebP
    with ``output_compression`` as the quality."""
    buf = io.BytesIO()
    if fmt == "png":
        from PIL.PngImagePlugin import PngInfo

        from ..imageio import metadata_text

        info = PngInfo()
        for k, v in metadata_text(metadata or {}).items():
            info.add_text(k, v)
        image.save(buf, format="PNG", pnginfo=info)
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=max(1, compression))
    else:
        image.save(buf, format="WEBP", quality=compression)
    return buf.getvalue()


class Worker:
    """Runs jobs one at a time on ``model`` in a daemon thread."""

    def __init__(self, model, max_queue: int, runner: Optional[Callable] = None, log=None):
        self.model = model
        self.max_queue = max_queue
        self._runner = runner  # tests may replace pipeline.run
        self._log = log or (lambda msg: print(f"fluxmini serve: {msg}", file=sys.stderr, flush=True))
        self._cond = threading.Condition()
        self._waiting: deque = deque()
        self._running: Optional[Job] = None
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._durations: deque = deque(maxlen=16)
        self.counts = {"done": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self.steps_run = 0  # sampling steps done over all jobs (shows where a cancelled job stopped)

    # ------------------------------------------------------------------ loop side (any thread)
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fluxmini-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            for job in self._waiting:
                job.cancel()
            if self._running is not None:
                self._running.cancel()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> int:
        """Queue a job; returns how many wait before it. Raises QueueFull beyond max_queue."""
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                self.counts["rejected"] += 1
                raise QueueFull(self._retry_after_locked())
            self._waiting.append(job)
            self._cond.notify()
            return len(self._waiting) - 1

    def cancel(self, job: Job) -> None:
        """The job's client is gone: drop it if it waits, stop it at once if it runs."""
        job.cancel()
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return
            job.state = "done"
            self.counts["cancelled"] += 1

    def status(self) -> dict:
        with self._cond:
            return {"queue_length": len(self._waiting), "running": self._running is not None,
                    "max_queue": self.max_queue, **self.counts, "steps_run": self.steps_run}

    def _retry_after_locked(self) -> int:
        per_job = sum(self._durations) / len(self._durations) if self._durations else 5.0
        return max(1, min(3600, int(per_job * (len(self._waiting) + 1) + 0.999)))

    # ------------------------------------------------------------------ worker thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._waiting.popleft()
                self._running = job
                job.state = "running"
            t0 = time.perf_counter()
            outcome = "failed"
            try:
                outcome = self._run(job)
            finally:
                with self._cond:
                    self._running = None
                    job.state = "done"
                    self.counts[outcome if outcome in self.counts else "failed"] += 1
                    if outcome == "done":
                        self._durations.append(time.perf_counter() - t0)

    def _run(self, job: Job) -> str:
        from .. import pipeline

        req = job.req
        run = self._runner or pipeline.run
        scope = getattr(self.model, "cancel_scope", None)  # FluxMini's; test fakes may lack it
        if scope is None:
            return self._generate(job, run, pipeline)
        from ..model import CancelToken

        job.token = CancelToken()
        if job.cancelled.is_set():  # cancelled between the pop and the token
            job.token.cancel()
        with scope(job.token):
            return self._generate(job, run, pipeline)

    def _generate(self, job: Job, run, pipeline) -> str:
        req = job.req
        try:
            if job.cancelled.is_set():
                raise Cancelled("the client went away before the job started")
            set_loras = getattr(self.model, "set_loras", None)
            if set_loras is not None:  # this request's LoRAs (free when the same as the last request's)
                set_loras(req.lora_paths)
            elif req.lora_paths:
                raise FluxMiniValueError("this model takes no LoRAs")
            cond = pipeline.encode_prompt(self.model, req.prompt, t5_length=req.t5_length, compat=req.compat)
            seed0 = req.seed if req.seed is not None else secrets.randbelow(1 << 32)
            size = (req.width, req.height)
            for index in range(req.n):
                if job.cancelled.is_set():
                    raise Cancelled("the client went away")
                res = run(self.model, conditioning=cond, progress=False,
                          callback=self._callback(job, index, size), **req.kwargs(seed0 + index))
                data = encode_image(res.image, req.output_format, req.output_compression, res.metadata)
                job.post({"kind": "image", "index": index, "seed": res.seed, "data": data,
                          "b64": base64.b64encode(data).decode("ascii")})
            job.post({"kind": "done"})
            return "done"
        except Cancelled:
            job.post({"kind": "cancelled"})
            return "cancelled"
        except FluxMiniError as e:  # a parameter the library refused: the client's mistake
            job.post({"kind": "error", "error": ApiError(400, str(e), code="invalid_value")})
            return "failed"
        except Exception:  # our bug or the machine's: logged here, never sent to the client
            self._log("generation failed:\n" + traceback.format_exc())
            job.post({"kind": "error", "error": ApiError(500, "the generation failed on the server (see its log)",
                                                          code="generation_failed")})
            return "failed"

    def _callback(self, job: Job, index: int, size):
        req = job.req
        want: list = []

        def callback(step: int, total: int, latent) -> bool:
            self.steps_run += 1  # only this thread writes it
            if job.cancelled.is_set():
                return False
            if not want:
                want.append(preview_steps(total, req.partial_images) if req.stream else set())
            event = {"kind": "progress", "index": index, "step": step, "total": total}
            if step in want[0]:
                img = preview_image(latent, size if size[0] else (latent.shape[2] * 8, latent.shape[1] * 8))
                data = encode_image(img, req.output_format, req.output_compression)
                event["preview"] = base64.b64encode(data).decode("ascii")
            job.post(event)
            return True

        return callback
