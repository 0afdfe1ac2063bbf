"""``fluxmini convert``: original weights to one GGUF file."""

from __future__ import annotations

from .. import convert as conv
from ..inventory import LAYOUT_PREFIXES
from .type_flags import add_type_flags


def run(args) -> int:
    res = conv.convert(args.output, diffusion=args.diffusion_model, clip_l=args.clip_l, t5xxl=args.t5xxl,
                       vae=args.vae, model=args.model, layout=args.layout, type=args.type,
                       clip_l_type=args.clip_l_type, t5xxl_type=args.t5xxl_type, vae_type=args.vae_type,
                       pure=args.pure, variant=args.variant, keep_t5_duplicate=args.keep_t5_duplicate,
                       progress=not args.quiet)
    print(f"wrote {res.path}: {len(res.tensors)} tensors, {res.size:,} bytes")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert FLUX.1-mini weights to one GGUF file",
                              description=conv.convert.__doc__.split("\n\n")[0])
    p.add_argument("--diffusion-model", dest="diffusion_model", help="flux-mini transformer (BFL or diffusers)")
    p.add_argument("--clip_l", "--clip-l", dest="clip_l", help="CLIP-L text encoder")
    p.add_argument("--t5xxl", dest="t5xxl", help="T5-XXL encoder")
    p.add_argument("--vae", dest="vae", help="VAE (BFL ae.safetensors or diffusers)")
    p.add_argument("-m", "--model", dest="model", help="all-in-one file for the components not given")
    p.add_argument("-o", "--output", required=True, help="output .gguf")
    p.add_argument("--layout", choices=tuple(LAYOUT_PREFIXES), default="gpustack",
                   help="tensor names: gpustack's (llama-box, fluxmini) or upstream sd.cpp's")
    p.add_argument("--keep-t5-duplicate", dest="keep_t5_duplicate", action="store_true",
                   help="also write T5's encoder.embed_tokens.weight (as gpustack's files do)")
    add_type_flags(p, "f16")
    p.set_defaults(func=run)
