"""Options that several commands share."""

from __future__ import annotations


def add_component_files(p) -> None:
    """--clip_l / --t5xxl / --vae: split component files next to the main model file."""
    p.add_argument("--clip_l", "--clip-l", dest="clip_l", default=None, help="separate CLIP-L file")
    p.add_argument("--t5xxl", default=None, help="separate T5-XXL file")
    p.add_argument("--vae", default=None, help="separate VAE file")


def add_cache_dir(p) -> None:
    """--cache-dir: the prompt-embedding cache's folder (FluxMini.load's cache_dir)."""
    p.add_argument("--cache-dir", dest="cache_dir", default=None, metavar="DIR",
                   help="keep prompt embeddings in DIR between runs (created if needed, at most 1 GiB, least "
                        "recently used first out; delete the folder to clear it): a repeated prompt skips "
                        "text encoding and never loads T5. Default: in memory only")
