"""The one names table (python/fluxmini/data/names.txt) is what both the C++ loader and the
Python converter use: the engine's embedded copy parses to the same rules, every input prefix
loads in the engine and converts in the converter, and every ignore rule drops the same tensors
in both."""

from __future__ import annotations

import pytest

import fixtures
from fluxmini import _core, names
from fluxmini.convert.names import _collect
from fluxmini.convert.readers import close_inputs, read_input
from fluxmini.inventory import COMPONENTS, component_tensors, tiny_dims
from fluxmini.model import FluxMini


def test_engine_embeds_the_same_table():
    engine = [tuple(r) for r in _core.name_rules()]
    assert engine == names.RULES  # a stale build (table edited, engine not rebuilt) fails here
    kinds = {r[0] for r in names.RULES}
    assert kinds == {"layout", "prefix", "ignore", "duplicate"}
    with open(names.TABLE_PATH, encoding="utf-8") as f:
        assert names.parse_rules(f.read()) == engine


def test_layout_prefixes_are_input_prefixes():
    # what the converter writes must be what the loader reads
    assert set(names.LAYOUT_PREFIXES) == {"gpustack", "sd.cpp"}
    for layout, prefixes in names.LAYOUT_PREFIXES.items():
        assert set(prefixes) == set(COMPONENTS)
        for comp, prefix in prefixes.items():
            assert (prefix, comp) in names.INPUT_PREFIXES, (layout, comp, prefix)


def test_parser_rejects_malformed_lines():
    with pytest.raises(ValueError, match="line 2"):
        names.parse_rules("prefix vae vae.\nprefix vae\n")
    with pytest.raises(ValueError, match="unknown component"):
        names.parse_rules("prefix unet model.\n")
    with pytest.raises(ValueError, match="HOW"):
        names.parse_rules("ignore * middle x\n")


def _loaded(path):
    m = FluxMini.load(path, components=[])
    info = m.info()
    return {c: sum(v["tensors_per_type"].values()) if v["present"] else 0
            for c, v in info["components"].items()}, info["ignored_tensors"]


def _converted(path, comp):
    tensors = read_input(path)
    try:
        col = _collect(comp, tensors, True, False)
    finally:
        close_inputs(tensors)
    return col


@pytest.mark.parametrize("prefix, comp", names.INPUT_PREFIXES, ids=[p for p, _ in names.INPUT_PREFIXES])
def test_every_prefix_loads_and_converts(tmp_path, prefix, comp):
    dims = tiny_dims()
    want = {n for n, _ in component_tensors(comp, dims)}
    dup = names.DUPLICATES.get(comp, {})
    path = fixtures.component_safetensors(tmp_path / "c.safetensors", comp, dims=dims, prefix=prefix)
    counts, ignored = _loaded(str(path))
    # the engine files every tensor under comp, except a duplicate copy, which it ignores
    assert counts == {c: (len(want - set(dup)) if c == comp else 0) for c in COMPONENTS}
    assert sorted(ignored) == sorted(prefix + n for n in want & set(dup))
    col = _converted(str(path), comp)
    assert set(col.have) == want - set(dup) and not col.unknown and not col.others


def test_unknown_prefix_is_refused_by_both(tmp_path):
    path = fixtures.component_safetensors(tmp_path / "c.safetensors", "vae", prefix="unet.first_stage_model.")
    counts, ignored = _loaded(str(path))
    assert counts == {c: 0 for c in COMPONENTS} and len(ignored) == len(component_tensors("vae", tiny_dims()))
    assert names.strip_prefix("unet.first_stage_model.encoder.conv_in.weight") == \
        (None, "unet.first_stage_model.encoder.conv_in.weight")


def _ignore_cases():
    """(component, an ignored bare name) for every ignore rule."""
    samples = {"diffusion": "final_layer.", "clip_l": "text_model.embeddings.", "t5xxl": "encoder.",
               "vae": "decoder."}
    for kind, *f in names.RULES:
        if kind != "ignore":
            continue
        who, how, text = f
        for comp in (COMPONENTS if who == "*" else (who,)):
            if how == "suffix":
                bare = samples[comp] + text
            elif how == "prefix":
                bare = text + ("" if text.endswith(".") else ".") + "weight"
            else:
                bare = text
            yield comp, bare


@pytest.mark.parametrize("comp, bare", list(_ignore_cases()))
def test_every_ignore_rule_drops_the_tensor_in_both(tmp_path, comp, bare):
    import numpy as np

    assert names.is_ignored(comp, bare)
    prefix = names.LAYOUT_PREFIXES["gpustack"][comp]
    dims = tiny_dims()
    tensors = {prefix + n: fixtures.tensor_values(1, n, s) for n, s in component_tensors(comp, dims)}
    tensors[prefix + bare] = np.ones(4, np.float32)
    path = fixtures.write_safetensors(tmp_path / "c.safetensors", tensors)
    counts, ignored = _loaded(str(path))
    assert prefix + bare in ignored
    col = _converted(str(path), comp)
    assert bare not in col.have and not col.unknown
