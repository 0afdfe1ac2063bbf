"""``fluxmini info``: the components, tensor types and hyper-parameters of a model."""

from __future__ import annotations

from ..model import FluxMini
from .common import add_component_files


def run(args) -> int:
    model = FluxMini.load(args.model, clip_l=args.clip_l, t5xxl=args.t5xxl, vae=args.vae,
                          backend=args.backend, components=[])
    print(model.info_table())
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="show the components, tensor types and hyper-parameters of a model")
    p.add_argument("model", help="FLUX.1-mini GGUF file")
    add_component_files(p)
    p.add_argument("--backend", default="cpu")
    p.set_defaults(func=run)
