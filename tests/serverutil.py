"""A live `fluxmini serve` subprocess on 127.0.0.1 for the server tests, and small HTTP helpers."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import fluxmini

API_KEY = "sk-fluxmini-test"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pythonpath() -> str:
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(fluxmini.__file__)))
    return os.pathsep.join([pkg_parent, os.environ.get("PYTHONPATH", "")])


def request(method: str, port: int, path: str, body=None, headers=None, timeout: float = 120):
    """(status, headers dict with lower-case names, body bytes) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def proc_status_mb(pid: int, key: str) -> float:
    """VmRSS / VmHWM of a process in MiB, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    raise KeyError(key)


class LiveServer:
    """`python -m fluxmini.cli serve -m MODEL --port FREE ...`, stopped by stop()."""

    def __init__(self, model, *args, log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"serve-{self.port}.log"
        env = dict(os.environ, PYTHONPATH=pythonpath())
        cmd = [sys.executable, "-m", "fluxmini.cli", "serve", "-m", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), "--threads", "1", *map(str, args)]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                status, _, _ = request("GET", self.port, "/health", timeout=5)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not answer /health in 90 s:\n{self.log()}")
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def health(self) -> dict:
        status, _, body = request("GET", self.port, "/health", timeout=10)
        assert status == 200
        return json.loads(body)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self._log.close()
