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
def _max_memory(text: str) -> int:
    import argparse

    from ..errors import FluxMiniValueError
    from ..validation import max_memory_arg

    try:
        return max_memory_arg(text, "--max-memory")
    except FluxMiniValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_max_memory(p) -> None:
    """--max-memory SIZE: the engine's memory budget (FluxMini.load(max_memory=))."""
    p.add_argument("--max-memory", dest="max_memory", type=_max_memory, default=None, metavar="SIZE",
                   help="memory budget, MiB or with a unit (1024, 1536M, 1.5G); default: the cgroup limit or "
                        "the available memory. Under a tight budget weights are dropped as soon as they were "
                        "used, compute buffers are freed between stages and the VAE tiles to fit")
