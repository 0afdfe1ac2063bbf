"""Reading inputs: safetensors, GGUF, diffusers folders and shard indexes, as lazily read tensors."""

from __future__ import annotations

import glob
import json
import os
from typing import Callable, Iterable

import numpy as np

from ..errors import FluxMiniFileError, FluxMiniValueError
from .type_rules import _gguf


_SAFETENSORS_DTYPE_NAMES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "F64": "f64", "F8_E4M3": "f8_e4m3",
                            "F8_E5M2": "f8_e5m2"}


def _kept_type(dtype: str) -> str:
    """The type a tensor keeps when the rules leave it unconverted (BF16 is widened to F32 like sd.cpp)."""
    if dtype in ("bf16", "f64", "f8_e4m3", "f8_e5m2"):
        return "f32"
    return dtype


class SrcTensor:
    """One tensor of an input file, read lazily as flat element ranges."""

    __slots__ = ("label", "name", "shape", "dtype", "file", "_read", "_raw")

    def __init__(self, label: str, name: str, shape: tuple[int, ...], dtype: str, file,
                 read: Callable[[int, int], np.ndarray], raw: Callable[[int, int], np.ndarray] | None):
        self.label, self.name, self.shape, self.dtype, self.file = label, name, shape, dtype, file
        self._read, self._raw = read, raw

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def read(self, a: int, b: int) -> np.ndarray:
        """Elements [a, b) as flat float32."""
        return self._read(a, b)

    def raw(self, a: int, b: int) -> np.ndarray:
        """The stored bytes of elements [a, b) (block-aligned for block types)."""
        return self._raw(a, b)


def close_inputs(tensors: Iterable[SrcTensor]) -> None:
    """Close the files behind ``read_input``'s tensors."""
    for f in {id(t.file): t.file for t in tensors}.values():
        f.close()


def _safetensors_tensors(path: str) -> list[SrcTensor]:
    from ..safetensors_io import FLOAT_DTYPES, SafetensorsFile

    sf = SafetensorsFile(path)
    label = os.path.basename(path)
    out = []
    for name, ent in sf.entries.items():
        dtype = _SAFETENSORS_DTYPE_NAMES.get(ent.dtype, ent.dtype.lower())

        def read(a, b, name=name, sdt=ent.dtype):
            if sdt not in FLOAT_DTYPES:
                raise FluxMiniValueError(f"{label}: tensor {name} has dtype {sdt}, not a floating-point type")
            return sf.read(name, a, b)

        def raw(a, b, name=name):
            return sf.raw(name, a, b).view(np.uint8)

        out.append(SrcTensor(label, name, ent.shape, dtype, sf, read, raw))
    return out


class _GGUFData:
    """Plain reads of a GGUF file's tensor data (the header is parsed by gguf.GGUFReader)."""

    def __init__(self, path: str):
        self.path = path
        self._fh = None

    def bytes(self, offset: int, nbytes: int) -> np.ndarray:
        from ..safetensors_io import read_file_range

        return read_file_range(self, offset, nbytes)

    def close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()


def _gguf_tensors(path: str) -> list[SrcTensor]:
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path, "r")
        infos = [(t.name, t.tensor_type, tuple(int(s) for s in reversed(t.shape.tolist())), int(t.data_offset),
                  int(t.n_bytes)) for t in reader.tensors]
    except Exception as e:  # the reader raises ValueError, struct.error, ... on bad files
        raise FluxMiniFileError(f"{path}: not a readable GGUF file, damaged or truncated ({e})") from e
    del reader
    size = os.path.getsize(path)
    data = _GGUFData(path)
    label = os.path.basename(path)
    out = []
    for name, qt, shape, off, nbytes in infos:
        if off + nbytes > size:
            raise FluxMiniFileError(f"{path}: truncated GGUF file (tensor {name} ends at byte {off + nbytes}, "
                                    f"the file has {size})")
        dtype = qt.name.lower()
        bs, ts = gguf.GGML_QUANT_SIZES[qt]

        if dtype in ("f32", "f16", "f64", "bf16"):
            npdt = {"f32": np.float32, "f16": np.float16, "f64": np.float64, "bf16": np.uint16}[dtype]

            def raw(a, b, off=off, ts=ts):
                return data.bytes(off + a * ts, (b - a) * ts)

            def read(a, b, raw=raw, npdt=npdt, bf16=dtype == "bf16"):
                v = raw(a, b).view(npdt)
                return (v.astype(np.uint32) << 16).view(np.float32) if bf16 else v.astype(np.float32)
        elif bs > 1:
            def raw(a, b, off=off, bs=bs, ts=ts):
                return data.bytes(off + a // bs * ts, (b - a) // bs * ts)

            def read(a, b, off=off, qt=qt, bs=bs, ts=ts, name=name):
                b0, b1 = a // bs, -(-b // bs)
                blocks = data.bytes(off + b0 * ts, (b1 - b0) * ts)
                try:
                    vals = gguf.quants.dequantize(blocks.reshape(1, -1), qt)
                except NotImplementedError:
                    raise FluxMiniValueError(f"{label}: cannot dequantize {name} ({qt.name})") from None
                return vals.reshape(-1)[a - b0 * bs: b - b0 * bs].astype(np.float32)
        else:
            def read(a, b, name=name, dtype=dtype):
                raise FluxMiniValueError(f"{label}: tensor {name} has type {dtype}, not a floating-point type")

            raw = None
        out.append(SrcTensor(label, name, shape, dtype, data, read, raw))
    return out


_ROLE_SUBFOLDERS = {"diffusion": "transformer", "clip_l": "text_encoder", "t5xxl": "text_encoder_2", "vae": "vae"}


def _input_files(path: str, role: str | None) -> list[str]:
    """The files an input names: a file, a shard index, or a (diffusers) folder."""
    if not os.path.exists(path):
        raise FluxMiniFileError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        sub = _ROLE_SUBFOLDERS.get(role or "")
        if sub and os.path.isdir(os.path.join(path, sub)):
            path = os.path.join(path, sub)
        index = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
        if index:
            return _index_files(index[0])
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            files = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if not files:
            raise FluxMiniFileError(f"{path}: folder holds no .safetensors or .gguf files")
        return files
    if path.endswith(".json"):
        return _index_files(path)
    return [path]


def _index_files(index: str) -> list[str]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise FluxMiniFileError(f"{index}: not a safetensors shard index ({e})") from e
    folder = os.path.dirname(index)
    out = [os.path.join(folder, f) for f in files]
    for f in out:
        if not os.path.exists(f):
            raise FluxMiniFileError(f"{index}: shard {os.path.basename(f)} is missing")
    return out


def read_input(path: str | os.PathLike, role: str | None = None) -> list[SrcTensor]:
    """All tensors of an input (file, shard index or folder), lazily."""
    out: list[SrcTensor] = []
    seen: dict[str, str] = {}
    for f in _input_files(os.fspath(path), role):
        if f.endswith((".ckpt", ".pt", ".pth", ".bin", ".pkl")):
            raise FluxMiniFileError(f"{f}: PyTorch pickle files are not read (they can run code); "
                                    "save the weights as safetensors first")
        try:
            with open(f, "rb") as fh:
                magic = fh.read(4)
        except OSError as e:
            raise FluxMiniFileError(f"cannot read {f}: {e.strerror or e}") from e
        tensors = _gguf_tensors(f) if magic == b"GGUF" else _safetensors_tensors(f)
        for t in tensors:
            if t.name in seen:
                raise FluxMiniValueError(f"tensor {t.name} appears in both {seen[t.name]} and {t.label}")
            seen[t.name] = t.label
        out += tensors
    return out
