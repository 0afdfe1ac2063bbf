"""The memory policy and weight streaming (csrc/memory.*, GraphRunner's segments; docs/ARCHITECTURE.md, "Memory").

* streaming on (FLUXMINI_STREAM=1) gives the same bits as streaming off, on F32 and Q4_0 models;
* a forced tiny budget (max_memory) changes what is kept in memory, never the image: the same
  bits with VAE tiling off, and with automatic tiling exactly the tiled decode it chose;
* the cgroup v1 / v2 and MemAvailable readers, on fixture files laid out like /proc and
  /sys/fs/cgroup in a temporary directory (never the live cgroup);
* --max-memory / max_memory= validation, and `fluxmini info`'s placement of the weights.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import fluxmini
from fluxmini import pipeline
from fluxmini.errors import FluxMiniValueError
from fluxmini.validation import max_memory_arg

import fixtures
import make_pipeline_goldens as ref

MIB = 1 << 20
core = fluxmini.model._core()


def _load(path, monkeypatch, stream: str, **kw):
    monkeypatch.setenv("FLUXMINI_STREAM", stream)
    return fluxmini.FluxMini.load(str(path), threads=2, **kw)


def _q4_model():
    return fixtures.cached_model("mem-q4_0", big_type="q4_0")


CASE = dict(prompt="a red fox", width=64, height=48, steps=2, seed=7, t5_length=16)


# ------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize("model", ["f32", "q4_0"])
def test_streaming_on_is_bit_identical_to_off(monkeypatch, model):
    path = ref.model_path() if model == "f32" else _q4_model()
    off = _load(path, monkeypatch, "0")
    on = _load(path, monkeypatch, "1")
    assert off.info()["memory"]["stream"] is False and on.info()["memory"]["stream"] is True
    a = pipeline.run(off, progress=False, **CASE)
    b = pipeline.run(on, progress=False, **CASE)
    np.testing.assert_array_equal(a.latent, b.latent)
    np.testing.assert_array_equal(a.decoded, b.decoded)
    cfg = on.config["diffusion"]
    # one segment per stream of a double block, one per single block, and the final layer
    assert on._m.stats("diffusion")["segments"] == 2 * cfg["double_blocks"] + cfg["single_blocks"] + 1
    assert off._m.stats("diffusion")["segments"] == 0
    # every weight used in place is dropped once per run, and only those
    in_place = sum(r["bytes"] for r in on.info()["components"]["diffusion"]["placement"] if r["where"] == "in place")
    assert on._m.stats("diffusion")["dropped_bytes"] == in_place
    ids = on.tokenize_t5("a red fox", 16)
    np.testing.assert_array_equal(off.encode_t5(ids), on.encode_t5(ids))
    assert on._m.stats("t5xxl")["segments"] == on.config["t5xxl"]["layers"] + 1


# ------------------------------------------------------------------------------ budgets
def test_tiny_budget_gives_identical_images(monkeypatch):
    path = ref.model_path()
    free = _load(path, monkeypatch, "auto")
    tight = _load(path, monkeypatch, "auto", max_memory=256)
    mem = tight.info()["memory"]
    assert mem["budget_bytes"] == 256 * MIB and mem["source"] == "max_memory"
    assert mem["evict"] and mem["release_compute"]
    assert not free.info()["memory"]["release_compute"]  # this machine has far more than the tiny model
    a = pipeline.run(free, progress=False, vae_tiling=False, **CASE)
    b = pipeline.run(tight, progress=False, vae_tiling=False, **CASE)
    np.testing.assert_array_equal(a.latent, b.latent)
    np.testing.assert_array_equal(a.decoded, b.decoded)
    # a tight budget frees a stage's compute buffers when another stage computes
    ids = tight.tokenize_t5("a red fox", 16)
    tight.encode_t5(ids)
    free.encode_t5(ids)
    assert tight._m.stats("t5xxl")["compute_bytes"] == 0
    assert free._m.stats("t5xxl")["compute_bytes"] > 0
    assert tight._m.stats("diffusion")["compute_bytes"] == 0  # freed when T5 began


def test_vae_tiles_to_fit_the_budget(monkeypatch):
    # A VAE budget a third of what the untiled decode needs: the automatic choice tiles with a tile
    # whose pass fits, and gives exactly that explicit tiled decode.
    z = np.random.default_rng(3).standard_normal((16, 24, 32)).astype(np.float32)
    free = _load(ref.model_path(), monkeypatch, "auto")
    untiled = free.vae_decode(z)
    st = free._m.stats("vae")
    assert st["vae_tiles"] == 1
    need = st["vae_compute_bytes"]
    budget_mib = max(1, need // 3 // MIB)
    monkeypatch.setenv("FLUXMINI_VAE_BUDGET_MB", str(budget_mib))
    m = _load(ref.model_path(), monkeypatch, "auto", max_memory=256)
    assert m.info()["memory"]["vae_budget_bytes"] == budget_mib * MIB
    auto = m.vae_decode(z)
    st = m._m.stats("vae")
    assert st["vae_tiles"] > 1 and 8 <= min(st["vae_tile"], st["vae_tile_w"]) < 72, st
    assert st["vae_compute_bytes"] <= budget_mib * MIB
    explicit = m.vae_decode(z, tiling=True, tile=(st["vae_tile"], st["vae_tile_w"]))
    np.testing.assert_array_equal(auto, explicit)
    assert auto.shape == untiled.shape


def test_vae_tiles_as_strips_when_strips_fit(monkeypatch):
    # A 40x40 latent whose VAE budget fits a pass over half of it (two strips of 40x24, overlap
    # 7) but not the whole: the automatic choice runs those two strips (1.2x the pixels), not the
    # four 24x24 tiles (1.44x) that square tiles would need.
    z = np.random.default_rng(4).standard_normal((16, 40, 40)).astype(np.float32)
    free = _load(ref.model_path(), monkeypatch, "auto")
    free.vae_decode(z)
    need = free._m.stats("vae")["vae_compute_bytes"]
    free.vae_decode(z, tiling=True, tile=(40, 30))
    st = free._m.stats("vae")
    assert st["vae_tiles"] == 2
    budget_mib = -(-st["vae_compute_bytes"] // MIB)
    assert budget_mib * MIB < need  # (the untiled pass must not fit)
    monkeypatch.setenv("FLUXMINI_VAE_BUDGET_MB", str(budget_mib))
    m = _load(ref.model_path(), monkeypatch, "auto", max_memory=256)
    auto = m.vae_decode(z)
    st = m._m.stats("vae")
    assert st["vae_tiles"] == 2 and st["vae_compute_bytes"] <= budget_mib * MIB, st
    np.testing.assert_array_equal(auto, m.vae_decode(z, tiling=True, tile=(st["vae_tile"], st["vae_tile_w"])))


_VAE_ADDRESS_SPACE = """
import sys
import numpy as np
import fluxmini

def vm_peak_kib():  # the most address space the process has had mapped (Linux)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmPeak:"))

m = fluxmini.FluxMini.load(sys.argv[1], threads=1)
z = np.full((m.config["vae"]["z_channels"], 2, 2), 0.1, np.float32)
before = vm_peak_kib()
m.vae_decode(z)
print((vm_peak_kib() - before) * 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmPeak from /proc/self/status")
def test_graph_scheduler_is_sized_by_its_graph():
    # ggml's scheduler reserves bookkeeping for one split per node of its graph size (about 25 KB
    # a node). Made for the VAE's node budget (32768) it mapped 700-830 MB per call (708 MB more
    # peak address space here), untouched without sanitizers but poisoned under ASan (0.2-0.9 s a
    # call); made for the graph, a tiny model's decode (a few hundred nodes) maps a few MB.
    r = subprocess.run([sys.executable, "-c", _VAE_ADDRESS_SPACE, str(ref.model_path())], capture_output=True,
                       text=True, env={**os.environ, "FLUXMINI_STREAM": "0"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) < 64 * MIB


def test_graph_scheduler_is_reused_across_graphs():
    # A scheduler made for one graph held that graph's tensors until reset: the next size's graph
    # then overflowed its hash set (a ggml abort) when it was reused without a reset.
    m = fluxmini.FluxMini.load(str(ref.model_path()), components=["diffusion"], threads=1)
    d = m.config["diffusion"]
    rng = np.random.default_rng(5)
    ctx = rng.standard_normal((3, d["context_dim"])).astype(np.float32)
    vec = rng.standard_normal(d["vec_dim"]).astype(np.float32)
    small = rng.standard_normal((d["latent_channels"], 2, 2)).astype(np.float32)
    first = m.transformer(small, 0.5, 3.5, ctx, vec)
    for h, w in [(4, 6), (6, 4), (2, 2)]:
        out = m.transformer(rng.standard_normal((d["latent_channels"], h, w)).astype(np.float32), 0.5, 3.5, ctx, vec)
        assert out.shape == (d["latent_channels"], h, w)
    np.testing.assert_array_equal(m.transformer(small, 0.5, 3.5, ctx, vec), first)


# ------------------------------------------------------------------------------ the policy
def _write(root, rel, text):
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


MEMINFO = "MemTotal:       24683584 kB\nMemFree:  100 kB\nMemAvailable:   23617592 kB\nBuffers: 1 kB\n"
V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNT = ("25 24 0:22 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
            "26 24 0:23 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n")


def test_cgroup_v2_limit_is_the_smallest_of_the_ancestors(tmp_path):
    _write(tmp_path, "/proc/meminfo", MEMINFO)
    _write(tmp_path, "/proc/self/mountinfo", V2_MOUNT)
    _write(tmp_path, "/proc/self/cgroup", "0::/user.slice/job\n")
    _write(tmp_path, "/sys/fs/cgroup/user.slice/job/memory.max", "max\n")
    _write(tmp_path, "/sys/fs/cgroup/user.slice/memory.max", f"{1536 * MIB}\n")
    limit, source, avail = core.testing.read_memory_limits(str(tmp_path))
    assert limit == 1536 * MIB and avail == 23617592 * 1024
    assert source.endswith("/sys/fs/cgroup/user.slice/memory.max") and source.startswith("cgroup v2")
    _write(tmp_path, "/sys/fs/cgroup/user.slice/job/memory.max", f"{1024 * MIB}\n")
    assert core.testing.read_memory_limits(str(tmp_path))[0] == 1024 * MIB


def test_cgroup_v1_limit_and_its_no_limit_value(tmp_path):
    _write(tmp_path, "/proc/meminfo", MEMINFO)
    _write(tmp_path, "/proc/self/mountinfo", V1_MOUNT)
    _write(tmp_path, "/proc/self/cgroup", "5:cpu:/\n4:memory:/fluxmini-memlimit-1\n0::/\n")
    _write(tmp_path, "/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")
    _write(tmp_path, "/sys/fs/cgroup/memory/fluxmini-memlimit-1/memory.limit_in_bytes", f"{1024 * MIB}\n")
    limit, source, _ = core.testing.read_memory_limits(str(tmp_path))
    assert limit == 1024 * MIB and source.startswith("cgroup v1")
    _write(tmp_path, "/sys/fs/cgroup/memory/fluxmini-memlimit-1/memory.limit_in_bytes", "9223372036854771712\n")
    assert core.testing.read_memory_limits(str(tmp_path))[:2] == (0, "")


def test_cgroup_inside_a_container_and_missing_files(tmp_path):
    # A container's mount shows its own subtree: /proc/self/cgroup's path starts with the mount root.
    _write(tmp_path, "/proc/meminfo", MEMINFO)
    _write(tmp_path, "/proc/self/mountinfo", V2_MOUNT.replace(" / /sys/fs/cgroup", " /docker/abc /sys/fs/cgroup"))
    _write(tmp_path, "/proc/self/cgroup", "0::/docker/abc\n")
    _write(tmp_path, "/sys/fs/cgroup/memory.max", "2147483648\n")
    assert core.testing.read_memory_limits(str(tmp_path))[0] == 2 * 1024 * MIB
    empty = tmp_path / "empty"
    empty.mkdir()
    assert core.testing.read_memory_limits(str(empty)) == (0, "", 0)


@pytest.mark.parametrize("text,value", [("max\n", 0), ("1073741824\n", 1 << 30), ("  512 ", 512), ("", 0),
                                        ("12abc", 0), ("9223372036854771712", 0), ("-1", 0)])
def test_cgroup_limit_parser(text, value):
    assert core.testing.parse_cgroup_limit(text) == value


def test_policy_rules():
    pol = core.testing.memory_policy
    gib = 1024 * MIB
    weights = 5 * gib
    # max_memory wins over everything; a budget below weights + 1 GiB is tight
    p = pol(1024, 3 * gib, 20 * gib, weights)
    assert (p["budget_bytes"], p["source"], p["evict"], p["release_compute"]) == (gib, "max_memory", True, True)
    assert p["vae_budget_bytes"] == 512 * MIB  # half the budget, at most EngineOptions::vae_budget_mb
    # a cgroup limit under MemAvailable is the budget
    p = pol(0, 3 * gib, 20 * gib, weights)
    assert p["budget_bytes"] == 3 * gib and p["source"] == "cgroup" and p["evict"]
    # MemAvailable smaller than the cgroup limit caps it; plenty of memory is not tight
    p = pol(0, 64 * gib, 20 * gib, weights)
    assert p["budget_bytes"] == 20 * gib and p["source"] == "MemAvailable" and not p["evict"]
    assert p["vae_budget_bytes"] == 1536 * MIB and p["stream"]
    p = pol(0, 0, 0, weights)
    assert p["budget_bytes"] == 0 and p["source"] == "none" and not p["release_compute"]


# ------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("value,mib", [(1024, 1024), ("1024", 1024), ("1536M", 1536), ("1.5G", 1536),
                                       ("2GiB", 2048), (" 512 MiB ", 512), (None, 0)])
def test_max_memory_values(value, mib):
    assert max_memory_arg(value) == mib


@pytest.mark.parametrize("value", ["", "abc", "12X", "1.5T", "nan", "inf", "-5", 0, 100, "255", True, 1.5, [1]])
def test_max_memory_bad_values(value):
    with pytest.raises(FluxMiniValueError, match="max_memory"):
        max_memory_arg(value)


def test_max_memory_on_load_and_cli(tmp_path):
    with pytest.raises(FluxMiniValueError, match="at least 256 MiB"):
        fluxmini.FluxMini.load(str(ref.model_path()), max_memory=64)
    for cmd in ("generate", "serve", "batch"):
        args = [sys.executable, "-m", "fluxmini.cli", cmd, "-m", str(ref.model_path()), "--max-memory", "12X"]
        if cmd == "batch":
            args[4:4] = [str(tmp_path / "jobs.jsonl"), "-o", str(tmp_path / "out")]
        r = subprocess.run(args, capture_output=True, text=True, env={**os.environ})
        assert r.returncode == 2, (cmd, r.stderr)
        assert "--max-memory must be a size in MiB" in r.stderr


def test_generate_cli_with_a_budget(tmp_path):
    out = tmp_path / "a.png"
    r = subprocess.run([sys.executable, "-m", "fluxmini.cli", "generate", "-m", str(ref.model_path()), "-p", "fox",
                        "-W", "64", "-H", "48", "--steps", "1", "--t5-length", "16", "-q", "-v",
                        "--max-memory", "300M", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "memory: budget 300 MiB (max_memory)" in r.stderr and out.exists()


# ------------------------------------------------------------------------------ info
def test_info_says_where_weights_live(monkeypatch):
    monkeypatch.delenv("FLUXMINI_KERNELS", raising=False)
    m = fluxmini.FluxMini.load(str(_q4_model()), components=[])
    info = m.info()
    for name, comp in info["components"].items():
        rows = comp["placement"]
        assert sum(r["count"] for r in rows) > 0, name
        for r in rows:
            assert r["where"] in ("in place", "repacked", "converted", "copied"), r
    diff = info["components"]["diffusion"]["placement"]
    # the Q4_0 matmul weights and the F32 rest are used from the mapping: nothing is copied
    assert [r["where"] for r in diff] == ["in place"]
    assert diff[0]["bytes"] == info["components"]["diffusion"]["bytes"]
    table = m.info_table()
    assert "memory: " in table and "in place" in table
    # with ggml's kernels the Q4_0 weights go to ggml's repacked buffer where ggml has a repack kernel
    monkeypatch.setenv("FLUXMINI_KERNELS", "ggml")
    g = fluxmini.FluxMini.load(str(_q4_model()), components=[]).info()["components"]["diffusion"]["placement"]
    wheres = {r["where"] for r in g}
    assert wheres <= {"in place", "repacked"}
    for r in g:
        if r["where"] == "repacked":
            assert "Q4_0" in r["reason"] and "FLUXMINI_KERNELS=ggml" in r["reason"]


def test_info_names_converted_weights(tmp_path):
    # BF16 VAE convolution kernels are widened to F16: copied into memory, and info says so.
    path = fixtures.write_model(tmp_path / "bf16.gguf", big_type="bf16", components=["vae"], bare=True)
    m = fluxmini.FluxMini.load(str(path), components=[])
    rows = m.info()["components"]["vae"]["placement"]
    conv = [r for r in rows if r["where"] == "converted"]
    assert conv and "BF16 convolution kernels widened to F16" in conv[0]["reason"]
    assert conv[0]["bytes"] > 0
