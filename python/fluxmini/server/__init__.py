"""``fluxmini serve``: an OpenAI-compatible image server with a web page (the ``[server]`` extra).

The core package never imports this one; FastAPI and uvicorn are imported by :mod:`.app`, which
:mod:`.command` loads only when the command runs. ``create_app`` is importable from ``.app``.
"""
