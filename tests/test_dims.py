"""Dimension inference: the converter's (fluxmini.inventory.infer_dims, on PyTorch shapes) and the
engine's (the configs in csrc/, on the loaded file) read the same dimensions back from models of
several shapes; both are compared with the dimensions the files were written from."""

from __future__ import annotations

import dataclasses

import pytest

import fixtures
from fluxmini.inventory import (COMPONENTS, ClipDims, FluxDims, T5Dims, VaeDims, component_tensors, infer_dims,
                                tiny_dims)
from fluxmini.model import FluxMini
from test_loader import expected_config


def _variants():
    a = tiny_dims()
    b = tiny_dims()
    b.flux = FluxDims(hidden=256, head_dim=128, depth=1, depth_single=3, mlp_ratio=2.0, in_channels=64,
                      context_dim=48, vec_dim=40, guidance=False)
    b.clip = ClipDims(vocab=300, positions=77, hidden=128, layers=1, mlp=160)
    b.t5 = T5Dims(vocab=200, d_model=48, layers=3, heads=2, d_kv=32, d_ff=80, buckets=16, duplicate_embed=False)
    b.vae = VaeDims(ch=32, ch_mult=(1, 2, 4), num_res_blocks=2)
    return [a, b]


@pytest.mark.parametrize("k", [0, 1])
def test_python_and_engine_infer_the_same_dims(tmp_path, k):
    dims = _variants()[k]
    parts = {"diffusion": dims.flux, "clip_l": dims.clip, "t5xxl": dims.t5, "vae": dims.vae}
    for comp in COMPONENTS:
        shapes = dict(component_tensors(comp, dims))
        got = infer_dims(comp, shapes, keep_t5_duplicate=dims.t5.duplicate_embed)
        assert dataclasses.asdict(got) == dataclasses.asdict(parts[comp]), comp
    path = fixtures.write_model(tmp_path / "m.gguf", dims=dims)
    info = FluxMini.load(str(path), components=[]).info()
    want = expected_config(dims)
    for comp in COMPONENTS:
        assert info["components"][comp]["config"] == want[comp], comp
