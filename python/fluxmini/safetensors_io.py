"""Reading and writing safetensors files with numpy alone (no torch, no safetensors package).

The format: an 8-byte little-endian header length N, then N bytes of JSON (one entry per tensor:
``{"dtype": "F16", "shape": [...], "data_offsets": [begin, end]}`` plus an optional
``"__metadata__"`` map of strings), then the raw tensor data, offsets counted from the end of the
header. Tensors are read lazily in slices with plain file reads, so a 10 GB file costs no memory beyond
the slice being converted.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

from .errors import FluxMiniFileError, FluxMiniValueError

# safetensors dtype -> (bytes per element, numpy dtype of the stored bits)
DTYPES = {
    "F64": (8, np.float64), "F32": (4, np.float32), "F16": (2, np.float16), "BF16": (2, np.uint16),
    "F8_E4M3": (1, np.uint8), "F8_E5M2": (1, np.uint8),
    "I64": (8, np.int64), "I32": (4, np.int32), "I16": (2, np.int16), "I8": (1, np.int8),
    "U8": (1, np.uint8), "U16": (2, np.uint16), "U32": (4, np.uint32), "U64": (8, np.uint64),
    "BOOL": (1, np.bool_),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
MAX_HEADER = 100 * 1024 * 1024


def _f8_e4m3_table() -> np.ndarray:
    """float32 value of every E4M3FN byte (bias 7, no infinities, S.1111.111 is NaN)."""
    b = np.arange(256, dtype=np.uint32)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = ((b >> 3) & 0xF).astype(np.int32)
    man = (b & 0x7).astype(np.float64)
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1.0 + man / 8.0) * 2.0 ** (exp - 7).astype(np.float64))
    val = sign * val
    val[(b & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


_F8_E4M3 = None


def bits_to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Decode a flat array of stored elements (as read from the file) to float32."""
    global _F8_E4M3
    if dtype == "F32":
        return np.asarray(raw, dtype=np.float32)
    if dtype in ("F16", "F64"):
        return raw.astype(np.float32)
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F8_E5M2":  # the top byte of an IEEE half
        return (raw.astype(np.uint16) << 8).view(np.float16).astype(np.float32)
    if dtype == "F8_E4M3":
        if _F8_E4M3 is None:
            _F8_E4M3 = _f8_e4m3_table()
        return _F8_E4M3[raw]
    raise FluxMiniValueError(f"safetensors dtype {dtype} is not a floating-point type")


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even); returns the uint16 bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(x)
    out = rounded.astype(np.uint16)
    if nan.any():
        out[nan] = 0x7FC0
    return out


@dataclass
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


class SafetensorsFile:
    """A safetensors file opened for lazy reading; ``entries`` maps names to TensorEntry."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise FluxMiniFileError(f"{self.path}: not a safetensors file (only {size} bytes, "
                                            "shorter than the 8-byte header length)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER or n < 2:
                    raise FluxMiniFileError(f"{self.path}: not a safetensors file (header length {n} is "
                                            "implausible)")
                if 8 + n > size:
                    raise FluxMiniFileError(f"{self.path}: truncated safetensors file (the header says it "
                                            f"is {n} bytes long but the file has only {size - 8} bytes after "
                                            "the length)")
                text = f.read(n)
        except OSError as e:
            if isinstance(e, FluxMiniFileError):
                raise
            raise FluxMiniFileError(f"cannot read {self.path}: {e.strerror or e}") from e
        try:
            header = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FluxMiniFileError(f"{self.path}: not a safetensors file (header is not valid JSON: {e})") from e
        if not isinstance(header, dict):
            raise FluxMiniFileError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        base = 8 + n
        self.data_size = size - base
        self.entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            try:
                dtype = info["dtype"]
                shape = tuple(int(s) for s in info["shape"])
                b, e = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise FluxMiniFileError(f"{self.path}: malformed header entry for tensor {name!r}") from err
            if dtype not in DTYPES:
                raise FluxMiniFileError(f"{self.path}: tensor {name!r} has unknown dtype {dtype!r}")
            if any(s < 0 for s in shape):
                raise FluxMiniFileError(f"{self.path}: tensor {name!r} has a negative dimension {list(shape)}")
            numel = int(np.prod(shape)) if shape else 1
            if not (0 <= b <= e) or e - b != numel * DTYPES[dtype][0]:
                raise FluxMiniFileError(f"{self.path}: tensor {name!r}: data offsets [{b}, {e}] do not match "
                                        f"{dtype} {list(shape)}")
            if e > self.data_size:
                raise FluxMiniFileError(f"{self.path}: truncated safetensors file (tensor {name!r} ends at byte "
                                        f"{e} of the data, but the data has {self.data_size} bytes)")
            self.entries[name] = TensorEntry(name, dtype, shape, base + b, base + e)
        self._fh = None

    def read_bytes(self, offset: int, nbytes: int) -> np.ndarray:
        """``nbytes`` bytes at absolute file ``offset`` (a fresh array; plain reads, not a memory map,
        so the process's resident memory stays at what it holds, not what it has read)."""
        return read_file_range(self, offset, nbytes)

    def raw(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Stored elements [start, stop) of a tensor, flat, in the stored dtype."""
        ent = self.entries[name]
        isz, npdt = DTYPES[ent.dtype]
        stop = ent.numel if stop is None else stop
        return self.read_bytes(ent.begin + start * isz, (stop - start) * isz).view(npdt)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Elements [start, stop) of a floating-point tensor as flat float32."""
        return bits_to_float32(self.raw(name, start, stop), self.entries[name].dtype)

    def tensor(self, name: str) -> np.ndarray:
        """A whole tensor as float32 with its shape (small tensors and tests)."""
        return self.read(name).reshape(self.entries[name].shape)

    def close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()


def read_file_range(holder, offset: int, nbytes: int) -> np.ndarray:
    """Read bytes through ``holder._fh`` (opened on first use from ``holder.path``)."""
    if holder._fh is None:
        holder._fh = open(holder.path, "rb")
    buf = np.empty(nbytes, dtype=np.uint8)
    holder._fh.seek(offset)
    got = holder._fh.readinto(memoryview(buf))
    if got != nbytes:
        raise FluxMiniFileError(f"{holder.path}: truncated file (wanted {nbytes} bytes at offset {offset}, "
                                f"got {got})")
    return buf


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], dtype: str | None = None,
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (numpy arrays) to a safetensors file.

    ``dtype`` ("F32", "F16" or "BF16") converts every floating-point array; None keeps each array's
    own dtype (float32/float16/float64 and integer arrays).
    """
    npmap = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
             np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
             np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    off = 0
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if dtype is not None and arr.dtype.kind == "f":
            if dtype == "BF16":
                data, dt = float32_to_bf16_bits(arr.astype(np.float32)), "BF16"
            elif dtype == "F16":
                data, dt = arr.astype(np.float16), "F16"
            elif dtype == "F32":
                data, dt = arr.astype(np.float32), "F32"
            else:
                raise FluxMiniValueError(f"cannot write safetensors dtype {dtype!r}")
        else:
            if arr.dtype not in npmap:
                raise FluxMiniValueError(f"{name}: cannot store numpy dtype {arr.dtype} in safetensors")
            data, dt = arr, npmap[arr.dtype]
        data = np.ascontiguousarray(data)
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + data.nbytes]}
        blobs.append(data)
        off += data.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the reference writer aligns the data start to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in blobs:
            f.write(data.tobytes())
