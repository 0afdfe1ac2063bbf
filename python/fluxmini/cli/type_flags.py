"""The type options of ``convert`` and ``quantize``."""

from __future__ import annotations

from ..convert import TYPE_NAMES, VARIANTS


def add_type_flags(p, default_type: str) -> None:
    p.add_argument("--type", default=default_type, type=str.lower, choices=TYPE_NAMES,
                   help=f"type of the big weights (default {default_type}); with a block type CLIP-L and the VAE "
                        "stay F16 unless --pure, as in gpustack's files")
    p.add_argument("--variant", default=None, help="one of gpustack's variants instead of --type: "
                   + ", ".join(VARIANTS))
    p.add_argument("--pure", action="store_true", help="quantize CLIP-L like the rest (gpustack's pure-* files)")
    p.add_argument("--clip-l-type", dest="clip_l_type", type=str.lower, choices=TYPE_NAMES, default=None)
    p.add_argument("--t5xxl-type", dest="t5xxl_type", type=str.lower, choices=TYPE_NAMES, default=None)
    p.add_argument("--vae-type", dest="vae_type", type=str.lower, choices=TYPE_NAMES, default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
