"""fluxmini.sampling: schedules, img2img start, noising and the Euler loop (docs/MODEL.md §4, §5.3).

Reference points: the hand-checked table of docs/MODEL.md §4.4; diffusers' FLUX scheduler and
img2img pipeline, through the committed goldens (tests/data/schedule_goldens.npz, written by
tests/make_sampling_goldens.py) and, where diffusers is installed, live; stable-diffusion.cpp's
code as described in docs/MODEL.md §4.4 / §5.3; and ODEs whose solutions are derived by hand.
"""

from __future__ import annotations

import importlib.util
import math
import os
import types

import numpy as np
import pytest

from fluxmini.errors import Cancelled, FluxMiniError, FluxMiniValueError
from fluxmini.sampling import (
    bfl_mu,
    euler_sample,
    img2img_start,
    noised_start,
    sigmas,
    time_shift,
)

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDENS = os.path.join(HERE, "data", "schedule_goldens.npz")


def goldens_maker():
    """tests/make_sampling_goldens.py as a module (skips the test without diffusers)."""
    pytest.importorskip("diffusers")
    spec = importlib.util.spec_from_file_location(
        "make_sampling_goldens", os.path.join(HERE, "make_sampling_goldens.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ulp_distance(a, b) -> int:
    """Largest distance in float32 units in the last place between two float32 arrays of
    non-negative values (the int32 views of non-negative floats are ordered like the floats)."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    assert a.shape == b.shape and np.all(a >= 0) and np.all(b >= 0)
    ia = a.view(np.int32).astype(np.int64)
    ib = b.view(np.int32).astype(np.int64)
    return int(np.max(np.abs(ia - ib)))


# ------------------------------------------------------------------ docs/MODEL.md §4.4 test vectors

TABLE = {
    ("sd.cpp", 4, None): [1.0, 0.8635, 0.61298, 0.00315, 0],
    ("sd.cpp", 10, None): [1.0, 0.96197, 0.91714, 0.8635, 0.79818, 0.71689, 0.61298, 0.47545,
                           0.28486, 0.00315, 0],
    ("sd.cpp", 20, None): [1.0, 0.98273, 0.96413, 0.94402, 0.92223, 0.89853, 0.87266, 0.8443,
                           0.81308, 0.77855, 0.74015, 0.69718, 0.64879, 0.59387, 0.531, 0.45834,
                           0.3734, 0.27277, 0.15167, 0.00315, 0],
    (None, 10, (1024, 1024)): [1.0, 0.96601, 0.92665, 0.88051, 0.8257, 0.75951, 0.67799, 0.5751,
                               0.4412, 0.25976, 0],
    (None, 20, (512, 512)): [1.0, 0.97273, 0.94413, 0.91409, 0.8825, 0.84923, 0.81416, 0.77713,
                             0.73797, 0.6965, 0.65249, 0.60571, 0.5559, 0.50274, 0.44589, 0.38494,
                             0.31945, 0.24888, 0.17261, 0.08993, 0],
}


@pytest.mark.parametrize("key", list(TABLE), ids=lambda k: f"{k[0]}-{k[1]}-{k[2]}")
def test_model_md_table(key):
    compat, steps, size = key
    want = np.array(TABLE[key])
    # the sd.cpp schedule does not depend on the size: check several
    sizes = [size] if size else [(512, 512), (1024, 1024), (256, 768)]
    for width, height in sizes:
        got = sigmas(steps, width, height, compat=compat)
        assert got.shape == want.shape
        # the table has 5 decimals (trailing zeros dropped): |value - entry| <= 0.5e-5
        np.testing.assert_allclose(got, want, rtol=0, atol=0.5e-5 + 1e-7)


# ------------------------------------------------------------------ shape of the schedules


@pytest.mark.parametrize("compat", [None, "sd.cpp", "llama-box"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 10, 20, 28, 50, 100, 999, 1000])
def test_schedule_structure(compat, steps):
    for width, height in [(16, 16), (512, 512), (1360, 768), (4096, 4096)]:
        s = sigmas(steps, width, height, compat)
        assert s.dtype == np.float32 and s.shape == (steps + 1,)
        assert s[0] == np.float32(1.0)
        assert s[-1] == np.float32(0.0)
        if width <= 2048:
            assert np.all(np.diff(s) < 0), "strictly decreasing"
        else:
            # mu grows without bound with the size (11.5 at 4096x4096): with ~1000 steps the
            # first sigmas all round to 1.0f (diffusers gives the same), so only non-increasing
            assert np.all(np.diff(s) <= 0)


def test_sdcpp_schedule_against_float64_formula():
    # docs/MODEL.md §4.4: t_k = 999 - k*999/(N-1), sigma_k = shift(1.15, (t_k + 1)/1000), then 0.
    # sd.cpp keeps t_k in float32 (absolute error < 1e-4 on the grid, so < 1e-7 in
    # (t_k + 1)/1000) and d sigma / d t <= exp(1.15) ~ 3.2 near t = 0: within 3.2e-7 absolute,
    # and the float32 result itself within 1e-6 relative.
    for steps in [2, 3, 5, 10, 20, 33, 100, 1000]:
        k = np.arange(steps)
        t = 999.0 - k * 999.0 / (steps - 1)
        want = np.append(time_shift(1.15, (t + 1.0) / 1000.0), 0.0)
        for compat in ("sd.cpp", "llama-box"):
            got = sigmas(steps, 512, 512, compat=compat)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=3.5e-7)
    np.testing.assert_array_equal(sigmas(1, 512, 512, compat="sd.cpp"), [1.0, 0.0])
    # the last nonzero sigma is shift(1.15, 0.001), not small as in the BFL schedule
    assert sigmas(20, 512, 512, compat="sd.cpp")[-2] == pytest.approx(
        math.exp(1.15) / (math.exp(1.15) + 999.0), rel=1e-6)


# The 20-step schedules bit for bit, as a g++ 12 / glibc 2.36 build of the C++ expressions computes
# them (docs/MODEL.md §4.4): upstream stable-diffusion.cpp (stable-diffusion-cpp-python 0.4.7,
# denoiser.hpp: float grid, flux_time_shift = expf(mu) / (expf(mu) + powf(1.0f / t - 1.0f, 1.0f)),
# all float) and llama-box's fork ([FORK-86]: the same grid, std::exp(float) and the rest in double,
# stored as float). They differ in 4 of the 20 values, by one float32 ulp.
SDCPP_20 = ["0x1p+0", "0x1.f72888p-1", "0x1.eda1dp-1", "0x1.e356aap-1", "0x1.d82e6p-1", "0x1.cc0be4p-1",
            "0x1.beccccp-1", "0x1.b04826p-1", "0x1.a04caap-1", "0x1.8e9ea6p-1", "0x1.7af4fep-1",
            "0x1.64f538p-1", "0x1.4c2df6p-1", "0x1.300f56p-1", "0x1.0fdfdp-1", "0x1.d5580ep-2",
            "0x1.7e5ca4p-2", "0x1.1751ap-2", "0x1.36a0d2p-3", "0x1.9d0f28p-9"]
LLAMA_BOX_20 = list(SDCPP_20)
LLAMA_BOX_20[3], LLAMA_BOX_20[5], LLAMA_BOX_20[6], LLAMA_BOX_20[18] = (
    "0x1.e356acp-1", "0x1.cc0be2p-1", "0x1.becccep-1", "0x1.36a0d4p-3")


@pytest.mark.parametrize("compat,hexes", [("sd.cpp", SDCPP_20), ("llama-box", LLAMA_BOX_20)])
def test_sdcpp_schedules_bit_for_bit(compat, hexes):
    want = np.array([float.fromhex(h) for h in hexes] + [0.0], np.float32)
    np.testing.assert_array_equal(sigmas(20, 512, 512, compat), want)
    assert ulp_distance(sigmas(20, 512, 512, "sd.cpp"), sigmas(20, 512, 512, "llama-box")) == 1


def test_sdcpp_mu_fixed():
    # mu 1.0 (sd.cpp's value for models without guidance input) and the identity at mu = 0:
    # shift(0, t) = 1 / (1 + 1/t - 1) = t, so the grid itself comes out.
    steps = 10
    t = (999.0 - np.arange(steps) * 999.0 / (steps - 1) + 1.0) / 1000.0
    np.testing.assert_allclose(sigmas(steps, 64, 64, "sd.cpp", mu_fixed=0.0)[:-1], t, rtol=1e-6)
    np.testing.assert_allclose(sigmas(steps, 64, 64, "sd.cpp", mu_fixed=1.0)[:-1],
                               time_shift(1.0, t), rtol=2e-6)
    # ignored by the reference schedule
    np.testing.assert_array_equal(sigmas(steps, 64, 64, mu_fixed=0.3), sigmas(steps, 64, 64))


def test_bfl_schedule_against_float64_formula():
    # docs/MODEL.md §4.4: sigma_i = shift(mu, 1 - i/N), mu = 0.5 + 0.65 (L - 256)/3840 with
    # L = (H/16)(W/16); only float32 rounding of the result separates the two.
    for (width, height) in [(256, 256), (512, 512), (1024, 1024), (512, 768), (1360, 768)]:
        tokens = (width // 16) * (height // 16)
        mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
        for steps in [1, 4, 10, 28, 50]:
            i = np.arange(steps + 1)
            t = 1.0 - i / steps
            e = math.exp(mu)
            want = np.where(t > 0, e / (e + (1.0 / np.maximum(t, 1e-300) - 1.0)), 0.0)
            got = sigmas(steps, width, height)
            np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-12)


def test_bfl_mu():
    assert bfl_mu(4096) == pytest.approx(1.15, abs=1e-12)  # 1024x1024
    assert bfl_mu(1024) == pytest.approx(0.63, abs=1e-12)  # 512x512
    assert bfl_mu(256) == pytest.approx(0.5, abs=1e-12)  # 256x256
    assert bfl_mu(16384) == pytest.approx(0.5 + 0.65 * (16384 - 256) / 3840, abs=1e-12)  # no clamp
    # the size enters as (H//16)*(W//16): 512x768 -> 32*48 = 1536 tokens
    s = sigmas(10, 512, 768)
    assert s[1] == np.float32(time_shift(bfl_mu(1536), 0.9))


def test_time_shift():
    assert time_shift(0.63, 1.0) == 1.0
    assert time_shift(1.15, 0.0) == 0.0
    assert time_shift(0.0, 0.25) == pytest.approx(0.25, abs=1e-15)  # mu 0: identity
    assert time_shift(1.15, 0.5) == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1.0))
    t = np.linspace(0, 1, 11).reshape(1, 11)
    out = time_shift(1.15, t)
    assert out.shape == (1, 11) and out.dtype == np.float64
    assert np.all(np.diff(out[0]) > 0) and np.all(out >= t)  # mu > 0 pushes sigmas up
    assert isinstance(time_shift(1.0, 0.5), float)
    for bad_t in (-0.1, 1.5, float("nan"), [0.5, 2.0]):
        with pytest.raises(FluxMiniValueError):
            time_shift(1.0, bad_t)
    with pytest.raises(FluxMiniValueError):
        time_shift(float("inf"), 0.5)


# ------------------------------------------------------------------ against diffusers


@pytest.fixture(scope="module")
def goldens():
    with np.load(GOLDENS) as data:
        return {k: data[k] for k in data.files}


def test_schedules_against_diffusers_goldens(goldens):
    # diffusers evaluates the shift in float32 (three rounded float32 operations), we in
    # float64 with one final rounding: measured <= 2 ulps apart (1.2e-7 absolute); 4 allowed.
    checked = 0
    for width, height in goldens["sizes"]:
        width, height = int(width), int(height)
        assert bfl_mu((height // 16) * (width // 16)) == goldens[f"mu_w{width}_h{height}"]
        for steps in goldens["steps"]:
            want = goldens[f"sigmas_w{width}_h{height}_n{int(steps)}"]
            got = sigmas(int(steps), width, height)
            assert got.shape == want.shape
            assert got[-1] == want[-1] == 0.0 and got[0] == want[0] == 1.0
            assert ulp_distance(got, want) <= 4
            checked += 1
    assert checked >= 4 * 4


def test_schedules_against_diffusers_live():
    mk = goldens_maker()

    for width, height in [(256, 256), (512, 512), (1024, 1024), (512, 768), (768, 1360)]:
        for steps in [1, 3, 10, 20, 28, 50]:
            mu, sched = mk.diffusers_schedule(steps, width, height)
            assert bfl_mu((height // 16) * (width // 16)) == mu
            want = sched.sigmas.numpy()
            assert ulp_distance(sigmas(steps, width, height), want) <= 4
            # the timesteps the pipeline feeds the transformer (before its /1000) are the sigmas
            np.testing.assert_allclose(sched.timesteps.numpy() / 1000.0, want[:-1], rtol=1e-6)


def test_goldens_are_current():
    """The committed file still says what the installed diffusers computes."""
    mk = goldens_maker()

    with np.load(GOLDENS) as data:
        for width, height in data["sizes"]:
            for steps in data["steps"]:
                _, sched = mk.diffusers_schedule(int(steps), int(width), int(height))
                key = f"sigmas_w{int(width)}_h{int(height)}_n{int(steps)}"
                np.testing.assert_array_equal(data[key], sched.sigmas.numpy())
        for a, steps in enumerate(data["i2i_steps"]):
            for b, strength in enumerate(data["i2i_strengths"]):
                start, _ = mk.diffusers_img2img_start(int(steps), float(strength))
                assert data["i2i_start"][a, b] == start


# ------------------------------------------------------------------ img2img start


def diffusers_t_start(steps: int, strength: float):
    """FluxImg2ImgPipeline.get_timesteps, rewritten from reading it: the number of skipped
    steps, or None where the pipeline raises (fewer than 1 step left)."""
    init_timestep = min(steps * strength, steps)
    t_start = int(max(steps - init_timestep, 0))
    return None if steps - t_start < 1 else t_start


def test_img2img_start_matches_diffusers_goldens(goldens):
    for a, steps in enumerate(goldens["i2i_steps"]):
        steps = int(steps)
        sched = sigmas(steps, 512, 512)
        for b, strength in enumerate(goldens["i2i_strengths"]):
            strength = float(strength)
            want = int(goldens["i2i_start"][a, b])
            rewrite = diffusers_t_start(steps, strength)
            assert (-1 if rewrite is None else rewrite) == want
            if want < 0:
                with pytest.raises(FluxMiniValueError):
                    img2img_start(sched, steps, strength)
                continue
            start = img2img_start(sched, steps, strength)
            assert start == want, (steps, strength)
            # the pipeline noises the image latent to scheduler.sigmas[t_start]
            assert ulp_distance(sched[start], goldens["i2i_sigma0"][a, b]) <= 4


def test_img2img_start_matches_diffusers_rewrite_everywhere():
    for steps in list(range(1, 31)) + [50, 100, 1000]:
        sched = sigmas(steps, 512, 512)
        for strength in np.linspace(0, 1, 101).tolist() + [0.29, 0.58, 1 / 3, 2 / 3]:
            want = diffusers_t_start(steps, strength)
            if want is None:
                with pytest.raises(FluxMiniValueError):
                    img2img_start(sched, steps, strength)
            else:
                assert img2img_start(sched, steps, strength) == want


def test_img2img_start_against_diffusers_live():
    mk = goldens_maker()
    from diffusers.pipelines.flux.pipeline_flux_img2img import FluxImg2ImgPipeline

    for steps in [1, 2, 5, 10, 20, 28]:
        for strength in [0.05, 0.2, 0.29, 0.5, 0.58, 0.6, 0.75, 0.99, 1.0]:
            _, sched = mk.diffusers_schedule(steps, 512, 512)
            fake_pipe = types.SimpleNamespace(scheduler=sched)
            _, remaining = FluxImg2ImgPipeline.get_timesteps(fake_pipe, steps, strength, "cpu")
            assert img2img_start(sigmas(steps, 512, 512), steps, strength) == steps - remaining


def test_img2img_start_sdcpp():
    # docs/MODEL.md §5.3 / sd.cpp img2img(): t_enc = (size_t)(steps * strength) with a float32
    # product, t_enc = steps - 1 if it equals steps, keep sigmas from steps - t_enc - 1 on.
    def start(steps, strength):
        got = img2img_start(sigmas(steps, 512, 512, "sd.cpp"), steps, strength, "sd.cpp")
        # llama-box's fork computes the same index (upstream skips it at strength 1: start 0 too)
        assert img2img_start(sigmas(steps, 512, 512, "llama-box"), steps, strength, "llama-box") == got
        return got

    assert start(20, 0.75) == 4  # t_enc 15: 16 steps run
    assert start(20, 1.0) == 0  # t_enc 20 -> 19: all 20 steps from sigma 1
    assert start(20, 0.0) == 19  # t_enc 0: the last (almost no-op) step still runs
    assert start(10, 0.7) == 2  # 10 * 0.7f rounds to 7.0f
    assert start(1, 0.5) == 0 and start(1, 1.0) == 0
    # float32 vs float64: 50 * 0.58 is 28.999999999999996 in float64 but 29.0f in float
    assert start(50, 0.58) == 50 - 29 - 1
    assert start(100, 0.29) == 100 - 29 - 1
    for steps in [1, 2, 7, 20, 50]:
        for strength in np.linspace(0, 1, 41):
            t_enc = min(int(np.float32(steps) * np.float32(strength)), steps - 1)
            assert start(steps, float(strength)) == steps - t_enc - 1


@pytest.mark.parametrize("compat", [None, "sd.cpp", "llama-box"])
def test_img2img_start_bad_arguments(compat):
    sched = sigmas(10, 512, 512, compat)
    for strength in (-0.01, 1.01, float("nan"), "0.5", None, True):
        with pytest.raises(FluxMiniValueError):
            img2img_start(sched, 10, strength, compat)
    with pytest.raises(FluxMiniValueError):
        img2img_start(sched[:-1], 10, 0.5, compat)  # wrong length
    with pytest.raises(FluxMiniValueError):
        img2img_start(sched, 0, 0.5, compat)
    with pytest.raises(FluxMiniValueError):
        img2img_start(sched, 10, 0.5, "comfy")


# ------------------------------------------------------------------ noised_start


def test_noised_start():
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((16, 4, 6)).astype(np.float32)
    noise = rng.standard_normal((16, 4, 6)).astype(np.float32)
    latent_copy, noise_copy = latent.copy(), noise.copy()
    np.testing.assert_array_equal(noised_start(latent, noise, 1.0), noise)
    np.testing.assert_array_equal(noised_start(latent, noise, 0.0), latent)
    out = noised_start(latent, noise, 0.6524894)
    assert out.dtype == np.float32 and out.shape == latent.shape
    s = np.float32(0.6524894)
    np.testing.assert_array_equal(out, s * noise + (np.float32(1) - s) * latent)
    np.testing.assert_allclose(out, 0.6524894 * noise.astype(np.float64)
                               + (1 - 0.6524894) * latent.astype(np.float64), atol=1e-6)
    np.testing.assert_array_equal(latent, latent_copy)
    np.testing.assert_array_equal(noise, noise_copy)
    with pytest.raises(FluxMiniValueError):
        noised_start(latent, noise[:8], 0.5)
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(FluxMiniValueError):
            noised_start(latent, noise, bad)


# ------------------------------------------------------------------ Euler loop


def test_euler_is_exact_on_the_straight_flow():
    # For data d and noise n the flow-matching path x(s) = s n + (1 - s) d has the velocity
    # v(x, s) = (x - d)/s (= n - d on the path). Then x + (s' - s) v = d + s' (n - d): Euler
    # stays on the path for any schedule and ends at d at s = 0.
    rng = np.random.default_rng(1)
    d = rng.standard_normal((16, 8, 8)).astype(np.float32)
    n = rng.standard_normal((16, 8, 8)).astype(np.float32)

    def model(x, s):
        return (x.astype(np.float64) - d) / s

    for compat in (None, "sd.cpp", "llama-box"):
        sched = sigmas(10, 512, 512, compat)
        np.testing.assert_allclose(euler_sample(model, n, sched), d, atol=2e-5)
        # img2img: start on the path at the start sigma, reach the same end
        start = img2img_start(sched, 10, 0.5, compat)
        x0 = noised_start(d, n, sched[start])
        np.testing.assert_allclose(euler_sample(model, x0, sched[start:]), d, atol=2e-5)


def test_euler_linear_field_hand_derived():
    # v = a x: the ODE dx/ds = a x from s = 1 to 0 has x(0) = x(1) exp(-a); Euler multiplies
    # by (1 + a (s_{i+1} - s_i)) per step. Uniform steps of 1/N give (1 - a/N)^N, which
    # converges to exp(-a) with error ~ a^2 exp(-a) / (2N).
    a = 0.8
    x1 = np.array([1.0, -2.0, 0.5], dtype=np.float32)

    def model(x, s):
        return a * x

    for steps in (1, 10, 100, 1000):
        sched = np.linspace(1.0, 0.0, steps + 1).astype(np.float32)
        got = euler_sample(model, x1, sched)
        ds = np.diff(sched.astype(np.float32)).astype(np.float64)
        factor = np.prod(1.0 + a * ds)
        np.testing.assert_allclose(got, x1 * factor, rtol=1e-5)
        assert factor == pytest.approx((1 - a / steps) ** steps, rel=1e-5)
        assert abs(factor - math.exp(-a)) <= a * a * math.exp(-a) / steps
    # a constant field is integrated exactly: x(0) = x(1) - c
    c = np.float32(0.25)
    got = euler_sample(lambda x, s: np.full_like(x, c), x1, sigmas(7, 512, 512))
    np.testing.assert_allclose(got, x1 - c, atol=1e-6)


def test_euler_calls_and_types():
    sched = sigmas(5, 512, 512)
    x = np.zeros((2, 3), dtype=np.float64)
    seen = []

    def model(xx, s):
        assert xx.dtype == np.float32 and xx.shape == (2, 3)
        assert type(s) is float
        seen.append(s)
        return np.ones((2, 3))

    out = euler_sample(model, x, sched)
    assert out.dtype == np.float32
    assert seen == [float(v) for v in sched[:-1]]
    assert np.all(x == 0), "input untouched"
    # a one-value schedule does no step
    np.testing.assert_array_equal(euler_sample(model, x, [1.0]), x)
    assert len(seen) == 5


def test_callback_progress_and_cancel():
    sched = sigmas(6, 512, 512)
    x = np.ones((4,), dtype=np.float32)
    calls = []

    def progress(i, total, latent):
        calls.append((i, total, latent.copy()))
        return None if i % 2 else True

    out = euler_sample(lambda xx, s: -xx, x, sched, callback=progress)
    assert [(i, t) for i, t, _ in calls] == [(i, 6) for i in range(6)]
    np.testing.assert_array_equal(calls[-1][2], out)

    n_model = []

    def model(xx, s):
        n_model.append(s)
        return -xx

    def cancel_at_3(i, total, latent):
        return i != 3

    with pytest.raises(Cancelled) as info:
        euler_sample(model, x, sched, callback=cancel_at_3)
    assert isinstance(info.value, FluxMiniError)
    assert len(n_model) == 4
    np.testing.assert_array_equal(x, np.ones(4, dtype=np.float32))

    with pytest.raises(Cancelled):
        euler_sample(model, x, sched, callback=lambda i, t, lat: np.False_)


def test_euler_bad_arguments():
    x = np.zeros((2, 2), dtype=np.float32)
    with pytest.raises(FluxMiniValueError):
        euler_sample(lambda xx, s: np.zeros((3,)), x, [1.0, 0.0])
    with pytest.raises(FluxMiniValueError):
        euler_sample(lambda xx, s: xx, x, [[1.0, 0.0]])
    with pytest.raises(FluxMiniValueError):
        euler_sample(lambda xx, s: xx, x, [])
    with pytest.raises(FluxMiniValueError):
        euler_sample(lambda xx, s: xx, x, [1.0, float("nan"), 0.0])


# ------------------------------------------------------------------ sigmas() bad inputs


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((0, 512, 512), {}),
        ((1001, 512, 512), {}),
        ((-3, 512, 512), {}),
        ((2.5, 512, 512), {}),
        ((20.0, 512, 512), {}),
        ((True, 512, 512), {}),
        (("20", 512, 512), {}),
        ((None, 512, 512), {}),
        ((20, 0, 512), {}),
        ((20, 512, -16), {}),
        ((20, 512.0, 512), {}),
        ((20, 512, None), {}),
        ((20, 512, 512), {"compat": "diffusers"}),
        ((20, 512, 512), {"compat": "sdcpp"}),
        ((20, 512, 512), {"compat": "llama_box"}),
        ((20, 512, 512), {"compat": ["sd.cpp"]}),
        ((20, 512, 512), {"compat": np.array(["sd.cpp", "x"])}),
        ((20, 512, 512), {"compat": "sd.cpp", "mu_fixed": float("nan")}),
        ((20, 512, 512), {"compat": "sd.cpp", "mu_fixed": "1.15"}),
    ],
)
def test_sigmas_bad_arguments(args, kwargs):
    with pytest.raises(FluxMiniValueError) as info:
        sigmas(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    assert str(info.value)


def test_sigmas_accepts_numpy_integers():
    np.testing.assert_array_equal(sigmas(np.int64(20), np.int32(512), np.uint16(768)),
                                  sigmas(20, 512, 768))


# stable-diffusion-cpp-python 0.4.7's own step 1 of 4 at 256² (a build that dumps its states;
# docs/MODEL.md §4.7): state x, velocity v, the next state, as float32 bit patterns, and the two
# sigmas. Elements 30, 59, 90 are where x + (σ' − σ)·v rounds differently from sd.cpp's form.
SDCPP_STEP1 = [  # (x, v, next x)
    ("-0x1.cd88aep+0", "-0x1.82ddcep-1", "-0x1.b3213ap+0"),
    ("-0x1.130010p-1", "0x1.b3783ep-1", "-0x1.4e7168p-1"),
    ("-0x1.1665ecp-2", "-0x1.45cd3ap+0", "-0x1.92073cp-4"),
    ("0x1.8d59c4p-3", "0x1.1e967ap-1", "0x1.e1bdd6p-4"),
]
SDCPP_STEP1_SIGMAS = [1.0, float.fromhex("0x1.ba1c56p-1")]


def test_sdcpp_euler_form_gives_sdcpps_states_bit_for_bit():
    f = lambda cols: np.array([float.fromhex(c) for c in cols], np.float32)  # noqa: E731
    x, v, want = (f(col) for col in zip(*SDCPP_STEP1))
    got = euler_sample(lambda xx, s: v, x, SDCPP_STEP1_SIGMAS, sdcpp_form=True)
    np.testing.assert_array_equal(got, want)
    plain = euler_sample(lambda xx, s: v, x, SDCPP_STEP1_SIGMAS)
    assert np.sum(plain != want) == 3 and np.max(np.abs(plain - want)) <= 2.4e-7
