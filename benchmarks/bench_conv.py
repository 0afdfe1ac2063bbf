#!/usr/bin/env python3
"""The VAE convolution kernel (csrc/cpu_conv.cpp) per instruction-set path (not a test).

    python benchmarks/bench_conv.py                     # avx512 vs avx2, 1 and 2 threads
    python benchmarks/bench_conv.py --paths avx2,portable --rounds 3

3x3 convolutions of the Flux VAE decoder's shapes (a 512² image: 512 channels on the 64² latent,
512 on 128², 256 on 256², 128 on 512²; padding 1, bias), through ``_core.testing.conv2d_f32``
with the path forced. Each round runs every path once, the order rotating from round to round
(A B, B A, ...) so load from other processes falls on all alike; medians of --rounds. Reported:
GFLOP/s (2·K·Cout·pixels) per wall second and per CPU-second / thread (process CPU time; the
better guide on a shared machine).
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

SHAPES = [(512, 64, 512), (512, 128, 512), (256, 256, 256), (128, 512, 128)]  # (Cin, side, Cout)


def main(argv=None) -> int:
    from fluxmini import _core

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", default="avx512,avx2")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", default="", help="Cin:side:Cout,... (default: the decoder's at 512²)")
    args = ap.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p in _core.testing.conv_paths()]
    shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    print(f"CPU: {cpu_name()}; paths {', '.join(paths)}; rounds {args.rounds}; load average {os.getloadavg()[0]:.1f}")
    rng = np.random.default_rng(0)

    def cpu_seconds() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    for cin, side, cout in shapes:
        x = rng.standard_normal((cin, side, side)).astype(np.float32)
        w = (rng.standard_normal((cout, cin, 3, 3)) * 0.02).astype(np.float32)
        b = rng.standard_normal(cout).astype(np.float32)
        flops = 2.0 * 9 * cin * cout * side * side
        for th in (int(t) for t in args.threads.split(",")):
            res = {p: [] for p in paths}
            for r in range(args.rounds):
                order = paths[r % len(paths):] + paths[:r % len(paths)]
                for p in order:
                    c0, t0 = cpu_seconds(), time.perf_counter()
                    _core.testing.conv2d_f32(x, w, b, stride=1, pad=1, threads=th, kernels=p)
                    res[p].append((time.perf_counter() - t0, (cpu_seconds() - c0) / th))
            cells = []
            for p in paths:
                wall = statistics.median(v[0] for v in res[p])
                cpu = statistics.median(v[1] for v in res[p])
                cells.append(f"{p} {flops / wall / 1e9:6.1f} GF/s wall {flops / cpu / 1e9:6.1f} per CPU-s/thr")
            print(f"{cin:>4} ch {side:>3}² -> {cout:>4}, {th} thr: " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
