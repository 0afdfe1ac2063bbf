"""``fluxmini batch JOBS.jsonl -o OUTDIR -m MODEL [--ray [ADDRESS]] [--workers N] [--threads T]``."""

from __future__ import annotations

import os
import sys


def _cmd_batch(args) -> int:
    from . import RESULTS_FILE, run

    defaults = {k: getattr(args, k) for k in ("width", "height", "steps", "guidance", "seed", "t5_length",
                                              "compat", "count") if getattr(args, k) is not None}
    ok = failed = skipped = 0
    for rec in run(args.jobs, args.output, model=args.model, ray=args.ray, workers=args.workers,
                   threads=args.threads, defaults=defaults, clip_l=args.clip_l, t5xxl=args.t5xxl, vae=args.vae,
                   backend=args.backend, low_memory=args.low_memory, progress=not args.quiet,
                   cache_dir=args.cache_dir, max_memory=args.max_memory):
        status = rec["status"]
        if status == "ok":
            ok += 1
        elif status == "skipped":
            skipped += 1
        else:
            failed += 1
            print(f"fluxmini batch: {rec['key']}: {rec['error']}", file=sys.stderr, flush=True)
    print(f"fluxmini batch: {ok} image(s) written, {skipped} already there, {failed} failed; "
          f"records in {os.path.join(args.output, RESULTS_FILE)}")
    return 1 if failed else 0


def add_parser(subparsers) -> None:
    """Register ``fluxmini batch`` on an argparse subparsers object."""
    from ..cli.common import add_cache_dir, add_max_memory  # here: the cli package imports this module
    b = subparsers.add_parser(
        "batch", help="generate every job of a JOBS.jsonl file, locally or on a Ray cluster (resumable)",
        description="Each line of JOBS.jsonl is a JSON job: a prompt plus any of seed, width, height, steps, "
                    "guidance, t5_length, compat, count (images with seeds seed, seed+1, ...). Writes "
                    "OUTDIR/<job index>_<seed>.png and OUTDIR/results.jsonl; a re-run skips finished images. "
                    "The options below set defaults for jobs that do not give a field.")
    b.add_argument("jobs", metavar="JOBS.jsonl", help="one JSON job per line (blank and # lines are skipped)")
    b.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created if needed)")
    b.add_argument("-m", "--model", required=True,
                   help="FLUX.1-mini GGUF file (with --ray: its path on every worker node)")
    b.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                   help="run on Ray (needs pip install \"fluxmini[ray]\"): the cluster at ADDRESS (e.g. auto, "
                        "HOST:6379), or RAY_ADDRESS, or a local Ray")
    b.add_argument("--workers", type=int, default=None, help="Ray workers, one model each (default: one per node)")
    b.add_argument("-t", "--threads", type=int, default=None,
                   help="CPU threads per model (local default: physical cores; Ray: a node's CPUs / its workers)")
    b.add_argument("-W", "--width", type=int, default=None, help="default width (512)")
    b.add_argument("-H", "--height", type=int, default=None, help="default height (512)")
    b.add_argument("--steps", type=int, default=None, help="default steps (20)")
    b.add_argument("--guidance", type=float, default=None, help="default guidance (3.5)")
    b.add_argument("-s", "--seed", type=int, default=None, help="default seed (42)")
    b.add_argument("--t5-length", "--t5_length", dest="t5_length", type=int, default=None,
                   help="default T5 tokens (512; 256 with --compat sd.cpp, 255 with llama-box)")
    b.add_argument("--compat", choices=["sd.cpp", "llama-box"], default=None, help="default compat mode")
    b.add_argument("-n", "--count", type=int, default=None, help="default images per job (1)")
    b.add_argument("--clip_l", "--clip-l", dest="clip_l", default=None, help="separate CLIP-L file")
    b.add_argument("--t5xxl", default=None, help="separate T5-XXL file")
    b.add_argument("--vae", default=None, help="separate VAE file")
    b.add_argument("--backend", default="cpu", help="cpu, cuda, metal or auto (default cpu)")
    add_max_memory(b)
    mem = b.add_mutually_exclusive_group()
    mem.add_argument("--low-memory", dest="low_memory", action="store_const", const=True, default=None,
                     help="keep only the text encoders or the transformer + VAE loaded at a time "
                          "(default locally)")
    mem.add_argument("--keep-weights", dest="low_memory", action="store_const", const=False,
                     help="keep every component loaded (default with --ray)")
    add_cache_dir(b)
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_batch)
