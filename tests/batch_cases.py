"""Shared cases of the batch tests (tests/test_batch.py, tests/test_batch_ray.py): twelve jobs on
the tiny F32 model, small enough to run in seconds, with one bad job, repeated prompts (the
embedding cache), a count > 1, the sd.cpp mode, another size and another T5 length."""

from __future__ import annotations

import io
import json
import os

import make_pipeline_goldens as ref

# per-file defaults, as `fluxmini batch -W 32 -H 32 --steps 2 --t5-length 16` gives them
DEFAULTS = {"width": 32, "height": 32, "steps": 2, "t5_length": 16}
BAD_INDEX = 6
JOBS = [
    {"prompt": "a photo of a cat", "seed": 1},
    {"prompt": "a photo of a cat", "seed": 2, "count": 2},
    {"prompt": "a dog", "seed": 3},
    {"prompt": "", "seed": 4},
    {"prompt": "a photo of a cat", "seed": 5, "guidance": 2.0},
    {"prompt": "a lighthouse", "seed": 6, "width": 48, "height": 32},
    {"prompt": "a bad size", "seed": 7, "width": 40},  # not a multiple of 16: the bad job
    {"prompt": "a dog", "seed": 8, "steps": 3},
    {"prompt": "a lighthouse", "seed": 9, "compat": "sd.cpp", "t5_length": 24},
    {"prompt": "ünïcode prompt", "seed": 10},
    {"prompt": "a dog", "seed": 11, "t5_length": 20},
    {"prompt": "a photo of a cat", "seed": 2**40, "count": 2},
]
assert len(JOBS) == 12


def model_path() -> str:
    return str(ref.model_path())


def write_jobs(path, jobs=JOBS) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for j in jobs:
            f.write(json.dumps(j, ensure_ascii=False) + "\n")
    return str(path)


def expected_images(jobs=JOBS, defaults=DEFAULTS) -> dict:
    """key -> generate() keyword arguments, for every image the good jobs make (written by hand
    from the naming rule: job index, underscore, seed)."""
    out = {}
    for i, j in enumerate(jobs):
        if i == BAD_INDEX and jobs is JOBS:
            continue
        p = {**defaults, **j}
        count = p.pop("count", 1)
        for k in range(count):
            out[f"{i:06d}_{p['seed'] + k}"] = {**p, "seed": p["seed"] + k}
    return out


def reference_png(model, kwargs) -> bytes:
    """What `fluxmini generate` writes for these parameters: FluxMini.generate's image through
    save_png (the metadata it carries in image.info)."""
    from fluxmini.imageio import save_png

    image = model.generate(progress=False, **kwargs)
    buf = io.BytesIO()
    save_png(image, buf)
    return buf.getvalue()


def read_results(out_dir) -> list:
    with open(os.path.join(out_dir, "results.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
