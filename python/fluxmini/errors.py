"""Exception types of fluxmini.

Every error a user can cause (bad file, bad shape, bad argument) is a FluxMiniError.
Subclasses also derive from the fitting builtin so ``except ValueError`` keeps working.
The C++ core raises the same classes (they are registered with the extension module).
"""


class FluxMiniError(Exception):
    """Base class of every error fluxmini raises on purpose."""


class FluxMiniValueError(FluxMiniError, ValueError):
    """A bad argument, size, prompt or tensor shape."""


class FluxMiniFileError(FluxMiniError, OSError):
    """A model file is missing, unreadable, truncated or malformed."""


class FluxMiniRuntimeError(FluxMiniError, RuntimeError):
    """The engine could not do what was asked (backend missing, out of memory, ...)."""


class Cancelled(FluxMiniError):
    """A generation was cancelled by its callback or by Ctrl-C."""

