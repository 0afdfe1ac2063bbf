"""``fluxmini batch``: many prompts, resumable, locally or on a Ray cluster (fluxmini.batch)."""

from ..batch.command import add_parser

__all__ = ["add_parser"]
