"""Write tests/data/schedule_goldens.npz from diffusers (run by hand; needs diffusers + torch).

    python tests/make_sampling_goldens.py

The file pins what diffusers' FLUX pipelines compute, so tests/test_sampling.py checks our
schedules and img2img start index against diffusers without diffusers installed:

* ``sigmas_w{W}_h{H}_n{N}``: ``FlowMatchEulerDiscreteScheduler`` (FLUX.1-dev scheduler config)
  ``.sigmas`` after ``set_timesteps(sigmas=np.linspace(1, 1/N, N), mu=calculate_shift(L))`` with
  ``L = (H//16) * (W//16)``, exactly as ``FluxPipeline.__call__`` prepares them (N + 1 float32
  values, the last one 0); ``mu_w{W}_h{H}`` the ``mu`` used.
* ``i2i_start[a, b]``: ``FluxImg2ImgPipeline.get_timesteps(i2i_steps[a], i2i_strengths[b])``
  as ``t_start = steps - remaining_steps`` (-1 where diffusers rejects the strength because no
  step remains), ``i2i_sigma0[a, b]`` the sigma the pipeline noises the image latent to
  (``scheduler.sigmas[t_start]``; NaN where rejected).
"""

from __future__ import annotations

import os
import types

import numpy as np

import diffusers
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux.pipeline_flux_img2img import FluxImg2ImgPipeline

# scheduler/scheduler_config.json of black-forest-labs/FLUX.1-dev
FLUX_DEV_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

SIZES = [(256, 256), (512, 512), (1024, 1024), (512, 768), (768, 512), (1360, 768), (2048, 2048)]
STEPS = [1, 2, 4, 10, 20, 28, 50]

I2I_STEPS = [1, 3, 4, 7, 10, 20, 28, 50, 100]
I2I_STRENGTHS = [0.0, 0.05, 0.1, 0.25, 0.29, 0.3, 0.33, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95,
                 0.99, 1.0]

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "schedule_goldens.npz")


def diffusers_schedule(steps: int, width: int, height: int):
    """(mu, scheduler) after FluxPipeline's timestep preparation."""
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG)
    image_seq_len = (height // 8 // 2) * (width // 8 // 2)
    mu = calculate_shift(
        image_seq_len,
        sched.config.get("base_image_seq_len", 256),
        sched.config.get("max_image_seq_len", 4096),
        sched.config.get("base_shift", 0.5),
        sched.config.get("max_shift", 1.15),
    )
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return mu, sched


def diffusers_img2img_start(steps: int, strength: float):
    """(t_start, sigma at t_start) of FluxImg2ImgPipeline, or (-1, nan) if it would refuse."""
    _, sched = diffusers_schedule(steps, 512, 512)
    fake_pipe = types.SimpleNamespace(scheduler=sched)
    _, remaining = FluxImg2ImgPipeline.get_timesteps(fake_pipe, steps, strength, "cpu")
    if remaining < 1:
        return -1, float("nan")
    t_start = steps - remaining
    return t_start, float(sched.sigmas[t_start])


def main() -> None:
    data = {
        "diffusers_version": np.array(diffusers.__version__),
        "sizes": np.array(SIZES, dtype=np.int64),
        "steps": np.array(STEPS, dtype=np.int64),
    }
    for width, height in SIZES:
        for steps in STEPS:
            mu, sched = diffusers_schedule(steps, width, height)
            data[f"mu_w{width}_h{height}"] = np.array(mu, dtype=np.float64)
            data[f"sigmas_w{width}_h{height}_n{steps}"] = sched.sigmas.numpy().astype(np.float32)

    start = np.zeros((len(I2I_STEPS), len(I2I_STRENGTHS)), dtype=np.int64)
    sigma0 = np.zeros(start.shape, dtype=np.float32)
    for a, steps in enumerate(I2I_STEPS):
        for b, strength in enumerate(I2I_STRENGTHS):
            start[a, b], sigma0[a, b] = diffusers_img2img_start(steps, strength)
    data["i2i_steps"] = np.array(I2I_STEPS, dtype=np.int64)
    data["i2i_strengths"] = np.array(I2I_STRENGTHS, dtype=np.float64)
    data["i2i_start"] = start
    data["i2i_sigma0"] = sigma0

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **data)
    print(f"wrote {OUT} ({len(data)} arrays, diffusers {diffusers.__version__})")


if __name__ == "__main__":
    main()
