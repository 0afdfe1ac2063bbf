"""``fluxmini make-random``: a random-weight full-size model (for benchmarks)."""

from __future__ import annotations

import os
import time

from ..convert import VARIANTS, make_random
from ..inventory import LAYOUT_PREFIXES, tiny_dims


def run(args) -> int:
    t0 = time.monotonic()
    paths = make_random(args.output, variant=args.variant, layout=args.layout, seed=args.seed,
                        dims=tiny_dims() if args.tiny else None, progress=not args.quiet, split=args.split)
    dt = time.monotonic() - t0
    for p in paths:
        print(f"wrote {p}: {os.path.getsize(p):,} bytes")
    print(f"{dt:.1f} s")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("make-random", help="write a random-weight full-size model (for benchmarks)")
    p.add_argument("-o", "--output", required=True, help="output .gguf (a folder with --split)")
    p.add_argument("--variant", default="Q4_0", help="one of " + ", ".join(VARIANTS) + " (default Q4_0)")
    p.add_argument("--layout", choices=tuple(LAYOUT_PREFIXES), default="gpustack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", action="store_true",
                   help="separate diffusion/clip_l/t5xxl/vae files with bare names (for stable-diffusion.cpp)")
    p.add_argument("--tiny", action="store_true", help="tiny dimensions (tests)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
