#!/usr/bin/env python3
"""What a repeated prompt costs with the prompt-embedding cache (not a test).

    python benchmarks/prompt_cache.py MODEL [--size 512] [--steps 1] [--t5-length 512] [--threads N]

Runs, on MODEL (never written):
1. a first generation (low_memory, as the CLI runs) with a fresh ``cache_dir``: a miss;
2. the page cache of T5's bytes is dropped (``posix_fadvise(DONTNEED)``: other processes that use
   the file only read those pages again), then a second generation with the same prompt in the
   same process, low_memory off (nothing is released, so nothing hides a load);
3. a third in a new process with the same ``cache_dir``: a disk hit.

For each: the stage timings, whether T5's weights are loaded, how many of T5's pages this process
has mapped (``/proc/self/pagemap``, present bit) and how many of them are in the page cache
(``mincore`` on a mapping of our own), and whether the latent equals the first run's bit for bit.
Also the cost of the text-weights fingerprint, cold (CLIP-L's and T5's pages dropped) and warm.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from _cpu import cpu_name  # benchmarks/_cpu.py (scripts run from this folder)

PAGE = os.sysconf("SC_PAGE_SIZE")
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def ranges(model, component: str):
    """[(path, offset, nbytes)] of a component's tensors."""
    return [(path, off, n) for _name, _fn, _t, _ne, path, off, n in model._m.tensor_table(component)]


def page_span(rs):
    """Sorted, merged page-aligned (start, end) byte spans of the ranges."""
    spans = sorted((off // PAGE * PAGE, (off + n + PAGE - 1) // PAGE * PAGE) for _p, off, n in rs)
    out = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def mapped_present(path: str, spans) -> int:
    """Pages of the spans (file offsets) present in this process's mappings of the file."""
    real = os.path.realpath(path)
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].strip() == real:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                maps.append((lo, hi, int(parts[2], 16)))
    present = 0
    with open("/proc/self/pagemap", "rb") as pm:
        for lo, hi, foff in maps:
            for a, b in spans:
                va, vb = max(lo, lo + a - foff), min(hi, lo + b - foff)
                if vb <= va:
                    continue
                pm.seek(va // PAGE * 8)
                entries = np.frombuffer(pm.read((vb - va) // PAGE * 8), dtype="<u8")
                present += int(np.count_nonzero(entries >> np.uint64(63)))
    return present


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def cached_pages(path: str, spans) -> int:
    """Pages of the spans in the page cache (mincore on a fresh read-only mapping: touches nothing)."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            total = 0
            for a, b in spans:
                n = (b - a) // PAGE
                vec = (ctypes.c_ubyte * n)()
                if _libc.mincore(addr + a, b - a, vec) != 0:
                    raise OSError(ctypes.get_errno(), "mincore failed")
                total += int(np.count_nonzero(np.frombuffer(vec, np.uint8) & 1))
            return total
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def drop(path: str, spans) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for a, b in spans:
            os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def rss_file_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def generation(model, args, low_memory: bool) -> dict:
    from fluxmini import pipeline

    path = model.paths["t5xxl"] or model.paths["model"]
    spans = page_span(ranges(model, "t5xxl"))
    before = {"t5_pages_mapped_here_before": mapped_present(path, spans),
              "t5_pages_in_page_cache_before": cached_pages(path, spans)}
    t_cpu = time.process_time()
    res = pipeline.run(model, PROMPT, width=args.size, height=args.size, steps=args.steps, seed=1,
                       t5_length=args.t5_length, progress=False, low_memory=low_memory)
    t = res.timings
    return {**before, "text_encoding_s": round(t.get("text_encoding", -1), 3), "load_s": round(t["load"], 3),
            "steps_s": round(sum(t["steps"]), 3), "vae_s": round(t["vae_decode"], 3), "total_s": round(t["total"], 3),
            "cpu_s": round(time.process_time() - t_cpu, 1),
            "t5_loaded": "t5xxl" in model.loaded_components(),
            "t5_pages": sum((b - a) // PAGE for a, b in spans),
            "t5_pages_mapped_here": mapped_present(path, spans),
            "t5_pages_in_page_cache": cached_pages(path, spans),
            "rss_file_mb": round(rss_file_mb(), 1), "peak_rss_mb": t.get("peak_rss_mb"),
            "stats": dict(model.embedding_cache.stats), "latent_sha": _sha(res.latent)}


def _sha(a) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def child(args) -> None:
    from fluxmini import FluxMini

    m = FluxMini.load(args.model, threads=args.threads, cache_dir=args.cache_dir)
    print(json.dumps(generation(m, args, low_memory=False)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--t5-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    from fluxmini import FluxMini

    out = {"cpu": cpu_name(), "model": args.model, "size": args.size, "steps": args.steps,
           "t5_length": args.t5_length, "loadavg": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="fm-embcache-") as cache_dir:
        m = FluxMini.load(args.model, threads=args.threads, cache_dir=cache_dir)
        text = [(p, o, n) for c in ("clip_l", "t5xxl") for p, o, n in ranges(m, c)]
        path = m.paths["t5xxl"] or m.paths["model"]
        drop(path, page_span(text))  # cold: the fingerprint's pages come from disk
        t0 = time.perf_counter()
        m.text_identity()
        cold = time.perf_counter() - t0
        m._text_weights_fp = None
        t0 = time.perf_counter()
        m.text_identity()
        out["fingerprint_s"] = {"cold": round(cold, 4), "warm": round(time.perf_counter() - t0, 4),
                                "tensors": len(text)}
        out["first (miss)"] = generation(m, args, low_memory=True)
        drop(path, page_span(ranges(m, "t5xxl")))
        out["t5_pages_in_page_cache_after_drop"] = cached_pages(path, page_span(ranges(m, "t5xxl")))
        out["second (memory hit)"] = generation(m, args, low_memory=False)
        del m
        r = subprocess.run([sys.executable, __file__, args.model, "--child", "--cache-dir", cache_dir,
                            "--size", str(args.size), "--steps", str(args.steps), "--t5-length", str(args.t5_length)]
                           + (["--threads", str(args.threads)] if args.threads else []),
                           capture_output=True, text=True, check=True)
        out["third, new process (disk hit)"] = json.loads(r.stdout.strip().splitlines()[-1])
        out["cache_files"] = sorted(os.listdir(cache_dir))
    first = out["first (miss)"]["latent_sha"]
    out["latents_identical"] = all(out[k]["latent_sha"] == first
                                   for k in ("second (memory hit)", "third, new process (disk hit)"))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
