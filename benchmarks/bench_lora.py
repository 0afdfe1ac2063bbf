#!/usr/bin/env python3
"""Per-step cost of run-time LoRA adapters on a full-size model (a benchmark, not a test).

    python benchmarks/make_random.py -o /tmp/flux-mini-Q4_0.gguf --variant Q4_0
    python benchmarks/bench_lora.py /tmp/flux-mini-Q4_0.gguf --ranks 16 64 --size 256 --reps 3

Writes random BF16 LoRAs (BFL names) of each rank on every linear layer of the double and single
blocks (qkv, proj, MLPs, modulations, linear1, linear2: what kohya-style Flux LoRAs cover), then
times one transformer evaluation without LoRA and with each rank, alternating A/B/C... per round
so that load from other processes hits all alike; reports medians of wall time and of process
CPU time (all threads: less sensitive to other processes on a shared machine), the adapters'
memory and the graph's compute buffer. --mode merge times merged LoRAs instead (F16/F32 models only).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from _cpu import cpu_name  # benchmarks/_cpu.py (scripts run from this folder)


def write_lora(path: str, linears, rank: int, seed: int) -> None:
    from fluxmini.safetensors_io import write_safetensors

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, n_in, n_out in linears:
        if not name.startswith(("double_blocks.", "single_blocks.")):
            continue
        a = rng.standard_normal((rank, n_in), dtype=np.float32) / np.float32(np.sqrt(n_in))
        b = 0.01 * rng.standard_normal((n_out, rank), dtype=np.float32)
        tensors[f"diffusion_model.{name}.lora_A.weight"] = a
        tensors[f"diffusion_model.{name}.lora_B.weight"] = b
    write_safetensors(path, tensors, dtype="BF16")


def main() -> int:
    from fluxmini.model import FluxMini

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    ap.add_argument("--text", type=int, default=64, help="T5 tokens (default 64)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--mode", choices=("runtime", "merge"), default="runtime")
    args = ap.parse_args()

    m = FluxMini.load(args.model, components=["diffusion"], threads=args.threads)
    linears = m._m.linears("diffusion")
    tmp = tempfile.mkdtemp(prefix="bench-lora-")
    try:
        return _run(args, m, linears, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args, m, linears, tmp) -> int:
    loras = {}
    for r in args.ranks:
        p = os.path.join(tmp, f"r{r}.safetensors")
        write_lora(p, linears, r, r)
        loras[f"rank {r}"] = p
    cfg = m.config["diffusion"]
    lat = np.random.default_rng(0).standard_normal((cfg["latent_channels"], args.size // 8, args.size // 8),
                                                   dtype=np.float32)
    t5 = np.zeros((args.text, cfg["context_dim"]), np.float32)
    pooled = np.zeros(cfg["vec_dim"], np.float32)
    configs = [("no LoRA", None)] + list(loras.items())
    times = {k: [] for k, _ in configs}
    cpu = {k: [] for k, _ in configs}
    sizes, compute = {}, {}
    for k, p in configs:  # warm-up: build each graph once, read the weights
        m.set_loras([p] if p else None, mode=args.mode)
        sizes[k] = m.lora_bytes()
        m.transformer(lat, 0.5, 3.5, t5, pooled)
        compute[k] = m._m.stats("diffusion")["compute_bytes"]
    for _ in range(args.reps):
        for k, p in configs:
            m.set_loras([p] if p else None, mode=args.mode)
            m.transformer(lat, 0.5, 3.5, t5, pooled)  # first run after a change rebuilds the graph
            t0, c0 = time.perf_counter(), time.process_time()
            m.transformer(lat, 0.5, 3.5, t5, pooled)
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    base, base_cpu = statistics.median(times["no LoRA"]), statistics.median(cpu["no LoRA"])
    print(f"{cpu_name()}, {m.threads} threads, {args.size}x{args.size}, {args.text} text tokens, "
          f"{os.path.basename(args.model)}, {args.mode}; median of {args.reps} alternating rounds")
    for k, _ in configs:
        med, med_cpu = statistics.median(times[k]), statistics.median(cpu[k])
        extra = (f" ({100 * (med / base - 1):+.1f}%)", f" ({100 * (med_cpu / base_cpu - 1):+.1f}%)") \
            if k != "no LoRA" else ("", "")
        print(f"  {k:>8}: {med:.3f} s/step{extra[0]}, CPU {med_cpu:.3f} s{extra[1]}  adapters "
              f"{sizes[k] / 2**20:.1f} MiB, compute buffer {compute[k] / 2**20:.1f} MiB  "
              f"all: {', '.join(f'{t:.3f}' for t in times[k])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
