"""Quantized GEMM throughput per instruction-set path of fluxmini's kernel (csrc/cpu_qmatmul.cpp)
against ggml's matmul, and as a fraction of the CPU's int8 dot-product peak.

    PYTHONPATH=... python benchmarks/bench_qmatmul.py [--types q4_0,q4_1,q8_0] [--shape 512,3072,3072]
                                                     [--reps 15] [--threads 2] [--portable]

Two measurements, each A/B-alternated between the paths and ggml in the same process:
  * one thread, kernel only (quantize + GEMM, `_core.testing.bench_qmatmul`; ggml: one mul_mat graph on a
    weight in ggml's repacked layout, `_core.testing.bench_mul_mat`), timed by the thread's own CPU time so
    that on a shared machine time spent descheduled does not count: best and median of --reps;
  * --threads threads, the engine's graph node (`_core.testing.bench_mul_mat` under FLUXMINI_KERNELS=path),
    wall time: median of --reps.
The peak is one core's: benchmarks/cpu_peak.c measures the clock (dependent imul chain) and each
instruction's throughput per cycle; peak = instructions per cycle (2 for vpdpbusd zmm / ymm and for
vpmaddubsw on Sapphire Rapids) x byte products per instruction x 2 ops x clock. Percentages are of
the best instruction the CPU has (vpdpbusd zmm where it has AVX-512 VNNI) and of the path's own.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile

import numpy as np

from fluxmini import _core

from _cpu import cpu_name  # benchmarks/_cpu.py (scripts run from this folder)

HERE = os.path.dirname(os.path.abspath(__file__))
PRODUCTS = {"vpdpbusd_zmm": 64, "vpdpbusd_ymm": 32, "vpmaddubsw_ymm": 32}  # byte products per instruction
PATH_INSTR = {"avx512vnni": "vpdpbusd_zmm", "avxvnni": "vpdpbusd_ymm", "avx2": "vpmaddubsw_ymm"}


def measure_peak() -> dict:
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc or platform.machine() not in ("x86_64", "AMD64"):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "cpu_peak")
        subprocess.run([cc, "-O2", os.path.join(HERE, "cpu_peak.c"), "-o", exe], check=True)
        out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    vals = {k: float(v) for k, v in (line.split() for line in out.splitlines())}
    peak = {"clock_ghz": vals["clock_ghz"]}
    for instr, products in PRODUCTS.items():
        if f"{instr}_per_cycle" in vals:
            measured = vals[f"{instr}_per_cycle"]
            nominal = round(measured)  # whole instructions per cycle (ports); the measurement is a bit under
            peak[instr] = {"per_cycle": measured, "nominal": nominal,
                           "gops": nominal * products * 2 * vals["clock_ghz"]}
    return peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="q4_0,q4_1,q8_0")
    ap.add_argument("--shape", default="512,3072,3072", help="rows (tokens), k (in), n (out)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--portable", action="store_true", help="also time the plain C++ path (slow)")
    args = ap.parse_args()
    rows, k, n = (int(v) for v in args.shape.split(","))
    flop = 2.0 * rows * k * n
    paths = [p for p in _core.testing.qmatmul_paths() if args.portable or p != "portable"]
    print(f"CPU: {cpu_name()}; qmatmul paths: {', '.join(_core.testing.qmatmul_paths())}")
    peak = measure_peak()
    if peak:
        print(f"clock {peak['clock_ghz']:.2f} GHz (dependent imul chain, best of 300 short runs)")
        for instr, p in peak.items():
            if instr != "clock_ghz":
                print(f"  {instr}: {p['per_cycle']:.2f}/cycle measured, {p['nominal']}/cycle x "
                      f"{PRODUCTS[instr]} products x 2 ops x {peak['clock_ghz']:.2f} GHz = {p['gops']:.0f} GOP/s per core")
    best_instr = next((i for i in PRODUCTS if i in peak), None)
    print(f"GEMM [{k} -> {n}] x {rows} rows ({flop / 1e9:.1f} GFLOP per call), {args.reps} reps\n")
    for t in args.types.split(","):
        one = {p: [] for p in paths + ["ggml"]}
        multi = {p: [] for p in paths + ["ggml"]}
        for _ in range(args.reps):
            for p in paths:
                one[p].append(_core.testing.bench_qmatmul(t, k, n, rows, p, 1, 1)[0][1])
            one["ggml"].append(_core.testing.bench_mul_mat(t, k, n, rows, 1, 1, True)[1])
            for p in paths:
                os.environ["FLUXMINI_KERNELS"] = p
                multi[p].append(_core.testing.bench_mul_mat(t, k, n, rows, args.threads, 1, False)[0])
            os.environ.pop("FLUXMINI_KERNELS")
            multi["ggml"].append(_core.testing.bench_mul_mat(t, k, n, rows, args.threads, 1, True)[0])
        g1, gm = flop / np.median(one["ggml"]) / 1e9, flop / np.median(multi["ggml"]) / 1e9
        print(f"{t}: path        | 1 thread GFLOP/s best  median | % of core peak (best instr / own) | x ggml (median) "
              f"| {args.threads} threads GFLOP/s median  x ggml")
        for p in paths + ["ggml"]:
            b1, m1 = flop / min(one[p]) / 1e9, flop / np.median(one[p]) / 1e9
            mm = flop / np.median(multi[p]) / 1e9
            pct = ""
            if best_instr:
                own = PATH_INSTR.get(p)
                pct = f"{100 * b1 / peak[best_instr]['gops']:5.1f}%"
                pct += f" / {100 * b1 / peak[own]['gops']:5.1f}%" if own in peak else "        "
            print(f"    {p:<11} | {b1:8.0f} {m1:8.0f}          | {pct:<33} | {m1 / g1:5.2f}          "
                  f"| {mm:8.0f}            {mm / gm:5.2f}")
        print()


if __name__ == "__main__":
    main()
