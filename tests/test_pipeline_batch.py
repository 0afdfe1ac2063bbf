"""Several images per call (``pipeline.run_batch``, ``fluxmini generate -n N``): the prompt is
encoded once and each component's weights are read once for the whole batch; low-memory mode
releases them between stages, never between images. Each image equals the single-image run of its
seed (hand-derivable with a fake engine; bit-identical with the real engine)."""

from __future__ import annotations

import numpy as np
import pytest

import fluxmini
from fluxmini import pipeline
from fluxmini.engine import Engine

import make_pipeline_goldens as ref


class RecordingEngine(Engine):
    """Zero velocity (the final latent is the seed's noise) and a decoder returning tanh of the
    latent's mean; records every call, weight loads and releases included."""

    def __init__(self):
        self.calls = []
        self.paths = {"model": "/x/FLUX.1-mini-Q4_0.gguf"}

    def encode_clip(self, ids):
        self.calls.append("encode_clip")
        return np.full(8, 0.25, np.float32)

    def encode_t5(self, ids, *, compat=None):
        self.calls.append("encode_t5")
        return np.full((len(ids), 8), 0.5, np.float32)

    def transformer(self, x, sigma, guidance, t5, pooled):
        self.calls.append("transformer")
        return np.zeros_like(x)

    def vae_encode(self, image, tiling=None):
        self.calls.append("vae_encode")
        return np.zeros((16, image.shape[1] // 8, image.shape[2] // 8), np.float32)

    def vae_decode(self, z, tiling=None):
        self.calls.append("vae_decode")
        c, h, w = z.shape
        return np.full((3, 8 * h, 8 * w), np.tanh(float(np.mean(z))), np.float32)

    def load_weights(self, component):
        self.calls.append("load:" + component)

    def release(self, component):
        self.calls.append("release:" + component)


@pytest.mark.parametrize("low_memory", [True, False])
def test_batch_reads_each_component_once(low_memory):
    m = RecordingEngine()
    seeds = [3, 4, 5]
    results = list(pipeline.run_batch(m, "a cat", seeds=seeds, width=32, height=16, steps=2, progress=False,
                                      low_memory=low_memory))
    rel = (lambda c: ["release:" + c]) if low_memory else (lambda c: [])
    assert m.calls == (["load:clip_l", "load:t5xxl", "encode_clip", "encode_t5"] + rel("clip_l") + rel("t5xxl")
                       + ["load:diffusion"] + ["transformer"] * 6 + rel("diffusion")
                       + ["load:vae"] + ["vae_decode"] * 3 + rel("vae"))
    assert [r.seed for r in results] == seeds
    for r, seed in zip(results, seeds):
        one = pipeline.run(RecordingEngine(), "a cat", width=32, height=16, steps=2, seed=seed, progress=False)
        np.testing.assert_array_equal(r.latent, one.latent)
        np.testing.assert_array_equal(np.asarray(r.image), np.asarray(one.image))
        assert r.metadata == one.metadata and len(r.timings["steps"]) == 2
    assert [r.timings["load"] for r in results[1:]] == [0.0, 0.0]  # nothing read again


def test_batch_img2img_encodes_the_init_image_once():
    from PIL import Image

    m = RecordingEngine()
    init = Image.new("RGB", (32, 16), (10, 200, 30))
    results = list(pipeline.run_batch(m, "", seeds=[1, 2], init_image=init, steps=4, strength=0.5,
                                      progress=False, low_memory=True))
    assert m.calls[:2] == ["load:vae", "vae_encode"] and m.calls.count("vae_encode") == 1
    assert m.calls.count("load:vae") == 2 and m.calls.count("release:vae") == 2  # encode stage, decode stage
    assert [r.metadata["mode"] for r in results] == ["img2img", "img2img"]


def test_batch_checks_arguments_before_any_work():
    m = RecordingEngine()
    with pytest.raises(fluxmini.FluxMiniValueError, match="seed must be in"):
        pipeline.run_batch(m, "x", seeds=[1, -1], progress=False)
    with pytest.raises(fluxmini.FluxMiniValueError, match="seeds is empty"):
        pipeline.run_batch(m, "x", seeds=[], progress=False)
    with pytest.raises(fluxmini.FluxMiniValueError, match="multiple of 16"):
        pipeline.run_batch(m, "x", seeds=[1], width=20, progress=False)
    with pytest.raises(fluxmini.FluxMiniValueError, match="fluxmini.FluxMini"):
        pipeline.run(object(), "x", progress=False)
    assert m.calls == []


def test_cli_count_keeps_weights_loaded(tmp_path, monkeypatch, capsys):
    # The real engine, in process: with -n 3 in the default low-memory mode each component is
    # loaded once and released once (a release is what would make the engine read it again), and
    # every image equals the single-image API's for its seed.
    from fluxmini.cli import main
    from fluxmini.model import FluxMini

    calls = []
    load, release = FluxMini.load_weights, FluxMini.release
    monkeypatch.setattr(FluxMini, "load_weights", lambda self, c: (calls.append("load:" + c), load(self, c))[1])
    monkeypatch.setattr(FluxMini, "release", lambda self, c: (calls.append("release:" + c), release(self, c))[1])
    model = str(ref.model_path())
    out = tmp_path / "o.png"
    assert main(["generate", "-m", model, "-p", "a red fox", "-o", str(out), "-W", "32", "-H", "32", "--steps", "2",
                 "-s", "11", "-t", "2", "--t5-length", "16", "-n", "3", "-q"]) == 0
    assert [c for c in calls if c.endswith(("diffusion", "vae"))] == \
        ["load:diffusion", "release:diffusion", "load:vae", "release:vae"]
    assert calls.index("release:t5xxl") < calls.index("load:diffusion")  # text encoders gone before sampling
    tiny = FluxMini.load(model, threads=2)
    for k, path in enumerate([out, tmp_path / "o_1.png", tmp_path / "o_2.png"]):
        assert fluxmini.read_metadata(path)["seed"] == 11 + k
        from PIL import Image

        with Image.open(path) as im:
            got = np.asarray(im)
        want = tiny.generate("a red fox", width=32, height=32, steps=2, seed=11 + k, t5_length=16, progress=False)
        np.testing.assert_array_equal(got, np.asarray(want))
