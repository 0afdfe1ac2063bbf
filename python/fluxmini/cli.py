"""The `fluxmini` command line: info, generate, convert, quantize, make-random."""

from __future__ import annotations

import argparse
import sys

from .errors import Cancelled, FluxMiniError


def _cmd_info(args) -> int:
    from .model import FluxMini

    model = FluxMini.load(args.model, clip_l=args.clip_l, t5xxl=args.t5xxl, vae=args.vae,
                          backend=args.backend, components=[])
    print(model.info_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluxmini", description="FLUX.1-mini text-to-image on ggml")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="show the components, tensor types and hyper-parameters of a model")
    info.add_argument("model", help="FLUX.1-mini GGUF file")
    info.add_argument("--clip_l", "--clip-l", dest="clip_l", help="separate CLIP-L file")
    info.add_argument("--t5xxl", help="separate T5-XXL file")
    info.add_argument("--vae", help="separate VAE file")
    info.add_argument("--backend", default="cpu")
    info.set_defaults(func=_cmd_info)

    try:
        from .convert import add_convert_subcommands
    except ImportError:
        add_convert_subcommands = None
    if add_convert_subcommands is not None:
        add_convert_subcommands(sub)
    try:
        from .pipeline import add_generate_subcommand
    except ImportError:
        add_generate_subcommand = None
    if add_generate_subcommand is not None:
        add_generate_subcommand(sub)
    from .batch.command import add_parser as add_batch_parser

    add_batch_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Cancelled:
        print("fluxmini: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("fluxmini: interrupted", file=sys.stderr)
        return 130
    except FluxMiniError as e:
        print(f"fluxmini: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
