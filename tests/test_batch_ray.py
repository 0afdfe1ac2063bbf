"""Batch generation, Ray mode, on a real local Ray cluster started once for this module
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
def model():
    return fluxmini.FluxMini.load(cases.model_path(), threads=1)


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


def test_ray_equals_local_mode(cluster, tmp_path, local_out, model):
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
    assert (out / f"{key}.png").read_bytes() == cases.reference_png(model, expected[key])


def _stat(pid: int):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _cpu_ticks(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[11]) + int(fields[12])  # utime + stime


def _busy(pid: int, seconds: float = 0.1) -> bool:
    """The process used CPU for at least a third of `seconds`: it is computing an image (an idle
    actor waits for its next task without using any)."""
    try:
        t0 = _cpu_ticks(pid)
        time.sleep(seconds)
        return (_cpu_ticks(pid) - t0) / os.sysconf("SC_CLK_TCK") >= seconds / 3
    except OSError:
        return False


def _our_actors() -> list:
    """Pids of this module's batch actors: children of the raylet this process started, titled
    after the Ray Data actor class."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                title = f.read()
            parent = int(_stat(int(name))[1])
            grandparent = int(_stat(parent)[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"MapWorker(MapBatches(RayGenerator))" in title and grandparent == os.getpid():
            pids.append(int(name))
    return pids


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="finds busy actors in /proc (Linux)")
def test_ray_worker_killed_mid_batch(cluster, tmp_path, model):
    # 16 images of 64x64 in 4 steps: enough work left after the first image for the kill
    jobs_list = [{"prompt": "a photo of a cat", "seed": 50 + i, "width": 64, "height": 64, "steps": 4}
                 for i in range(16)]
    killed = []

    def kill_a_busy_worker(rec):
        # once images flow, kill an actor while it computes: a job in flight is lost with it
        if rec["status"] != "ok" or killed:
            return
        deadline = time.monotonic() + 30
        while not killed and time.monotonic() < deadline:
            for pid in _our_actors():
                if _busy(pid):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break

    out, records = _run_ray(tmp_path, jobs_list, on_record=kill_a_busy_worker)
    assert killed, "no actor was computing after the first image"
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)
    expected = cases.expected_images(jobs_list)
    ok = [r["key"] for r in records if r["status"] == "ok"]
    assert sorted(ok) == sorted(expected)  # every image delivered once, none lost
    assert sorted(r["key"] for r in cases.read_results(out) if r["status"] == "ok") == sorted(expected)
    assert sorted(n for n in os.listdir(out) if n.endswith(".png")) == sorted(f"{k}.png" for k in expected)
    for key in sorted(expected)[::5]:  # a sample against generate() keeps the test short
        assert (out / f"{key}.png").read_bytes() == cases.reference_png(model, expected[key]), key


def test_ray_missing_model_names_the_node(cluster, tmp_path):
    with pytest.raises(FluxMiniFileError) as e:
        list(batch.run([{"prompt": "x"}], tmp_path / "out", model=str(tmp_path / "nowhere.gguf"), ray=True,
                       workers=1, threads=1, progress=False))
    msg = str(e.value)
    assert f"on node {socket.gethostname()}" in msg and "nowhere.gguf" in msg and "every node" in msg
