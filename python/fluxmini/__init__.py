"""fluxmini: FLUX.1-mini text-to-image on ggml, from gpustack's GGUF files, without torch."""

from ._version import __version__  # noqa: F401 (fluxmini.__version__)
from .errors import (Cancelled, FluxMiniError, FluxMiniFileError, FluxMiniRuntimeError,
                     FluxMiniValueError)
from .imageio import read_metadata
from .model import CancelToken, FluxMini
from .sampling import sigmas

__all__ = [
    "FluxMini",
    "CancelToken",
    "FluxMiniError",
    "FluxMiniValueError",
    "FluxMiniFileError",
    "FluxMiniRuntimeError",
    "Cancelled",
    "read_metadata",
    "sigmas",
]
