#!/usr/bin/env python3
"""fluxmini vs stable-diffusion.cpp (its Python binding), side by side on the same files.

    python benchmarks/compare_sdcpp.py --sizes 256 512 --steps 2 --rounds 2

Both engines run the same full-size random-weight FLUX.1-mini (made by our converter; split
files, which is what stable-diffusion.cpp's binding takes for Flux), with the same threads,
size, steps and T5 length, alternating A B A B, each run in its own process (the binding exports
its own ggml symbols, and a fresh process gives a clean peak-RSS figure). Printed per stage:
medians of weight loading, text encoding, seconds per step, VAE decode (each stage compute
alone: sd.cpp loads every weight in its constructor, fluxmini each component before its stage),
total wall time of the process, peak RSS, and fluxmini / sd.cpp.
Also the matmul bound: FLOPs per step over ggml's measured GEMM throughput for the weight type.

stable-diffusion-cpp-python is installed into its own venv (--sd-venv) on first use; it
compiles stable-diffusion.cpp (several minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SD_VERSION = "0.4.7"
PROMPT = "a lighthouse on a cliff at dusk, dramatic clouds, photorealistic"

SD_RUNNER = r"""
import json, os, re, sys, time
from stable_diffusion_cpp import StableDiffusion
a = json.loads(sys.argv[1])
logs = []
t0 = time.perf_counter()
sd = StableDiffusion(diffusion_model_path=a["diffusion"], clip_l_path=a["clip_l"], t5xxl_path=a["t5xxl"],
                     vae_path=a["vae"], n_threads=a["threads"], verbose=True)
t_load = time.perf_counter() - t0
t1 = time.perf_counter()
imgs = sd.generate_image(prompt=a["prompt"], width=a["size"], height=a["size"], cfg_scale=1.0,
                         guidance=3.5, sample_method="euler", sample_steps=a["steps"], seed=1)
t_gen = time.perf_counter() - t1
imgs[0].save(a["out"])
hwm = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        hwm = int(line.split()[1]) * 1024
print("RESULT " + json.dumps({"load": t_load, "generate": t_gen, "peak_rss": hwm}), flush=True)
"""


def ensure_sd_venv(venv: str) -> str:
    py = os.path.join(venv, "bin", "python")
    ok = os.path.exists(py) and subprocess.run(
        [py, "-c", "import stable_diffusion_cpp"], capture_output=True).returncode == 0
    if not ok:
        print(f"installing stable-diffusion-cpp-python=={SD_VERSION} into {venv} (compiles; minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", f"stable-diffusion-cpp-python=={SD_VERSION}"], check=True)
    return py


def ensure_model(model_dir: str, variant: str) -> dict:
    """Split files (diffusion, clip_l, t5xxl, vae) made by our converter."""
    d = os.path.join(model_dir, f"split-{variant}")
    names = {"diffusion": "diffusion_model.gguf", "clip_l": "clip_l.gguf", "t5xxl": "t5xxl.gguf", "vae": "vae.gguf"}
    paths = {k: os.path.join(d, v) for k, v in names.items()}
    if not all(os.path.exists(p) for p in paths.values()):
        sys.path.insert(0, os.path.join(ROOT, "python"))
        from fluxmini.convert import make_random

        print(f"writing full-size random {variant} split files into {d}", flush=True)
        make_random(d, variant, split=True, progress=False)
    return paths


def parse_sd_log(text: str) -> dict:
    """Stage times from stable-diffusion.cpp's log lines."""
    out = {}
    pats = {
        "text_encoding": r"get_learned_condition completed, taking ([0-9.]+) ?(ms|s)",
        "sampling": r"sampling completed, taking ([0-9.]+) ?(ms|s)",
        "vae_decode": r"decode_first_stage completed, taking ([0-9.]+) ?(ms|s)",
    }
    for k, p in pats.items():
        m = re.findall(p, text)
        if m:
            v, unit = m[-1]
            out[k] = float(v) / (1000.0 if unit == "ms" else 1.0)
    return out


def run_sd(py: str, paths: dict, size: int, steps: int, threads: int, tmp: str) -> dict:
    args = dict(paths, size=size, steps=steps, threads=threads, prompt=PROMPT, out=os.path.join(tmp, "sd.png"))
    t = time.perf_counter()
    r = subprocess.run([py, "-c", SD_RUNNER, json.dumps(args)], capture_output=True, text=True)
    wall = time.perf_counter() - t
    text = r.stdout + r.stderr
    m = re.search(r"RESULT (\{.*\})", text)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"stable-diffusion.cpp run failed (rc {r.returncode}):\n{text[-3000:]}")
    res = json.loads(m.group(1))
    st = parse_sd_log(text)
    return {"load": res["load"], "text_encoding": st.get("text_encoding"),
            "step": st["sampling"] / steps if "sampling" in st else None,
            "vae_decode": st.get("vae_decode"), "total": wall, "peak_rss": res["peak_rss"]}


def run_ours(paths: dict, size: int, steps: int, threads: int, t5_length: int, tmp: str) -> dict:
    cmd = [sys.executable, "-m", "fluxmini.cli", "generate", "-m", paths["diffusion"], "--clip_l", paths["clip_l"],
           "--t5xxl", paths["t5xxl"], "--vae", paths["vae"], "-p", PROMPT, "-W", str(size), "-H", str(size),
           "--steps", str(steps), "-t", str(threads), "--t5-length", str(t5_length), "-s", "1", "-v",
           "-o", os.path.join(tmp, "ours.png")]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    text = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"fluxmini run failed (rc {r.returncode}):\n{text[-3000:]}")
    f = lambda p: float(re.search(p, text).group(1))  # noqa: E731
    steps_t = [float(x) for x in re.findall(r"step \d+/\d+:? \(?([0-9.]+) s", text)]
    # Both engines' stage times are compute alone: sd.cpp reads all weights in its constructor
    # ("load"); fluxmini reads each component before its stage and logs that as "weights loaded".
    load = sum(float(x) for x in re.findall(r"weights loaded: ([0-9.]+) s", text))
    return {"load": load, "text_encoding": f(r"text encoding \(CLIP-L \+ T5, \d+ tokens\): ([0-9.]+) s"),
            "step": statistics.median(steps_t), "vae_decode": f(r"VAE decode \(\d+x\d+\): ([0-9.]+) s"),
            "total": wall, "peak_rss": f(r"peak RSS ([0-9.]+) MB") * 1e6}


def flux_step_flops(size: int, t5_length: int, hidden=3072, mlp=12288, depth=5, single=10, ctx=4096) -> float:
    """FLOPs (2 x multiply-adds) of the matmuls and attention of one Flux step."""
    n_img = (size // 16) ** 2
    n = n_img + t5_length
    h = hidden
    attn = 2 * n * n * h                                   # Q·Kᵀ and A·V over all heads
    double = n * (3 * h * h + h * h + 2 * h * mlp) + attn  # both streams' linears cover all n rows
    single_b = n * h * (3 * h + mlp) + n * (h + mlp) * h + attn
    embed = n_img * 64 * h + t5_length * ctx * h + n_img * h * 64
    return 2.0 * (depth * double + single * single_b + embed)


def gemm_throughput(weight_type: str, threads: int, tokens: int, ggml_only: bool = False) -> float:
    """FLOP/s of the CPU matmul for a Flux MLP weight [3072 -> 12288] of this type, placed as
    the engine places and multiplies it (fluxmini's kernel where the CPU has AVX2, else ggml's, repacked)."""
    from fluxmini import _core

    wall, _ = _core.testing.bench_mul_mat(weight_type, 3072, 12288, tokens, threads, 3, ggml_only)
    return 2.0 * 3072 * 12288 * tokens / wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="A B rounds per size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--t5-length", type=int, default=256, help="sd.cpp uses 256")
    p.add_argument("--variant", default="Q4_0")
    p.add_argument("--model-dir", default="/tmp/fm_models")
    p.add_argument("--sd-venv", default="/tmp/sdv")
    p.add_argument("--json", help="write all measurements here")
    p.add_argument("--report", metavar="JSON", help="print the table of measurements saved with --json (no runs)")
    args = p.parse_args()

    if args.report:
        with open(args.report) as f:
            results = {int(k): v for k, v in json.load(f).items()}
        args.rounds = len(next(iter(results.values()))["fluxmini"])
        report(results, args)
        return 0
    sd_py = ensure_sd_venv(args.sd_venv)
    paths = ensure_model(args.model_dir, args.variant)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            runs = {"fluxmini": [], "sd.cpp": []}
            for rnd in range(args.rounds):
                for name in ("fluxmini", "sd.cpp"):
                    if name == "fluxmini":
                        r = run_ours(paths, size, args.steps, args.threads, args.t5_length, tmp)
                    else:
                        r = run_sd(sd_py, paths, size, args.steps, args.threads, tmp)
                    runs[name].append(r)
                    print(f"{size}px round {rnd + 1} {name}: " + ", ".join(
                        f"{k} {v:.2f}" if k != "peak_rss" else f"peak RSS {v / 1e9:.2f} GB"
                        for k, v in r.items() if v is not None), flush=True)
            results[size] = runs

    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(k): v for k, v in results.items()}, f, indent=1)
    report(results, args)
    return 0


def report(results: dict, args) -> None:
    print(f"\nmachine: {os.cpu_count()} CPUs, {args.threads} threads, {args.variant}, T5 length {args.t5_length}, "
          f"{args.steps} steps, medians of {args.rounds} runs each\n")
    header = f"{'size':>5} {'stage':<14} {'fluxmini':>10} {'sd.cpp':>10} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for size, runs in results.items():
        for k, unit in (("load", "s"), ("text_encoding", "s"), ("step", "s"), ("vae_decode", "s"), ("total", "s"), ("peak_rss", "GB")):
            vals = {n: [r[k] for r in rs if r[k] is not None] for n, rs in runs.items()}
            med = {n: statistics.median(v) if v else float("nan") for n, v in vals.items()}
            scale = 1e9 if unit == "GB" else 1.0
            a, b = med["fluxmini"] / scale, med["sd.cpp"] / scale
            print(f"{size:>5} {k:<14} {a:>9.2f}{unit[0]} {b:>9.2f}{unit[0]} {a / b if b else float('nan'):>7.2f}")
        flops = flux_step_flops(size, args.t5_length)
        ours = statistics.median(r["step"] for r in runs["fluxmini"])
        tokens = (size // 16) ** 2 + args.t5_length
        # The matmul bound (docs/MODEL.md §11.3) uses ggml's GEMM; fluxmini's own kernel (AVX2 or a VNNI path)
        # is faster, so the bound at its rate is printed too.
        for what, ggml_only in (("ggml's GEMM", True), ("fluxmini's GEMM", False)):
            flops_per_s = gemm_throughput(args.variant.lower(), args.threads, tokens, ggml_only)
            bound = flops / flops_per_s
            print(f"{size:>5} matmul bound with {what}: {flops / 1e12:.2f} TFLOP/step at {flops_per_s / 1e9:.0f} "
                  f"GFLOP/s = {bound:.1f} s/step; fluxmini at {ours / bound:.2f}x this bound")


if __name__ == "__main__":
    sys.exit(main())
