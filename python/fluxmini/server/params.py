"""Request fields of the OpenAI Images API (plus fluxmini's extras), checked before any work.

Plain Python (no FastAPI): every bad field raises :class:`ApiError` with the HTTP status and
the OpenAI error fields (``message``, ``type``, ``param``, ``code``). JSON bodies give typed
values; multipart forms (``/v1/images/edits``) give text, which :func:`from_form` converts first.
"""

from __future__ import annotations

import json

import math
from dataclasses import dataclass, field
from typing import Optional

#: largest ``n``, as the OpenAI API
MAX_N = 10
#: server-side cap on steps (the library takes up to 1000; a server should not run that long)
MAX_STEPS = 100
#: longest prompt in characters (DALL-E 3's limit; T5 reads at most t5_length tokens of it)
MAX_PROMPT_CHARS = 4000
#: most previews per image (OpenAI allows 0-3; previews are cheap here)
MAX_PARTIAL_IMAGES = 10
#: largest guidance accepted (FLUX.1's distilled guidance is used at 1-10)
MAX_GUIDANCE = 100.0

RESPONSE_FORMATS = ("b64_json", "url")
OUTPUT_FORMATS = ("png", "jpeg", "webp")

# OpenAI fields accepted and ignored: they steer features a FLUX model does not have.
IGNORED_FIELDS = frozenset({
    "quality", "style", "background", "moderation", "user", "safety_identifier", "input_fidelity",
    "complexity",
})
COMMON_FIELDS = frozenset({
    "prompt", "model", "n", "size", "response_format", "output_format", "output_compression", "stream",
    "partial_images", "seed", "steps", "guidance", "t5_length", "compat", "progress", "lora",
})
MAX_LORAS = 8
MAX_LORA_SCALE = 16.0
EDIT_FIELDS = COMMON_FIELDS | {"strength", "image", "image[]", "mask"}


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[dict] = None):
        # a lone surrogate (a JSON "\\ud800" escape in a field name, say) cannot be encoded
        # as UTF-8: escaped here, so the JSON answer can always be written
        message = _encodable(message)
        param = None if param is None else _encodable(param)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad(message: str, param: Optional[str] = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class ImageRequest:
    """A checked request: what the worker needs to make the images, and how to answer."""

    prompt: str
    n: int = 1
    width: Optional[int] = 512
    height: Optional[int] = 512
    seed: Optional[int] = None
    steps: int = 20
    guidance: float = 3.5
    t5_length: Optional[int] = None
    compat: Optional[str] = None
    strength: float = 0.75
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int = 100
    stream: bool = False
    partial_images: int = 0
    progress: bool = True  # fluxmini.progress events in a stream
    init_image: object = None  # PIL image (edits)
    # [(name, scale)] as sent (names of files in the server's --lora-dir); the app resolves them
    # into lora_paths [(path, scale)], which the worker applies for this request.
    loras: list = field(default_factory=list)
    lora_paths: list = field(default_factory=list)
    edit: bool = False
    generate_kwargs: dict = field(default_factory=dict)

    def kwargs(self, seed: int) -> dict:
        """Keyword arguments of :func:`fluxmini.pipeline.run` / ``FluxMini.generate`` for one image."""
        kw = dict(width=self.width, height=self.height, steps=self.steps, guidance=self.guidance, seed=seed,
                  compat=self.compat, t5_length=self.t5_length)
        if self.init_image is not None:
            kw.update(init_image=self.init_image, strength=self.strength)
        return kw


# --------------------------------------------------------------------------- field checks


def _int(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise bad(f"'{name}' must be an integer, got {_show(value)}", name, "invalid_type")
    if not lo <= value <= hi:
        raise bad(f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return value


def _real(value, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"'{name}' must be a number, got {_show(value)}", name, "invalid_type")
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise bad(f"'{name}' must be between {lo:g} and {hi:g}, got {value!r}", name)
    return value


def _str(value, name: str) -> str:
    if not isinstance(value, str):
        raise bad(f"'{name}' must be a string, got {_show(value)}", name, "invalid_type")
    return value


def _choice(value, name: str, choices) -> str:
    value = _str(value, name)
    if value not in choices:
        raise bad(f"'{name}' must be one of {', '.join(map(repr, choices))}, got {value!r}", name)
    return value


def _show(value) -> str:
    text = repr(value)
    kind = "null" if value is None else type(value).__name__
    return f"{kind} {text[:40]}" if value is not None else kind


def parse_size(value, max_size: int):
    """``"WxH"`` (multiples of 16, from 16 to max_size) -> (W, H); ``"auto"`` or None -> None."""
    if value is None or value == "auto":
        return None
    text = _str(value, "size")
    parts = text.lower().split("x")
    # ASCII digits only: str.isdigit() also accepts '\u00b2' and the like, which int() refuses
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 6 for p in parts):
        raise bad(f"'size' must look like '512x512' (WIDTHxHEIGHT), got {text[:40]!r}", "size")
    w, h = int(parts[0]), int(parts[1])
    for side in (w, h):
        if side % 16 or not 16 <= side <= max_size:
            raise bad(f"'size' sides must be multiples of 16 from 16 to {max_size}, got {text!r}", "size")
    return w, h


def from_json(body, *, max_size: int, edit: bool = False) -> ImageRequest:
    """Check a JSON body of ``/v1/images/generations`` (model is checked by the caller)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_json")
    allowed = EDIT_FIELDS if edit else COMMON_FIELDS
    for key in body:
        if key not in allowed and key not in IGNORED_FIELDS:
            raise bad(f"unrecognized request argument supplied: {str(key)[:60]!r}", str(key)[:60],
                      "unknown_parameter")
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt", "missing_required_parameter")
    req = ImageRequest(prompt=_str(body["prompt"], "prompt"), edit=edit)
    if len(req.prompt) > MAX_PROMPT_CHARS:
        raise bad(f"'prompt' is too long: {len(req.prompt)} characters, at most {MAX_PROMPT_CHARS}", "prompt",
                  "string_above_max_length")
    if "\x00" in req.prompt:
        raise bad("'prompt' must not contain NUL characters", "prompt")

    def get(name):
        v = body.get(name)
        return None if v is None else v

    if get("n") is not None:
        req.n = _int(body["n"], "n", 1, MAX_N)
    size = parse_size(get("size"), max_size)
    if size is not None:
        req.width, req.height = size
    elif edit:
        req.width = req.height = None  # the input image's size (see app._edit_size)
    else:  # 512 unless the server's --max-size is smaller
        req.width = req.height = min(512, max_size)
    if get("response_format") is not None:
        req.response_format = _choice(body["response_format"], "response_format", RESPONSE_FORMATS)
    if get("output_format") is not None:
        req.output_format = _choice(body["output_format"], "output_format", OUTPUT_FORMATS)
    if get("output_compression") is not None:
        req.output_compression = _int(body["output_compression"], "output_compression", 0, 100)
    if get("stream") is not None:
        if not isinstance(body["stream"], bool):
            raise bad(f"'stream' must be true or false, got {_show(body['stream'])}", "stream", "invalid_type")
        req.stream = body["stream"]
    if get("progress") is not None:
        if not isinstance(body["progress"], bool):
            raise bad(f"'progress' must be true or false, got {_show(body['progress'])}", "progress", "invalid_type")
        req.progress = body["progress"]
    if get("partial_images") is not None:
        req.partial_images = _int(body["partial_images"], "partial_images", 0, MAX_PARTIAL_IMAGES)
    if get("seed") is not None:
        req.seed = _int(body["seed"], "seed", 0, (1 << 64) - 1)
    if get("steps") is not None:
        req.steps = _int(body["steps"], "steps", 1, MAX_STEPS)
    if get("guidance") is not None:
        req.guidance = _real(body["guidance"], "guidance", 0.0, MAX_GUIDANCE)
    if get("t5_length") is not None:
        req.t5_length = _int(body["t5_length"], "t5_length", 1, 512)
    if get("compat") is not None:
        v = _str(body["compat"], "compat")
        if v not in ("sd.cpp", "llama-box", "none", ""):
            raise bad(f"'compat' must be 'sd.cpp', 'llama-box' or null, got {v[:40]!r}", "compat")
        req.compat = v if v in ("sd.cpp", "llama-box") else None
    if get("strength") is not None:
        req.strength = _real(body["strength"], "strength", 0.0, 1.0)
    if get("lora") is not None:
        req.loras = _loras(body["lora"])
    if req.seed is not None and req.seed + req.n - 1 >= 1 << 64:
        raise bad(f"'seed' + n - 1 must stay below 2**64 (seeds seed, seed+1, ... are used), got seed {req.seed}",
                  "seed")
    return req


def _loras(value) -> list:
    """``[{"path_or_name": NAME, "scale": 0.8}, ...]`` (also "name"; scale default 1) -> [(NAME, scale)]."""
    if not isinstance(value, list):
        raise bad(f"'lora' must be a list of {{\"path_or_name\": NAME, \"scale\": NUMBER}} objects, got {_show(value)}",
                  "lora", "invalid_type")
    if len(value) > MAX_LORAS:
        raise bad(f"'lora' lists {len(value)} LoRAs; at most {MAX_LORAS} at once", "lora")
    out = []
    for item in value:
        if not isinstance(item, dict) or set(item) - {"path_or_name", "name", "scale"}:
            raise bad("each 'lora' entry must be an object with 'path_or_name' (a file name in the server's LoRA "
                      f"folder) and optionally 'scale', got {_show(item)}", "lora", "invalid_type")
        name = item.get("path_or_name", item.get("name"))
        if not isinstance(name, str) or not name:
            raise bad("each 'lora' entry needs 'path_or_name': a file name in the server's LoRA folder", "lora")
        scale = 1.0 if item.get("scale") is None else _real(item["scale"], "lora scale", -MAX_LORA_SCALE,
                                                              MAX_LORA_SCALE)
        out.append((name[:200], scale))
    return out


# multipart fields arrive as text; these are converted to the JSON types before the same checks
_FORM_INTS = ("n", "output_compression", "partial_images", "seed", "steps", "t5_length")
_FORM_REALS = ("guidance", "strength")


def from_form(fields: dict, *, max_size: int) -> ImageRequest:
    """Check the text fields of a multipart ``/v1/images/edits`` body (files are handled by the caller)."""
    body = {}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise bad(f"'{key}' must be a text field, not a file", key, "invalid_type")
        if key in _FORM_INTS:
            try:
                body[key] = int(value.strip())
            except ValueError:
                raise bad(f"'{key}' must be an integer, got {value[:40]!r}", key, "invalid_type") from None
        elif key in _FORM_REALS:
            try:
                body[key] = float(value.strip())
            except ValueError:
                raise bad(f"'{key}' must be a number, got {value[:40]!r}", key, "invalid_type") from None
        elif key == "lora":
            try:
                body[key] = json.loads(value)
            except (ValueError, RecursionError):  # RecursionError: nested too deeply
                raise bad("'lora' must be a JSON list of {\"path_or_name\": NAME, \"scale\": NUMBER} objects",
                          key, "invalid_type") from None
        elif key in ("stream", "progress"):
            v = value.strip().lower()
            if v not in ("true", "false", "1", "0"):
                raise bad(f"'{key}' must be true or false, got {value[:40]!r}", key, "invalid_type")
            body[key] = v in ("true", "1")
        else:
            body[key] = value
    return from_json(body, max_size=max_size, edit=True)
