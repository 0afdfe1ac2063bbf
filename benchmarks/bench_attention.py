#!/usr/bin/env python3
"""fluxmini's fused CPU attention (csrc/cpu_attention.cpp) against ggml's flash attention (not a test).

    python benchmarks/bench_attention.py                       # Flux's shapes, 1 and 2 threads
    python benchmarks/bench_attention.py --tokens 1280 --threads 2 --rounds 5
    python benchmarks/bench_attention.py --vae                 # the VAE's one head of 512
    python benchmarks/bench_attention.py --step /tmp/cpp13-q4_0.gguf --sizes 256,512

Kernel mode: one attention of --heads heads of --d over L tokens (Flux's self-attention over
image + T5 tokens: 256² -> 256 + 256, 512² -> 1024 + 256, 1024² -> 4096 + 256, and the same with
T5 512), built as the Flux graph builds it (``_core.testing.bench_attention``: q, k, v
[d, H, L] F32; ggml's side with F32 K/V, as the engine runs it on the CPU). Each --rounds round
times ours and ggml's once each, in alternating order (A B, B A, ...), so load from other
processes falls on both alike; the table gives medians. FLOPs = 4·L²·d·H (Q·Kᵀ and P·V).
Throughput is given per wall second and per CPU-second / thread (process CPU time: the better
guide on a shared machine).

Step mode (--step MODEL): two models loaded side by side, one with our attention and one with
FLUXMINI_ATTENTION=ggml (everything else the same: our matmul), and ``transformer`` steps timed
in alternation at each --sizes (T5 --t5-len tokens): medians of --rounds, wall and CPU-s/thread.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import numpy as np

from _cpu import cpu_name  # benchmarks/_cpu.py (scripts run from this folder)


def kernel_mode(args) -> None:
    from fluxmini import _core

    ours = args.ours or _core.testing.attention_paths()[0]
    threads = [int(t) for t in args.threads.split(",")]
    if args.vae:
        shapes = [(512, 1, L, f"VAE {8 * int(L ** 0.5)}²") for L in (1024, 4096)]
    else:
        shapes = []
        for L in (int(x) for x in args.tokens.split(",")):
            shapes.append((args.d, args.heads, L, ""))
    print(f"CPU: {cpu_name()}; ours: {ours}; rounds: {args.rounds}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'L':>6} {'H':>3} {'d':>4} {'thr':>3} | {'ours GF/s':>9} {'per CPU-s':>9} | {'ggml GF/s':>9} "
          f"{'per CPU-s':>9} | {'ratio wall':>10} {'ratio CPU':>9}")
    for d, heads, L, label in shapes:
        flops = 4.0 * L * L * d * heads
        for th in threads:
            res = {"ours": [], "ggml": []}
            for r in range(args.rounds):
                order = ("ours", "ggml") if r % 2 == 0 else ("ggml", "ours")
                for who in order:
                    # The VAE's alternative is ggml's explicit F32 softmax (flash=False), as the engine runs it.
                    flash = not (args.vae and who == "ggml")
                    res[who].append(_core.testing.bench_attention(d, heads, L, flash, th, 1,
                                                                 kernels=ours if who == "ours" else "ggml"))
            med = {w: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for w, v in res.items()}
            ow, oc = flops / med["ours"][0] / 1e9, flops / (med["ours"][1] / th) / 1e9
            gw, gc = flops / med["ggml"][0] / 1e9, flops / (med["ggml"][1] / th) / 1e9
            print(f"{L:>6} {heads:>3} {d:>4} {th:>3} | {ow:>9.1f} {oc:>9.1f} | {gw:>9.1f} {gc:>9.1f} | "
                  f"{ow / gw:>10.2f} {oc / gc:>9.2f} {label}", flush=True)


def step_mode(args) -> None:
    from fluxmini.model import FluxMini

    th = int(args.threads.split(",")[-1])
    models = {}
    for who, value in (("ours", "auto"), ("ggml", "ggml")):
        os.environ["FLUXMINI_ATTENTION"] = value  # read at load
        models[who] = FluxMini.load(args.step, components=["diffusion"], threads=th)
        print(f"{who}: kernels: {models[who].info()['kernels']}")
    os.environ.pop("FLUXMINI_ATTENTION")
    print(f"CPU: {cpu_name()}; {th} threads; T5 {args.t5_len} tokens; rounds: {args.rounds}")
    cfg = dict(models["ours"].config["diffusion"])
    rng = np.random.default_rng(0)

    def cpu_seconds() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    for size in (int(s) for s in args.sizes.split(",")):
        side = size // 8
        latent = rng.standard_normal((cfg["latent_channels"], side, side)).astype(np.float32)
        t5 = (0.5 * rng.standard_normal((args.t5_len, cfg["context_dim"]))).astype(np.float32)
        pooled = rng.standard_normal(cfg["vec_dim"]).astype(np.float32)
        for m in models.values():  # warm-up: pages in, graph built
            m.transformer(latent, 0.7, 3.5, t5, pooled)
        res = {"ours": [], "ggml": []}
        outs = {}
        for r in range(args.rounds):
            for who in (("ours", "ggml") if r % 2 == 0 else ("ggml", "ours")):
                c0, t0 = cpu_seconds(), time.perf_counter()
                outs[who] = models[who].transformer(latent, 0.7, 3.5, t5, pooled)
                res[who].append((time.perf_counter() - t0, (cpu_seconds() - c0) / th, os.getloadavg()[0]))
        diff = float(np.abs(outs["ours"] - outs["ggml"]).max() / np.abs(outs["ggml"]).max())
        line = []
        for who, v in res.items():
            w, c = statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)
            line.append(f"{who} {w:.2f} s wall, {c:.2f} CPU-s/thread")
        ratio_w = statistics.median(x[0] for x in res["ours"]) / statistics.median(x[0] for x in res["ggml"])
        ratio_c = statistics.median(x[1] for x in res["ours"]) / statistics.median(x[1] for x in res["ggml"])
        print(f"{size}²: " + " | ".join(line) + f" | ours/ggml {ratio_w:.3f} wall, {ratio_c:.3f} CPU | "
              f"outputs differ by {diff:.2g} (relative) | load average up to "
              f"{max(x[2] for v in res.values() for x in v):.1f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="512,1280,4352,768,1536,4608", help="L per shape (Flux: image + T5)")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ours", default=None, help="our path (default: the fastest this CPU runs)")
    ap.add_argument("--vae", action="store_true", help="the VAE's attention (one head of 512) instead")
    ap.add_argument("--step", metavar="MODEL", help="time full Flux steps of MODEL instead")
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--t5-len", type=int, default=256)
    args = ap.parse_args(argv)
    if args.step:
        step_mode(args)
    else:
        kernel_mode(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
