"""``fluxmini serve``: argument parsing and the entry point (FastAPI and uvicorn load only here)."""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import sys

from ..errors import FluxMiniRuntimeError, FluxMiniValueError

INSTALL_HINT = 'pip install "fluxmini[server]"'


def _missing_server_packages() -> list:
    wanted = {"fastapi": ("fastapi",), "uvicorn": ("uvicorn",), "python-multipart": ("python_multipart", "multipart")}
    return [name for name, modules in wanted.items()
            if not any(importlib.util.find_spec(m) is not None for m in modules)]


def _check_args(args) -> None:
    if not 16 <= args.max_size <= 2048 or args.max_size % 16:
        raise FluxMiniValueError(f"--max-size must be a multiple of 16 from 16 to 2048, got {args.max_size}")
    if args.max_queue < 0:
        raise FluxMiniValueError(f"--max-queue must be 0 or more, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise FluxMiniValueError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_body_mb <= 0:
        raise FluxMiniValueError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    if args.api_key is not None and not args.api_key.strip():
        raise FluxMiniValueError("--api-key must not be empty")
    if args.lora_dir is not None and not os.path.isdir(args.lora_dir):
        raise FluxMiniValueError(f"--lora-dir {args.lora_dir}: no such folder")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cmd_serve(args) -> int:
    missing = _missing_server_packages()
    if missing:
        raise FluxMiniRuntimeError(f"fluxmini serve needs {', '.join(missing)}, which is not installed: "
                                   f"run {INSTALL_HINT}")
    _check_args(args)
    import uvicorn

    from ..model import FluxMini
    from ..hub import resolve_model
    from .app import create_app

    api_key = args.api_key if args.api_key is not None else os.environ.get("FLUXMINI_API_KEY") or None
    path = resolve_model(args.model)
    model = FluxMini.load(path, clip_l=args.clip_l, t5xxl=args.t5xxl, vae=args.vae, backend=args.backend,
                          threads=args.threads, cache_dir=args.cache_dir, max_memory=args.max_memory)
    alias = args.alias or os.path.splitext(os.path.basename(path))[0]
    app = create_app(model, model_id=alias, api_key=api_key, max_queue=args.max_queue, max_size=args.max_size,
                     max_body_bytes=int(args.max_body_mb * (1 << 20)), cors_origins=args.cors_origin or (),
                     url_ttl=args.url_ttl, lora_dir=args.lora_dir)
    if not _is_loopback(args.host) and api_key is None:
        print(f"fluxmini serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "port can use the server", file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"fluxmini serve: {alias} on http://{shown}:{args.port}/ (OpenAI API under /v1, "
          f"{model.threads} threads, queue {args.max_queue})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.log_level == "info",
                timeout_graceful_shutdown=3)
    return 0


def add_parser(subparsers) -> None:
    """Register ``fluxmini serve``."""
    from ..cli.common import add_cache_dir, add_max_memory  # here: the cli package imports this module
    s = subparsers.add_parser(
        "serve", help="serve the OpenAI Images API and a web page (needs the [server] extra)",
        description="An OpenAI-compatible image server: POST /v1/images/generations and /v1/images/edits "
                    "(with stream: true for progress and previews), GET /v1/models and /health, and a web page "
                    f"at /. Needs FastAPI and uvicorn: {INSTALL_HINT}.")
    s.add_argument("-m", "--model", required=True,
                   help="FLUX.1-mini GGUF file, or owner/repo:QUANT (needs the [hub] extra)")
    s.add_argument("--clip_l", "--clip-l", dest="clip_l", default=None, help="separate CLIP-L file")
    s.add_argument("--t5xxl", default=None, help="separate T5-XXL file")
    s.add_argument("--vae", default=None, help="separate VAE file")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $FLUXMINI_API_KEY, else none)")
    s.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    s.add_argument("--backend", default="cpu", help="cpu, cuda, metal or auto (default cpu)")
    add_max_memory(s)
    s.add_argument("--max-queue", type=int, default=8,
                   help="requests that may wait behind the running one; more get 429 (default 8)")
    s.add_argument("--max-size", type=int, default=1024, help="largest width or height in pixels (default 1024)")
    s.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MiB (default 20)")
    s.add_argument("--alias", default=None,
                   help="the model name clients send and /v1/models lists (default: the file name without .gguf)")
    s.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="allow browser pages from ORIGIN to call the API (repeatable; default: CORS off)")
    s.add_argument("--url-ttl", type=float, default=600.0,
                   help="seconds a response_format=url image stays downloadable (default 600; 64 kept at most)")
    s.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="offer the LoRA files (.safetensors, .gguf) in DIR: requests name them in 'lora' "
                        "([{\"path_or_name\": \"style\", \"scale\": 0.8}]); no other path is ever read")
    add_cache_dir(s)
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning; info logs each request)")
    s.set_defaults(func=_cmd_serve)
