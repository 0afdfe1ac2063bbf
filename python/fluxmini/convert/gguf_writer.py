"""GGUF v3 writing (our own, so that a file can have no key/value pairs at all, like gpustack's), streamed."""

from __future__ import annotations

import os
import struct
from typing import Sequence

import numpy as np

from ..errors import FluxMiniFileError, FluxMiniValueError
from .type_rules import ALIGNMENT, _any_ggml_type, _block, tensor_nbytes


def _pad(n: int, align: int = ALIGNMENT) -> int:
    return (n + align - 1) // align * align


def _gguf_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _gguf_value(v) -> bytes:
    # value type ids of GGUF v3: UINT32 4, INT32 5, FLOAT32 6, BOOL 7, STRING 8, UINT64 10, INT64 11
    if isinstance(v, bool):
        return struct.pack("<IB", 7, int(v))
    if isinstance(v, (int, np.integer)):
        v = int(v)
        return struct.pack("<IQ", 10, v) if v >= 0 else struct.pack("<Iq", 11, v)
    if isinstance(v, (float, np.floating)):
        return struct.pack("<If", 6, float(v))
    return struct.pack("<I", 8) + _gguf_string(str(v))


def gguf_header(tensors: Sequence[tuple[str, tuple[int, ...], str]],
                metadata: dict | None = None) -> tuple[bytes, list[int], int]:
    """The header of a GGUF v3 file (padded to the alignment), each tensor's data offset, and the
    total data size (every tensor padded to 32 bytes)."""
    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(metadata or {}))]
    for k, v in (metadata or {}).items():
        out.append(_gguf_string(str(k)))
        out.append(_gguf_value(v))
    offsets = []
    off = 0
    for name, shape, t in tensors:
        ne = [int(s) for s in reversed(shape)] or [1]
        out.append(_gguf_string(name))
        out.append(struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, int(_any_ggml_type(t)), off))
        offsets.append(off)
        off += _pad(tensor_nbytes(shape, t))
    head = b"".join(out)
    head += b"\0" * (_pad(len(head)) - len(head))
    return head, offsets, off


class StreamingWriter:
    """Two-pass GGUF writer: declare every tensor first, then stream the data in order.

    ``metadata`` (a dict of str/int/float/bool) becomes GGUF key/value pairs; None or {} writes none
    (n_kv = 0, like gpustack's files). Data can be given whole (``write``) or in pieces
    (``write_part``); each tensor is padded to 32 bytes.
    """

    def __init__(self, path: str | os.PathLike, metadata: dict | None = None):
        self.path = os.fspath(path)
        self.metadata = dict(metadata or {})
        self._infos: list[tuple[str, tuple[int, ...], str]] = []
        self._sizes: list[int] = []
        self._f = None
        self._i = 0
        self._done = 0

    def declare(self, name: str, shape: tuple[int, ...], type_name: str) -> None:
        type_name = type_name.lower()
        _any_ggml_type(type_name)
        bs, _ = _block(type_name)
        row = shape[-1] if len(shape) else 1
        if row % bs:
            raise FluxMiniValueError(f"{name}: row length {row} is not a multiple of {bs} for {type_name}")
        self._infos.append((name, tuple(int(s) for s in shape), type_name))
        self._sizes.append(tensor_nbytes(shape, type_name))

    @property
    def tensors(self) -> list[tuple[str, tuple[int, ...], str]]:
        return list(self._infos)

    def header(self) -> bytes:
        return gguf_header(self._infos, self.metadata)[0]

    def file_size(self) -> int:
        head, _, data = gguf_header(self._infos, self.metadata)
        return len(head) + data

    def begin(self) -> None:
        """Opens ``PATH.part`` (creating missing folders); ``close`` renames it to PATH, so a failed
        or interrupted write never leaves a truncated model behind nor destroys an existing one."""
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._f = open(self._part, "wb")
            self._f.write(self.header())
        except OSError as e:
            self.abort()
            raise FluxMiniFileError(f"cannot write {self.path}: {e.strerror or e} (choose a writable folder)") from e

    @property
    def _part(self) -> str:
        return self.path + ".part"

    def _write_raw(self, data) -> None:
        try:
            self._f.write(data)
        except OSError as e:
            self.abort()
            raise FluxMiniFileError(f"writing {self.path} failed: {e.strerror or e} (it needs "
                                    f"{self.file_size() / 2**30:.2f} GiB of free space); nothing was written") from e

    def write_part(self, raw: np.ndarray) -> None:
        """Append bytes of the current tensor; moves to the next one when this one is complete."""
        if self._i >= len(self._infos):
            raise FluxMiniValueError("more tensor data than declared")
        buf = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        need = self._sizes[self._i] - self._done
        if buf.nbytes > need:
            raise FluxMiniValueError(f"{self._infos[self._i][0]}: {self._done + buf.nbytes} bytes of data for a "
                                     f"tensor of {self._sizes[self._i]} bytes")
        self._write_raw(memoryview(buf))
        self._done += buf.nbytes
        if self._done == self._sizes[self._i]:
            self._write_raw(b"\0" * (_pad(self._done) - self._done))
            self._i += 1
            self._done = 0

    def write(self, raw: np.ndarray) -> None:
        """Write one whole tensor."""
        i = self._i
        self.write_part(raw)
        if self._i == i:
            raise FluxMiniValueError(f"{self._infos[i][0]}: {raw.nbytes} bytes of data for a tensor of "
                                     f"{self._sizes[i]} bytes")

    def close(self) -> None:
        f, self._f = self._f, None
        if f is None:
            return
        try:
            f.close()
            if self._i != len(self._infos):
                raise FluxMiniValueError(f"{self.path}: closed after {self._i} of {len(self._infos)} tensors")
            os.replace(self._part, self.path)
        except OSError as e:
            self.abort()
            raise FluxMiniFileError(f"writing {self.path} failed: {e.strerror or e}; nothing was written") from e
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drops what was written (PATH itself, if it existed before, stays as it was)."""
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        try:
            os.remove(self._part)
        except OSError:
            pass
