"""Hugging Face references: ``owner/repo:QUANT`` to a local GGUF path (download or cache)."""

from __future__ import annotations

import os
import re

from .errors import FluxMiniFileError, FluxMiniValueError

_HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*):(?P<quant>[A-Za-z0-9_.-]+)$")


def is_hub_reference(ref: str) -> bool:
    """True for ``owner/repo:QUANT`` (or ``owner/repo:file.gguf``) strings."""
    return isinstance(ref, str) and _HUB_REF.match(ref) is not None


def hub_filename(repo: str, quant: str) -> str:
    """The GGUF file name a ``repo:QUANT`` reference means, in gpustack's naming.

    ``gpustack/FLUX.1-mini-GGUF`` + ``Q4_0`` -> ``FLUX.1-mini-Q4_0.gguf``; ``pure-q8_0`` ->
    ``FLUX.1-mini-pure-Q8_0.gguf``; ``F16`` -> ``...-FP16.gguf``; a name ending in ``.gguf`` is
    taken as the file name itself.
    """
    if quant.lower().endswith(".gguf"):
        return quant
    base = re.sub(r"[-_.]gguf$", "", repo.split("/", 1)[1], flags=re.IGNORECASE)
    pure = quant.lower().startswith("pure-")
    q = quant[5:] if pure else quant
    q = q.upper()
    if q == "F16":
        q = "FP16"
    return f"{base}-{'pure-' if pure else ''}{q}.gguf"


def _manual_download_help(repo: str, filename: str) -> str:
    return (f"download it by hand from https://huggingface.co/{repo}/resolve/main/{filename} "
            f"(or run `huggingface-cli download {repo} {filename} --local-dir .`, `hf download` in "
            f"huggingface_hub 1.0 and later) and pass its path "
            f"with -m ./{filename}")


def resolve_model(ref) -> str:
    """A model argument as a local path: an existing file as is, ``owner/repo:QUANT`` through
    ``huggingface_hub`` (download or local cache).

    Raises:
        FluxMiniFileError: not a file and not a reference, or the reference cannot be fetched
            (``huggingface_hub`` missing, offline, no such file); the message says how to
            download the file by hand.
    """
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str):
        raise FluxMiniValueError(f"model must be a path or owner/repo:QUANT, got {type(ref).__name__}")
    if os.path.exists(ref) or not is_hub_reference(ref):
        if not os.path.isfile(ref):
            raise FluxMiniFileError(
                f"model file not found: {ref} (give a GGUF path or a Hugging Face reference such as "
                "gpustack/FLUX.1-mini-GGUF:Q4_0)")
        return ref
    m = _HUB_REF.match(ref)
    repo, filename = m.group("repo"), hub_filename(m.group("repo"), m.group("quant"))
    try:
        import huggingface_hub
    except ImportError:
        raise FluxMiniFileError(
            f"{ref} is a Hugging Face reference, which needs the huggingface_hub package "
            f"(pip install 'fluxmini[hub]'); or {_manual_download_help(repo, filename)}") from None
    try:
        return huggingface_hub.hf_hub_download(repo_id=repo, filename=filename)
    except Exception as e:  # offline, no such repo/file, HTTP errors: all mean the same to the user
        reason = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
        raise FluxMiniFileError(
            f"could not get {filename} from https://huggingface.co/{repo} ({reason}); "
            f"{_manual_download_help(repo, filename)}") from None


