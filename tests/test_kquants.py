"""K-quant weights (Q4_K, Q5_K, Q6_K, which `fluxmini quantize` can write and third-party files
use) compute what their dequantized values say.

gguf-py cannot quantize to K-quants, so the weight is random block bytes with sane super-block
scales; gguf-py's dequantization (an implementation independent of ggml's) gives its values.
The engine runs the transformer three times: with the K-quant weight, with an F32 copy of gguf's
dequantized values (exact), and with that weight zeroed (how much the layer matters). The K-quant
run may differ from the exact one only by ggml's rounding of the activations (Q8_K blocks), a
small fraction of the layer's own effect; a wrong block layout or scale decoding gives a
difference of the order of the layer's effect or more.
"""

from __future__ import annotations

import numpy as np
import pytest

import fixtures
import fluxmini
from fluxmini.inventory import LAYOUT_PREFIXES, ModelDims, component_tensors, tiny_dims

gguf = pytest.importorskip("gguf")
QT = gguf.GGMLQuantizationType

# bytes per 256-element super-block, and where its F16 scale(s) sit (docs: ggml's block_q*_K)
LAYOUTS = {
    "q4_K": (QT.Q4_K, 144, {0: 2e-4, 2: 1e-4}),    # d, dmin, 12 scale bytes, 128 quant bytes
    "q5_K": (QT.Q5_K, 176, {0: 1e-4, 2: 1e-4}),    # d, dmin, scales, 32 high bits, 128 quant bytes
    "q6_K": (QT.Q6_K, 210, {208: 2e-5}),            # 128 low, 64 high quant bytes, 16 int8 scales, d
}
WEIGHT = "double_blocks.0.img_mlp.2.weight"  # [hidden, 4*hidden]: rows of 1024 = 4 super-blocks


def k_blocks(type_name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    qt, size, scales = LAYOUTS[type_name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    for off, base in scales.items():  # random positive F16 scales of a sane size
        vals = (base * rng.uniform(0.5, 1.5, size=raw.shape[:2])).astype(np.float16)
        raw[:, :, off:off + 2] = vals.view(np.uint8).reshape(rows, cols // 256, 2)
    return raw.reshape(rows, -1)


def write(path, dims: ModelDims, weight_raw=None, weight_type=None, weight_f32=None):
    w = gguf.GGUFWriter(str(path), "t")
    prefix = LAYOUT_PREFIXES["gpustack"]["diffusion"]
    for name, shape in component_tensors("diffusion", dims):
        if name == WEIGHT and weight_raw is not None:
            w.add_tensor(prefix + name, weight_raw, raw_shape=weight_raw.shape, raw_dtype=weight_type)
        elif name == WEIGHT and weight_f32 is not None:
            w.add_tensor(prefix + name, weight_f32)
        else:
            w.add_tensor(prefix + name, fixtures.tensor_values(0, prefix + name, shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("type_name", list(LAYOUTS))
def test_k_quant_linear_matches_gguf_dequantization(tmp_path, type_name):
    dims = tiny_dims()
    shape = dict(component_tensors("diffusion", dims))[WEIGHT]
    rows, cols = shape
    assert cols % 256 == 0
    raw = k_blocks(type_name, rows, cols, seed=len(type_name) + rows)
    exact_w = gguf.quants.dequantize(raw, LAYOUTS[type_name][0]).astype(np.float32).reshape(rows, cols)
    assert np.isfinite(exact_w).all() and np.abs(exact_w).max() > 0

    paths = {"k": write(tmp_path / "k.gguf", dims, weight_raw=raw, weight_type=LAYOUTS[type_name][0]),
             "exact": write(tmp_path / "exact.gguf", dims, weight_f32=exact_w),
             "zero": write(tmp_path / "zero.gguf", dims, weight_f32=np.zeros_like(exact_w))}
    rng = np.random.default_rng(3)
    args = (rng.standard_normal((16, 8, 6)).astype(np.float32), 0.7, 3.5,
            rng.standard_normal((9, dims.flux.context_dim)).astype(np.float32),
            rng.standard_normal(dims.flux.vec_dim).astype(np.float32))
    out = {}
    for k, p in paths.items():
        m = fluxmini.FluxMini.load(p, components=["diffusion"], threads=2)
        if k == "k":
            assert m.info()["components"]["diffusion"]["tensors_per_type"][type_name] == 1
        out[k] = m.transformer(*args)
    effect = float(np.abs(out["exact"] - out["zero"]).max())
    err = float(np.abs(out["k"] - out["exact"]).max())
    assert effect > 1e-3 * float(np.abs(out["exact"]).max())  # the layer matters to the output
    # Q8_K activation rounding (1/127 of each 256-block's max) moves the layer's output slightly:
    # measured err/effect 5.8e-4 (Q4_K), 4.5e-4 (Q5_K), 1.2e-2 (Q6_K, its larger weights) on an
    # Intel Xeon; 0.05 is 4x the largest. A decoding error gives ~1 or more.
    print(f"{type_name}: err/effect = {err / effect:.2e}")
    assert err <= 0.05 * effect, (type_name, err, effect)
