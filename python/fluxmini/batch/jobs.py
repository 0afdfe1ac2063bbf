"""Batch jobs: JOBS.jsonl parsing and per-job validation, output names, the results store.

A job is a JSON object: ``prompt`` plus any parameter of :func:`fluxmini.pipeline.run` that makes
sense in a file (``seed``, ``width``, ``height``, ``steps``, ``guidance``, ``t5_length``,
``compat``, ``init_image``, ``strength``, ``vae_tiling``, and whatever run() learns later) and
``count`` (images with seeds ``seed``, ``seed + 1``, ...). A bad line or a bad job becomes an
error record; the others go on.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Iterable, List, Optional

from ..errors import FluxMiniError, FluxMiniFileError, FluxMiniValueError
from ..validation import (DEFAULT_SIZE, compat_arg, image_side, int_arg, real_arg, seed_arg, steps_arg,
                          t5_length_arg)

RESULTS_FILE = "results.jsonl"
MAX_COUNT = 10_000
DEFAULT_SEED = 42

# run() parameters a job may not set: the batch runner owns them, or they are not JSON.
_NOT_JOB_KEYS = {"model", "prompt", "progress", "callback", "verbose", "conditioning", "model_name",
                 "noise", "low_memory", "negative_prompt"}


def job_keys() -> frozenset:
    """Keys a job may hold: prompt, count and the generation parameters of pipeline.run."""
    from .. import pipeline

    params = set(inspect.signature(pipeline.run).parameters) - _NOT_JOB_KEYS
    return frozenset(params | {"prompt", "count"})


@dataclass
class Job:
    """One job: ``params`` (validated, defaults merged) or ``error`` (what is wrong)."""

    index: int
    line: Optional[int]
    params: Optional[dict] = None
    error: Optional[str] = None
    raw: object = None
    seeds: List[int] = field(default_factory=list)

    @property
    def key(self) -> str:
        return job_key(self.index)


def job_key(index: int) -> str:
    return f"{index:06d}"


def image_key(index: int, seed: int) -> str:
    """Deterministic output stem of a job's image: job index and seed."""
    return f"{index:06d}_{seed}"


def _where(line: Optional[int], index: int) -> str:
    return f"line {line}" if line is not None else f"job {index}"


def validate(raw, defaults: Optional[dict], index: int, line: Optional[int] = None,
             base_dir: Optional[str] = None) -> Job:
    """A Job from a decoded JSON value: params on success, else error (never raises).

    A relative ``init_image`` path is taken from ``base_dir`` (default: the current folder) and
    made absolute, so that workers started elsewhere (Ray) find it too.
    """
    job = Job(index=index, line=line, raw=raw)
    try:
        job.params = _normalise(raw, defaults or {}, base_dir or os.getcwd())
    except FluxMiniError as e:
        job.error = f"{_where(line, index)}: {e}"
        return job
    seed, count = job.params["seed"], job.params["count"]
    job.seeds = [seed + k for k in range(count)]
    return job


def _normalise(raw, defaults: dict, base_dir: str) -> dict:
    if not isinstance(raw, dict):
        raise FluxMiniValueError(f"a job must be a JSON object with a prompt, got {type(raw).__name__}")
    allowed = job_keys()
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise FluxMiniValueError(f"unknown job field(s) {', '.join(map(repr, unknown))}; "
                                 f"fields are {', '.join(sorted(allowed))}")
    if "prompt" not in raw:
        raise FluxMiniValueError('a job needs a "prompt" (a string; may be empty)')
    p = dict(defaults)
    p.update(raw)
    if not isinstance(p["prompt"], str):
        raise FluxMiniValueError(f"prompt must be a string, got {type(p['prompt']).__name__}")
    seed = p.get("seed", DEFAULT_SEED)
    if seed is None:
        raise FluxMiniValueError("a batch job needs a fixed seed (output names and resuming depend on it)")
    p["seed"] = seed_arg(seed)
    p["count"] = int_arg(p.get("count", 1), "count")
    if not 1 <= p["count"] <= MAX_COUNT:
        raise FluxMiniValueError(f"count must be between 1 and {MAX_COUNT}, got {p['count']}")
    if p["seed"] + p["count"] > 1 << 64:
        raise FluxMiniValueError("seed + count must stay below 2**64")
    if isinstance(p.get("init_image"), str):
        p["init_image"] = os.path.abspath(os.path.join(base_dir, p["init_image"]))
    if p.get("init_image") is None:
        for side in ("width", "height"):
            value = p.get(side)
            p[side] = image_side(DEFAULT_SIZE if value is None else value, side)
    p["steps"] = steps_arg(p.get("steps", 20))
    guidance = real_arg(p.get("guidance", 3.5), "guidance")
    if guidance < 0:
        raise FluxMiniValueError(f"guidance must be >= 0, got {guidance}")
    p["guidance"] = guidance
    p["compat"] = compat_arg(p.get("compat"))
    p["t5_length"] = t5_length_arg(p.get("t5_length"), p["compat"])
    return p


def parse_jobs(jobs, defaults: Optional[dict] = None) -> List[Job]:
    """Jobs from a JOBS.jsonl path or an iterable of dicts (or JSON strings).

    In a file, blank lines and lines starting with ``#`` are skipped; every other line is a job
    with the next index (a line that is not valid JSON too: it becomes an error record), and
    relative ``init_image`` paths are relative to the file's folder.
    """
    if defaults is not None and not isinstance(defaults, dict):
        raise FluxMiniValueError("defaults must be a dict of job fields")
    bad = sorted(set(defaults or {}) - (job_keys() - {"prompt"}))
    if bad:
        raise FluxMiniValueError(f"unknown default field(s) {', '.join(map(repr, bad))}")
    if isinstance(jobs, (str, os.PathLike)):
        return list(_parse_file(os.fspath(jobs), defaults))
    if isinstance(jobs, (dict, bytes)) or not isinstance(jobs, Iterable):
        raise FluxMiniValueError("jobs must be a JOBS.jsonl path or an iterable of job dicts")
    out = []
    for i, raw in enumerate(jobs):
        if isinstance(raw, str):
            out.append(_parse_text(raw, defaults, i, None))
        else:
            out.append(validate(raw, defaults, i))
    return out


def _parse_text(text: str, defaults, index: int, line: Optional[int], base_dir: Optional[str] = None) -> Job:
    try:
        raw = json.loads(text)
    except ValueError as e:
        return Job(index=index, line=line, raw=text, error=f"{_where(line, index)}: not valid JSON ({e})")
    return validate(raw, defaults, index, line, base_dir)


def _parse_file(path: str, defaults):
    if not os.path.isfile(path):
        raise FluxMiniFileError(f"jobs file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FluxMiniFileError(f"cannot read the jobs file {path}: {e}") from None
    index = 0
    for n, text in enumerate(lines, 1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        yield _parse_text(text, defaults, index, n, os.path.dirname(os.path.abspath(path)))
        index += 1


# --------------------------------------------------------------------------- results store


class Store:
    """OUTDIR: PNGs written atomically (temp file + rename) and results.jsonl appended.

    A PNG under its final name is complete. results.jsonl gets one JSON line per record, each
    written with a single append; a line cut short by a kill is ignored when read and the next
    record starts on a fresh line. A key that already has an "ok" record is not written again;
    an error record is written once per key.
    """

    def __init__(self, out_dir):
        self.dir = os.fspath(out_dir)
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:
            raise FluxMiniFileError(f"cannot create the output folder {self.dir}: {e}") from None
        self.results = os.path.join(self.dir, RESULTS_FILE)
        self.ok_keys, self.keys = set(), set()
        self._needs_newline = False
        self._read_results()
        self._remove_stale_temps()

    def _read_results(self) -> None:
        try:
            with open(self.results, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        except OSError as e:
            raise FluxMiniFileError(f"cannot read {self.results}: {e}") from None
        self._needs_newline = bool(data) and not data.endswith(b"\n")
        for line in data.splitlines():
            try:
                rec = json.loads(line)
                key = rec["key"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
            self.keys.add(key)
            if rec.get("status") == "ok":
                self.ok_keys.add(key)

    def _remove_stale_temps(self) -> None:
        """Temp files left by a killed run on this host (their process is gone)."""
        host = socket.gethostname()
        for name in os.listdir(self.dir):
            parts = name.split(".")
            # .{stem}.png.{host}.{pid}.tmp
            if not (name.startswith(".") and name.endswith(".tmp") and len(parts) >= 6):
                continue
            try:
                pid = int(parts[-2])
            except ValueError:
                continue
            if ".".join(parts[3:-2]) != host or _alive(pid):
                continue
            try:
                os.unlink(os.path.join(self.dir, name))
            except OSError:
                pass

    def png_path(self, key: str) -> str:
        return os.path.join(self.dir, key + ".png")

    def has_image(self, key: str) -> bool:
        return os.path.exists(self.png_path(key))

    def write_png(self, key: str, data: bytes) -> str:
        final = self.png_path(key)
        tmp = os.path.join(self.dir, f".{key}.png.{socket.gethostname()}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise FluxMiniFileError(f"cannot write {final}: {e}") from None
        return final

    def append(self, record: dict) -> bool:
        """Append a record unless its key is already recorded; True when written."""
        key = record["key"]
        if key in self.ok_keys or (record.get("status") != "ok" and key in self.keys):
            return False
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        if self._needs_newline:
            line = "\n" + line
        data = line.encode("utf-8")
        fd = os.open(self.results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _lock(fd)
            n = os.write(fd, data)
            while n < len(data):  # a short write (rare): finish it
                n += os.write(fd, data[n:])
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock
        self._needs_newline = False
        self.keys.add(key)
        if record.get("status") == "ok":
            self.ok_keys.add(key)
        return True


def _lock(fd: int) -> None:
    """An exclusive lock, so that two runs appending to one results.jsonl do not interleave."""
    try:
        import fcntl
    except ImportError:  # Windows: O_APPEND single writes only
        return
    fcntl.flock(fd, fcntl.LOCK_EX)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
