"""The ``fluxmini`` command line.

One module per command; each exposes ``add_parser(subparsers)``, which adds its sub-parser and
sets ``func`` (called with the parsed arguments, returns the exit status). To add a command,
import its module here and put it in ``COMMANDS`` (the order is the order of ``fluxmini --help``).
Imports are not guarded: a command whose module does not import breaks the whole command line
loudly rather than vanishing from it.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import Cancelled, FluxMiniError
from . import batch, convert, demo, generate, info, make_random, quantize, serve

COMMANDS = [info, generate, demo, batch, serve, convert, quantize, make_random]


def build_parser(commands=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluxmini", description="FLUX.1-mini text-to-image on ggml")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS if commands is None else commands:
        command.add_parser(sub)
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
