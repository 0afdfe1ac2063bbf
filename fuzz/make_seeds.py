"""Writes the seed corpora of the fuzzers (generated at fuzz time, never committed):
tiny valid files of every supported tensor type and name layout, KV pairs of every value type,
safetensors of every dtype, and small images of many modes and formats.

Usage: python fuzz/make_seeds.py OUT_DIR   (makes OUT_DIR/<target>/ for each harness)
"""

from __future__ import annotations

import io
import json
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
K_TYPES = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}  # bytes per 256 values
NAMES = {  # one short name per component and layout
    "gpustack": ["model.diffusion_model.img_in.weight", "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
                 "text_encoders.t5xxl.transformer.shared.weight", "vae.decoder.conv_in.weight"],
    "sd.cpp": ["model.diffusion_model.img_in.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight",
               "cond_stage_model.1.transformer.shared.weight", "first_stage_model.decoder.conv_in.weight"],
    "bare": ["img_in.weight", "text_model.final_layer_norm.weight", "encoder.block.0.layer.1.layer_norm.weight",
             "decoder.conv_in.weight"],
}


def small_gguf(path: Path, type_name: str, layout: str, kv: bool, alignment: int | None = None) -> None:
    import gguf

    import fixtures

    w = gguf.GGUFWriter(str(path), "fluxmini-seed")
    if alignment:
        w.add_custom_alignment(alignment)
    if kv:
        w.add_uint8("s.u8", 7); w.add_int8("s.i8", -7); w.add_uint16("s.u16", 700); w.add_int16("s.i16", -700)
        w.add_uint32("s.u32", 70000); w.add_int32("s.i32", -70000); w.add_float32("s.f32", 0.5)
        w.add_uint64("s.u64", 2**40); w.add_int64("s.i64", -2**40); w.add_float64("s.f64", 0.25)
        w.add_bool("s.bool", True); w.add_string("s.str", "héllo")
        w.add_array("s.arr_i32", [1, 2, 3]); w.add_array("s.arr_str", ["a", "bc", ""])
        w.add_array("s.arr_f32", [0.5, 1.5])
    for i, name in enumerate(NAMES[layout]):
        shape = (2, 32) if type_name in TYPES else (1, 256)
        if type_name in ("f32", "f16", "bf16") and i % 2:
            shape = (3,) if i == 1 else (1, 2, 4, 8)  # 1-D and 4-D tensors too
        if type_name in K_TYPES:
            raw = np.random.default_rng(i).integers(0, 255, size=(1, K_TYPES[type_name]), dtype=np.uint8)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=getattr(gguf.GGMLQuantizationType, type_name.upper()))
            continue
        data = fixtures.tensor_values(i, name, shape)
        raw, qt = fixtures._encode(data, type_name)
        if qt is None:
            w.add_tensor(name, raw)
        else:
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qt)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


def safetensors_bytes(tensors: dict, metadata: dict | None = None) -> tuple[bytes, bytes]:
    """(JSON header, data) of a safetensors file."""
    header, blobs, off = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dt, arr) in tensors.items():
        b = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    return json.dumps(header).encode(), b"".join(blobs)


def safetensors_seeds():
    f = np.linspace(-1, 1, 12, dtype=np.float32)
    yield "all_dtypes", safetensors_bytes({
        "text_model.final_layer_norm.weight": ("F32", f.reshape(3, 4)),
        "decoder.conv_in.bias": ("F16", f.astype(np.float16)),
        "img_in.weight": ("BF16", (f.view(np.uint32) >> 16).astype(np.uint16).reshape(2, 2, 3)),
        "x.position_ids": ("I64", np.arange(4, dtype=np.int64).reshape(1, 4)),
        "x.i32": ("I32", np.arange(2, dtype=np.int32)), "x.u8": ("U8", np.arange(3, dtype=np.uint8)),
        "x.bool": ("BOOL", np.array([1, 0], np.uint8)), "x.f64": ("F64", np.zeros(1)),
        "x.scalar": ("F32", np.float32(1.0).reshape(())),
    }, {"format": "pt", "note": "caf\u00e9"})
    yield "unicode_names", safetensors_bytes({"vae.\u00e9\u4e2d": ("F32", f[:2]), "encoder.\\\"q\"": ("F32", f[:1])})
    yield "empty", safetensors_bytes({})


def image_seeds():
    from PIL import Image, PngImagePlugin

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    info = PngImagePlugin.PngInfo()
    for k, v in {"prompt": "a cat", "seed": "42", "steps": "4", "guidance": "3.5", "width": "16", "compat": "none",
                 "strength": "0.75"}.items():
        info.add_text(k, v)
    info.add_text("zkey", "compressed " * 20, zip=True)
    info.add_itxt("ikey", "intl \u00e9", lang="fr", tkey="k")
    out = {}
    for mode in ("RGB", "RGBA", "L", "LA", "1", "P", "I", "I;16", "F", "CMYK", "YCbCr"):
        try:
            img = rgb.convert(mode)
        except ValueError:
            continue
        for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"):
            buf = io.BytesIO()
            try:
                img.save(buf, fmt, **({"pnginfo": info} if fmt == "PNG" else {}))
            except (OSError, KeyError, ValueError):
                continue
            out[f"{mode.replace(';', '_')}.{fmt.lower()}"] = buf.getvalue()
    buf = io.BytesIO(); rgb.save(buf, "PNG", pnginfo=info, optimize=True); out["interlaced_like.png"] = buf.getvalue()
    buf = io.BytesIO(); rgb.save(buf, "JPEG", progressive=True); out["progressive.jpeg"] = buf.getvalue()
    return out


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    g = out / "gguf_bytes"; g.mkdir(exist_ok=True)
    for t in TYPES + list(K_TYPES):
        for layout in NAMES:
            small_gguf(g / f"{t}-{layout}.gguf", t, layout, kv=(layout == "gpustack"))
    small_gguf(g / "f32-aligned64.gguf", "f32", "bare", kv=True, alignment=64)
    st = out / "safetensors"; st.mkdir(exist_ok=True)
    for name, (header, data) in safetensors_seeds():
        (st / f"{name}.seed").write_bytes(b"\x00" + header + b"\x00" + data)  # fuzz_safetensors framing
        (g / f"{name}.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    (out / "gguf_struct").mkdir(exist_ok=True)  # the generator needs no seeds
    (out / "after_load").mkdir(exist_ok=True)
    (out / "after_load" / "zeros").write_bytes(bytes(64))
    (out / "after_load" / "ones").write_bytes(bytes([1]) * 64)
    # Full-length random choices (hyper-parameters, types, components, edits): under the ASan
    # preload libFuzzer has no coverage and mutates only the seeds it keeps (-keep_seed=1), and
    # mutations of a short input leave most choices at their zero-byte defaults and make no edits.
    rng = np.random.default_rng(17)
    for i in range(64):
        (out / "after_load" / f"random{i:02d}").write_bytes(rng.integers(0, 256, 256, dtype=np.uint8).tobytes())
    pr = out / "prompt"; pr.mkdir(exist_ok=True)
    for i, text in enumerate(["a photo of a cat", "", "\u00e9\u4e2d\U0001F600 \t\n\x00\x1b[0m", "word " * 100,
                              "<|startoftext|> </w> \u200b\ufeff"]):
        (pr / f"p{i}").write_bytes(bytes([0]) + text.encode())
    sv = out / "server"; sv.mkdir(exist_ok=True)  # the harness builds requests from any bytes
    for i, raw in enumerate([bytes(64), bytes([1]) * 64, bytes([5]) * 256, bytes(range(256)),
                             bytes([9, 0, 0]) + b'{"prompt": "a cat", "size": "32x48", "n": 2}']):
        (sv / f"s{i}").write_bytes(raw)
    imgs = image_seeds()
    for target in ("png_metadata", "init_image"):
        d = out / target; d.mkdir(exist_ok=True)
        for name, data in imgs.items():
            (d / name).write_bytes(data)
    print(f"seeds in {out}: " + ", ".join(f"{p.name} {len(list(p.iterdir()))}" for p in sorted(out.iterdir())))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fluxmini-fuzz/seeds"))
