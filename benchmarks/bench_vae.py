#!/usr/bin/env python3
"""VAE decode (and optionally encode) time and peak memory, tiled and untiled (not a test).

    python benchmarks/bench_vae.py                          # 512 and 1024 px, F32 kernels, 2 threads
    python benchmarks/bench_vae.py --sizes 512 --types f32,f16 --modes untiled
    python benchmarks/bench_vae.py --sizes 1024 --modes tiled --tile 64 --overlap 16 --encode

The models are full-size random-weight Flux VAEs (ch 128, ch_mult (1, 2, 4, 4), 2 resnets per
encoder level, 16 latent channels; 83.8 M parameters) written once with tests/fixtures.write_model
into --dir: "f32" has F32 conv kernels (like the F32 source and gpustack's quantized files),
"f16" F16 kernels (gpustack's FP16 file). Speed does not depend on the values.

Each configuration runs in its own process, so that its peak resident memory (VmHWM of
/proc/self/status: weights mapped from the file + compute buffers + inputs/outputs) is its own:
the child loads the weights, decodes a tiny latent (untimed: first-touch of the weight pages),
then times one decode of a random latent. Reported: wall seconds, CPU seconds / threads (on a
machine shared with other work the better guide to an idle machine; the load average is printed),
GFLOP/s from the decoder's convolution and attention FLOPs, the engine's compute buffer, and the
peak RSS.

Measured on the project machine (2 cores, AVX2/AVX-VNNI, 24 GB), 2 threads, load <= 2 (this
benchmark itself):

    decode   512 f32 own     untiled   28.5 s wall, compute  832 MiB, peak RSS 1067 MiB
    decode   512 f32 im2col  untiled   72.3 s wall, compute  864 MiB, peak RSS 1100 MiB
    decode   512 f16 own     untiled   29.0 s wall, compute  832 MiB, peak RSS  998 MiB
    decode   512 f16 im2col  untiled   84.8 s wall, compute  704 MiB, peak RSS  848 MiB
    decode  1024 f32 own     untiled  151.7 s wall, compute 3328 MiB, peak RSS 3583 MiB
    decode  1024 f32 own     tiled    147.3 s wall (2x2 tiles of 72), compute 1053 MiB, peak RSS 1303 MiB
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def decoder_flops(ch=128, mult=(1, 2, 4, 4), nres=2, h=64, w=64, z=16, out=3) -> float:
    """Multiply-add FLOPs (2 per MAC) of the Flux decoder on an h x w latent."""
    chans = [ch * m for m in mult]
    top = chans[-1]

    def conv(cin, cout, k, H, W):
        return 2.0 * cin * cout * k * k * H * W

    def res(cin, cout, H, W):
        return conv(cin, cout, 3, H, W) + conv(cout, cout, 3, H, W) + (conv(cin, cout, 1, H, W) if cin != cout else 0)

    H, W = h, w
    f = conv(z, top, 3, H, W) + 2 * res(top, top, H, W) + 4 * conv(top, top, 1, H, W) + 4.0 * top * (H * W) ** 2
    cin = top
    for i in reversed(range(len(chans))):
        for _ in range(nres + 1):
            f += res(cin, chans[i], H, W)
            cin = chans[i]
        if i:
            H, W = 2 * H, 2 * W
            f += conv(chans[i], chans[i], 3, H, W)
    return f + conv(cin, out, 3, H, W)


def tiled_flops(lat: int, tile: int, overlap: int) -> tuple:
    """(FLOPs, tiles per side, tile side) of a tiled decode of a lat x lat latent (the engine's rule)."""
    if lat <= tile:
        return decoder_flops(h=lat, w=lat), 1, lat
    count = -(-(lat - overlap) // (tile - overlap))
    size = -(-(lat + (count - 1) * overlap) // count)
    return count * count * decoder_flops(h=size, w=size), count, size


def ensure_model(path: str, big_type: str) -> None:
    if os.path.exists(path):
        return
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import fixtures
    from fluxmini.inventory import ModelDims

    print(f"writing {path} ...", flush=True)
    tmp = path + ".tmp"
    fixtures.write_model(tmp, dims=ModelDims(), components=("vae",), big_type=big_type)
    os.replace(tmp, path)


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def child(args) -> None:
    import numpy as np

    from fluxmini.model import FluxMini

    m = FluxMini.load(args.model, components=["vae"], threads=args.threads, verbose=1)
    m.load_weights("vae")
    lat = args.size // 8
    rng = np.random.default_rng(0)
    tiling = args.mode == "tiled"
    kw = dict(tiling=tiling, tile=args.tile, overlap=args.overlap)
    if args.encode:
        x = np.tanh(rng.standard_normal((3, args.size, args.size))).astype(np.float32)
        m.vae_encode(np.zeros((3, 16, 16), np.float32), tiling=False)
        fn = lambda: m.vae_encode(x, **kw)  # noqa: E731
    else:
        x = rng.standard_normal((16, lat, lat)).astype(np.float32)
        m.vae_decode(np.zeros((16, 2, 2), np.float32), tiling=False)
        fn = lambda: m.vae_decode(x, **kw)  # noqa: E731
    before = vm_hwm_mib()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    assert np.isfinite(out).all()
    print("RESULT " + json.dumps({"wall": wall, "cpu": cpu, "hwm_before": before, "hwm": vm_hwm_mib()}), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/fluxmini-bench-vae", help="where the random models are written")
    ap.add_argument("--sizes", default="512,1024", help="image sides in pixels (square)")
    ap.add_argument("--types", default="f32", help="conv kernel types: f32,f16")
    ap.add_argument("--modes", default="untiled,tiled", help="untiled,tiled")
    ap.add_argument("--tile", type=int, default=0, help="tile side in latent px (0 = engine default, 72)")
    ap.add_argument("--overlap", type=int, default=-1, help="tile overlap in latent px (-1 = default, min(16, tile/4))")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--encode", action="store_true", help="time the encoder instead (image of the size)")
    ap.add_argument("--convs", default="own", help="convolutions: own (csrc/cpu_conv.cpp, the default for F32 "
                    "kernels on AVX2), im2col (ggml's banded im2col + mul_mat), direct (ggml_conv_2d_direct)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0

    os.makedirs(args.dir, exist_ok=True)
    tile = args.tile or 72
    overlap = min(16, tile // 4) if args.overlap < 0 else args.overlap
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.1f} "
          f"(this machine: {os.cpu_count()} logical CPUs); tile {tile}, overlap {overlap}", flush=True)
    header = (f"{'what':<7} {'size':>5} {'kernels':>7} {'conv':>6} {'mode':>8} {'tiles':>9} {'wall s':>8} {'cpu s/thr':>9} "
              f"{'GFLOP/s':>8} {'compute MiB':>11} {'peak RSS MiB':>12} {'load':>5}")
    rows = []
    for t in args.types.split(","):
        path = os.path.join(args.dir, f"vae-full-{t}.gguf")
        ensure_model(path, t)
        for size, conv, mode in [(int(s), c, m) for s in args.sizes.split(",") for c in args.convs.split(",")
                                 for m in args.modes.split(",")]:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", path, "--size", str(size),
                   "--mode", mode, "--tile", str(args.tile), "--overlap", str(args.overlap),
                   "--threads", str(args.threads)] + (["--encode"] if args.encode else [])
            load = os.getloadavg()[0]
            env = dict(os.environ, FLUXMINI_VAE_CONV="" if conv == "own" else conv)
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            res = next((json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")), None)
            if p.returncode != 0 or res is None:
                print(f"{size} {t} {mode}: failed (rc {p.returncode})\n{p.stderr[-1500:]}", flush=True)
                continue
            compute = [ln for ln in p.stderr.splitlines() if "compute buffer" in ln and "tile(s)" in ln]
            cmib = compute[-1].rsplit("compute buffer", 1)[1].strip().split()[0] if compute else "?"
            lat = size // 8
            if mode == "tiled" and not args.encode:
                fl, n, side = tiled_flops(lat, tile, overlap)
                tiles = f"{n}x{n}@{side}"
            else:
                fl, tiles = decoder_flops(h=lat, w=lat), "1"
                if mode == "tiled":
                    tiles = "(enc)"
            gf = "" if args.encode else f"{fl / res['wall'] / 1e9:8.1f}"
            row = (f"{'encode' if args.encode else 'decode':<7} {size:>5} {t:>7} {conv:>6} {mode:>8} {tiles:>9} "
                   f"{res['wall']:8.1f} {res['cpu'] / args.threads:9.1f} {gf:>8} {cmib:>11} "
                   f"{res['hwm']:12.0f} {load:5.1f}")
            rows.append(row)
            if len(rows) == 1:
                print(header)
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
