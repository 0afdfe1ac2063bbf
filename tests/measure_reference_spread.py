"""Measure how far the torch references drift from the committed goldens across float32 code paths.

    python tests/measure_reference_spread.py [--checks flux vae text] [--json OUT]

The golden-freshness tests (test_flux / test_vae / test_text_encoders ``*goldens*current`` and
``goldens_match_live_reference``) recompute the references with torch and compare them with the
committed goldens. Their purpose is to catch a changed reference (a diffusers/transformers
release that computes something else) or changed inputs, not float32 rounding. torch's float32
results depend on the CPU: ATen's vectorised kernels are compiled per ISA level
(``ATEN_CPU_CAPABILITY``), MKL picks its sgemm by CPU (an AMD CPU gets MKL's AVX2 path), oneDNN
by its ISA limit, and the thread count changes reduction order. Each configuration below runs in
its own process (the variables are read when torch loads) and reports, per check, the same
error measure the test uses. The tests' tolerances are set a few times above the largest value.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# name -> (environment, torch threads, mkldnn enabled)
CONFIGS = {
    "default-2t": ({}, 2, True),
    "default-1t": ({}, 1, True),
    "no-mkldnn": ({}, 2, False),
    "aten-avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, 2, True),
    "aten-scalar": ({"ATEN_CPU_CAPABILITY": "default"}, 1, True),
    "mkl-avx2": ({"MKL_ENABLE_INSTRUCTIONS": "AVX2", "MKL_CBWR": "AVX2"}, 2, True),
    "onednn-avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, 2, True),
    # what an AVX2-only CPU (or MKL on AMD) runs: every library on its AVX2 path
    "all-avx2-1t": ({"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                     "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, 1, True),
}


def _flux() -> dict:
    import make_flux_goldens as G

    goldens = np.load(G.GOLDENS)
    models, worst = {}, 0.0
    for i, (name, h, w, sigma, guidance, n_txt, seed) in enumerate(G.CASES):
        latent, t5, pooled = G.case_inputs(h, w, n_txt, seed, G.model_dims(name).flux)
        if name not in models:
            models[name] = G.reference_model(G.model_path(name))
        ref = G.reference_forward(models[name], latent, sigma, guidance, t5, pooled)
        gold = goldens[f"c{i}_out"]
        worst = max(worst, float(np.abs(ref - gold).max() / np.abs(gold).max()))
    return {"flux_rel": worst}


def _vae() -> dict:
    import make_vae_goldens as G

    goldens = np.load(G.GOLDENS)
    models, worst = {}, 0.0
    for case in G.CASES:
        if case[0] not in models:
            models[case[0]] = G.reference_model(case[0])
        ref = G.reference(models[case[0]], case)
        gold = goldens[G.case_key(case)]
        worst = max(worst, float(np.abs(ref - gold).max() / np.abs(ref).max()))
    return {"vae_rel": worst}


def _text() -> dict:
    import make_text_goldens as mk

    goldens = np.load(mk.GOLDENS)
    refs = mk.References()
    out = {"clip_abs": 0.0, "t5_abs": 0.0, "model_err_ratio_min": np.inf, "model_err_ratio_max": 0.0}
    for net, cases in (("clip", mk.clip_cases()), ("t5", mk.t5_cases())):
        for name, big, ids in cases:
            ref, err, _ = refs.outputs(net, big, ids)
            key = f"{net}_{name}"
            out[f"{net}_abs"] = max(out[f"{net}_abs"], float(np.abs(goldens[key + "_out"] - ref).max()))
            if big != "f32":
                ratio = float(goldens[key + "_model_err"]) / err
                out["model_err_ratio_min"] = min(out["model_err_ratio_min"], ratio)
                out["model_err_ratio_max"] = max(out["model_err_ratio_max"], ratio)
    return out


CHECKS = {"flux": _flux, "vae": _vae, "text": _text}


def _child(checks, threads: int, mkldnn: bool) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn
    result = {"capability": torch.backends.cpu.get_cpu_capability()}
    for c in checks:
        result.update(CHECKS[c]())
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checks", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--json", help="write the table here")
    p.add_argument("--child", nargs=2, metavar=("THREADS", "MKLDNN"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.checks, int(args.child[0]), args.child[1] == "1")
        return
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    print(f"CPU: {cpu}")
    table = {}
    for name in args.configs:
        env, threads, mkldnn = CONFIGS[name]
        cmd = [sys.executable, __file__, "--checks", *args.checks, "--child", str(threads), "1" if mkldnn else "0"]
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            continue
        table[name] = json.loads(line[7:])
        print(f"{name:>12}: " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in table[name].items()), flush=True)
    keys = sorted({k for r in table.values() for k, v in r.items() if isinstance(v, float)})
    print("max over configurations: " + "  ".join(
        f"{k}={max(r[k] for r in table.values() if k in r):.3g}" for k in keys if not k.endswith("_min")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
