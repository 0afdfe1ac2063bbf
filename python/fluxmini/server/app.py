"""The FastAPI application: OpenAI Images API endpoints, the web page, health and models.

Every answer that is not an image is JSON; every error is OpenAI's error object
``{"error": {"message", "type", "param", "code"}}``. Client mistakes are 4xx with a message
saying what to change; a failure of the server itself is a 500 whose details go to the log,
never into the response.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import sys
import time
import traceback
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import params
from .params import ApiError, ImageRequest, bad
from .worker import Job, QueueFull, Worker

STATIC = Path(__file__).resolve().parent / "static"
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# the pipeline warns when it resizes an init image; the server resizes on purpose (edits' size)
warnings.filterwarnings("ignore", message="fluxmini: the init image is", category=UserWarning)


def _log(msg: str) -> None:
    print(f"fluxmini serve: {msg}", file=sys.stderr, flush=True)


class ImageStore:
    """Images answered as ``url``: kept in memory for ``ttl`` seconds, at most ``capacity`` of them
    (the oldest go first). Names are random 128-bit tokens: knowing one is the permission."""

    def __init__(self, ttl: float, capacity: int):
        self.ttl = ttl
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items:
            name, (_, _, expires) = next(iter(self._items.items()))
            if expires > now and len(self._items) <= self.capacity:
                break
            self._items.popitem(last=False)

    def put(self, data: bytes, fmt: str) -> str:
        name = f"{secrets.token_urlsafe(16)}.{fmt}"
        self._items[name] = (data, MIME[fmt], time.monotonic() + self.ttl)
        self._expire()
        return name

    def get(self, name: str):
        self._expire()
        return self._items.get(name)


def decode_image(data: bytes, max_pixels: int):
    """An uploaded image as an RGB PIL image, or a 400 saying why not."""
    from PIL import Image

    if not data:
        raise bad("'image' is empty", "image", "invalid_image")
    try:
        with Image.open(io.BytesIO(data)) as f:
            w, h = f.size
            if w * h > max_pixels:
                raise bad(f"'image' is {w}x{h} pixels; at most {max_pixels} pixels are accepted", "image",
                          "image_too_large")
            f.load()
            img = f.convert("RGB")
    except ApiError:
        raise
    except Image.DecompressionBombError:  # Pillow's own cap, below ours only if max_size is huge
        raise bad(f"'image' has too many pixels; at most {max_pixels} are accepted", "image",
                  "image_too_large") from None
    except Exception as e:  # Pillow raises many types for bad files; all mean "not an image"
        raise bad(f"'image' is not an image this server can read (PNG, JPEG or WebP): "
                  f"{type(e).__name__}: {str(e)[:120]}", "image", "invalid_image") from None
    return img


def edit_size(img_size, max_size: int):
    """The output size of an edit without ``size``: the image's own size when it is a multiple
    of 16 within max_size, else that size scaled to fit and rounded to multiples of 16."""
    w0, h0 = img_size
    scale = min(1.0, max_size / max(w0, h0))
    w = max(16, min(max_size, int(w0 * scale) // 16 * 16))
    h = max(16, min(max_size, int(h0 * scale) // 16 * 16))
    return w, h


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


LORA_SUFFIXES = (".safetensors", ".gguf")


def resolve_loras(lora_dir: Optional[str], loras: list) -> list:
    """[(name, scale)] -> [(path, scale)] for names of files inside ``lora_dir`` only: a plain file
    name (with or without its .safetensors/.gguf suffix), never a path; links leading out of the
    folder are refused too."""
    if not loras:
        return []
    if not lora_dir:
        raise bad("this server takes no LoRAs (start it with --lora-dir DIR to offer the LoRA files in DIR)",
                  "lora", "unsupported_parameter")
    root = os.path.realpath(lora_dir)
    out = []
    for name, scale in loras:
        if ("/" in name or "\\" in name or name.startswith(".") or "\x00" in name or ":" in name):
            raise bad(f"LoRA {name[:60]!r}: give the name of a file in the server's LoRA folder, not a path",
                      "lora")
        for cand in [name] + [name + s for s in LORA_SUFFIXES if not name.endswith(s)]:
            path = os.path.realpath(os.path.join(root, cand))
            if os.path.dirname(path) == root and cand.endswith(LORA_SUFFIXES) and os.path.isfile(path):
                out.append((path, scale))
                break
        else:
            raise bad(f"no LoRA named {name[:60]!r} in the server's LoRA folder", "lora", "lora_not_found")
    return out


def create_app(model, *, model_id: str, api_key: Optional[str] = None, max_queue: int = 8, max_size: int = 1024,
               max_body_bytes: int = 20 << 20, cors_origins: Sequence[str] = (), url_ttl: float = 600.0,
               url_capacity: int = 64, runner=None, lora_dir: Optional[str] = None) -> FastAPI:
    """The server's ASGI app around a loaded :class:`fluxmini.FluxMini` (one worker thread).

    model_id: the name clients send as ``model``. api_key: required as ``Authorization: Bearer``
    on /v1 routes when set. max_queue: waiting requests beyond the running one (then 429).
    max_size: largest width/height. max_body_bytes: largest request body (then 413).
    cors_origins: origins allowed by CORS (none by default). url_ttl / url_capacity: how long
    and how many ``url`` images are kept. runner: replaces ``fluxmini.pipeline.run`` (tests).
    lora_dir: the folder whose LoRA files requests may name in ``lora`` (None: no LoRAs).
    """
    from contextlib import asynccontextmanager

    worker = Worker(model, max_queue, runner=runner, log=_log)
    store = ImageStore(url_ttl, url_capacity)
    max_pixels = (4 * max_size) ** 2
    model_file = os.path.basename((getattr(model, "paths", None) or {}).get("model") or "") or None
    created = int(time.time())
    page = (STATIC / "index.html").read_bytes()

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="fluxmini", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.worker = worker
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg, code = f"no such route: {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            msg, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            msg, code = str(exc.detail)[:200], None
        err = ApiError(exc.status_code, msg, code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(bad("invalid request").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        _log(f"error on {request.method} {request.url.path}:\n" + traceback.format_exc())
        err = ApiError(500, "internal server error (see the server's log)", code="server_error")
        return JSONResponse(err.body(), status_code=500)

    # ------------------------------------------------------------------ helpers
    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the "
                                "key the server was started with (--api-key)", code="invalid_api_key")

    def check_model(name) -> None:
        if name is None:
            return
        if not isinstance(name, str):
            raise bad("'model' must be a string", "model", "invalid_type")
        if name != model_id:
            raise ApiError(404, f"the model {name[:80]!r} does not exist here; this server serves {model_id!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.isdigit()):  # isdigit() alone takes '\u00b2', int() does not
                raise bad("bad Content-Length header")
            if int(length) > max_body_bytes:
                raise ApiError(413, f"the request body is {int(length)} bytes; at most {max_body_bytes} are "
                                    "accepted", code="request_too_large")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_body_bytes:
                raise ApiError(413, f"the request body is larger than {max_body_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        body = b"".join(chunks)
        request._body = body  # Starlette's form parser reads the body from here
        return body

    async def wait_disconnect(request: Request) -> None:
        # the body is read: the next message the server gives is the client going away
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    def submit(req: ImageRequest):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            worker.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {worker.max_queue} requests wait already; retry in "
                                f"{e.retry_after} s", type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(e.retry_after)}) from None
        return job, events

    async def answer(request: Request, req: ImageRequest):
        job, events = submit(req)
        if req.stream:
            return StreamingResponse(stream(job, events, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        images = []
        gone = asyncio.ensure_future(wait_disconnect(request))
        try:
            while True:
                get = asyncio.ensure_future(events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    worker.cancel(job)
                    return Response(status_code=499)  # nobody reads it
                ev = get.result()
                kind = ev["kind"]
                if kind == "image":
                    images.append(ev)
                elif kind == "done":
                    break
                elif kind == "error":
                    raise ev["error"]
                elif kind == "cancelled":
                    raise ApiError(503, "the request was cancelled (the server is stopping)", code="cancelled")
        finally:
            gone.cancel()
            if job.state != "done":
                worker.cancel(job)
        data = []
        for ev in images:
            item = {"seed": ev["seed"]}
            if req.response_format == "url":
                item["url"] = str(request.base_url) + "v1/images/files/" + store.put(ev["data"], req.output_format)
            else:
                item["b64_json"] = ev["b64"]
            data.append(item)
        return JSONResponse({"created": int(time.time()), "data": data, "output_format": req.output_format,
                             "size": f"{req.width}x{req.height}", "quality": "auto", "background": "opaque"})

    async def stream(job: Job, events: asyncio.Queue, req: ImageRequest):
        prefix = "image_edit" if req.edit else "image_generation"
        common = {"size": f"{req.width}x{req.height}", "output_format": req.output_format, "quality": "auto",
                  "background": "opaque"}
        partial = 0
        try:
            while True:
                ev = await events.get()
                kind = ev["kind"]
                now = int(time.time())
                if kind == "progress":
                    # not an OpenAI event; OpenAI's documented loop (`if event.type == ...`) skips it, and
                    # "progress": false turns it off
                    if req.progress:
                        yield _sse("fluxmini.progress", {"type": "fluxmini.progress", "image_index": ev["index"],
                                                         "n": req.n, "step": ev["step"], "total": ev["total"],
                                                         "created_at": now})
                    if "preview" in ev:
                        yield _sse(f"{prefix}.partial_image", {
                            "type": f"{prefix}.partial_image", "b64_json": ev["preview"], "created_at": now,
                            "partial_image_index": partial, "image_index": ev["index"], **common})
                        partial += 1
                elif kind == "image":
                    yield _sse(f"{prefix}.completed", {
                        "type": f"{prefix}.completed", "b64_json": ev["b64"], "created_at": now,
                        "image_index": ev["index"], "seed": ev["seed"], **common,
                        "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                                  "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}})
                elif kind == "error":
                    yield _sse("error", ev["error"].body())
                    return
                else:  # done or cancelled
                    return
        finally:
            if job.state != "done":
                worker.cancel(job)

    # ------------------------------------------------------------------ routes
    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "model_file": model_file, **worker.status()}

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "fluxmini"}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str, request: Request):
        check_auth(request)
        check_model(name)
        return model_card()

    @app.get("/v1/images/files/{name}")
    async def image_file(name: str):
        item = store.get(name)
        if item is None:
            raise ApiError(404, "no such image: url images are kept for a limited time and number", code="not_found")
        data, mime, _ = item
        return Response(data, media_type=mime, headers={"Cache-Control": "private, max-age=60"})

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        check_auth(request)
        raw = await read_body(request)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise bad("the request body is not valid JSON", None, "invalid_json") from None
        except RecursionError:
            raise bad("the request body is JSON nested too deeply", None, "invalid_json") from None
        if isinstance(body, dict):
            check_model(body.get("model"))
        req = params.from_json(body, max_size=max_size)
        req.lora_paths = resolve_loras(lora_dir, req.loras)
        return await answer(request, req)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        check_auth(request)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise bad("send /v1/images/edits as multipart/form-data with the image file in 'image' (as the openai "
                      "client does)", None, "invalid_content_type")
        await read_body(request)
        try:
            form = await request.form(max_files=16, max_fields=64, max_part_size=max_body_bytes)
        except Exception as e:
            raise bad(f"the multipart body cannot be read: {str(getattr(e, 'detail', e))[:120]}", None,
                      "invalid_multipart") from None
        fields, images = {}, []
        for key, value in form.multi_items():
            if key in ("image", "image[]"):
                if isinstance(value, str):
                    raise bad(f"'{key}' must be an uploaded file, not text (no request field names a file on the "
                              "server)", "image", "invalid_image")
                images.append(value)
            elif key == "mask":
                raise bad("'mask' (inpainting) is not supported yet: send the edit without a mask for "
                          "image-to-image over the whole picture", "mask", "unsupported_parameter")
            elif key in fields:
                raise bad(f"'{key}' is given twice", key)
            else:
                fields[key] = value
        check_model(fields.get("model"))
        req = params.from_form(fields, max_size=max_size)
        req.lora_paths = resolve_loras(lora_dir, req.loras)
        if not images:
            raise bad("'image' is required: the picture to edit, as a file", "image", "missing_required_parameter")
        data = await images[0].read()
        await form.close()
        req.init_image = await asyncio.get_running_loop().run_in_executor(None, decode_image, data, max_pixels)
        if req.width is None:
            req.width, req.height = edit_size(req.init_image.size, max_size)
        return await answer(request, req)

    return app
