"""Tiny random FLUX.1-mini models for the tests, written with the `gguf` package from a fixed seed.

Independent of fluxmini.convert on purpose (the converter is under test elsewhere); only the
tensor inventory (names and shapes) is shared. Values depend only on (seed, tensor name), so a
goldens file made from a model stays valid however the model is split or named.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from fluxmini.inventory import COMPONENTS, LAYOUT_PREFIXES, ModelDims, component_tensors, tiny_dims

QUANT_TYPES = {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1"}


def tensor_values(seed: int, name: str, shape) -> np.ndarray:
    """Deterministic float32 values for one tensor, with scales that keep activations sane."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(h)
    shape = tuple(shape)
    last = name.rsplit(".", 1)[-1]
    if last == "scale" or (last == "weight" and len(shape) == 1):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if last == "bias":
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)
    if "embedding" in name or name in ("shared.weight", "encoder.embed_tokens.weight"):
        return rng.standard_normal(shape).astype(np.float32)
    if "relative_attention_bias" in name:
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def _ggml_type(type_name: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, type_name.upper())


def _encode(data: np.ndarray, type_name: str):
    import gguf

    if type_name == "f32":
        return data.astype(np.float32), None
    if type_name == "f16":
        return data.astype(np.float16), None
    if type_name == "bf16":
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16)
        return q, gguf.GGMLQuantizationType.BF16
    qt = _ggml_type(type_name)
    return gguf.quants.quantize(data, qt), qt


def tensor_type(component: str, name: str, shape, big_type: str) -> str:
    """gpustack-like rules: big 2-D weights in `big_type`; 1-D tensors, biases, embedders and
    rows that do not fill quant blocks stay F32; VAE conv kernels 3x3/1x1 stay F32."""
    if big_type in ("f32", "f16", "bf16"):
        if len(shape) == 1 or name.endswith(".bias") or name.endswith(".scale"):
            return "f32"
        return big_type
    if len(shape) == 1 or name.endswith(".bias") or name.endswith(".scale") or shape[-1] % 32:
        return "f32"
    if component == "diffusion" and name.split(".")[0] in (
            "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer"):
        return "f32"
    return big_type


def write_model(path, *, dims: ModelDims | None = None, layout: str = "gpustack", big_type: str = "f32",
                components=COMPONENTS, bare: bool = False, seed: int = 1234, extra=(), skip=(),
                override_shapes=None, types=None) -> Path:
    """Write a GGUF with the given components.

    layout: "gpustack" or "sd.cpp" prefixes; bare=True writes names without prefix (split files).
    extra: (name, np.ndarray) pairs added verbatim; skip: full names left out;
    override_shapes: {bare name: shape} to write a wrong shape; types: {full name: type}.
    """
    import gguf

    dims = dims or tiny_dims()
    w = gguf.GGUFWriter(str(path), "fluxmini-test")
    for comp in components:
        prefix = "" if bare else LAYOUT_PREFIXES[layout][comp]
        for name, shape in component_tensors(comp, dims):
            full = prefix + name
            if full in skip:
                continue
            shape = tuple((override_shapes or {}).get(name, shape))
            data = tensor_values(seed, f"{comp}:{name}", shape)
            t = (types or {}).get(full) or tensor_type(comp, name, shape, big_type)
            raw, qt = _encode(data, t)
            if qt is None:
                w.add_tensor(full, raw)
            else:
                w.add_tensor(full, raw, raw_shape=raw.shape, raw_dtype=qt)
    for name, arr in extra:
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def write_safetensors(path, tensors: dict) -> Path:
    """Write a safetensors file by its published format (8-byte header length, JSON, raw data)."""
    import json

    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype == np.float32:
            dt = "F32"
        elif arr.dtype == np.float16:
            dt = "F16"
        elif arr.dtype == np.uint16:  # raw bf16 bits
            dt = "BF16"
        else:
            raise ValueError(arr.dtype)
        b = arr.tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    hj = json.dumps(header).encode()
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)
    return Path(path)


def component_safetensors(path, component: str, *, dims: ModelDims | None = None, seed: int = 1234,
                          prefix: str = "", dtype: str = "f32") -> Path:
    dims = dims or tiny_dims()
    out = {}
    for name, shape in component_tensors(component, dims):
        v = tensor_values(seed, f"{component}:{name}", shape)
        if dtype == "f16":
            v = v.astype(np.float16)
        elif dtype == "bf16":
            v = (v.view(np.uint32) >> 16).astype(np.uint16)
        out[prefix + name] = v
    return write_safetensors(path, out)


def read_component(path, component: str, layout: str = "gpustack", bare: bool = False) -> dict:
    """Dequantized float32 arrays (PyTorch shapes) of one component of a GGUF, by bare name:
    the exact values the engine sees, for feeding the torch references."""
    import gguf

    prefix = "" if bare else LAYOUT_PREFIXES[layout][component]
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        if not t.name.startswith(prefix):
            continue
        shape = tuple(int(x) for x in reversed(t.shape))
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name[len(prefix):]] = np.asarray(data, np.float32).reshape(shape)
    return out


_CACHE = Path(os.environ.get("FLUXMINI_TEST_MODELS", Path(__file__).parent / "_models"))


def cached_model(name: str, **kwargs) -> Path:
    """write_model into tests/_models (git-ignored) once per test session."""
    _CACHE.mkdir(parents=True, exist_ok=True)
    # the file's content depends on this module, the tensor inventory and the name table
    import fluxmini.inventory
    import fluxmini.names

    sources = [Path(__file__), Path(fluxmini.inventory.__file__), Path(fluxmini.names.__file__),
               Path(fluxmini.names.__file__).parent / "data" / "names.txt"]
    text = repr(sorted(kwargs.items())) + "".join(f.read_text() for f in sources)
    key = hashlib.sha256(text.encode()).hexdigest()[:10]
    p = _CACHE / f"{name}-{key}.gguf"
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    if not p.exists():
        write_model(tmp, **kwargs)
        os.replace(tmp, p)
    return p


def check_bad_inputs(setup: str, bad_inputs: dict, good: str) -> str:
    """Runs each expression of bad_inputs after `setup` (which defines `m` and any variables) in
    a subprocess, so that a crash fails the caller's test instead of taking pytest down. Asserts
    that every one raises FluxMiniValueError with a message; returns repr of `good`'s shape,
    evaluated last (a good call still works after the bad ones)."""
    import subprocess
    import sys
    import textwrap

    script = "\n".join([
        "import sys, numpy as np",
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})",
        "from fluxmini.errors import FluxMiniValueError",
        "from fluxmini.model import FluxMini",
        textwrap.dedent(setup).strip(),
        f"for name, expr in {bad_inputs!r}.items():",
        "    try:",
        "        eval(expr)",
        "        print(name, 'NO-ERROR')",
        "    except FluxMiniValueError as e:",
        "        assert str(e), name",
        "        print(name, 'ok')",
        f"print('good', ({good}).shape)",
    ])
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    for name in bad_inputs:
        assert lines.get(name) == "ok", (name, r.stdout)
    return lines["good"]


def cpuinfo_flags():
    """The CPU flags Linux reports (/proc/cpuinfo), or None where there is none (not Linux): the
    independent reference the kernels' own cpuid detection is checked against."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def float_kernel_paths(flags):
    """The F32 kernel paths (attention, VAE convolution) a CPU with these flags must offer, best first."""
    expect = ["portable"]
    if {"avx2", "fma"} <= flags:
        expect.insert(0, "avx2")
        if "avx512f" in flags:
            expect.insert(0, "avx512")
    return expect
