"""The prompt-embedding cache (python/fluxmini/embedding_cache.py, pipeline.encode_prompt).

References: a fresh encode through the engine's own ``encode_clip`` / ``encode_t5`` (never through
the cache) for every value, compared bitwise; the engine's loaded components
(``FluxMini.loaded_components()``, from each network's weight bytes) for what a hit loads, with a
control run that does load T5 so the check can fail; hand-built files for the disk format.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fixtures
import fluxmini
from fluxmini import pipeline
from fluxmini.embedding_cache import _HEADER, MAGIC, EmbeddingCache, entry_key
from fluxmini.errors import FluxMiniFileError, FluxMiniValueError
from fluxmini.model import FluxMini
from fluxmini.tokenizers import tokenize_clip, tokenize_t5

import make_pipeline_goldens as ref

PROMPT = "a red fox in the snow"
T5_LEN = 32


def load(path=None, **kw) -> FluxMini:
    return FluxMini.load(str(path or ref.model_path()), threads=2, **kw)


def fresh(m: FluxMini, prompt=PROMPT, n=T5_LEN):
    """The engine's own encoders, not the cache: (t5, pooled)."""
    return m.encode_t5(tokenize_t5(prompt, n)), m.encode_clip(tokenize_clip(prompt))


def same(cond, want) -> bool:
    t5, pooled = want
    return (cond.t5.shape == t5.shape and np.array_equal(cond.t5, t5) and np.array_equal(cond.pooled, pooled)
            and cond.t5.dtype == np.float32 and cond.pooled.dtype == np.float32)


class Spy:
    """Counts a model's encoder calls and weight loads (wrapping its bound methods)."""

    def __init__(self, m: FluxMini):
        self.calls = []
        for name in ("encode_clip", "encode_t5", "load_weights"):
            fn = getattr(m, name)
            setattr(m, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def call(*a, **k):
            self.calls.append(name if name != "load_weights" else f"load:{a[0]}")
            return fn(*a, **k)
        return call

    def encodes(self) -> int:
        return sum(c.startswith("encode") for c in self.calls)


# =========================================================================== hits are exact


def test_hit_returns_exactly_the_stored_embeddings(tmp_path):
    m = load(cache_dir=tmp_path)
    want = fresh(m)
    spy = Spy(m)
    first = pipeline.encode_prompt(m, PROMPT, t5_length=T5_LEN)
    assert first.cached is None and spy.encodes() == 2 and same(first, want)
    again = pipeline.encode_prompt(m, PROMPT, t5_length=T5_LEN)
    assert again.cached == "memory" and again.seconds == 0.0 and again.load_seconds == 0.0
    assert same(again, want) and spy.encodes() == 2
    # another process's view: a new model with the same folder reads the file
    other = load(cache_dir=tmp_path)
    spy2 = Spy(other)
    disk = pipeline.encode_prompt(other, PROMPT, t5_length=T5_LEN)
    assert disk.cached == "disk" and same(disk, want) and spy2.calls == []
    # shared, so read-only: a caller cannot change the cached values by accident
    with pytest.raises(ValueError):
        disk.t5[0, 0] = 1.0
    assert m.embedding_cache.stats == {"memory_hits": 1, "disk_hits": 0, "misses": 1, "disk_writes": 1}


def test_misses_when_prompt_length_or_compat_differ():
    m = load()
    spy = Spy(m)
    pipeline.encode_prompt(m, PROMPT, t5_length=T5_LEN)
    for prompt, n, compat in [("a blue fox in the snow", T5_LEN, None), (PROMPT, 48, None),
                              (PROMPT, T5_LEN, "sd.cpp")]:
        before = spy.encodes()
        cond = pipeline.encode_prompt(m, prompt, t5_length=n, compat=compat)
        assert cond.cached is None and spy.encodes() == before + 2, (prompt, n, compat)
        if compat is None:
            assert same(cond, fresh(m, prompt, n))
    assert pipeline.encode_prompt(m, PROMPT, t5_length=48).cached == "memory"


@pytest.fixture(scope="module")
def split_models(tmp_path_factory):
    """A main file without T5 plus two bare T5 files: the same tensor table, different values
    (seeds 1234 and 99), and a byte-identical copy of the first under another name."""
    d = tmp_path_factory.mktemp("split")
    main = fixtures.cached_model("cache-no-t5", big_type="f32", components=("diffusion", "clip_l", "vae"))
    t5a = fixtures.write_model(d / "t5-a.gguf", components=("t5xxl",), bare=True, big_type="f32")
    t5b = fixtures.write_model(d / "t5-b.gguf", components=("t5xxl",), bare=True, big_type="f32", seed=99)
    copy = d / "copy-of-a.gguf"
    shutil.copyfile(t5a, copy)
    assert os.path.getsize(t5a) == os.path.getsize(t5b)
    return main, t5a, t5b, copy


def test_misses_when_the_text_weights_differ(tmp_path, split_models):
    main, t5a, t5b, copy = split_models
    a = load(main, t5xxl=t5a, cache_dir=tmp_path)
    want_a = fresh(a)
    assert pipeline.encode_prompt(a, PROMPT, t5_length=T5_LEN).cached is None
    b = load(main, t5xxl=t5b, cache_dir=tmp_path)
    want_b = fresh(b)
    assert not np.array_equal(want_a[0], want_b[0])  # the two files do encode differently
    cond = pipeline.encode_prompt(b, PROMPT, t5_length=T5_LEN)
    assert cond.cached is None and same(cond, want_b)
    # the fingerprint is of the content, not the path: a copy of file a finds a's entry
    c = load(main, t5xxl=copy, cache_dir=tmp_path)
    cond = pipeline.encode_prompt(c, PROMPT, t5_length=T5_LEN)
    assert cond.cached == "disk" and same(cond, want_a)
    assert a.text_identity() == c.text_identity() != b.text_identity()


def test_text_encoder_loras_are_part_of_the_key(tmp_path):
    m = load()
    lin = dict((n, (i, o)) for n, i, o in m._m.linears("clip_l"))
    name = "text_model.encoder.layers.0.self_attn.q_proj"
    i, o = lin[name]
    rng = np.random.default_rng(15)
    te = {f"lora_te1_{name.replace('.', '_')}.lora_down.weight": (rng.standard_normal((4, i)) / 8).astype(np.float32),
          f"lora_te1_{name.replace('.', '_')}.lora_up.weight": rng.standard_normal((o, 4)).astype(np.float32)}
    dname = "double_blocks.0.img_attn.proj"
    i, o = dict((n, (i, o)) for n, i, o in m._m.linears("diffusion"))[dname]
    di = {f"diffusion_model.{dname}.lora_A.weight": (rng.standard_normal((4, i)) / 8).astype(np.float32),
          f"diffusion_model.{dname}.lora_B.weight": rng.standard_normal((o, 4)).astype(np.float32)}
    te_path, di_path = str(tmp_path / "te.safetensors"), str(tmp_path / "di.safetensors")
    fixtures.write_safetensors(te_path, te)
    fixtures.write_safetensors(di_path, di)

    plain = pipeline.encode_prompt(m, PROMPT, t5_length=T5_LEN)
    m.set_loras([di_path])  # the diffusion model's LoRA leaves text encoding as it is: a hit
    assert pipeline.encode_prompt(m, PROMPT, t5_length=T5_LEN).cached == "memory"
    m.set_loras([te_path])
    with_te = pipeline.encode_prompt(m, PROMPT, t5_length=T5_LEN)
    assert with_te.cached is None and same(with_te, fresh(m))
    assert not np.array_equal(with_te.pooled, plain.pooled)
    m.set_loras([(te_path, 0.5)])  # another scale: other embeddings
    assert pipeline.encode_prompt(m, PROMPT, t5_length=T5_LEN).cached is None
    m.set_loras(None)
    back = pipeline.encode_prompt(m, PROMPT, t5_length=T5_LEN)
    assert back.cached == "memory" and same(back, (plain.t5, plain.pooled))


# =========================================================================== a hit loads nothing


def test_a_hit_loads_no_text_encoder_and_takes_no_time(tmp_path):
    args = dict(prompt=PROMPT, t5_length=T5_LEN, width=32, height=32, steps=1, progress=False)
    control = load()  # no entry: this run must load both text encoders (the check below can fail)
    pipeline.run(control, **args)
    assert {"clip_l", "t5xxl"} <= set(control.loaded_components())

    first = load(cache_dir=tmp_path)
    miss = pipeline.run(first, low_memory=True, **args)
    assert miss.timings["text_encoding"] > 0
    second = load(cache_dir=tmp_path)
    spy = Spy(second)
    hit = pipeline.run(second, **args)  # low_memory=False: nothing is released to hide a load
    assert hit.timings["text_encoding"] == 0.0
    assert sorted(second.loaded_components()) == ["diffusion", "vae"]
    assert spy.encodes() == 0 and not [c for c in spy.calls if c in ("load:clip_l", "load:t5xxl")]
    # in memory too: the first model released its text encoders (low_memory) and stays without them
    again = pipeline.run(first, **args)
    assert again.timings["text_encoding"] == 0.0 and "t5xxl" not in first.loaded_components()


def test_generate_with_a_hit_gives_the_same_image(tmp_path):
    args = dict(width=48, height=32, steps=2, seed=7, t5_length=T5_LEN, progress=False)
    m = load(cache_dir=tmp_path)
    miss = pipeline.run(m, PROMPT, **args)
    hit = pipeline.run(m, PROMPT, **args)
    disk = pipeline.run(load(cache_dir=tmp_path), PROMPT, **args)
    uncached = pipeline.run(load(cache_memory_bytes=0), PROMPT, **args)
    assert hit.timings["text_encoding"] == disk.timings["text_encoding"] == 0.0
    for r in (hit, disk, uncached):
        np.testing.assert_array_equal(r.latent, miss.latent)
        np.testing.assert_array_equal(np.asarray(r.image), np.asarray(miss.image))
    img = m.generate(PROMPT, **args)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(miss.image))


# =========================================================================== the disk format


def _entry(seed: int, rows=16, width=64):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, width)).astype(np.float32), rng.standard_normal(width).astype(np.float32))


def _key(i: int) -> bytes:
    return entry_key(b"test identity", None, np.arange(77) + i, np.arange(16))


def _file(d, key: bytes) -> str:
    return os.path.join(d, key.hex() + ".emb")


def _damage(path: str, how: str, other: str) -> None:
    data = open(path, "rb").read()
    if how == "flipped payload byte":
        data = data[:-5] + bytes([data[-5] ^ 0x40]) + data[-4:]
    elif how == "flipped header byte":
        data = data[:60] + bytes([data[60] ^ 1]) + data[61:]
    elif how == "truncated by one byte":
        data = data[:-1]
    elif how == "cut inside the header":
        data = data[:20]
    elif how == "one byte appended":
        data = data + b"\0"
    elif how == "empty":
        data = b""
    elif how == "another key's entry":
        data = open(other, "rb").read()
    elif how == "random bytes":
        data = np.random.default_rng(3).bytes(len(data))
    elif how == "huge shapes declared":
        data = _HEADER.pack(MAGIC, data[8:40], 1 << 30, 1 << 30, 4, 0, b"\0" * 32) + data[_HEADER.size:]
    elif how == "a folder":
        os.unlink(path)
        os.mkdir(path)
        return
    with open(path, "wb") as f:
        f.write(data)


DAMAGE = ["flipped payload byte", "flipped header byte", "truncated by one byte", "cut inside the header",
          "one byte appended", "empty", "another key's entry", "random bytes", "huge shapes declared", "a folder"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_or_foreign_file_is_a_miss(tmp_path, how):
    c = EmbeddingCache(tmp_path)
    t5, pooled = _entry(1)
    c.put(_key(1), t5, pooled)
    c.put(_key(2), *_entry(2))
    assert EmbeddingCache(tmp_path).get(_key(1))[0] == "disk"
    _damage(_file(tmp_path, _key(1)), how, _file(tmp_path, _key(2)))
    fresh_cache = EmbeddingCache(tmp_path)  # nothing in memory: the file decides
    assert fresh_cache.get(_key(1)) is None
    assert fresh_cache.stats["misses"] == 1
    if how != "a folder":  # a new write replaces the bad file, which then reads back exactly
        fresh_cache.put(_key(1), t5, pooled)
        where, got_t5, got_pooled = EmbeddingCache(tmp_path).get(_key(1))
        assert where == "disk" and np.array_equal(got_t5, t5) and np.array_equal(got_pooled, pooled)


def test_a_damaged_file_under_a_real_model_is_a_miss_with_the_right_values(tmp_path):
    m = load(cache_dir=tmp_path)
    want = fresh(m)
    pipeline.encode_prompt(m, PROMPT, t5_length=T5_LEN)
    (entry,) = [f for f in os.listdir(tmp_path) if f.endswith(".emb")]
    _damage(str(tmp_path / entry), "flipped payload byte", None)
    other = load(cache_dir=tmp_path)
    cond = pipeline.encode_prompt(other, PROMPT, t5_length=T5_LEN)
    assert cond.cached is None and same(cond, want)
    assert pipeline.encode_prompt(load(cache_dir=tmp_path), PROMPT, t5_length=T5_LEN).cached == "disk"


def test_lru_eviction_bounds_the_folder(tmp_path):
    t5, pooled = _entry(0)
    size = _HEADER.size + t5.nbytes + pooled.nbytes
    foreign = tmp_path / "notes.txt"
    foreign.write_bytes(b"x" * 10 * size)  # not an entry: neither counted nor removed
    c = EmbeddingCache(tmp_path, max_bytes=3 * size + size // 2, memory_bytes=0)
    for i in range(3):
        c.put(_key(i), *_entry(i))
    assert c.disk_bytes() == 3 * size
    assert c.get(_key(0))[0] == "disk"  # used: now the most recent
    for i in range(3, 8):
        c.put(_key(i), *_entry(i))
        assert c.disk_bytes() <= c.max_bytes
        if i == 3:  # key 1 was the least recently used, key 0 was just read
            assert c.get(_key(1)) is None and c.get(_key(0)) is not None
    kept = sorted(f for f in os.listdir(tmp_path) if f.endswith(".emb"))
    assert kept == sorted(_key(i).hex() + ".emb" for i in (5, 6, 7))
    assert foreign.read_bytes() == b"x" * 10 * size and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    c.clear()
    assert c.disk_bytes() == 0 and len(c) == 0 and foreign.exists()


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from fluxmini.embedding_cache import EmbeddingCache, entry_key
    d, me, rounds, own_keys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "own"
    def entry(seed):
        rng = np.random.default_rng(seed)
        return rng.standard_normal((64, 64)).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    def key(i):
        return entry_key(b"test identity", None, np.arange(77) + i, np.arange(16))
    c = EmbeddingCache(d, max_bytes=6 * (88 + 65 * 64 * 4), memory_bytes=0)
    bad = missing = 0
    for r in range(rounds):
        c.put(key(0), *entry(0))                  # the same key from every process
        if own_keys:
            c.put(key(1000 * me + r), *entry(r))  # and keys of its own, so eviction runs concurrently
        got = c.get(key(0))
        missing += got is None
        bad += got is not None and not (np.array_equal(got[1], entry(0)[0]) and np.array_equal(got[2], entry(0)[1]))
    c.put(key(0), *entry(0))  # last: the newest entry, which no later eviction removes
    print("bad", bad, "missing", missing)
""")


@pytest.mark.parametrize("own_keys", ["same", "own"])
def test_concurrent_processes_leave_valid_entries(tmp_path, own_keys):
    """Three processes rewrite one key (and, with "own", keys of their own that make eviction run
    in all of them at once), reading it back after each write: never a wrong value; without
    eviction never a miss either (a rewrite replaces the file whole, by rename)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(fluxmini.__file__))), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(k), "60", own_keys], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (1, 2, 3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        words = out.split()
        assert words[:2] == ["bad", "0"] and words[2] == "missing", out
        if own_keys == "same":
            assert words[3] == "0", out
    c = EmbeddingCache(tmp_path, max_bytes=6 * (88 + 65 * 64 * 4))
    where, t5, pooled = c.get(_key(0))
    rng = np.random.default_rng(0)
    assert where == "disk" and np.array_equal(t5, rng.standard_normal((64, 64)).astype(np.float32))
    assert np.array_equal(pooled, rng.standard_normal(64).astype(np.float32))
    assert c.disk_bytes() <= c.max_bytes
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    for f in os.listdir(tmp_path):  # every file left is whole
        if f.endswith(".emb"):
            assert EmbeddingCache(tmp_path)._read(bytes.fromhex(f[:-4])) is not None, f


# =========================================================================== arguments and commands


def test_bad_cache_arguments(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(FluxMiniFileError, match="cache folder"):
        load(cache_dir=f)
    with pytest.raises(FluxMiniValueError, match="cache_max_bytes"):
        load(cache_dir=tmp_path, cache_max_bytes=-1)
    with pytest.raises(FluxMiniValueError, match="cache_dir must be a folder path"):
        load(cache_dir=3)


def test_memory_level_is_bounded():
    c = EmbeddingCache(memory_entries=3)
    for i in range(5):
        c.put(_key(i), *_entry(i))
    assert len(c) == 3 and c.get(_key(0)) is None and c.get(_key(4))[0] == "memory"
    t5, pooled = _entry(0)
    c = EmbeddingCache(memory_bytes=2 * (t5.nbytes + pooled.nbytes))
    for i in range(4):
        c.put(_key(i), *_entry(i))
    assert len(c) == 2 and c.get(_key(3)) is not None and c.get(_key(1)) is None


def test_cli_generate_cache_dir(tmp_path, capsys):
    from fluxmini.cli import build_parser, main

    out1, out2, cache = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "cache"
    base = ["generate", "-m", str(ref.model_path()), "-p", PROMPT, "--t5-length", "16", "-W", "32", "-H", "32",
            "--steps", "1", "-t", "2", "-q", "-v", "--cache-dir", str(cache)]
    assert main(base + ["-o", str(out1)]) == 0
    assert "cached" not in capsys.readouterr().err
    assert main(base + ["-o", str(out2)]) == 0
    assert "text encoding: cached (disk" in capsys.readouterr().err
    assert out1.read_bytes() == out2.read_bytes()
    for cmd in (["serve", "-m", "x"], ["batch", "jobs.jsonl", "-o", "o", "-m", "x"]):
        assert build_parser().parse_args(cmd + ["--cache-dir", "d"]).cache_dir == "d"


def test_batch_reuses_the_cache_across_runs(tmp_path):
    import batch_cases as cases
    from fluxmini import batch

    jobs = cases.write_jobs(tmp_path / "jobs.jsonl", cases.JOBS[:4])
    kw = dict(model=cases.model_path(), threads=2, defaults=cases.DEFAULTS, progress=False,
              cache_dir=tmp_path / "cache")
    first = [r for r in batch.run(jobs, tmp_path / "o1", **kw) if r["status"] == "ok"]
    second = [r for r in batch.run(jobs, tmp_path / "o2", **kw) if r["status"] == "ok"]
    assert len(first) == len(second) == 5
    assert len([r for r in first if r["timings"]["text_encoding"] > 0]) == 3  # three distinct prompts
    assert all(r["timings"]["text_encoding"] == 0.0 for r in second)
    for r in first:
        assert (tmp_path / "o1" / r["file"]).read_bytes() == (tmp_path / "o2" / r["file"]).read_bytes()


def test_the_fingerprint_reads_one_small_window_per_tensor(monkeypatch):
    import fluxmini.embedding_cache as ec

    reads = []
    real = os.pread
    monkeypatch.setattr(ec.os, "pread", lambda fd, n, off: reads.append(n) or real(fd, n, off))
    m = load()
    m.text_identity()
    tensors = len(m._m.tensor_table("clip_l")) + len(m._m.tensor_table("t5xxl"))
    assert len(reads) == tensors and max(reads) <= ec._SAMPLE
    m.text_identity()  # computed once per model
    assert len(reads) == tensors
