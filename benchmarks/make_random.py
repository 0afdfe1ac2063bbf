#!/usr/bin/env python3
"""Write a full-size random-weight FLUX.1-mini for benchmarks, and time it.

    python benchmarks/make_random.py -o /tmp/flux-mini-Q4_0.gguf --variant Q4_0
    python benchmarks/make_random.py -o /tmp/flux-mini-split --variant Q8_0 --split   # sd.cpp's files
    python benchmarks/make_random.py -o /tmp/x.gguf --variant all --delete            # time all six

Each file has exactly the size of gpustack's file of that variant (docs/MODEL.md §1.1): the script
checks it against ``predict_file_size``. Values are random with sane scales (see
fluxmini.convert.random_tensor), so the engine's activations stay finite; speed does not depend
on the values.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time


def _import_convert():
    try:
        from fluxmini import convert
        return convert
    except ImportError:
        # The C++ extension may not be built: the converter needs only Python, so load the package
        # folder without running fluxmini/__init__.py.
        import types

        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "fluxmini")
        pkg = types.ModuleType("fluxmini")
        pkg.__path__ = [os.path.normpath(root)]
        sys.modules["fluxmini"] = pkg
        from fluxmini import convert
        return convert


def main(argv=None) -> int:
    C = _import_convert()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", required=True,
                   help="output .gguf (a folder with --split; with --variant all, the variant is added to the name)")
    p.add_argument("--variant", default="Q4_0", help="one of " + ", ".join(C.VARIANTS) + ", or all")
    p.add_argument("--layout", choices=("gpustack", "sd.cpp"), default="gpustack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", action="store_true", help="separate diffusion/clip_l/t5xxl/vae files (sd.cpp)")
    p.add_argument("--delete", action="store_true", help="delete the files after timing them")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)

    variants = list(C.VARIANTS) if args.variant == "all" else [C.variant_name(args.variant)]
    for v in variants:
        out = args.output
        if len(variants) > 1:
            stem, ext = os.path.splitext(out)
            out = f"{stem}-{v}{ext}"
        t0 = time.perf_counter()
        paths = C.make_random(out, v, layout=args.layout, seed=args.seed, progress=not args.quiet,
                              split=args.split)
        dt = time.perf_counter() - t0
        size = sum(os.path.getsize(x) for x in paths)
        if args.split:
            want = sum(C.predict_file_size(None, v, components=[c], bare=True) for c in C.COMPONENTS)
        else:
            want = C.predict_file_size(None, v, args.layout)
        status = "ok" if size == want else f"MISMATCH (predicted {want:,})"
        print(f"{v:10s} {size:>15,} bytes  {dt:7.1f} s  {size / dt / 1e6:7.0f} MB/s  size {status}", flush=True)
        if args.delete:
            if args.split:
                shutil.rmtree(out)
            else:
                os.remove(out)
        if size != want:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
