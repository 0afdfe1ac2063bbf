"""Images in and out: pixel conversions (docs/MODEL.md §5.4), PNG text metadata.

* :func:`to_uint8` / :func:`array_to_image`: a decoded VAE image ``[3, H, W]`` (about [-1, 1])
  to RGB bytes as stable-diffusion.cpp and BFL do it: ``v = (x + 1) / 2`` clamped to [0, 1],
  ``byte = trunc(v * 255)``, every step in float32.
* :func:`image_to_array`: RGB bytes to the VAE's input ``[3, H, W]``: ``bytes / 255 * 2 - 1``
  in float32.
* :func:`save_png` writes the generation parameters as PNG text chunks (``tEXt``, or ``iTXt``
  for text outside Latin-1) and :func:`read_metadata` reads them back with their Python types.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .errors import FluxMiniFileError, FluxMiniValueError

__all__ = [
    "to_uint8",
    "array_to_image",
    "image_to_array",
    "load_image",
    "metadata_text",
    "save_png",
    "read_metadata",
    "METADATA_KEYS",
]

# Metadata keys fluxmini writes and the type each is restored to by read_metadata.
# "compat" is written as "none" for the reference behaviour and read back as None.
_INT_KEYS = ("seed", "steps", "width", "height", "t5_length", "start_step")
_FLOAT_KEYS = ("guidance", "strength")
_STR_KEYS = ("prompt", "model", "compat", "sampler", "schedule", "mode", "noise", "init_image",
             "fluxmini_version")
METADATA_KEYS = _STR_KEYS[:1] + _INT_KEYS + _FLOAT_KEYS + _STR_KEYS[1:]


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pillow is a dependency; only a broken install gets here
        raise ImportError(f"fluxmini needs Pillow for images ({e}); pip install pillow") from e
    return Image


def _decoded(path: str, use):
    """use(image) of the fully decoded image file at path. Pillow's decoders raise many exception
    types on damaged files (OSError, SyntaxError, ValueError, EOFError, struct.error, ...) and
    DecompressionBombError on huge dimensions: each becomes a FluxMiniFileError."""
    Image = _pil()
    try:
        with Image.open(path) as f:
            f.load()
            return use(f)
    except Image.DecompressionBombError as e:
        raise FluxMiniFileError(f"cannot read the image {path}: it is too large to decode safely ({e})") from None
    except Exception as e:  # noqa: BLE001 (only the decoder runs here)
        raise FluxMiniFileError(f"cannot read the image {path}: {e or type(e).__name__}") from None


# --------------------------------------------------------------------------- pixels


def to_uint8(x, rounded: bool = False) -> np.ndarray:
    """``[3, H, W]`` float image (about [-1, 1]) -> ``[H, W, 3]`` uint8 (docs/MODEL.md §5.4).

    ``(x + 1) / 2``, clamped to [0, 1], times 255, truncated (``rounded``: plus 0.5 first, as
    upstream stable-diffusion.cpp does); in float32 like sd.cpp. NaN becomes 0.
    """
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 3 or a.shape[0] != 3:
        raise FluxMiniValueError(f"image array must have shape [3, H, W], got {a.shape}")
    v = (a + np.float32(1.0)) * np.float32(0.5)
    v = np.nan_to_num(v, nan=0.0, posinf=1.0, neginf=0.0)
    np.clip(v, np.float32(0.0), np.float32(1.0), out=v)
    v *= np.float32(255.0)
    if rounded:
        v += np.float32(0.5)
    return np.ascontiguousarray(v.astype(np.uint8).transpose(1, 2, 0))


def array_to_image(x, rounded: bool = False):
    """``[3, H, W]`` float image -> an RGB ``PIL.Image.Image`` (see :func:`to_uint8`)."""
    return _pil().fromarray(to_uint8(x, rounded))


def image_to_array(image) -> np.ndarray:
    """An image (PIL, path, or uint8 ``[H, W, 3]`` array) -> float32 ``[3, H, W]`` in [-1, 1].

    ``bytes / 255 * 2 - 1`` in float32 (docs/MODEL.md §5.4). Other modes (RGBA, L, P, ...) are
    converted to RGB first (alpha is dropped).
    """
    img = load_image(image)
    b = np.asarray(img, dtype=np.uint8)
    a = b.astype(np.float32) / np.float32(255.0)
    a = a * np.float32(2.0) - np.float32(1.0)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def load_image(image):
    """An RGB ``PIL.Image.Image`` from a PIL image, a path, or a uint8 ``[H, W, 3]`` array."""
    Image = _pil()
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FluxMiniFileError(f"image file not found: {path}")
        img = _decoded(path, lambda f: f.copy())
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise FluxMiniValueError(
                f"an image array must be uint8 of shape [H, W, 3], got {image.dtype} {image.shape}")
        img = Image.fromarray(np.ascontiguousarray(image))
    else:
        raise FluxMiniValueError(
            f"expected a PIL image, a path or a uint8 [H, W, 3] array, got {type(image).__name__}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


# --------------------------------------------------------------------------- metadata


def _text_value(key: str, value) -> str:
    if key == "compat" and value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)  # shortest round-trip text
    return str(value)


def metadata_text(metadata: dict) -> dict:
    """The text form of a metadata dict (None values are left out, except ``compat``)."""
    out = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not k or len(k) > 79:
            raise FluxMiniValueError(f"PNG text keys must be 1-79 characters, got {k!r}")
        if v is None and k != "compat":
            continue
        out[k] = _text_value(k, v)
    return out


def _restore(key: str, text: str):
    try:
        if key in _INT_KEYS:
            return int(text)
        if key in _FLOAT_KEYS:
            return float(text)
    except ValueError:
        return text  # not written by fluxmini: keep the text
    if key == "compat" and text == "none":
        return None
    return text


def save_png(image, path, metadata: Optional[dict] = None) -> None:
    """Write ``image`` as a PNG with ``metadata`` as text chunks.

    path: a file path, or a binary file object (e.g. ``io.BytesIO``; the same bytes as a file).
    metadata: a dict (values are written as text); by default the metadata fluxmini attached
    to an image it generated (:func:`read_metadata` of the image).
    """
    from PIL.PngImagePlugin import PngInfo

    img = load_image(image)
    meta = read_metadata(image) if metadata is None else metadata
    info = PngInfo()
    for k, v in metadata_text(meta).items():
        info.add_text(k, v)  # Pillow switches to iTXt for text outside Latin-1
    target = path if hasattr(path, "write") else os.fspath(path)
    try:
        img.save(target, format="PNG", pnginfo=info)
    except OSError as e:
        raise FluxMiniFileError(f"cannot write {target}: {e}") from None


def read_metadata(source) -> dict:
    """The text metadata of a PNG (path or PIL image) as a dict, with fluxmini's types restored.

    Keys fluxmini writes: ``prompt``, ``seed``, ``steps``, ``guidance``, ``width``, ``height``,
    ``model``, ``compat`` (None, ``"sd.cpp"`` or ``"llama-box"``), ``sampler``, ``schedule``, ``t5_length``,
    ``mode`` (``"txt2img"``/``"img2img"``), ``noise`` (``"seed"`` or ``"custom"``),
    ``fluxmini_version``; for img2img also ``strength``, ``start_step`` and ``init_image``.
    Numbers come back as int/float; other text chunks of the file are returned as strings.
    An image without text gives ``{}``.
    """
    Image = _pil()
    if isinstance(source, Image.Image):
        return _metadata_of(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FluxMiniFileError(f"image file not found: {path}")
        return _decoded(path, _metadata_of)  # text chunks after the image data are read by load()
    raise FluxMiniValueError(f"read_metadata needs a path or a PIL image, got {type(source).__name__}")


def _metadata_of(img) -> dict:
    text = getattr(img, "text", None)  # PNG files: every tEXt/zTXt/iTXt chunk
    if text is None:
        text = {k: v for k, v in img.info.items() if isinstance(k, str) and isinstance(v, str)}
    return {k: _restore(k, str(v)) for k, v in text.items()}
