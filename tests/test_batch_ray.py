"""Batch generation, Ray mode (issue 19), on a real local Ray cluster started once for this module
(``ray.init(num_cpus=2)``): byte-identical PNGs to local mode and to FluxMini.generate; a worker
killed mid-batch and every job still done exactly once; a missing model named with its node.
Needs the [ray] extra (``ray[data]``), which .ci/run installs."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

ray = pytest.importorskip("ray", reason='Ray mode needs pip install "fluxmini[ray]"')

import fluxmini  # noqa: E402
from fluxmini import batch  # noqa: E402
from fluxmini.errors import FluxMiniFileError  # noqa: E402

import batch_cases as cases  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_out(tmp_path_factory):
    """The twelve jobs in local mode (tests/test_batch.py checks these against generate())."""
    out = tmp_path_factory.mktemp("local")
    jobs = cases.write_jobs(out / "jobs.jsonl")
    list(batch.run(jobs, out / "out", model=cases.model_path(), threads=1, defaults=cases.DEFAULTS, progress=False))
    return out / "out"


def _run_ray(tmp_path, jobs_list=cases.JOBS, on_record=None):
    jobs = cases.write_jobs(tmp_path / "jobs.jsonl", jobs_list)
    out = tmp_path / "out"
    records = []
    for rec in batch.run(jobs, out, model=cases.model_path(), ray=True, workers=2, threads=1,
                         defaults=cases.DEFAULTS, progress=False):
        records.append(rec)
        if on_record is not None:
            on_record(rec)
    return out, records


def test_ray_equals_local_mode(cluster, tmp_path, local_out):
    out, records = _run_ray(tmp_path)
    expected = cases.expected_images()
    errors = [r for r in records if r["status"] == "error"]
    assert len(errors) == 1 and errors[0]["index"] == cases.BAD_INDEX
    ok = [r for r in records if r["status"] == "ok"]
    assert sorted(r["key"] for r in ok) == sorted(expected)
    for key in expected:
        assert (out / f"{key}.png").read_bytes() == (local_out / f"{key}.png").read_bytes(), key
    # the images were made by the actors, not by this process
    assert {r["pid"] for r in ok} and os.getpid() not in {r["pid"] for r in ok}
    assert all(r["host"] == socket.gethostname() for r in ok)
    # and one of them equals generate() here, independently of local mode
    key = "000008_9"  # the sd.cpp job
    model = fluxmini.FluxMini.load(cases.model_path(), threads=1)
    assert (out / f"{key}.png").read_bytes() == cases.reference_png(model, expected[key])


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _busy(pid: int, seconds: float = 0.1) -> bool:
    """The process used CPU for at least a third of `seconds`: it is computing an image (an idle
    actor waits for its next task without using any)."""
    t0 = _cpu_ticks(pid)
    time.sleep(seconds)
    return (_cpu_ticks(pid) - t0) / os.sysconf("SC_CLK_TCK") >= seconds / 3


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="tells a busy actor by /proc (Linux)")
def test_ray_worker_killed_mid_batch(cluster, tmp_path, local_out):
    killed = []

    def kill_first_worker(rec):
        # the actor that made the first image is working through its next jobs: kill it mid-job
        if rec["status"] == "ok" and not killed:
            deadline = time.monotonic() + 10
            while not _busy(rec["pid"]) and time.monotonic() < deadline:
                pass
            killed.append(_busy(rec["pid"], 0.05))
            os.kill(rec["pid"], signal.SIGKILL)
            killed.append(rec["pid"])

    out, records = _run_ray(tmp_path, on_record=kill_first_worker)
    busy, pid = killed
    assert busy, "the actor was idle: no job in flight to lose"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    expected = cases.expected_images()
    ok = [r["key"] for r in records if r["status"] == "ok"]
    assert sorted(ok) == sorted(expected)  # every image delivered once, none lost
    assert sorted(r["key"] for r in cases.read_results(out) if r["status"] == "ok") == sorted(expected)
    assert sorted(n for n in os.listdir(out) if n.endswith(".png")) == sorted(f"{k}.png" for k in expected)
    for key in expected:
        assert (out / f"{key}.png").read_bytes() == (local_out / f"{key}.png").read_bytes(), key


def test_ray_missing_model_names_the_node(cluster, tmp_path):
    with pytest.raises(FluxMiniFileError) as e:
        list(batch.run([{"prompt": "x"}], tmp_path / "out", model=str(tmp_path / "nowhere.gguf"), ray=True,
                       workers=1, threads=1, progress=False))
    msg = str(e.value)
    assert f"on node {socket.gethostname()}" in msg and "nowhere.gguf" in msg and "every node" in msg
