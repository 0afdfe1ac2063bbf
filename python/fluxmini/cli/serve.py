"""``fluxmini serve``: the OpenAI-compatible image server (fluxmini.server; needs the [server] extra,
imported only when the command runs)."""

from ..server.command import add_parser

__all__ = ["add_parser"]
