#!/usr/bin/env python3
"""Time the T5-XXL encoder of a FLUX.1-mini file (the benchmark of docs/MODEL.md §11.3; not a test).

    python benchmarks/bench_t5.py /tmp/fm_models/FLUX.1-mini-Q4_0.gguf /tmp/fm_models/FLUX.1-mini-Q8_0.gguf
    python benchmarks/bench_t5.py MODEL.gguf --lengths 256 512 --threads 2 --repeat 2

Each (file, length) runs in a fresh process that loads only the T5 component, tokenizes one
prompt to `length` ids, and encodes it `--repeat` times. Reported per run:
  load   seconds of FluxMini.load (maps the file, checks shapes; reads no weights)
  first  seconds of the first encode_t5: includes placing the weights (page faults from the file
         or its page cache, repacking for ggml's CPU kernels where ggml's are used) and building the graph
  next   best seconds of the following encodes (weights and graph ready): the steady cost
  cpu/t  CPU seconds (user + system) of that best encode divided by the threads: about what
         `next` would be on otherwise idle cores (ggml's threads spin briefly between ops, so
         it is a slight over-estimate); compare with `next` to see how busy the machine was
  peak   the process's peak resident memory (VmHWM) after the encodes, GiB (file pages used in
         place count as resident too)
  wts    GiB of T5 weights the engine holds (in place in the mapping plus repacked copies)
"first" depends on whether the file is in the OS page cache: run twice if it was read from disk.
Random-weight files are fine: speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

PROMPT = ("a photo of a red fox sitting in fresh snow at dawn, soft golden light, shallow depth of field, "
          "highly detailed fur, 85mm lens")


def run_one(path: str, length: int, threads: int, repeat: int) -> dict:
    code = textwrap.dedent(f"""
        import json, resource, time
        import numpy as np
        def cpu():
            r = resource.getrusage(resource.RUSAGE_SELF)
            return r.ru_utime + r.ru_stime
        import fluxmini
        t0 = time.perf_counter()
        m = fluxmini.FluxMini.load({path!r}, components=["t5xxl"], threads={threads})
        t_load = time.perf_counter() - t0
        ids = m.tokenize_t5({PROMPT!r}, {length})
        times, cpus = [], []
        for _ in range({repeat}):
            t0, c0 = time.perf_counter(), cpu()
            out = m.encode_t5(ids)
            times.append(time.perf_counter() - t0)
            cpus.append(cpu() - c0)
        assert out.shape == ({length}, 4096) and np.isfinite(out).all()
        status = open("/proc/self/status").read().split("\\n")
        hwm = [l for l in status if l.startswith("VmHWM:")][0].split()[1]
        cfg = m.config["t5xxl"]
        print(json.dumps({{"load": t_load, "times": times, "cpu": cpus, "peak_kib": int(hwm), "layers": cfg["layers"],
                          "weights_bytes": m._m.weight_bytes("t5xxl")}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"run failed ({path}, L={length}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="FLUX.1-mini GGUF files (or T5-only files)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="encodes per process (first one includes weight loading)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    results = []
    print(f"{'file':<28} {'L':>4} {'layers':>6} {'load s':>7} {'first s':>8} {'next s':>7} {'cpu/t s':>7} {'peak GiB':>9} {'wts GiB':>8}")
    for path in args.models:
        if not os.path.exists(path):
            raise SystemExit(f"no such file: {path}")
        for length in args.lengths:
            r = run_one(path, length, args.threads, args.repeat)
            later = list(zip(r["times"], r["cpu"]))[1:] or [(float("nan"), float("nan"))]
            nxt, nxt_cpu = min(later)
            print(f"{os.path.basename(path):<28} {length:>4} {r['layers']:>6} {r['load']:>7.2f} {r['times'][0]:>8.2f} "
                  f"{nxt:>7.2f} {nxt_cpu / args.threads:>7.2f} {r['peak_kib'] / 1048576:>9.2f} {r['weights_bytes'] / 2**30:>8.2f}", flush=True)
            results.append({"file": path, "length": length, "threads": args.threads, **r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
