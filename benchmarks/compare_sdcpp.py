#!/usr/bin/env python3
"""fluxmini vs stable-diffusion.cpp (its Python binding), side by side on the same files.

    python benchmarks/compare_sdcpp.py --sizes 256 512 --steps 2 --rounds 2
    python benchmarks/compare_sdcpp.py --images --sizes 256 512 --image-steps 1 4 20

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

--images: the same picture? For each size and step count, both engines generate from the same
seed, prompt and settings (fluxmini with --compat, sd.cpp's defaults: Euler, its discrete
schedule, cfg 1, guidance 3.5) and the PNGs are compared: PSNR over the bytes (peak 255), the
largest byte difference and the share of bytes that differ (docs/MODEL.md §4.7). With
--sd-lib, sd.cpp runs that build of the binding's library instead (STABLE_DIFFUSION_CPP_LIB)
with SD_DUMP_DIR set: a debug build that writes its intermediates there as NAME.bin (int64
ndim, int64 dims in ggml order, float32 data) — t5, pooled, sigmas, noise, stepN_x / stepN_v
(the state and the model output of step N), latent, vae_in, decoded01 (the VAE output mapped
to [0, 1]) — gets each stage compared with fluxmini's from sd.cpp's own inputs, the stages that
differ printed, and what each costs the picture: fluxmini's VAE on sd.cpp's latent, fluxmini's
sampling from sd.cpp's noise and text conditioning, and the same from fluxmini's own text
conditioning (docs/MODEL.md §4.7). No such build ships with anything; one is a few dozen lines added to
stable-diffusion.cpp's generate_image, sample and decode_first_stage.
"""

from __future__ import annotations

import argparse
import json
import math
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
                         guidance=a.get("guidance", 3.5), sample_method="euler", sample_steps=a["steps"],
                         seed=a.get("seed", 1))
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


# --------------------------------------------------------------------------- --images


def run_sd_image(py: str, paths: dict, size: int, steps: int, args, out: str, dump_dir: str = None) -> None:
    """sd.cpp's picture for these settings, written to ``out`` (and its intermediates to dump_dir)."""
    a = dict(paths, size=size, steps=steps, threads=args.threads, prompt=args.prompt, seed=args.seed,
             guidance=args.guidance, out=out)
    env = dict(os.environ)
    if dump_dir:
        env.update(STABLE_DIFFUSION_CPP_LIB=args.sd_lib, SD_DUMP_DIR=dump_dir)
    r = subprocess.run([py, "-c", SD_RUNNER, json.dumps(a)], capture_output=True, text=True, env=env)
    if r.returncode != 0 or "RESULT" not in r.stdout:
        raise RuntimeError(f"stable-diffusion.cpp run failed (rc {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")


def run_ours_image(paths: dict, size: int, steps: int, args, out: str) -> None:
    cmd = [sys.executable, "-m", "fluxmini.cli", "generate", "-m", paths["diffusion"], "--clip_l", paths["clip_l"],
           "--t5xxl", paths["t5xxl"], "--vae", paths["vae"], "-p", args.prompt, "-W", str(size), "-H", str(size),
           "--steps", str(steps), "-t", str(args.threads), "-s", str(args.seed), "--guidance", str(args.guidance),
           "--compat", args.compat, "-q", "-o", out]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"fluxmini run failed (rc {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")


def image_scores(a_png: str, b_png: str) -> dict:
    """PSNR over the bytes (peak 255), the largest byte difference, the share of bytes that differ."""
    import numpy as np
    from PIL import Image

    with Image.open(a_png) as ia, Image.open(b_png) as ib:
        a = np.asarray(ia.convert("RGB"), np.float64)
        b = np.asarray(ib.convert("RGB"), np.float64)
    mse = float(np.mean((a - b) ** 2))
    return {"psnr": float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse),
            "max_diff": int(np.max(np.abs(a - b))), "differ": float(np.mean(a != b))}


def read_dump(d: str, name: str):
    """One NAME.bin of an sd.cpp debug build (see the module docstring), in numpy (C) order."""
    import numpy as np

    path = os.path.join(d, name + ".bin")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        nd = int(np.frombuffer(f.read(8), np.int64)[0])
        shape = np.frombuffer(f.read(8 * nd), np.int64).tolist()
        data = np.frombuffer(f.read(), np.float32)
    return data.reshape(shape[::-1])


def stage_report(model, d: str, png_sd: str, args) -> list:
    """(stage, measure, value, verdict) rows: each stage of fluxmini from sd.cpp's own inputs, then
    what each stage costs the picture (docs/MODEL.md §4.7)."""
    import numpy as np
    from PIL import Image

    from fluxmini import sampling
    from fluxmini.pipeline import VAE_SCALE, VAE_SHIFT
    from fluxmini.rng import initial_noise
    from fluxmini.tokenizers import tokenize_clip, tokenize_t5

    def rms_rel(x, y):
        e = np.float64(x) - np.float64(y)
        return float(np.sqrt(np.mean(e * e) / max(float(np.mean(np.float64(y) ** 2)), 1e-30)))

    def to_bytes(decoded):  # fluxmini.imageio.to_uint8 of the mode, [3, H, W]
        v = np.clip((decoded + np.float32(1)) * np.float32(0.5), 0, 1).astype(np.float32) * np.float32(255)
        return (v + np.float32(0.5) if args.compat == "sd.cpp" else v).astype(np.uint8)

    def psnr(a, b):
        mse = float(np.mean((np.float64(a) - np.float64(b)) ** 2))
        return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)

    shift = 0.0 if args.compat == "llama-box" else VAE_SHIFT

    def decode(latent):
        return to_bytes(np.asarray(model.vae_decode(latent / np.float32(VAE_SCALE) + np.float32(shift)), np.float32))

    rows = []
    t5_sd = read_dump(d, "t5").reshape(-1, 4096)
    pooled_sd = read_dump(d, "pooled").reshape(-1)
    t5 = model.encode_t5(tokenize_t5(args.prompt, t5_sd.shape[0]), compat=args.compat)
    pooled = model.encode_clip(tokenize_clip(args.prompt))
    # Bars measured on the full-size random Q4_0 model (§4.7): two runs of one engine whose Q8_0
    # activation scales differ only in their F16 rounding give T5 states 23% apart (rms) and
    # velocities 1% apart, so 25% and 2% are what rounding alone produces there; a wrong input
    # (another token count, a missing shift) is far outside them.
    e = rms_rel(pooled, pooled_sd)
    rows.append(("CLIP pooled", "rms rel. error", e, e < 1e-2))
    e = rms_rel(t5, t5_sd)
    rows.append((f"T5 states ({t5_sd.shape[0]} tokens)", "rms rel. error", e, e < 0.25))
    noise_sd = read_dump(d, "noise")
    c, h, w = noise_sd.shape[-3:]
    noise_sd = noise_sd.reshape(c, h, w)
    dn = float(np.max(np.abs(initial_noise(args.seed, c, h, w, args.compat) - noise_sd)))
    rows.append(("initial noise", "max abs. difference", dn, dn == 0))
    sig_sd = read_dump(d, "sigmas")
    sig = sampling.sigmas(len(sig_sd) - 1, 8 * w, 8 * h, args.compat)
    rows.append(("sigmas", "values differing", int(np.sum(sig != sig_sd)), bool(np.array_equal(sig, sig_sd))))
    for i in range(1, len(sig_sd)):
        x = read_dump(d, f"step{i}_x").reshape(c, h, w)
        v_sd = read_dump(d, f"step{i}_v").reshape(c, h, w)
        v = model.transformer(x, float(sig_sd[i - 1]), args.guidance, t5_sd, pooled_sd)
        e = rms_rel(v, v_sd)
        rows.append((f"step {i} velocity (sd.cpp's input)", "rms rel. error", e, e < 2e-2))
        if i < len(sig_sd) - 1:
            nxt = read_dump(d, f"step{i + 1}_x").reshape(c, h, w)
            e = float(np.max(np.abs(sampling.euler_sample(lambda xx, s: v_sd, x, sig_sd[i - 1:i + 1],
                                                          sdcpp_form=True) - nxt)))
            rows.append((f"step {i} Euler update (sd.cpp's v)", "max abs. difference", e, e == 0))

    def sample(t5_states, pooled_vec):
        return sampling.euler_sample(lambda xx, s: model.transformer(xx, s, args.guidance, t5_states, pooled_vec),
                                     noise_sd, sig_sd, sdcpp_form=args.compat is not None)

    x_sd_text, x_our_text = sample(t5_sd, pooled_sd), sample(t5, pooled)
    lat_sd = read_dump(d, "latent").reshape(c, h, w)
    vin_sd = read_dump(d, "vae_in").reshape(c, h, w)
    z = lat_sd / np.float32(VAE_SCALE) + np.float32(shift)
    rows.append(("VAE input from the latent", "max abs. difference", float(np.max(np.abs(z - vin_sd))),
                 bool(np.max(np.abs(z - vin_sd)) == 0)))
    dec_sd = read_dump(d, "decoded01").reshape(3, 8 * h, 8 * w)
    with Image.open(png_sd) as im:
        theirs = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    # the byte conversion of the mode (fluxmini.imageio.to_uint8's last steps) on sd.cpp's own [0, 1] image
    ours = dec_sd.astype(np.float32) * np.float32(255)
    if args.compat == "sd.cpp":
        ours += np.float32(0.5)
    nb = int(np.sum(ours.astype(np.uint8) != theirs))
    rows.append(("bytes from sd.cpp's decoded image", "bytes differing", nb, nb == 0))
    # What each stage costs the picture: PSNR against sd.cpp's PNG of fluxmini's VAE on sd.cpp's
    # latent; of fluxmini's sampling + VAE from sd.cpp's noise and text conditioning; and of the
    # same from fluxmini's own text conditioning (the whole pipeline).
    p = psnr(to_bytes(np.asarray(model.vae_decode(vin_sd), np.float32)), theirs)
    rows.append(("picture: VAE (sd.cpp's latent)", "PSNR dB", p, p >= 50))
    p = psnr(decode(x_sd_text), theirs)
    rows.append(("picture: sampling + VAE (sd.cpp's text)", "PSNR dB", p, p >= 40))
    p = psnr(decode(x_our_text), theirs)
    rows.append(("picture: text + sampling + VAE", "PSNR dB", p, p >= 40))
    return rows


def images_main(args) -> int:
    sd_py = ensure_sd_venv(args.sd_venv)
    paths = ensure_model(args.model_dir, args.variant)
    sys.path.insert(0, os.path.join(ROOT, "python"))
    model = None
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for steps in args.image_steps:
                ours, theirs = os.path.join(tmp, "ours.png"), os.path.join(tmp, "sd.png")
                t0 = time.perf_counter()
                run_ours_image(paths, size, steps, args, ours)
                t1 = time.perf_counter()
                run_sd_image(sd_py, paths, size, steps, args, theirs)
                t2 = time.perf_counter()
                sc = image_scores(ours, theirs)
                sc.update(size=size, steps=steps, fluxmini_s=t1 - t0, sdcpp_s=t2 - t1)
                print(f"{size}px {steps} steps: PSNR {sc['psnr']:.1f} dB, max byte difference {sc['max_diff']}, "
                      f"{100 * sc['differ']:.1f}% of bytes differ (fluxmini {t1 - t0:.0f} s, sd.cpp {t2 - t1:.0f} s)",
                      flush=True)
                if args.sd_lib:
                    dump = os.path.join(tmp, f"dump-{size}-{steps}")
                    os.makedirs(dump)
                    run_sd_image(sd_py, paths, size, steps, args, os.path.join(dump, "sd.png"), dump)
                    same = image_scores(theirs, os.path.join(dump, "sd.png"))["max_diff"] == 0
                    if model is None:
                        from fluxmini import FluxMini

                        model = FluxMini.load(paths["diffusion"], clip_l=paths["clip_l"], t5xxl=paths["t5xxl"],
                                              vae=paths["vae"], threads=args.threads)
                    sc["stages"] = stage_report(model, dump, os.path.join(dump, "sd.png"), args)
                    print(f"  the debug build's picture {'equals' if same else 'DIFFERS FROM'} the binding's")
                    for stage, what, value, ok in sc["stages"]:
                        print(f"  {stage:<40} {what:<20} {value:>12.4g}  {'same' if ok else 'DIFFERS'}")
                results.append(sc)
    print(f"\nmachine: {os.cpu_count()} CPUs, {args.threads} threads, {args.variant}, compat {args.compat}, "
          f"seed {args.seed}, prompt {args.prompt!r}, guidance {args.guidance}\n")
    print(f"{'size':>5} {'steps':>5} {'PSNR dB':>8} {'max diff':>8} {'differ':>7}")
    for sc in results:
        print(f"{sc['size']:>5} {sc['steps']:>5} {sc['psnr']:>8.1f} {sc['max_diff']:>8} {100 * sc['differ']:>6.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


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
    g = p.add_argument_group("--images: compare the pictures (module docstring)")
    g.add_argument("--images", action="store_true", help="compare the pictures instead of the speed")
    g.add_argument("--image-steps", type=int, nargs="+", default=[1, 4, 20])
    g.add_argument("--compat", default="sd.cpp", choices=["sd.cpp", "llama-box"], help="fluxmini's mode")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--prompt", default="a lovely cat")
    g.add_argument("--guidance", type=float, default=3.5)
    g.add_argument("--sd-lib", help="an sd.cpp debug build of libstable-diffusion.so that writes its stages")
    args = p.parse_args()
    if args.images:
        return images_main(args)

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
