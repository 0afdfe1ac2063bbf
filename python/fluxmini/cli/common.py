"""Options that several commands share."""

from __future__ import annotations


def add_component_files(p) -> None:
    """--clip_l / --t5xxl / --vae: split component files next to the main model file."""
    p.add_argument("--clip_l", "--clip-l", dest="clip_l", default=None, help="separate CLIP-L file")
    p.add_argument("--t5xxl", default=None, help="separate T5-XXL file")
    p.add_argument("--vae", default=None, help="separate VAE file")
