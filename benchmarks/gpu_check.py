#!/usr/bin/env python3
"""CUDA (or Metal) check: the same tiny models on the GPU backend and on the CPU agree, and the
full-size model's stages are timed on the GPU.

Run on a machine with a GPU after building fluxmini against a CUDA ggml (benchmarks/gpu_check.sh):

    python benchmarks/gpu_check.py --backend cuda [--full /path/FLUX.1-mini-Q4_0.gguf]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import fixtures  # noqa: E402
import fluxmini  # noqa: E402


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def parity(backend: str, tmp: str, types=("f32", "f16", "q8_0", "q4_0"), only=None) -> bool:
    """Each network on the GPU and on the CPU, both measured against an exact reference: the CPU
    running an F32 copy of the same (dequantized) weights.

    Why not GPU vs CPU directly: both engines round on purpose and differently. The CPU quantizes
    activations to Q8_0 for quantized weights, the GPU to Q8_1 or F16 (dequantize + cuBLAS), and
    ggml's CUDA backend runs F32 matmuls on TF32 tensor cores (ggml-cuda/common.cuh sets
    CUBLAS_TF32_TENSOR_OP_MATH: 10-bit mantissas, the rounding of F16). So the GPU passes when its
    distance from the exact result is at most twice the CPU's, or 5e-3 (a few TF32/F16 roundings
    through ~30 layers; the CPU's own F16 tests accept 2e-3..3e-3 for one rounding), whichever is
    larger. A wrong op or layout gives errors near 1.
    """
    from fluxmini.convert import quantize

    ok = True
    rng = np.random.default_rng(0)
    for big in types:
        path = fixtures.write_model(os.path.join(tmp, f"tiny-{big}.gguf"), big_type=big)
        exact_path = path
        if big != "f32":
            exact_path = os.path.join(tmp, f"tiny-{big}-as-f32.gguf")
            quantize(path, exact_path, "f32", pure=True, progress=False)
        cpu = fluxmini.FluxMini.load(path, backend="cpu")
        exact = fluxmini.FluxMini.load(exact_path, backend="cpu")
        gpu = fluxmini.FluxMini.load(path, backend=backend)
        cfg = cpu.config
        d = cfg["diffusion"]
        lat = rng.standard_normal((16, 12, 10)).astype(np.float32)
        t5 = rng.standard_normal((9, d["context_dim"])).astype(np.float32)
        pooled = rng.standard_normal(d["vec_dim"]).astype(np.float32)
        ids_t5 = cpu.tokenize_t5("a red fox in fresh snow", 32)
        ids_clip = cpu.tokenize_clip("a red fox in fresh snow")
        z = rng.standard_normal((16, 8, 12)).astype(np.float32)
        img = np.clip(rng.standard_normal((3, 64, 48)), -1, 1).astype(np.float32)
        checks = {
            "transformer": (lambda m: m.transformer(lat, 0.7, 3.5, t5, pooled)),
            "encode_t5": (lambda m: m.encode_t5(ids_t5)),
            "encode_clip": (lambda m: m.encode_clip(ids_clip)),
            "vae_decode": (lambda m: m.vae_decode(z, tiling=False)),
            "vae_encode": (lambda m: m.vae_encode(img, tiling=False)),
        }
        for name, fn in checks.items():
            if only and name not in only:
                continue
            try:
                ref = fn(exact)
                e_cpu, e_gpu, e_pair = rel(fn(cpu), ref), rel(fn(gpu), ref), rel(fn(gpu), fn(cpu))
                tol = max(2.0 * e_cpu, 5e-3)
                good = e_gpu <= tol
            except Exception as ex:  # report, keep going
                e_cpu = e_gpu = e_pair = tol = float("nan")
                good = False
                print(f"  {name}: {type(ex).__name__}: {ex}")
            ok &= good
            print(f"{big:5s} {name:12s} vs exact: {backend} {e_gpu:.2e}, cpu {e_cpu:.2e} (tol {tol:.1e}); "
                  f"{backend} vs cpu {e_pair:.2e}  {'ok' if good else 'FAIL'}")
    return ok


def timed(fn, n):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def full_size(backend: str, path: str, repeats: int, verbose: int) -> None:
    model = fluxmini.FluxMini.load(path, backend=backend, verbose=verbose)
    cfg = model.config["diffusion"]
    rng = np.random.default_rng(0)
    for L in (256, 512):
        ids = model.tokenize_t5("a photo of a cat", L)
        print(f"T5 encode, length {L}: {timed(lambda: model.encode_t5(ids), repeats):.3f} s")
    t5 = rng.standard_normal((512, cfg["context_dim"])).astype(np.float32)
    pooled = rng.standard_normal(cfg["vec_dim"]).astype(np.float32)
    for px in (512, 1024):
        lat = rng.standard_normal((16, px // 8, px // 8)).astype(np.float32)
        s = timed(lambda: model.transformer(lat, 0.5, 3.5, t5, pooled), repeats)
        print(f"Flux step {px}x{px} (T5 512): {s:.3f} s")
    for px in (512, 1024):
        z = rng.standard_normal((16, px // 8, px // 8)).astype(np.float32)
        print(f"VAE decode {px}x{px}: {timed(lambda: model.vae_decode(z), repeats):.3f} s")
    if hasattr(model, "generate"):
        t = time.perf_counter()
        model.generate("a red fox in fresh snow", width=1024, height=1024, steps=20, seed=1, progress=False)
        print(f"generate 1024x1024, 20 steps: {time.perf_counter() - t:.2f} s")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="cuda")
    p.add_argument("--full", help="full-size model file to time")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", help="checks to run (transformer, encode_t5, encode_clip, vae_decode, vae_encode)")
    p.add_argument("--types", nargs="*", default=["f32", "f16", "q8_0", "q4_0"])
    p.add_argument("--no-parity", action="store_true")
    p.add_argument("-v", "--verbose", action="count", default=0, help="engine log (graphs, ops left on the CPU)")
    args = p.parse_args()
    from fluxmini import _core

    print("backends:", _core.available_backends())
    ok = True
    if not args.no_parity:
        with tempfile.TemporaryDirectory() as tmp:
            ok = parity(args.backend, tmp, args.types, args.only)
    if args.full:
        full_size(args.backend, args.full, args.repeats, args.verbose)
    print("PARITY", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
