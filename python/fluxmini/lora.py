"""LoRA adapters applied at run time: reading the file formats Flux LoRAs are trained in and
mapping their keys onto the engine's linear layers.

The engine adds ``scale · B(A·x)`` next to each adapted linear layer (extra graph nodes); the
base weights, quantized or not, stay untouched and mapped from the model file, and the factors
stay in their file type (F32, F16 or BF16; other types are widened to F32).

Formats (every key of a file is matched to a layer or reported):

- FluxKits / XLabs (``double_blocks.N.processor.qkv_lora1.down.weight``, ``proj_lora1``,
  ``qkv_lora2``, ``proj_lora2``; single blocks ``qkv_lora`` / ``proj_lora``), what TencentARC's
  FluxKits ``train_flux_lora.py`` writes for FLUX.1-mini. Double blocks: ``*1`` on the image
  stream, ``*2`` on the text stream. Single blocks: ``qkv_lora`` adds to the first 3·hidden rows
  of ``linear1``; ``proj_lora`` reads the OUTPUT of ``linear2`` and adds to it
  (``out = out + proj_lora(out)``), as FluxKits' ``SingleStreamBlockLoraProcessor`` does.
- kohya (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` + ``.alpha``; also
  ``lora_transformer_*`` with diffusers names, ``lora_te1_*`` for CLIP-L, ``lora_te3_*`` (kohya's
  Flux prefix) or ``lora_te2_*`` for T5 with T5's module names).
- diffusers / PEFT (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``): split
  q/k/v and ``proj_mlp`` land on row ranges of the fused ``qkv`` / ``linear1`` weights, missing
  parts count as zero; alpha from ``.alpha`` tensors, from the safetensors metadata
  (``lora_adapter_metadata``), or 1. ``text_encoder.*`` is CLIP-L, ``text_encoder_2.*`` T5 (as
  in diffusers' FluxPipeline).
- BFL / ComfyUI (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``, or
  ``lora_down``/``lora_up`` + ``.alpha``).

Each in safetensors or GGUF. The scale of one module is ``multiplier · alpha / rank`` (alpha
absent: ``alpha / rank`` = 1).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from .errors import FluxMiniFileError, FluxMiniValueError

# Suffix -> role of a LoRA tensor.
_ROLES = [
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".down.weight", "down"), (".up.weight", "up"),
    (".alpha", "alpha"),
]
# Adapter kinds we do not apply (reported, never silently dropped).
_UNSUPPORTED = re.compile(r"(hada_|lokr_|\.lora_mid\.|\.diff$|\.diff_b$|dora_scale|\.scale$)")

_XLABS = re.compile(r"^(?:.*\.)?(double_blocks|single_blocks)\.(\d+)\.processor\."
                    r"(qkv_lora1|proj_lora1|qkv_lora2|proj_lora2|qkv_lora|proj_lora)$")
_BLOCK = re.compile(r"(single_transformer_blocks|transformer_blocks|double_blocks|single_blocks)[._](\d+)(?:[._]|$)")


@dataclass
class _Target:
    component: str
    name: str             # the engine's linear layer
    row0: int = 0
    rows: Optional[int] = None       # expected rows of `up` (None: the layer's out features)
    up_rows: Optional[tuple] = None  # take only these rows of the file's `up` (a, b)
    on_output: bool = False


@dataclass
class Adapter:
    """One adapter ready for the engine (factors in their file type)."""
    component: str
    target: str
    row0: int
    on_output: bool
    scale: float            # alpha / rank (the user's multiplier is applied later)
    dtype: str              # "f32" | "f16" | "bf16"
    down: np.ndarray        # [rank, in]
    up: np.ndarray          # [rows, rank]
    source: str             # the file's module key

    @property
    def nbytes(self) -> int:
        return int(self.down.nbytes + self.up.nbytes)


@dataclass
class LoraFile:
    """A parsed LoRA: its adapters, the format it was recognised as, and the keys left unmatched
    (with the reason), which ``strict`` loading refuses."""
    path: str
    format: str
    adapters: list = field(default_factory=list)
    unmatched: list = field(default_factory=list)  # (key, reason)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.adapters)


# ----------------------------------------------------------------------------------------------
# The model's layers

class ModelLayers:
    """The adapter targets of a loaded model: its linear layers per component, and the Flux
    configuration (block counts, widths) that the diffusers and XLabs names are mapped with."""

    def __init__(self, linears: dict, flux_config: Optional[dict]):
        self.linears = linears  # component -> {name: (in, out)}
        self.flux = flux_config or {}
        self._tables = None

    @classmethod
    def of(cls, core_model, present: Iterable[str]) -> "ModelLayers":
        linears = {}
        flux = None
        for c in present:
            if c == "vae":
                continue
            linears[c] = {n: (int(i), int(o)) for n, i, o in core_model.linears(c)}
        for c in core_model.info():
            if c["name"] == "diffusion" and c["present"]:
                flux = dict(c["config"])
        return cls(linears, flux)

    def tables(self):
        """(dotted, underscored) name tables: key -> (component, [targets])."""
        if self._tables is not None:
            return self._tables
        bfl, diff, te = {}, {}, {}
        for comp, layers in self.linears.items():
            for name in layers:
                (bfl if comp == "diffusion" else te)[name] = (comp, [_Target(comp, name)])
        f = self.flux
        if f:
            h, m = int(f["hidden"]), int(f["mlp_hidden"])
            d = "diffusion"

            def T(name, row0=0, rows=None, up_rows=None):
                return _Target(d, name, row0, rows, up_rows)
            for i in range(int(f["double_blocks"])):
                tb, db = f"transformer_blocks.{i}.", f"double_blocks.{i}."
                for s, (pre, ff) in {"img": ("", "ff"), "txt": ("add_", "ff_context")}.items():
                    qkv = db + f"{s}_attn.qkv"
                    names = (["to_q", "to_k", "to_v"] if s == "img" else ["add_q_proj", "add_k_proj", "add_v_proj"])
                    for k, n in enumerate(names):
                        diff[tb + "attn." + n] = (d, [T(qkv, k * h, h)])
                    diff[tb + ("attn.to_out.0" if s == "img" else "attn.to_add_out")] = (d, [T(db + f"{s}_attn.proj")])
                    diff[tb + f"{ff}.net.0.proj"] = (d, [T(db + f"{s}_mlp.0")])
                    diff[tb + f"{ff}.net.2"] = (d, [T(db + f"{s}_mlp.2")])
                    diff[tb + ("norm1.linear" if s == "img" else "norm1_context.linear")] = (d, [T(db + f"{s}_mod.lin")])
            for i in range(int(f["single_blocks"])):
                tb, sb = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
                for k, n in enumerate(["to_q", "to_k", "to_v"]):
                    diff[tb + "attn." + n] = (d, [T(sb + "linear1", k * h, h)])
                diff[tb + "proj_mlp"] = (d, [T(sb + "linear1", 3 * h, m)])
                diff[tb + "proj_out"] = (d, [T(sb + "linear2")])
                diff[tb + "norm.linear"] = (d, [T(sb + "modulation.lin")])
            glob = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
                    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
                    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
                    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
                    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
                    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
                    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer"}
            for k, v in glob.items():
                if v in self.linears.get(d, {}):
                    diff[k] = (d, [T(v)])
            # diffusers' norm_out is (scale, shift); BFL's final modulation is (shift, scale).
            fin = "final_layer.adaLN_modulation.1"
            diff["norm_out.linear"] = (d, [T(fin, h, h, (0, h)), T(fin, 0, h, (h, 2 * h))])
        under = lambda t: {k.replace(".", "_"): v for k, v in t.items()}  # noqa: E731
        self._tables = {"bfl": bfl, "diffusers": diff, "te": te,
                        "bfl_": under(bfl), "diffusers_": under(diff), "te_": under(te)}
        return self._tables


def _xlabs_targets(kind: str, block: str, i: int, layers: ModelLayers):
    f = layers.flux
    if not f:
        return None
    h = int(f["hidden"])
    d = "diffusion"
    if block == "double_blocks":
        s = "img" if kind.endswith("1") else "txt"
        p = f"double_blocks.{i}.{s}_attn."
        return [_Target(d, p + "qkv", 0, 3 * h)] if kind.startswith("qkv") else [_Target(d, p + "proj")]
    p = f"single_blocks.{i}."
    if kind == "qkv_lora":
        return [_Target(d, p + "linear1", 0, 3 * h)]
    return [_Target(d, p + "linear2", 0, h, None, True)]


def _resolve(key: str, layers: ModelLayers):
    """(format, targets) for a module key, or (format guess, None) when nothing matches."""
    t = layers.tables()
    m = _XLABS.match(key)
    if m:
        return "XLabs/FluxKits", _xlabs_targets(m[3], m[1], int(m[2]), layers)

    def look(table, name):
        hit = t[table].get(name)
        return hit[1] if hit else None
    for pre, fmt, tabs in (("lora_unet_", "kohya", ("bfl_", "diffusers_")),
                           ("lora_transformer_", "kohya", ("diffusers_",)),
                           ("lora_te1_", "kohya", ("te_",)), ("lora_te_", "kohya", ("te_",)),
                           ("lora_te2_", "kohya", ("te_",)), ("lora_te3_", "kohya", ("te_",)),
                           ("model.diffusion_model.", "BFL/ComfyUI", ("bfl",)),
                           ("diffusion_model.", "BFL/ComfyUI", ("bfl",)),
                           ("base_model.model.", "diffusers/PEFT", ("diffusers",)),
                           ("transformer.", "diffusers/PEFT", ("diffusers",)),
                           ("text_encoders.clip_l.transformer.", "BFL/ComfyUI", ("te",)),
                           ("text_encoder.", "diffusers/PEFT", ("te",)),
                           ("text_encoder_2.", "diffusers/PEFT", ("te",)),  # FLUX.1's T5 in diffusers
                           ("", "bare", ("bfl", "diffusers", "te"))):
        if key.startswith(pre):
            rest = key[len(pre):]
            for tab in tabs:
                hit = look(tab, rest)
                if hit:
                    return fmt, hit
            return fmt, None
    return "unknown", None


def _why_unmatched(key: str, layers: ModelLayers) -> str:
    f = layers.flux
    m = _BLOCK.search(key)
    if m and f:
        single = m[1].startswith("single")
        have = int(f["single_blocks" if single else "double_blocks"])
        if int(m[2]) >= have:
            return (f"block {m[2]} of the {'single' if single else 'double'}-stream blocks; this model has {have} "
                    f"(indices 0-{have - 1})")
    if key.startswith(("lora_te", "text_encoder")) and not {"clip_l", "t5xxl"} & set(layers.linears):
        return "a text-encoder layer, and this model has no text encoder loaded"
    return "no layer of this model has that name"


# ----------------------------------------------------------------------------------------------
# Reading

def _open(path: str):
    """{name: SrcTensor} and the safetensors metadata of a LoRA file (safetensors or GGUF), read
    with the converter's readers (lazy; nothing big is read here)."""
    from .convert.readers import read_input

    if not isinstance(path, (str, os.PathLike)):
        raise FluxMiniValueError(f"a LoRA is given by a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FluxMiniFileError(f"{path}: is a folder; give the LoRA's .safetensors or .gguf file")
    tensors = read_input(path)
    meta = {}
    for t in tensors:
        md = getattr(t.file, "metadata", None)
        if isinstance(md, dict):
            meta = md
        break
    return {t.name: t for t in tensors}, meta, tensors


_KEEP = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}


def _factor(t, what: str):
    """A factor's values as a 2-D array in its file type (F32/F16/BF16 kept, else F32) and that type."""
    n = t.numel
    if t.dtype in _KEEP and t._raw is not None:
        arr, dt = t.raw(0, n).view(_KEEP[t.dtype]).copy(), t.dtype
    else:
        arr, dt = t.read(0, n).astype(np.float32), "f32"
    shape = tuple(int(s) for s in t.shape)
    if len(shape) == 4 and shape[2:] == (1, 1):  # 1x1 conv-shaped linear factors
        shape = shape[:2]
    if len(shape) != 2:
        raise FluxMiniValueError(f"{t.label}: LoRA tensor {t.name} has shape {list(t.shape)}; a low-rank factor "
                                 "is a matrix")
    arr = arr.reshape(shape)
    vals = arr if dt != "bf16" else (arr.astype(np.uint32) << 16).view(np.float32)
    if not np.isfinite(vals).all():
        raise FluxMiniValueError(f"{t.label}: LoRA tensor {t.name} holds NaN or infinite values; the file is "
                                 "damaged (or the training diverged)")
    return arr, dt


def _as(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    if src == dst:
        return arr
    if src == "bf16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def _peft_alphas(meta: dict) -> tuple[Optional[float], dict]:
    """(lora_alpha, alpha_pattern) from diffusers' ``lora_adapter_metadata``, if present."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None, {}
    try:
        md = json.loads(raw)
    except ValueError:
        return None, {}
    alpha = None
    pattern = {}
    for k, v in md.items():
        base = k.split(".", 1)[-1] if k.startswith(("transformer.", "text_encoder.", "text_encoder_2.")) else k
        if base == "lora_alpha" and isinstance(v, (int, float)):
            alpha = float(v)
        elif base == "alpha_pattern" and isinstance(v, dict):
            pattern.update({str(a): float(b) for a, b in v.items() if isinstance(b, (int, float))})
    return alpha, pattern


def read_lora(path, layers: ModelLayers) -> LoraFile:
    """Parse one LoRA file against a model's layers. Raises FluxMiniError for a file that is not
    a LoRA, is damaged, holds NaNs, or has a factor whose shape does not fit its layer."""
    from .convert.readers import close_inputs

    tensors, meta, opened = _open(path)
    try:
        return _read_lora(path, layers, tensors, meta)
    finally:
        close_inputs(opened)


def _read_lora(path, layers: ModelLayers, tensors: dict, meta: dict) -> LoraFile:
    label = os.path.basename(os.fspath(path))
    modules: dict[str, dict] = {}
    unmatched = []
    for name in tensors:
        for suf, role in _ROLES:
            if name.endswith(suf):
                modules.setdefault(name[:-len(suf)], {})[role] = name
                break
        else:
            unmatched.append((name, "an adapter kind fluxmini does not apply (LoHa, LoKr, DoRA, full diffs)"
                              if _UNSUPPORTED.search(name) else "not a LoRA factor"))
    if not any("down" in r or "up" in r for r in modules.values()):
        raise FluxMiniValueError(f"{label}: not a LoRA file: none of its {len(tensors)} tensors is a low-rank "
                                 "factor (.lora_down/.lora_up, .lora_A/.lora_B, or XLabs .down/.up weights)")
    peft_alpha, alpha_pattern = _peft_alphas(meta)
    lf = LoraFile(path=os.fspath(path), format="")
    formats = set()
    for key, roles in sorted(modules.items()):
        if "down" not in roles or "up" not in roles:
            for r in roles.values():
                unmatched.append((r, "the other factor of this pair is missing"))
            continue
        fmt, targets = _resolve(key, layers)
        formats.add(fmt)
        if not targets:
            reason = _why_unmatched(key, layers)
            unmatched += [(roles[r], reason) for r in sorted(roles)]
            continue
        down, ddt = _factor(tensors[roles["down"]], "down")
        up, udt = _factor(tensors[roles["up"]], "up")
        if ddt != udt:
            down, up, ddt = _as(down, ddt, "f32"), _as(up, udt, "f32"), "f32"
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise FluxMiniValueError(f"{label}: LoRA tensor {roles['up']} has shape {list(up.shape)} but "
                                     f"{roles['down']} has rank {rank}; the pair does not fit together")
        alpha = None
        if "alpha" in roles:
            a = tensors[roles["alpha"]].read(0, 1)
            alpha = float(a[0])
        else:
            short = key.split(".", 1)[1] if key.startswith(("transformer.", "text_encoder.", "text_encoder_2.")) else key
            for pat, val in alpha_pattern.items():
                if short == pat or short.endswith("." + pat):
                    alpha = val
            if alpha is None:
                alpha = peft_alpha
        if alpha is not None and not math.isfinite(alpha):
            raise FluxMiniValueError(f"{label}: LoRA tensor {roles['alpha']} is not a finite number")
        scale = 1.0 if alpha is None else alpha / rank
        for tg in targets:
            lin_in, lin_out = layers.linears[tg.component][tg.name]
            u = up if tg.up_rows is None else np.ascontiguousarray(up[tg.up_rows[0]:tg.up_rows[1]])
            want_rows = tg.rows if tg.rows is not None else lin_out
            want_in = lin_out if tg.on_output else lin_in
            if down.shape[1] != want_in:
                raise FluxMiniValueError(
                    f"{label}: LoRA tensor {roles['down']} has shape {list(down.shape)}: it reads {down.shape[1]} "
                    f"features, but layer {tg.name} of this model {'outputs' if tg.on_output else 'takes'} "
                    f"{want_in}; the LoRA was made for a different model")
            full_rows = want_rows if tg.up_rows is None else tg.up_rows[1] - tg.up_rows[0] + want_rows
            if up.shape[0] != full_rows:
                raise FluxMiniValueError(
                    f"{label}: LoRA tensor {roles['up']} has shape {list(up.shape)}: it writes {up.shape[0]} "
                    f"rows, but its place in layer {tg.name} of this model has {full_rows}; the LoRA was made "
                    "for a different model")
            lf.adapters.append(Adapter(tg.component, tg.name, tg.row0, tg.on_output, scale, ddt,
                                       np.ascontiguousarray(down), u, key))
    lf.unmatched = sorted(unmatched, key=lambda kw: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", kw[0])])
    known = sorted(formats - {"unknown", "bare"})
    lf.format = " + ".join(known) if known else ("bare names" if "bare" in formats else "unknown")
    return lf


def unmatched_message(lf: LoraFile, layers: ModelLayers) -> str:
    label = os.path.basename(lf.path)
    keys = lf.unmatched
    shown = "; ".join(f"{k} ({why})" for k, why in keys[:8]) + (f"; and {len(keys) - 8} more" if len(keys) > 8 else "")
    f = layers.flux
    hint = ""
    if f and any("block" in why and "this model has" in why for _, why in keys):
        hint = (f" This model has {f['double_blocks']} double and {f['single_blocks']} single blocks; the LoRA has "
                "more, so it was made for another Flux model (FLUX.1-dev/schnell have 19 and 38), whose blocks do "
                "not correspond to FLUX.1-mini's.")
    return (f"{label}: {len(keys)} of its tensors match no layer of this model: {shown}.{hint} "
            "Pass strict=False (CLI: --lora-nonstrict) to apply the matching part anyway.")


# ----------------------------------------------------------------------------------------------
# Arguments

def lora_list(loras) -> list[tuple[str, float]]:
    """Normalise ``loras``: None, a path, (path, scale), or a list of paths / (path, scale) /
    "PATH:SCALE" strings -> [(path, scale)]."""
    if loras is None:
        return []
    if isinstance(loras, (str, os.PathLike)) or (isinstance(loras, tuple) and len(loras) == 2
                                                  and not isinstance(loras[1], (str, os.PathLike, tuple))):
        loras = [loras]
    out = []
    for item in loras:
        if isinstance(item, (str, os.PathLike)):
            path, scale = os.fspath(item), 1.0
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            path, scale = item
        else:
            raise FluxMiniValueError(f"a LoRA is a path or a (path, scale) pair, got {item!r}")
        if not isinstance(path, (str, os.PathLike)):
            raise FluxMiniValueError(f"a LoRA path must be a string, got {type(path).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise FluxMiniValueError(f"the scale of LoRA {path} must be a finite number, got {scale!r}")
        out.append((os.fspath(path), float(scale)))
    return out


def parse_lora_arg(text: str) -> tuple[str, float]:
    """CLI ``PATH[:SCALE]`` (a trailing ``:number`` is the scale; default 1)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(scale):
            raise FluxMiniValueError(f"--lora {text}: the scale must be a finite number")
        return path, scale
    return text, 1.0


def engine_items(files: list[tuple[LoraFile, float]]) -> dict[str, list]:
    """Per component, the tuples the engine's set_adapters takes, with each user multiplier folded
    into its adapters' scales."""
    out: dict[str, list] = {}
    for lf, mult in files:
        for a in lf.adapters:
            out.setdefault(a.component, []).append(
                (a.target, a.row0, a.on_output, float(mult * a.scale), a.dtype, a.down, a.up))
    return out
