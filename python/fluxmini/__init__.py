"""fluxmini: FLUX.1-mini text-to-image on ggml, from gpustack's GGUF files, without torch."""

from .errors import (Cancelled, FluxMiniError, FluxMiniFileError, FluxMiniRuntimeError,
                     FluxMiniValueError)
from .imageio import read_metadata
from .model import CancelToken, FluxMini
from .sampling import sigmas

__version__ = "0.1.0"

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
