"""``fluxmini quantize``: re-encode a model file with other types."""

from __future__ import annotations

from .. import convert as conv
from ..inventory import LAYOUT_PREFIXES
from .type_flags import add_type_flags


def run(args) -> int:
    res = conv.quantize(args.input, args.output, args.type, clip_l_type=args.clip_l_type,
                        t5xxl_type=args.t5xxl_type, vae_type=args.vae_type, pure=args.pure,
                        variant=args.variant, layout=args.layout, progress=not args.quiet)
    print(f"wrote {res.path}: {len(res.tensors)} tensors, {res.size:,} bytes")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="re-encode a model file with other types")
    p.add_argument("input", help="input .gguf (all four components)")
    p.add_argument("output", help="output .gguf")
    p.add_argument("--layout", choices=tuple(LAYOUT_PREFIXES), default=None, help="default: the input's")
    add_type_flags(p, "q4_0")
    p.set_defaults(func=run)
