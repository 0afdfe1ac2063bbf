"""The text-to-image / image-to-image pipeline, its API, metadata and CLI.

References:

* whole generations on the tiny F32 model against an independent torch loop over the Hugging
  Face models (tests/make_pipeline_goldens.py, itself checked there to equal diffusers'
  FluxPipeline exactly): committed goldens (tests/data/pipeline_goldens.npz) and, with torch
  installed, live. Measure: PSNR of the decoded float image (before the byte conversion,
  unclamped) over the nominal range [-1, 1] (peak-to-peak 2). Bar: 55 dB (docs/MODEL.md §11.2); the
  engine's F32 networks each match their references to ~1e-5 relative, a handful of Euler steps
  keep that (measured ~115 dB). Leaving out the VAE shift drops far below the bar (tested).
* the stage order, the numbers handed from stage to stage, validation and cancellation with a
  fake model whose outputs are chosen so the expected values can be derived by hand;
* pixel conversions and metadata against hand-checked values.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

import fluxmini
from fluxmini import hub, pipeline
from fluxmini.engine import Engine
from fluxmini.errors import Cancelled, FluxMiniFileError, FluxMiniValueError
from fluxmini.imageio import image_to_array, read_metadata, save_png, to_uint8
from fluxmini.rng import initial_noise

import make_pipeline_goldens as ref

HERE = os.path.dirname(os.path.abspath(__file__))
PSNR_BAR = 55.0


def psnr(a, b) -> float:
    """PSNR in dB over the nominal [-1, 1] image range (peak-to-peak 2), no clamping."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(4.0 / mse)


# =========================================================================== fake model


class FakeModel(Engine):
    """Records every call. transformer returns `velocity(x, sigma)` (default zero), so the final
    latent is known by hand; the VAE decoder returns tanh of the mean of its input per pixel."""

    def __init__(self, velocity=None, enc_mean=None, pooled_dim=8, t5_dim=8):
        self.calls = []
        self.velocity = velocity
        self.enc_mean = enc_mean
        self.pooled_dim, self.t5_dim = pooled_dim, t5_dim
        self.paths = {"model": "/somewhere/FLUX.1-mini-Q4_0.gguf"}
        self.decoded_input = None
        self.encoded_input = None
        self.sigmas_seen = []
        self.t5_ids = None

    def encode_clip(self, ids):
        self.calls.append("encode_clip")
        assert np.asarray(ids).shape == (77,)
        return np.full(self.pooled_dim, 0.25, np.float32)

    def encode_t5(self, ids, *, compat=None):
        self.calls.append("encode_t5")
        self.t5_compat = compat
        self.t5_ids = np.asarray(ids)
        return np.full((len(ids), self.t5_dim), 0.5, np.float32)

    def transformer(self, x, sigma, guidance, t5, pooled):
        self.calls.append("transformer")
        self.sigmas_seen.append(sigma)
        self.guidance, self.t5_shape, self.pooled = guidance, np.shape(t5), np.asarray(pooled)
        if self.velocity is None:
            return np.zeros_like(x)
        return self.velocity(x, sigma)

    def vae_decode(self, z, tiling=None):
        self.calls.append("vae_decode")
        self.decoded_input = np.array(z)
        c, h, w = z.shape
        return np.full((3, 8 * h, 8 * w), np.tanh(float(np.mean(z))), np.float32)

    def vae_encode(self, image, tiling=None):
        self.calls.append("vae_encode")
        self.encoded_input = np.array(image)
        _, hh, ww = image.shape
        if self.enc_mean is not None:
            return self.enc_mean.copy()
        return np.zeros((16, hh // 8, ww // 8), np.float32)

    def release(self, component):
        self.calls.append("release:" + component)


def test_stage_order_and_low_memory_releases():
    m = FakeModel()
    pipeline.run(m, "a cat", width=32, height=48, steps=3, progress=False, low_memory=True)
    assert m.calls == ["encode_clip", "encode_t5", "release:clip_l", "release:t5xxl",
                       "transformer", "transformer", "transformer", "release:diffusion",
                       "vae_decode", "release:vae"]
    m = FakeModel()
    pipeline.run(m, "a cat", width=32, height=48, steps=3, progress=False)
    assert not [c for c in m.calls if c.startswith("release")]


def test_values_handed_between_stages():
    # zero velocity: the final latent is the starting noise, so the decoder's input must be
    # initial_noise(seed) / 0.3611 + 0.1159 (float32), and each step sees the next sigma
    m = FakeModel()
    res = pipeline.run(m, "a cat", width=32, height=48, steps=4, guidance=2.5, seed=1234, progress=False)
    noise = initial_noise(1234, 16, 6, 4)
    np.testing.assert_array_equal(res.latent, noise)
    np.testing.assert_array_equal(m.decoded_input, noise / np.float32(0.3611) + np.float32(0.1159))
    np.testing.assert_allclose(m.sigmas_seen, fluxmini.sigmas(4, 32, 48)[:-1], rtol=0, atol=0)
    assert m.guidance == 2.5 and m.t5_shape == (512, 8)
    np.testing.assert_array_equal(m.pooled, np.full(8, 0.25, np.float32))
    # decoded value tanh(mean) -> bytes by (x + 1) / 2 * 255 truncated
    v = np.float32(np.tanh(float(np.mean(m.decoded_input))))
    expected = int((v + np.float32(1)) * np.float32(0.5) * np.float32(255))
    assert res.image.size == (32, 48) and res.image.mode == "RGB"
    assert set(np.asarray(res.image).ravel().tolist()) == {expected}
    assert res.decoded.shape == (3, 48, 32)


def test_compat_sdcpp_schedule_t5_length_shift_and_rounding():
    # upstream stable-diffusion.cpp (stable-diffusion-cpp-python 0.4.7): T5 chunk of 256
    # (conditioner.hpp FluxCLIPEmbedder chunk_len), the VAE shift (auto_encoder_kl.hpp
    # diffusion_to_vae_latents: latents / 0.3611f + 0.1159f), bytes rounded
    # (preprocessing.hpp: value * 255.0f + 0.5f, truncated)
    m = FakeModel()
    res = pipeline.run(m, "a cat", width=64, height=64, steps=4, seed=5, compat="sd.cpp", progress=False)
    # docs/MODEL.md §4.4 table: sd.cpp N = 4 -> 1.0, 0.8635, 0.61298, 0.00315
    np.testing.assert_allclose(m.sigmas_seen, [1.0, 0.8635, 0.61298, 0.00315], atol=1e-5)
    assert m.t5_shape == (256, 8) and len(m.t5_ids) == 256
    noise = initial_noise(5, 16, 8, 8, compat="sd.cpp")  # the Box-Muller step in double (§4.7)
    np.testing.assert_array_equal(m.decoded_input, noise / np.float32(0.3611) + np.float32(0.1159))
    v = np.float32(np.tanh(float(np.mean(m.decoded_input))))
    expected = int((v + np.float32(1)) * np.float32(0.5) * np.float32(255) + np.float32(0.5))
    assert set(np.asarray(res.image).ravel().tolist()) == {expected}
    assert res.metadata["compat"] == "sd.cpp" and res.metadata["t5_length"] == 256
    assert m.t5_compat == "sd.cpp"  # the engine's T5 takes sd.cpp's arithmetic (§4.7)
    m = FakeModel()
    pipeline.run(m, "", width=64, height=64, steps=2, compat="sd.cpp", t5_length=77, progress=False)
    assert m.t5_shape == (77, 8)
    for compat in (None, "llama-box"):
        m = FakeModel()
        pipeline.run(m, "", width=16, height=16, steps=1, compat=compat, progress=False)
        assert m.t5_compat is None


def test_compat_llama_box_schedule_t5_length_and_no_shift():
    # llama-box v0.0.86's fork ([FORK-86]): T5 chunks of 255, no VAE shift, bytes truncated
    m = FakeModel()
    res = pipeline.run(m, "a cat", width=64, height=64, steps=4, seed=5, compat="llama-box", progress=False)
    np.testing.assert_allclose(m.sigmas_seen, [1.0, 0.8635, 0.61298, 0.00315], atol=1e-5)
    assert m.t5_shape == (255, 8) and len(m.t5_ids) == 255
    noise = initial_noise(5, 16, 8, 8)
    np.testing.assert_array_equal(m.decoded_input, noise / np.float32(0.3611))
    v = np.float32(np.tanh(float(np.mean(m.decoded_input))))
    expected = int((v + np.float32(1)) * np.float32(0.5) * np.float32(255))
    assert set(np.asarray(res.image).ravel().tolist()) == {expected}
    assert res.metadata["compat"] == "llama-box" and res.metadata["t5_length"] == 255


def test_euler_update_with_a_known_velocity():
    # v = -x: x_{i+1} = x_i (1 - (s_{i+1} - s_i)) step by step in float32
    m = FakeModel(velocity=lambda x, s: -x)
    res = pipeline.run(m, "", width=16, height=16, steps=3, seed=9, progress=False)
    s = fluxmini.sigmas(3, 16, 16)
    x = initial_noise(9, 16, 2, 2)
    for i in range(3):
        x = x + (s[i + 1] - s[i]) * (-x)
    np.testing.assert_allclose(res.latent, x, rtol=1e-6, atol=0)


def test_img2img_start_noising_and_encode_shift():
    mean = np.random.default_rng(3).standard_normal((16, 4, 6)).astype(np.float32)
    m = FakeModel(enc_mean=mean)
    init = np.random.default_rng(4).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    res = pipeline.run(m, "x", init_image=init, steps=5, strength=0.6, seed=21, progress=False)
    assert res.image.size == (48, 32)  # width/height default to the init image's size
    np.testing.assert_array_equal(m.encoded_input, init.transpose(2, 0, 1).astype(np.float32)
                                  / np.float32(255) * np.float32(2) - np.float32(1))
    s = fluxmini.sigmas(5, 48, 32)
    start = 2  # diffusers: int(5 - 5 * 0.6) = 2 -> 3 steps
    assert m.calls.count("transformer") == 3 and m.calls[0] == "vae_encode"
    np.testing.assert_allclose(m.sigmas_seen, s[start:-1], rtol=0, atol=0)
    z0 = np.float32(0.3611) * (mean - np.float32(0.1159))
    sig = np.float32(s[start])
    expected = initial_noise(21, 16, 4, 6) * sig + z0 * (np.float32(1) - sig)
    np.testing.assert_allclose(res.latent, expected, rtol=1e-6, atol=1e-7)
    assert res.metadata["mode"] == "img2img" and res.metadata["strength"] == 0.6
    assert res.metadata["start_step"] == 2
    # sd.cpp: t_enc = int(4 * 0.5) = 2 -> start 4 - 2 - 1 = 1; encode with the shift (upstream),
    # without it (llama-box)
    for compat, z0 in (("sd.cpp", z0), ("llama-box", np.float32(0.3611) * mean)):
        m = FakeModel(enc_mean=mean)
        res = pipeline.run(m, "x", init_image=init, steps=4, strength=0.5, seed=21, compat=compat, progress=False)
        assert m.calls.count("transformer") == 3
        sig = np.float32(fluxmini.sigmas(4, 48, 32, compat)[1])
        expected = initial_noise(21, 16, 4, 6, compat) * sig + z0 * (np.float32(1) - sig)
        np.testing.assert_allclose(res.latent, expected, rtol=1e-6, atol=1e-7)


def test_img2img_resizes_and_rejects_odd_sizes(tmp_path):
    from PIL import Image

    m = FakeModel()
    img = Image.fromarray(np.zeros((40, 50, 3), np.uint8))
    with pytest.raises(FluxMiniValueError, match="multiple of 16.*pass width= and height="):
        pipeline.run(m, "", init_image=img, steps=2, progress=False)
    with pytest.warns(UserWarning, match="resized to 64x32"):
        res = pipeline.run(m, "", init_image=img, width=64, height=32, steps=2, progress=False)
    assert res.image.size == (64, 32) and m.encoded_input.shape == (3, 32, 64)
    p = tmp_path / "init.png"
    Image.fromarray(np.zeros((32, 32, 4), np.uint8), "RGBA").save(p)  # alpha dropped
    res = pipeline.run(FakeModel(), "", init_image=str(p), steps=2, strength=1.0, progress=False)
    assert res.metadata["init_image"] == "init.png"
    with pytest.raises(FluxMiniFileError):
        pipeline.run(FakeModel(), "", init_image=str(tmp_path / "missing.png"), steps=2, progress=False)
    with pytest.raises(FluxMiniValueError, match="leaves no denoising step"):
        pipeline.run(FakeModel(), "", init_image=str(p), steps=4, strength=0.0, progress=False)


@pytest.mark.parametrize("kw, match", [
    (dict(width=0), "between 16 and 2048"),
    (dict(height=-16), "between 16 and 2048"),
    (dict(width=8), "between 16 and 2048"),
    (dict(width=2064), "between 16 and 2048"),
    (dict(height=4096), "between 16 and 2048"),
    (dict(width=500), r"multiple of 16 pixels, got 500 \(use 496 or 512\)"),
    (dict(height=17), "multiple of 16"),
    (dict(width=512.0), "must be an integer"),
    (dict(width=True), "must be an integer"),
    (dict(steps=0), "steps must be between"),
    (dict(guidance=float("nan")), "finite"),
    (dict(guidance=-1.0), ">= 0"),
    (dict(seed=-1), "seed must be in"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(compat="sdcpp"), "compat"),
    (dict(t5_length=0), "t5_length"),
    (dict(noise=np.zeros((16, 8, 8), np.float32), width=64, height=32), r"noise must have shape \[16, 4, 8\]"),
    (dict(noise=np.zeros((4, 64, 64), np.float32)), "noise must have shape"),
    (dict(noise=np.full((16, 64, 64), np.nan, np.float32)), "NaN"),
    (dict(negative_prompt="blurry"), "negative prompts are not supported"),
    (dict(callback=3), "callback must be callable"),
    (dict(vae_tiling="yes"), "vae_tiling"),
])
def test_bad_arguments_fail_before_any_work(kw, match):
    m = FakeModel()
    with pytest.raises(FluxMiniValueError, match=match):
        pipeline.run(m, "a cat", progress=False, **kw)
    assert m.calls == []


def test_bad_prompt_type():
    m = FakeModel()
    with pytest.raises(FluxMiniValueError, match="prompt must be a string"):
        pipeline.run(m, None, progress=False)
    assert m.calls == []


def test_noise_override_and_random_seed():
    noise = np.random.default_rng(0).standard_normal((16, 4, 2)).astype(np.float32)
    m = FakeModel()
    res = pipeline.run(m, "", width=16, height=32, steps=2, noise=noise, progress=False)
    np.testing.assert_array_equal(res.latent, noise)
    assert res.seed is None and res.metadata["noise"] == "custom" and "seed" not in read_metadata(res.image)
    seeds = {pipeline.run(FakeModel(), "", width=16, height=16, steps=1, seed=None, progress=False).seed
             for _ in range(3)}
    assert len(seeds) == 3  # random 32-bit seeds: a repeat has probability ~1e-9
    res = pipeline.run(FakeModel(), "", width=16, height=16, steps=1, seed=None, progress=False)
    np.testing.assert_array_equal(res.latent, initial_noise(res.seed, 16, 2, 2))
    assert read_metadata(res.image)["seed"] == res.seed


def test_callback_progress_and_cancel():
    seen = []

    def cb(step, total, latent):
        seen.append((step, total, latent.shape))
        latent[:] = 1e9  # a copy: must not affect the run

    m = FakeModel()
    res = pipeline.run(m, "", width=16, height=16, steps=3, seed=2, callback=cb, progress=False)
    assert seen == [(1, 3, (16, 2, 2)), (2, 3, (16, 2, 2)), (3, 3, (16, 2, 2))]
    np.testing.assert_array_equal(res.latent, initial_noise(2, 16, 2, 2))

    m = FakeModel()
    with pytest.raises(Cancelled, match="after step 2 of 4"):
        pipeline.run(m, "", width=16, height=16, steps=4, callback=lambda s, t, x: s < 2, progress=False)
    assert m.calls.count("transformer") == 2 and "vae_decode" not in m.calls


def test_engine_cancellation_and_ctrl_c_pass_through():
    """The engine raises Cancelled for a cancelled call (FluxMini.interrupt() or a CancelToken) and
    KeyboardInterrupt for Ctrl-C itself; the pipeline passes both on unchanged (its own checks
    come first: nothing after the failing call runs)."""
    class Cancelling(FakeModel):
        def transformer(self, *a):
            self.calls.append("transformer")
            raise Cancelled("cancelled (FluxMini.interrupt() or the call's CancelToken)")

    class CtrlC(FakeModel):
        def transformer(self, *a):
            self.calls.append("transformer")
            raise KeyboardInterrupt("interrupted (Ctrl-C)")

    for cls, exc, msg in ((Cancelling, Cancelled, "CancelToken"), (CtrlC, KeyboardInterrupt, "Ctrl-C")):
        m = cls()
        with pytest.raises(exc, match=msg):
            pipeline.run(m, "", width=16, height=16, steps=2, progress=False)
        assert m.calls.count("transformer") == 1 and "vae_decode" not in m.calls


def test_progress_without_tqdm_and_verbose(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm fails
    pipeline.run(FakeModel(), "", width=16, height=16, steps=2, progress=True, verbose=True)
    err = capsys.readouterr().err
    assert "step 1/2" in err and "step 2/2" in err
    assert "text encoding" in err and "VAE decode" in err
    if sys.platform != "win32":
        assert "peak RSS" in err
    pipeline.run(FakeModel(), "", width=16, height=16, steps=2, progress=False)
    assert capsys.readouterr().err == ""


def test_conditioning_reuse():
    m = FakeModel()
    cond = pipeline.encode_prompt(m, "a cat", t5_length=64)
    assert m.calls == ["encode_clip", "encode_t5"] and cond.t5.shape == (64, 8)
    res = pipeline.run(m, conditioning=cond, width=16, height=16, steps=1, progress=False)
    assert m.calls.count("encode_t5") == 1 and res.metadata["prompt"] == "a cat"
    assert res.metadata["t5_length"] == 64


# =========================================================================== images and metadata


def test_pixel_conversions_hand_checked():
    x = np.array([-1.0, 1.0, 0.0, 0.999, 2.0, -3.0, np.nan, -0.5, 0.5], np.float32)
    # (x+1)/2*255 truncated: 0, 255, 127.5->127, 254.87->254, clamp 255, clamp 0, NaN->0,
    # 63.75->63, 191.25->191
    out = to_uint8(np.tile(x, (3, 1, 1)))
    assert out.shape == (1, 9, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 255, 127, 254, 255, 0, 0, 63, 191]
    # rounded (upstream sd.cpp's value * 255.0f + 0.5f, truncated): 127.5->128, 254.87->255,
    # 63.75->64, 191.25->191
    out = to_uint8(np.tile(x, (3, 1, 1)), rounded=True)
    assert out[0, :, 0].tolist() == [0, 255, 128, 255, 255, 0, 0, 64, 191]
    b = np.array([[[0, 255, 128]]], np.uint8)
    a = image_to_array(b)
    assert a.shape == (3, 1, 1) and a.dtype == np.float32
    np.testing.assert_array_equal(a.ravel(), np.float32([-1.0, 1.0, np.float32(128 / 255) * 2 - 1]))
    with pytest.raises(FluxMiniValueError):
        to_uint8(np.zeros((4, 2, 2)))
    with pytest.raises(FluxMiniValueError):
        image_to_array(np.zeros((2, 2, 3), np.float32))


def test_metadata_round_trip(tmp_path):
    res = pipeline.run(FakeModel(), "un chat sur la lune — 月の猫", width=32, height=16, steps=3, guidance=4.25,
                       seed=2**63 + 5, progress=False)
    meta = read_metadata(res.image)
    assert meta == {k: v for k, v in res.metadata.items()}
    p = tmp_path / "out.png"
    save_png(res.image, p)
    back = fluxmini.read_metadata(str(p))
    assert back == res.metadata
    assert back["prompt"] == "un chat sur la lune — 月の猫"
    assert back["seed"] == 2**63 + 5 and isinstance(back["seed"], int)
    assert back["guidance"] == 4.25 and back["steps"] == 3 and back["width"] == 32 and back["height"] == 16
    assert back["compat"] is None and back["model"] == "FLUX.1-mini-Q4_0.gguf"
    assert back["sampler"] == "euler" and back["fluxmini_version"] == fluxmini.__version__
    assert fluxmini.read_metadata(p) == back  # PathLike
    from PIL import Image

    with Image.open(p) as im:
        assert im.size == (32, 16)
        assert fluxmini.read_metadata(im) == back
    for compat in ("sd.cpp", "llama-box"):
        res2 = pipeline.run(FakeModel(), "", width=16, height=16, steps=1, compat=compat, progress=False)
        save_png(res2.image, p)
        assert fluxmini.read_metadata(p)["compat"] == compat and fluxmini.read_metadata(p)["prompt"] == ""
    plain = tmp_path / "plain.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(plain)
    assert fluxmini.read_metadata(plain) == {}
    with pytest.raises(FluxMiniFileError):
        fluxmini.read_metadata(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(FluxMiniFileError):
        fluxmini.read_metadata(tmp_path / "bad.png")


# =========================================================================== Hugging Face references


def test_hub_filenames():
    assert hub.hub_filename("gpustack/FLUX.1-mini-GGUF", "Q4_0") == "FLUX.1-mini-Q4_0.gguf"
    assert hub.hub_filename("gpustack/FLUX.1-mini-GGUF", "q8_0") == "FLUX.1-mini-Q8_0.gguf"
    assert hub.hub_filename("gpustack/FLUX.1-mini-GGUF", "pure-q4_0") == "FLUX.1-mini-pure-Q4_0.gguf"
    assert hub.hub_filename("gpustack/FLUX.1-mini-GGUF", "F16") == "FLUX.1-mini-FP16.gguf"
    assert hub.hub_filename("someone/other", "model-x.gguf") == "model-x.gguf"
    assert hub.is_hub_reference("gpustack/FLUX.1-mini-GGUF:Q4_0")
    assert not hub.is_hub_reference("/models/FLUX.1-mini-Q4_0.gguf")
    assert not hub.is_hub_reference("C:/models/x.gguf")


HUB_URL = "https://huggingface.co/gpustack/FLUX.1-mini-GGUF/resolve/main/FLUX.1-mini-Q4_0.gguf"
HUB_CMD = "huggingface-cli download gpustack/FLUX.1-mini-GGUF FLUX.1-mini-Q4_0.gguf"


def test_hub_reference_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(FluxMiniFileError) as e:
        hub.resolve_model("gpustack/FLUX.1-mini-GGUF:Q4_0")
    msg = str(e.value)
    assert "fluxmini[hub]" in msg and HUB_URL in msg and HUB_CMD in msg


def test_hub_reference_offline(monkeypatch):
    calls = []

    def offline(**kw):
        calls.append(kw)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files (offline)")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=offline))
    with pytest.raises(FluxMiniFileError) as e:
        hub.resolve_model("gpustack/FLUX.1-mini-GGUF:Q4_0")
    msg = str(e.value)
    assert HUB_URL in msg and HUB_CMD in msg and "couldn't connect" in msg
    assert calls == [{"repo_id": "gpustack/FLUX.1-mini-GGUF", "filename": "FLUX.1-mini-Q4_0.gguf"}]


def test_hub_reference_resolves_and_local_files_win(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(
        hf_hub_download=lambda repo_id, filename: f"/cache/{repo_id}/{filename}"))
    assert hub.resolve_model("gpustack/FLUX.1-mini-GGUF:Q4_0") == \
        "/cache/gpustack/FLUX.1-mini-GGUF/FLUX.1-mini-Q4_0.gguf"
    local = tmp_path / "a"
    local.mkdir()
    (local / "b:c").write_bytes(b"x")  # an existing file that looks like a reference
    monkeypatch.chdir(tmp_path)
    assert hub.resolve_model("a/b:c") == "a/b:c"
    with pytest.raises(FluxMiniFileError, match="model file not found"):
        hub.resolve_model(str(tmp_path / "missing.gguf"))


# =========================================================================== CLI (no engine)


def test_cli_argument_errors(capsys):
    from fluxmini.cli import build_parser
    from fluxmini.cli import generate as cli_generate

    p = build_parser()
    with pytest.raises(SystemExit):
        p.parse_args(["generate", "-m", "x.gguf", "-n", "blurry"])
    assert "negative prompts" in capsys.readouterr().err
    a = p.parse_args(["generate", "-m", "x.gguf", "-p", "cat", "-W", "256", "-H", "128", "-s", "7",
                      "--steps", "8", "--guidance", "2", "-t", "3", "--compat", "sd.cpp", "-b", "3",
                      "--clip_l", "c", "--t5xxl", "t", "--vae", "v", "-i", "in.png", "--strength", "0.5", "-v"])
    assert (a.width, a.height, a.seed, a.steps, a.guidance, a.threads, a.compat, a.count) == \
        (256, 128, 7, 8, 2.0, 3, "sd.cpp", 3)
    assert (a.clip_l, a.t5xxl, a.vae, a.init_img, a.strength, a.verbose) == ("c", "t", "v", "in.png", 0.5, True)
    assert p.parse_args(["generate", "-m", "x.gguf", "--compat", "llama-box"]).compat == "llama-box"
    with pytest.raises(SystemExit):
        p.parse_args(["generate", "-m", "x.gguf", "--compat", "sdcpp"])
    assert cli_generate.output_paths("out.png", 3) == ["out.png", "out_1.png", "out_2.png"]
    assert cli_generate.output_paths("dir/x", 2) == ["dir/x", "dir/x_1"]


def test_cli_hub_reference_offline_message(tmp_path):
    # real huggingface_hub (when installed) in offline mode with an empty cache: no network
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=_pythonpath())
    r = subprocess.run([sys.executable, "-m", "fluxmini.cli", "generate", "-m", "gpustack/FLUX.1-mini-GGUF:Q4_0",
                        "-p", "x", "-o", str(tmp_path / "o.png")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert HUB_URL in r.stderr and HUB_CMD in r.stderr and "Traceback" not in r.stderr


# =========================================================================== engine: end to end


def _pythonpath() -> str:
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(fluxmini.__file__)))
    return os.pathsep.join([pkg_parent, os.environ.get("PYTHONPATH", "")])


@pytest.fixture(scope="module")
def goldens():
    g = np.load(os.path.join(HERE, "data", "pipeline_goldens.npz"))
    return {"cases": json.loads(str(g["cases"])), "init": g["init_image"],
            **{k: g[k] for k in g.files if "/" in k}}


@pytest.fixture(scope="module")
def tiny():
    return fluxmini.FluxMini.load(str(ref.model_path()), threads=2)


def test_goldens_are_current(goldens):
    assert goldens["cases"] == json.loads(json.dumps(ref.CASES, sort_keys=True))
    np.testing.assert_array_equal(goldens["init"], ref.init_image())
    for name, p in ref.CASES.items():  # the stored noise is the seed's draw
        np.testing.assert_array_equal(goldens[f"{name}/noise"], initial_noise(p["seed"], 16, p["height"] // 8,
                                                                              p["width"] // 8, p.get("compat")))


@pytest.mark.parametrize("name", list(ref.CASES))
def test_end_to_end_against_goldens(tiny, goldens, name):
    p = dict(ref.CASES[name])
    init = goldens["init"] if "strength" in p else None
    res = pipeline.run(tiny, init_image=init, progress=False, **p)
    score = psnr(res.decoded, goldens[f"{name}/decoded"])
    assert score >= PSNR_BAR, f"{name}: PSNR {score:.1f} dB"
    # latents: flow-matching space values of magnitude ~1-5; 1e-3 is ~100x the measured error
    np.testing.assert_allclose(res.latent, goldens[f"{name}/latent"], rtol=0, atol=1e-3)
    assert res.image.size == (p["width"], p["height"])
    np.testing.assert_array_equal(np.asarray(res.image), to_uint8(res.decoded, rounded=p.get("compat") == "sd.cpp"))


def test_missing_vae_shift_is_caught_by_the_bar(tiny, goldens):
    # The same latent decoded without the +0.1159 shift scores well below 55 dB: the bar sees it.
    res = pipeline.run(tiny, progress=False, **ref.CASES["t2i"])
    unshifted = tiny.vae_decode(res.latent / np.float32(0.3611))
    assert psnr(res.decoded, goldens["t2i/decoded"]) >= PSNR_BAR
    assert psnr(unshifted, goldens["t2i/decoded"]) < PSNR_BAR - 5


def test_generate_api_and_noise_override(tiny, goldens):
    p = dict(ref.CASES["t2i_wide_empty"])
    p.pop("seed")
    img = tiny.generate(noise=goldens["t2i_wide_empty/noise"], seed=None, progress=False, **p)
    from PIL import Image

    assert isinstance(img, Image.Image) and img.size == (80, 48)
    # bytes agree with the golden's bytes except where a value sits on a truncation boundary
    ours = np.asarray(img).astype(int)
    theirs = to_uint8(goldens["t2i_wide_empty/decoded"]).astype(int)
    assert np.abs(ours - theirs).max() <= 1 and np.mean(ours != theirs) < 0.01
    meta = fluxmini.read_metadata(img)
    assert meta["noise"] == "custom" and "seed" not in meta and meta["prompt"] == ""
    assert meta["model"] == os.path.basename(str(ref.model_path())) and meta["t5_length"] == 32


def test_cancel_then_model_still_works(tiny, goldens):
    p = dict(ref.CASES["t2i_sdcpp"])
    steps_seen = []
    with pytest.raises(Cancelled):
        pipeline.run(tiny, progress=False, callback=lambda s, t, x: steps_seen.append(s) or s < 1, **p)
    assert steps_seen == [1]
    # interrupt() from inside a generation: its next native computation stops, as Cancelled
    steps_seen.clear()
    with pytest.raises(Cancelled, match="interrupt"):
        tiny.generate(progress=False, callback=lambda s, t, x: steps_seen.append(s) or tiny.interrupt(), **p)
    assert steps_seen == [1]
    res = pipeline.run(tiny, progress=False, **p)
    assert psnr(res.decoded, goldens["t2i_sdcpp/decoded"]) >= PSNR_BAR


def test_cancel_token_stops_its_call_only(tiny, goldens):
    """Two generations at once on one model, each with its own CancelToken: cancelling A's token
    from a third thread stops A (Cancelled) and neither B, which runs meanwhile and finishes with
    the reference image, nor the next call. interrupt() with no call in progress cancels nothing."""
    import threading

    p = dict(ref.CASES["t2i_sdcpp"])
    solo = np.asarray(tiny.generate(progress=False, **p))
    reached = {"a": threading.Event(), "b": threading.Event()}
    resume = {"a": threading.Event(), "b": threading.Event()}
    steps = {"a": [], "b": []}
    tokens = {"a": fluxmini.CancelToken(), "b": fluxmini.CancelToken()}
    results = {}

    def work(name):
        def hold(s, t, x):  # wait after step 1 until the main thread lets this generation go on
            steps[name].append(s)
            if s == 1:
                reached[name].set()
                assert resume[name].wait(300)

        try:
            results[name] = tiny.generate(progress=False, callback=hold, cancel=tokens[name], **p)
        except Exception as e:  # noqa: BLE001 - checked below
            results[name] = e

    threads = {n: threading.Thread(target=work, args=(n,)) for n in ("a", "b")}
    threads["a"].start()
    assert reached["a"].wait(300)
    threads["b"].start()
    assert reached["b"].wait(300)  # both are between step 1 and step 2 now
    tokens["a"].cancel()
    resume["a"].set()
    threads["a"].join(300)
    resume["b"].set()
    threads["b"].join(300)
    assert isinstance(results["a"], Cancelled) and "CancelToken" in str(results["a"]), results["a"]
    assert steps["a"] == [1] and steps["b"] == [1, 2, 3, 4]
    assert tokens["a"].cancelled and not tokens["b"].cancelled
    np.testing.assert_array_equal(np.asarray(results["b"]), solo)
    tiny.interrupt()  # nothing in progress: no effect on what comes next
    np.testing.assert_array_equal(np.asarray(tiny.generate(progress=False, **p)), solo)
    with pytest.raises(FluxMiniValueError, match="CancelToken"):
        tiny.generate(progress=False, cancel=True, **p)


def test_cancel_token_stops_a_running_computation(tiny):
    """Cancelling a token from another thread stops the native computation it runs (ggml's abort
    callback, checked between graph nodes), not only the next one: a VAE decode of a 256² image
    stops within a second of the cancel (a quarter of the way through), and the model still works
    afterwards. The GIL is released meanwhile, or the timer thread could not cancel."""
    import threading

    z = np.random.default_rng(0).standard_normal((16, 32, 32)).astype(np.float32)
    t0 = time.perf_counter()
    tiny.vae_decode(z, tiling=False)
    full = time.perf_counter() - t0
    token = fluxmini.CancelToken()
    delay = full / 4
    timer = threading.Timer(delay, token.cancel)
    t0 = time.perf_counter()
    timer.start()
    with pytest.raises(Cancelled):
        tiny.vae_decode(z, tiling=False, cancel=token)
    stopped = time.perf_counter() - t0
    timer.join()
    assert stopped < delay + 1.0 and stopped < full, (full, delay, stopped)
    assert tiny.vae_decode(z[:, :8, :8]).shape == (3, 64, 64)


def test_low_memory_gives_the_same_image(tiny, goldens):
    p = dict(ref.CASES["t2i_wide_empty"])
    res = pipeline.run(tiny, progress=False, low_memory=True, **p)
    assert psnr(res.decoded, goldens["t2i_wide_empty/decoded"]) >= PSNR_BAR
    res2 = pipeline.run(tiny, progress=False, low_memory=True, **p)  # everything reloads
    np.testing.assert_array_equal(res.decoded, res2.decoded)


def test_live_against_torch_reference(tiny):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    models = ref.reference_models(ref.model_path())
    params = dict(prompt="an astronaut riding a horse, oil painting", width=32, height=64, steps=3,
                  guidance=5.0, t5_length=40)
    noise = initial_noise(2024, 16, 8, 4)
    decoded, _ = ref.reference_generate(models, noise=noise, **params)
    res = pipeline.run(tiny, seed=2024, progress=False, **params)
    assert psnr(res.decoded, decoded) >= PSNR_BAR
    init = ref.init_image(32, 64)
    decoded, _ = ref.reference_generate(models, noise=noise, init=init, strength=0.7, compat="sd.cpp", **params)
    res = pipeline.run(tiny, seed=2024, init_image=init, strength=0.7, compat="sd.cpp", progress=False, **params)
    assert psnr(res.decoded, decoded) >= PSNR_BAR


# =========================================================================== engine: CLI


def _cli(*args, timeout=300, **kw):
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    return subprocess.run([sys.executable, "-m", "fluxmini.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, **kw)


def test_cli_generate_count_metadata_and_bytes(tiny, tmp_path):
    from PIL import Image

    model = str(ref.model_path())
    out = tmp_path / "out.png"
    r = _cli("generate", "-m", model, "-p", "a red fox", "-o", str(out), "-W", "48", "-H", "32",
             "--steps", "2", "-s", "7", "-t", "2", "--t5-length", "16", "-n", "2", "-q", "-v")
    assert r.returncode == 0, r.stderr
    assert "text encoding" in r.stderr and "VAE decode" in r.stderr and "step 2/2" in r.stderr
    assert "peak RSS" in r.stderr or sys.platform == "win32"
    for path, seed in ((out, 7), (tmp_path / "out_1.png", 8)):
        with Image.open(path) as im:
            assert im.size == (48, 32) and im.mode == "RGB"
            pixels = np.asarray(im)
        meta = fluxmini.read_metadata(path)
        assert meta["seed"] == seed and meta["prompt"] == "a red fox" and meta["steps"] == 2
        assert meta["width"] == 48 and meta["height"] == 32 and meta["t5_length"] == 16
        assert meta["model"] == os.path.basename(model) and meta["compat"] is None
        api = tiny.generate("a red fox", width=48, height=32, steps=2, seed=seed, t5_length=16, progress=False)
        np.testing.assert_array_equal(pixels, np.asarray(api))  # same engine, same numbers
    assert f"wrote {out}" in r.stdout


def test_cli_img2img_and_errors(tmp_path):
    from PIL import Image

    model = str(ref.model_path())
    init = tmp_path / "init.png"
    Image.fromarray(ref.init_image(64, 64)).save(init)
    out = tmp_path / "i2i.png"
    noise = tmp_path / "noise.npy"
    np.save(noise, np.random.default_rng(1).standard_normal((16, 8, 8)).astype(np.float32))
    r = _cli("generate", "-m", model, "-p", "", "-i", str(init), "--strength", "0.5", "--steps", "2",
             "-o", str(out), "--t5-length", "8", "--compat", "sd.cpp", "--noise", str(noise), "-q")
    assert r.returncode == 0, r.stderr
    meta = fluxmini.read_metadata(out)
    assert meta["mode"] == "img2img" and meta["strength"] == 0.5 and meta["width"] == 64
    assert meta["compat"] == "sd.cpp" and meta["init_image"] == "init.png"
    assert meta["noise"] == "custom" and "seed" not in meta and "custom noise" in r.stdout
    for bad, msg in ((["-W", "100"], "multiple of 16"), (["-H", "0"], "between 16 and 2048"),
                     (["-W", "4096"], "between 16 and 2048")):
        r = _cli("generate", "-m", model, "-p", "x", "-o", str(tmp_path / "b.png"), "-q", *bad)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _cli("generate", "-m", str(tmp_path / "none.gguf"), "-p", "x")
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_cli_demo(tmp_path):
    out = tmp_path / "demo.png"
    r = _cli("demo", "-o", str(out), "-q", "-t", "2")
    assert r.returncode == 0, r.stderr
    assert "noise" in r.stdout and "RANDOM" in r.stdout
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (64, 64)
    assert fluxmini.read_metadata(out)["steps"] == 4


def test_cli_ctrl_c_stops_cleanly(tmp_path):
    model = str(ref.model_path())
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    proc = subprocess.Popen([sys.executable, "-m", "fluxmini.cli", "generate", "-m", model, "-p", "x",
                             "-W", "256", "-H", "256", "--steps", "200", "-t", "2", "-v", "-o",
                             str(tmp_path / "never.png")], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=env, text=True,
                            # as in a terminal: a runner started in a shell's background (CI) passes
                            # SIGINT ignored, and Python and the engine then rightly keep ignoring it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        err = ""
        while "step 1/" not in err and time.time() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            err += line
        assert "step 1/" in err, err
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        out, rest = proc.communicate(timeout=120)
        err += rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert time.time() - t0 < 60  # stops within a step, not after 200
    assert not (tmp_path / "never.png").exists()


def test_low_memory_lowers_peak_rss():
    # Text encoders released before the transformer runs: the peak holds max(T5, Flux + VAE)
    # instead of T5 + Flux + VAE. With T5 layers of 84 MB and Flux weights of 108 MB (F32, used
    # in place from the file mapping, every page read) the difference shows in ru_maxrss of a
    # fresh process. (The T5 embedding table does not count: get_rows reads only the pages of
    # the prompt's rows.)
    from fluxmini.inventory import FluxDims, T5Dims, tiny_dims

    dims = tiny_dims()
    dims.flux = FluxDims(hidden=512, head_dim=128, depth=2, depth_single=2, context_dim=512, vec_dim=64)
    dims.t5 = T5Dims(d_model=512, layers=3, heads=8, d_kv=64, d_ff=4096, duplicate_embed=False)
    import fixtures

    path = str(fixtures.cached_model("pipe-mem", dims=dims, big_type="f32"))
    code = ("import sys, fluxmini; from fluxmini import pipeline; "
            "m = fluxmini.FluxMini.load(sys.argv[1], threads=2); "
            "r = pipeline.run(m, 'a cat', width=32, height=32, steps=1, t5_length=64, progress=False, "
            "low_memory=sys.argv[2] == 'low'); "
            "print(r.timings['peak_rss_mb'])")
    # Streaming off: it drops each block's weight pages after use, which lowers "keep" too (its
    # own test is in tests/test_memory.py); this test is about low_memory's release alone.
    env = dict(os.environ, PYTHONPATH=_pythonpath(), FLUXMINI_STREAM="0")
    peaks = {}
    for mode in ("low", "keep"):
        r = subprocess.run([sys.executable, "-c", code, path, mode], capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        peaks[mode] = float(r.stdout.split()[-1])
    t5 = dims.t5
    layers_mb = t5.layers * (4 * t5.d_model * t5.heads * t5.d_kv + 3 * t5.d_model * t5.d_ff) * 4 / (1 << 20)
    assert layers_mb > 80
    assert peaks["low"] < peaks["keep"] - 0.5 * layers_mb, (peaks, layers_mb)
