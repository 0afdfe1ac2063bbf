#!/usr/bin/env python3
"""Seconds per Flux step, beside the matmul-bound estimate (not a test).

    python benchmarks/bench_flux.py /tmp/fm_models/FLUX.1-mini-Q4_0.gguf /tmp/fm_models/FLUX.1-mini-Q8_0.gguf
    python benchmarks/bench_flux.py MODEL --sizes 512 --t5-len 256 --runs 3 --threads 2
    python benchmarks/bench_flux.py MID_MODEL --extrapolate 5,10     # a model with fewer blocks

For each model and image size: --warmup untimed steps (the first loads the weights, builds and
reserves the graph), then the median of --runs timed steps of ``FluxMini.transformer`` on random
inputs. --profile adds one step with ggml's per-op timings (as FLUXMINI_PROFILE=1 gives) on stderr.

The estimate is FLOPs / throughput, from the model's configuration and the token counts:
* weight matmuls: 2·tokens·in·out for every Linear applied to the tokens, split by the weight's
  type (block weights in the file's main type; gpustack keeps the embedders and the final layer
  in F32), each divided by the GEMM throughput the engine reaches for that type on this
  machine, measured here with ``_core.testing.bench_mul_mat`` (weight [hidden -> mlp_hidden], placed and
  multiplied as the model's weights are: fluxmini's Q4_0/Q8_0 kernel where the CPU has AVX2 (its fastest path),
  else ggml's matmul, repacked where ggml has a kernel; 512 tokens);
* attention: 4·L²·hidden per block (Q·Kᵀ and P·V), divided by the throughput of the attention the
  graph uses, measured with ``_core.testing.bench_attention`` at the step's L (2 heads);
* the per-step mat-vecs (modulations, timestep/guidance/text embedders) are memory-bound and are
  listed, not counted (well under 1% of a step).
With --extrapolate D,S the model's measured/estimate ratio is applied to the estimate of the same
widths with D double and S single blocks (clearly labelled as extrapolated).

Every figure is given twice: wall-clock seconds, and process CPU seconds divided by the thread
count (with the rates measured the same way). On a machine shared with other work the second is
the better guide to what an idle machine would show; the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import numpy as np


def _weight_types(path: str) -> dict:
    """{bare diffusion tensor name: ggml type name} from the GGUF header (needs the gguf package)."""
    try:
        import gguf
    except ImportError:
        return {}
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        name = t.name
        for p in ("model.diffusion_model.",):
            if name.startswith(p):
                name = name[len(p):]
        out[name] = t.tensor_type.name.lower()
    return out


def flux_flops(cfg: dict, l_img: int, l_txt: int, types: dict, depth=None, depth_single=None) -> dict:
    """FLOPs of one step by weight type ('attention' for Q·Kᵀ and P·V), plus mat-vec FLOPs."""
    h, mlp = cfg["hidden"], cfg["mlp_hidden"]
    c4 = 4 * cfg["latent_channels"]
    ctx = cfg["context_dim"]
    D = cfg["double_blocks"] if depth is None else depth
    S = cfg["single_blocks"] if depth_single is None else depth_single
    L = l_img + l_txt
    by_type: dict = {}

    def add(name, flops):
        t = types.get(name, types.get("_blocks", "?"))
        by_type[t] = by_type.get(t, 0.0) + flops

    for i in range(D):
        for s, n in (("img", l_img), ("txt", l_txt)):
            p = f"double_blocks.0.{s}_"
            add(p + "attn.qkv.weight", 2.0 * n * h * 3 * h)
            add(p + "attn.proj.weight", 2.0 * n * h * h)
            add(p + "mlp.0.weight", 2.0 * n * h * mlp)
            add(p + "mlp.2.weight", 2.0 * n * mlp * h)
    for i in range(S):
        add("single_blocks.0.linear1.weight", 2.0 * L * h * (3 * h + mlp))
        add("single_blocks.0.linear2.weight", 2.0 * L * (h + mlp) * h)
    add("img_in.weight", 2.0 * l_img * c4 * h)
    add("txt_in.weight", 2.0 * l_txt * ctx * h)
    add("final_layer.linear.weight", 2.0 * l_img * h * c4)
    by_type["attention"] = 4.0 * L * L * h * (D + S)
    matvec = 2.0 * h * (12 * h * D + 3 * h * S + 2 * h + 2 * h + 256 + cfg["vec_dim"])
    return {"by_type": by_type, "matvec": matvec}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="FLUX.1-mini GGUF files (or diffusion-only files)")
    ap.add_argument("--sizes", default="512,1024", help="image sides in pixels (square), comma-separated")
    ap.add_argument("--t5-len", type=int, default=512, choices=(256, 512), help="T5 tokens (default 512)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="3", help="timed steps per size (median); one number or one per size")
    ap.add_argument("--warmup", default="1",
                    help="untimed steps before each size; one number or one per size (0 is fine for a later "
                         "size: the weights are loaded already and building a graph takes milliseconds)")
    ap.add_argument("--preload", action="store_true",
                    help="run one untimed 64x64 step with 8 text tokens first (loads the weights), e.g. with --warmup 0 to save "
                         "whole warm-up steps on a slow machine")
    ap.add_argument("--no-flash", action="store_true", help="explicit softmax attention")
    ap.add_argument("--extrapolate", default="", help="D,S: also extrapolate to D double and S single blocks")
    ap.add_argument("--profile", action="store_true",
                    help="one more step with ggml's per-op timings on stderr (as FLUXMINI_PROFILE=1)")
    args = ap.parse_args(argv)

    from fluxmini import _core
    from fluxmini.model import FluxMini

    sizes = [int(s) for s in args.sizes.split(",") if s]

    def per_size(text: str, what: str) -> list:
        v = [int(x) for x in text.split(",") if x]
        if len(v) == 1:
            v = v * len(sizes)
        if len(v) != len(sizes):
            raise SystemExit(f"--{what}: give one number or one per size")
        return v

    runs_per_size, warmup_per_size = per_size(args.runs, "runs"), per_size(args.warmup, "warmup")
    ext = tuple(int(x) for x in args.extrapolate.split(",")) if args.extrapolate else None
    th = args.threads
    rates: dict = {}  # key -> (FLOP per wall second, FLOP per CPU-second / threads)

    def gemm_rate(t: str, h: int, mlp: int):
        key = (t, h, mlp)
        if key not in rates:
            m = 512
            wall, cpu = _core.testing.bench_mul_mat(t, h, mlp, m, th, 3)
            fl = 2.0 * h * mlp * m
            rates[key] = (fl / wall, fl / (cpu / th))
            print(f"  GEMM {t:>5} [{h} -> {mlp}] x {m} tokens: {rates[key][0] / 1e9:6.1f} GFLOP/s wall, "
                  f"{rates[key][1] / 1e9:6.1f} per CPU-second/thread", flush=True)
        return rates[key]

    def attn_rate(d: int, L: int):
        key = ("attn", d, L)
        if key not in rates:
            heads = 2
            wall, cpu = _core.testing.bench_attention(d, heads, L, not args.no_flash, th, 1)
            fl = 4.0 * L * L * d * heads
            rates[key] = (fl / wall, fl / (cpu / th))
            kind = "explicit softmax" if args.no_flash else "flash"
            print(f"  attention ({kind}) L={L}: {rates[key][0] / 1e9:6.1f} GFLOP/s wall, "
                  f"{rates[key][1] / 1e9:6.1f} per CPU-second/thread", flush=True)
        return rates[key]

    def cpu_seconds() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    rows = []
    for path in args.models:
        types = _weight_types(path)
        model = FluxMini.load(path, components=["diffusion"], threads=th, flash_attn=not args.no_flash)
        cfg = dict(model.config["diffusion"])
        big = types.get("double_blocks.0.img_attn.qkv.weight") or types.get("single_blocks.0.linear1.weight") or "?"
        types.setdefault("_blocks", big)
        name = os.path.basename(path)
        print(f"{name}: {cfg['double_blocks']} double + {cfg['single_blocks']} single blocks, hidden "
              f"{cfg['hidden']}, block weights {big}, {th} threads", flush=True)
        rng = np.random.default_rng(0)
        if args.preload:
            t0 = time.perf_counter()
            model.transformer(np.zeros((cfg["latent_channels"], 8, 8), np.float32), 0.7, 3.5,
                              np.zeros((8, cfg["context_dim"]), np.float32),
                              np.zeros(cfg["vec_dim"], np.float32))
            print(f"  preload (64x64 step, 8 text tokens): {time.perf_counter() - t0:.1f} s", flush=True)
        for size, n_runs, n_warm in zip(sizes, runs_per_size, warmup_per_size):
            if n_runs < 1:
                raise SystemExit("--runs must be at least 1")
            lat_side = size // 8
            l_img = (lat_side // 2) ** 2
            latent = rng.standard_normal((cfg["latent_channels"], lat_side, lat_side)).astype(np.float32)
            t5 = (0.5 * rng.standard_normal((args.t5_len, cfg["context_dim"]))).astype(np.float32)
            pooled = rng.standard_normal(cfg["vec_dim"]).astype(np.float32)
            warm = 0.0
            for _ in range(n_warm):
                t0 = time.perf_counter()
                model.transformer(latent, 0.7, 3.5, t5, pooled)
                warm += time.perf_counter() - t0
            walls, cpus, loads = [], [], []
            for _ in range(n_runs):
                c0, t0 = cpu_seconds(), time.perf_counter()
                model.transformer(latent, 0.7, 3.5, t5, pooled)
                walls.append(time.perf_counter() - t0)
                cpus.append((cpu_seconds() - c0) / th)
                loads.append(os.getloadavg()[0])
            wall, cpu = statistics.median(walls), statistics.median(cpus)
            if args.profile:  # FLUXMINI_PROFILE=1 at load does the same for every step
                model._m.profile = True
                model.transformer(latent, 0.7, 3.5, t5, pooled)
                model._m.profile = False

            L = l_img + args.t5_len

            def estimate(depth=None, depth_single=None):
                f = flux_flops(cfg, l_img, args.t5_len, types, depth, depth_single)
                est_wall = est_cpu = total = 0.0
                for t, fl in f["by_type"].items():
                    r = attn_rate(cfg["head_dim"], L) if t == "attention" else gemm_rate(t, cfg["hidden"], cfg["mlp_hidden"])
                    est_wall += fl / r[0]
                    est_cpu += fl / r[1]
                    total += fl
                return est_wall, est_cpu, total, f["matvec"]

            ew, ec, flops, mv = estimate()
            rows.append((name, size, wall, ew, cpu, ec, flops, max(loads), ""))
            print(f"  {size}x{size}: {wall:8.2f} s/step wall (median of {n_runs}; {n_warm} warm-up: {warm:.1f} s), "
                  f"estimate {ew:8.2f} s, ratio {wall / ew:.2f} | CPU-s/thread {cpu:8.2f}, estimate {ec:8.2f}, "
                  f"ratio {cpu / ec:.2f} | {flops / 1e12:.2f} TFLOP + {mv / 1e9:.2f} GFLOP mat-vec, "
                  f"load average up to {max(loads):.1f}", flush=True)
            if ext:
                xw, xc, xf, _ = estimate(*ext)
                rows.append((f"{name} -> {ext[0]}+{ext[1]} blocks", size, wall / ew * xw, xw, cpu / ec * xc, xc, xf,
                             max(loads), "  (EXTRAPOLATED)"))
                print(f"  {size}x{size} EXTRAPOLATED to {ext[0]} double + {ext[1]} single blocks: "
                      f"{wall / ew * xw:8.2f} s/step wall, {cpu / ec * xc:8.2f} CPU-s/thread (estimates {xw:.2f} / "
                      f"{xc:.2f} s for {xf / 1e12:.2f} TFLOP x this model's measured ratios)", flush=True)
        del model

    print()
    print(f"{'model':<44} {'size':>5} {'wall s':>8} {'est.':>8} {'ratio':>5} {'CPU-s/th':>9} {'est.':>8} "
          f"{'ratio':>5} {'TFLOP':>6} {'load':>5}")
    for name, size, w, ew, c, ec, flops, load, tag in rows:
        print(f"{name:<44} {size:>5} {w:>8.1f} {ew:>8.1f} {w / ew:>5.2f} {c:>9.1f} {ec:>8.1f} {c / ec:>5.2f} "
              f"{flops / 1e12:>6.2f} {load:>5.1f}{tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
