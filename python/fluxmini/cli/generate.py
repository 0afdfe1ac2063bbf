"""``fluxmini generate``: an image (or several) from a prompt, txt2img or img2img."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time

import numpy as np

from ..errors import FluxMiniFileError, FluxMiniValueError
from ..hub import resolve_model
from ..imageio import save_png
from ..model import FluxMini
from ..pipeline import encode_prompt, run_batch
from ..pipeline import run as run_one
from .common import add_cache_dir, add_component_files, add_max_memory


def output_paths(output: str, count: int) -> list:
    """OUT, OUT_1, ... OUT_{count-1} (the extension kept at the end)."""
    root, ext = os.path.splitext(output)
    return [output] + [f"{root}_{k}{ext}" for k in range(1, count)]


def _count_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"-n is the number of images here, got {text!r} (negative prompts, sd.cpp's -n, are not "
            "supported: FLUX.1-mini runs without classifier-free guidance)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"the image count must be at least 1, got {n}")
    return n


def run(args) -> int:
    if args.count > 1 and args.noise_file:
        raise FluxMiniValueError("--noise and -n COUNT > 1 cannot be combined")
    seed = args.seed if args.seed is None or args.seed >= 0 else None  # sd.cpp: a negative seed is random
    if seed is None:
        seed = secrets.randbelow(1 << 32)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise FluxMiniFileError(f"the output folder does not exist: {out_dir}")
    path = resolve_model(args.model)
    t0 = time.perf_counter()
    model = FluxMini.load(path, clip_l=args.clip_l, t5xxl=args.t5xxl, vae=args.vae, backend=args.backend,
                          threads=args.threads, verbose=1 if args.verbose else 0, cache_dir=args.cache_dir,
                          max_memory=args.max_memory)
    if args.lora:
        from ..lora import parse_lora_arg

        report = model.set_loras([parse_lora_arg(x) for x in args.lora], strict=not args.lora_nonstrict,
                                 mode=args.lora_mode)
        for lora_path, keys in report:
            print(f"fluxmini: {lora_path}: {len(keys)} tensors match no layer and were skipped: "
                  + ", ".join(k for k, _ in keys[:10]) + (" ..." if len(keys) > 10 else ""), file=sys.stderr)
    if args.verbose:
        info = model.info()
        print(f"fluxmini: loaded {path} ({info['backend']}, {model.threads} threads) in "
              f"{time.perf_counter() - t0:.3f} s; memory: {info['memory']['description']}", file=sys.stderr)
    low_memory = not args.keep_weights
    noise = None
    if args.noise_file:
        try:
            noise = np.load(args.noise_file)
        except (OSError, ValueError) as e:
            raise FluxMiniFileError(f"cannot read the noise file {args.noise_file}: {e}") from None
    cond = encode_prompt(model, args.prompt, t5_length=args.t5_length, compat=args.compat,
                         low_memory=low_memory, verbose=args.verbose)
    common = dict(conditioning=cond, width=args.width, height=args.height, steps=args.steps,
                  guidance=args.guidance, compat=args.compat, init_image=args.init_img, strength=args.strength,
                  progress=not args.quiet, low_memory=low_memory, verbose=args.verbose,
                  vae_tiling=args.vae_tiling)
    if noise is not None:
        results = iter([run_one(model, noise=noise, **common)])
    else:  # the images go stage by stage: each component's weights are read once for all of them
        results = run_batch(model, seeds=[seed + k for k in range(args.count)], **common)
    paths = output_paths(args.output, args.count)
    for k, res in enumerate(results):
        out = paths[k]
        save_png(res.image, out, res.metadata)
        seed_txt = f"seed {res.seed}" if res.seed is not None else "custom noise"
        print(f"fluxmini: wrote {out} ({res.image.size[0]}x{res.image.size[1]}, {seed_txt}, "
              f"{res.timings['total']:.1f} s)")
    return 0


def add_parser(subparsers) -> None:
    g = subparsers.add_parser(
        "generate", help="make an image from a prompt (txt2img, or img2img with -i)",
        description="Generate an image with FLUX.1-mini. Defaults: Euler, 20 steps, guidance 3.5, "
                    "512x512, seed 42, the reference (BFL/diffusers) schedule.")
    g.add_argument("-m", "--model", required=True,
                   help="FLUX.1-mini GGUF file, or a Hugging Face reference owner/repo:QUANT such as "
                        "gpustack/FLUX.1-mini-GGUF:Q4_0 (needs the [hub] extra)")
    g.add_argument("-p", "--prompt", default="", help="the prompt (default: empty)")
    g.add_argument("-o", "--output", default="output.png",
                   help="output PNG (default output.png); with -n N also OUT_1.png ... OUT_{N-1}.png")
    g.add_argument("-W", "--width", type=int, default=None,
                   help="width in pixels, a multiple of 16 (default 512, or the init image's width)")
    g.add_argument("-H", "--height", type=int, default=None,
                   help="height in pixels, a multiple of 16 (default 512, or the init image's height)")
    g.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    g.add_argument("--guidance", type=float, default=3.5, help="distilled guidance (default 3.5)")
    g.add_argument("-s", "--seed", type=int, default=42, help="seed (default 42; negative = random)")
    g.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    g.add_argument("--backend", default="cpu", help="cpu, cuda, metal or auto (default cpu)")
    g.add_argument("--compat", choices=["sd.cpp", "llama-box"], default=None,
                   help="the same image as another program for a seed: sd.cpp = stable-diffusion.cpp as "
                        "stable-diffusion-cpp-python 0.4.7 ships it (discrete mu 1.15 schedule, T5 length 256); "
                        "llama-box = llama-box v0.0.86's stable-diffusion.cpp fork (T5 length 255, no VAE shift)")
    g.add_argument("--t5-length", "--t5_length", dest="t5_length", type=int, default=None,
                   help="T5 tokens (default 512; 256 with --compat sd.cpp, 255 with --compat llama-box)")
    g.add_argument("-i", "--init-img", "--init_img", dest="init_img", default=None,
                   help="init image for img2img")
    g.add_argument("--strength", type=float, default=0.75, help="img2img strength (default 0.75)")
    add_component_files(g)
    g.add_argument("-n", "--count", "-b", "--batch-count", dest="count", type=_count_arg, default=1,
                   help="number of images, seeds SEED, SEED+1, ... (default 1); the weights stay loaded "
                        "between images: all are sampled, then all are decoded")
    g.add_argument("--vae-tiling", dest="vae_tiling", action="store_const", const=True, default=None,
                   help="decode the VAE in tiles (default: automatic for large images)")
    g.add_argument("--keep-weights", action="store_true",
                   help="keep every component's weights in memory (default: release the text encoders "
                        "before sampling and the transformer before the VAE, to lower the peak memory)")
    add_max_memory(g)
    g.add_argument("--noise", dest="noise_file", default=None,
                   help="a .npy float32 [16, H/8, W/8] starting noise instead of the seed's")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="apply a LoRA at run time with a multiplier (default 1, negative allowed); repeatable. "
                        "FluxKits/XLabs, kohya, diffusers/PEFT or BFL/ComfyUI keys, safetensors or GGUF")
    g.add_argument("--lora-mode", choices=("runtime", "merge"), default="runtime",
                   help="runtime (default): adapters as extra graph nodes, base weights untouched; merge: "
                        "added once into copies of the weights (F16/F32 models only; faster steps)")
    g.add_argument("--lora-nonstrict", action="store_true",
                   help="apply the matching part of a LoRA whose other tensors match no layer (listed on stderr)")
    add_cache_dir(g)
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("-v", "--verbose", action="store_true", help="per-stage timings and peak memory on stderr")
    g.set_defaults(func=run)
