"""Batch generation, local mode: JOBS.jsonl validation, outputs equal to
FluxMini.generate (byte for byte, as `fluxmini generate` writes them), error records, resuming
after a SIGKILL without recomputing finished images, results.jsonl appends. Ray mode:
tests/test_batch_ray.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import fluxmini
from fluxmini import batch
from fluxmini.batch.jobs import Store, parse_jobs
from fluxmini.errors import FluxMiniFileError, FluxMiniValueError

import batch_cases as cases

THREADS = 1  # the engine's results do not depend on it; one thread keeps the shared CPU calm


@pytest.fixture(scope="module")
def model():
    return fluxmini.FluxMini.load(cases.model_path(), threads=THREADS)


@pytest.fixture(scope="module")
def reference(model):
    """key -> the PNG bytes `fluxmini generate` would write for that image."""
    return {k: cases.reference_png(model, kw) for k, kw in cases.expected_images().items()}


def _pythonpath() -> str:
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(fluxmini.__file__)))
    return os.pathsep.join([pkg_parent, os.environ.get("PYTHONPATH", "")])


# =========================================================================== jobs


def test_parse_jobs_validates_each_line(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join([
        '{"prompt": "ok", "seed": 3, "count": 2}',
        "",
        "# a comment",
        '{"prompt": "ok"}',
        "{not json",
        '["a list"]',
        '{"seed": 1}',
        '{"prompt": "x", "stpes": 4}',
        '{"prompt": "x", "seed": null}',
        '{"prompt": "x", "count": 0}',
        '{"prompt": "x", "height": 2064}',
        '{"prompt": 5}',
        '{"prompt": "x", "steps": 2.5}',
    ]) + "\n", encoding="utf-8")
    jobs = parse_jobs(str(path), {"steps": 4, "width": 64})
    assert [j.index for j in jobs] == list(range(11))  # blank and comment lines take no index
    assert [j.line for j in jobs] == [1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    good = jobs[0]
    assert good.error is None and good.seeds == [3, 4]
    assert good.params["steps"] == 4 and good.params["width"] == 64 and good.params["height"] == 512
    assert jobs[1].params["seed"] == 42 and jobs[1].params["t5_length"] == 512  # generate's defaults
    errors = [j.error for j in jobs[2:]]
    assert all(e is not None for e in errors)
    for e, words in zip(errors, [("line 5", "not valid JSON"), ("line 6", "JSON object"), ("line 7", "prompt"),
                                 ("line 8", "'stpes'", "steps"), ("line 9", "fixed seed"),
                                 ("line 10", "count"), ("line 11", "height", "2048"),
                                 ("line 12", "prompt must be a string"), ("line 13", "steps must be an integer")]):
        for w in words:
            assert w in e, (w, e)


def test_parse_jobs_bad_arguments(tmp_path):
    with pytest.raises(FluxMiniFileError, match="jobs file not found"):
        parse_jobs(str(tmp_path / "none.jsonl"))
    with pytest.raises(FluxMiniValueError, match="unknown default"):
        parse_jobs([{"prompt": "x"}], {"prompt": "y"})
    with pytest.raises(FluxMiniValueError, match="iterable of job dicts"):
        parse_jobs({"prompt": "x"})
    with pytest.raises(FluxMiniValueError, match="workers > 1 needs Ray"):
        batch.run([{"prompt": "x"}], tmp_path / "o", model=cases.model_path(), workers=2)


def test_store_appends_after_a_cut_line_and_deduplicates(tmp_path):
    res = tmp_path / "results.jsonl"
    res.write_text('{"key": "000000_1", "status": "ok"}\n{"key": "000001_2", "sta', encoding="utf-8")
    store = Store(tmp_path)
    assert store.ok_keys == {"000000_1"}
    assert not store.append({"key": "000000_1", "status": "ok"})  # already recorded
    assert store.append({"key": "000001_2", "status": "error", "error": "boom"})
    assert not store.append({"key": "000001_2", "status": "error", "error": "boom"})  # once per key
    assert store.append({"key": "000001_2", "status": "ok"})  # an ok after an error is recorded
    lines = res.read_text(encoding="utf-8").split("\n")
    assert lines[1] == '{"key": "000001_2", "sta'  # the cut line stays, alone on its line
    assert [json.loads(x)["status"] for x in lines[2:] if x] == ["error", "ok"]


# =========================================================================== local mode


def test_local_batch_equals_generate(tmp_path, reference):
    jobs = cases.write_jobs(tmp_path / "jobs.jsonl")
    out = tmp_path / "out"
    records = list(batch.run(jobs, out, model=cases.model_path(), threads=THREADS, defaults=cases.DEFAULTS,
                             progress=False))
    errors = [r for r in records if r["status"] == "error"]
    assert len(errors) == 1 and errors[0]["index"] == cases.BAD_INDEX and errors[0]["line"] == cases.BAD_INDEX + 1
    assert "width must be a multiple of 16" in errors[0]["error"]
    ok = {r["key"]: r for r in records if r["status"] == "ok"}
    assert set(ok) == set(reference) and len(ok) == len(records) - 1 == 13
    for key, want in reference.items():
        assert (out / f"{key}.png").read_bytes() == want, key
        assert ok[key]["file"] == f"{key}.png" and ok[key]["host"] and ok[key]["timings"]["total"] > 0
    # one encoding per distinct (prompt, T5 length, compat): the others report none
    encoded = [r for r in ok.values() if r["timings"]["text_encoding"] > 0]
    distinct = {(kw["prompt"], kw["t5_length"], kw.get("compat")) for kw in cases.expected_images().values()}
    assert len(encoded) == len(distinct) == 7
    assert sorted(r["key"] for r in cases.read_results(out)) == sorted(r["key"] for r in records)
    assert sorted(os.listdir(out)) == sorted([f"{k}.png" for k in reference] + ["results.jsonl"])

    # a re-run makes nothing again and appends nothing
    again = list(batch.run(jobs, out, model=cases.model_path(), threads=THREADS, defaults=cases.DEFAULTS,
                           progress=False))
    assert sorted(r["status"] for r in again) == ["error"] + ["skipped"] * 13
    assert len(cases.read_results(out)) == 14


def test_cli_batch_progress_and_exit_code(tmp_path, reference):
    jobs = cases.write_jobs(tmp_path / "jobs.jsonl", cases.JOBS[:3])
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    r = subprocess.run([sys.executable, "-m", "fluxmini.cli", "batch", jobs, "-o", str(tmp_path / "out"),
                        "-m", cases.model_path(), "-t", "1", "-W", "32", "-H", "32", "--steps", "2",
                        "--t5-length", "16"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "4 image(s) written, 0 already there, 0 failed" in r.stdout
    assert "4/4" in r.stderr and "img/h" in r.stderr and "ETA" in r.stderr
    for key in ("000000_1", "000001_2", "000001_3", "000002_3"):
        assert (tmp_path / "out" / f"{key}.png").read_bytes() == reference[key]
    bad = cases.write_jobs(tmp_path / "bad.jsonl", [{"prompt": "x", "width": 40}])
    r = subprocess.run([sys.executable, "-m", "fluxmini.cli", "batch", bad, "-o", str(tmp_path / "out2"),
                        "-m", cases.model_path(), "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "line 1: width must be a multiple of 16" in r.stderr, r.stderr


def test_killed_batch_resumes_without_recomputing(tmp_path, reference):
    # 24 images of one prompt: enough work that the kill lands midway
    jobs_list = [{"prompt": "a photo of a cat", "seed": 100 + 10 * i, "count": 3} for i in range(8)]
    jobs = cases.write_jobs(tmp_path / "jobs.jsonl", jobs_list)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    proc = subprocess.Popen([sys.executable, "-m", "fluxmini.cli", "batch", jobs, "-o", str(out),
                             "-m", cases.model_path(), "-t", "1", "-W", "32", "-H", "32", "--steps", "2",
                             "--t5-length", "16", "-q"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and len([n for n in os.listdir(out) if n.endswith(".png")]) >= 3:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the batch ended before it could be killed"
    done = {n: os.stat(out / n) for n in os.listdir(out) if n.endswith(".png")}
    assert 3 <= len(done) < 24

    expected = cases.expected_images(jobs_list, cases.DEFAULTS)
    records = list(batch.run(jobs, out, model=cases.model_path(), threads=THREADS, defaults=cases.DEFAULTS,
                             progress=False))
    skipped = {r["key"] + ".png" for r in records if r["status"] == "skipped"}
    made = [r["key"] for r in records if r["status"] == "ok"]
    assert skipped == set(done)  # every image finished before the kill is reused ...
    assert len(made) == 24 - len(done) and not set(made) & {n[:-4] for n in done}  # ... none made again
    for n, st in done.items():  # ... and not rewritten
        now = os.stat(out / n)
        assert (now.st_ino, now.st_mtime_ns, now.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size)
    assert sorted(n for n in os.listdir(out)) == sorted([f"{k}.png" for k in expected] + ["results.jsonl"])
    keys = [r["key"] for r in cases.read_results(out) if r["status"] == "ok"]
    assert sorted(keys) == sorted(expected)  # every image recorded exactly once
    # images from both runs equal generate(); a sample keeps the test short
    model = fluxmini.FluxMini.load(cases.model_path(), threads=THREADS)
    for key in [sorted(done)[0][:-4], made[0], made[-1]]:
        assert (out / f"{key}.png").read_bytes() == cases.reference_png(model, expected[key]), key


def test_img2img_job_with_a_path_relative_to_the_jobs_file(tmp_path, model):
    import make_pipeline_goldens as ref
    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.fromarray(ref.init_image(32, 32)).save(tmp_path / "in" / "init.png")
    jobs = cases.write_jobs(tmp_path / "in" / "jobs.jsonl",
                            [{"prompt": "a watercolour", "seed": 3, "init_image": "init.png", "strength": 0.6}])
    records = list(batch.run(jobs, tmp_path / "out", model=cases.model_path(), threads=THREADS,
                             defaults=cases.DEFAULTS, progress=False))
    assert [r["status"] for r in records] == ["ok"]
    assert records[0]["job"]["init_image"] == str(tmp_path / "in" / "init.png")
    want = cases.reference_png(model, {**cases.DEFAULTS, "prompt": "a watercolour", "seed": 3, "strength": 0.6,
                                       "init_image": str(tmp_path / "in" / "init.png")})
    assert (tmp_path / "out" / "000000_3.png").read_bytes() == want


def test_ray_mode_without_ray_says_what_to_install(tmp_path, monkeypatch):
    from fluxmini.errors import FluxMiniRuntimeError

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    with pytest.raises(FluxMiniRuntimeError, match=r'pip install "fluxmini\[ray\]"'):
        list(batch.run([{"prompt": "x"}], tmp_path / "out", model=cases.model_path(), ray=True, progress=False))


def test_progress_without_tqdm_prints_rate_and_eta(monkeypatch):
    import io

    from fluxmini.batch import _Progress

    monkeypatch.setitem(sys.modules, "tqdm", None)
    stream = io.StringIO()
    bar = _Progress(10, 4, enabled=True, stream=stream)  # 4 images were there before this run
    bar.t0 -= 7.2  # as if the first new image took 7.2 s: 500 images/hour
    bar.update(ok=True)
    bar.update(ok=False)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("fluxmini batch: 5/10 images, ")
    # 2 new images in ~7.2 s: ~1000 img/h; 4 left: ~14 s
    rate = float(lines[1].split(", ")[1].split()[0])
    assert 900 < rate <= 1000 and "ETA 0:00:1" in lines[1] and "1 failed" in lines[1], lines
