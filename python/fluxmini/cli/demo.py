"""``fluxmini demo``: the whole pipeline on a tiny random model, to check an install."""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

from ..convert import write_random_model
from ..imageio import save_png
from ..inventory import tiny_dims
from ..model import FluxMini
from ..pipeline import run as run_one


def run(args) -> int:
    with tempfile.TemporaryDirectory(prefix="fluxmini-demo-") as tmp:
        path = os.path.join(tmp, "tiny-random.gguf")
        t0 = time.perf_counter()
        write_random_model(path, tiny_dims(), types="f32", seed=0)
        model = FluxMini.load(path, threads=args.threads)
        res = run_one(model, args.prompt, width=args.size, height=args.size, steps=args.steps, seed=args.seed,
                      progress=not args.quiet, verbose=args.verbose, model_name="tiny random model (fluxmini demo)")
        del model
        gc.collect()  # unmap the temporary file before its folder goes
    save_png(res.image, args.output, res.metadata)
    print(f"fluxmini demo: wrote {args.output} ({args.size}x{args.size}, {args.steps} steps, "
          f"{time.perf_counter() - t0:.1f} s).")
    print("The picture is noise: it comes from a tiny model with RANDOM weights, built on the fly. "
          "This only checks that fluxmini is installed and runs end to end (tokenizers, text encoders, "
          "transformer, sampler, VAE, PNG). For real pictures get a FLUX.1-mini GGUF, e.g. "
          "`fluxmini generate -m gpustack/FLUX.1-mini-GGUF:Q4_0 -p \"a cat\"`.")
    return 0


def add_parser(subparsers) -> None:
    d = subparsers.add_parser(
        "demo", help="check the install: run the whole pipeline on a tiny random model (the image is noise)",
        description="Builds a tiny FLUX-shaped model with random weights in a temporary folder, runs "
                    "text encoding, sampling and VAE decoding on it and writes a PNG. The picture is "
                    "noise because the weights are random; nothing is downloaded.")
    d.add_argument("-o", "--output", default="demo.png", help="output PNG (default demo.png)")
    d.add_argument("-p", "--prompt", default="a photo of a cat", help=argparse.SUPPRESS)
    d.add_argument("--size", type=int, default=64, help="width and height in pixels (default 64)")
    d.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    d.add_argument("-s", "--seed", type=int, default=42, help="seed (default 42)")
    d.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    d.add_argument("-v", "--verbose", action="store_true", help="per-stage timings")
    d.set_defaults(func=run)
