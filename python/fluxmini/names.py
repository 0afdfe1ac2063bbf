"""Tensor-name rules shared with the C++ loader: layout prefixes, input prefixes, ignored tensors.

The rules live in one data file, ``fluxmini/data/names.txt``, which the C++ build embeds too
(see its header), so the converter and the loader accept the same names. ``_core.name_rules()``
returns the loader's parse of its embedded copy; tests/test_names.py checks that they agree.
"""

from __future__ import annotations

import os
from typing import Optional

COMPONENTS = ("diffusion", "clip_l", "t5xxl", "vae")
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "names.txt")

_ARITY = {"layout": 3, "prefix": 2, "ignore": 3, "duplicate": 3}
_HOW = ("suffix", "prefix", "exact")


def parse_rules(text: str) -> list[tuple[str, ...]]:
    """The rules of a names table as tuples (kind, fields...), in file order.

    The C++ loader parses the same format (csrc/weights.cpp); keep the two parsers equally strict.
    """
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        kind = fields[0]
        if kind not in _ARITY or len(fields) != 1 + _ARITY[kind]:
            raise ValueError(f"names table line {number}: cannot read {line.strip()!r}")
        component = fields[2] if kind == "layout" else fields[1]
        if component not in COMPONENTS and not (kind == "ignore" and component == "*"):
            raise ValueError(f"names table line {number}: unknown component {component!r}")
        if kind == "ignore" and fields[2] not in _HOW:
            raise ValueError(f"names table line {number}: HOW must be one of {', '.join(_HOW)}")
        rules.append(tuple(fields))
    return rules


def _read_table() -> list[tuple[str, ...]]:
    with open(TABLE_PATH, encoding="utf-8") as f:
        return parse_rules(f.read())


RULES = _read_table()

#: layout -> component -> the prefix that layout writes
LAYOUT_PREFIXES: dict[str, dict[str, str]] = {}
for _kind, *_f in RULES:
    if _kind == "layout":
        LAYOUT_PREFIXES.setdefault(_f[0], {})[_f[1]] = _f[2]

#: (prefix, component) a checkpoint name may start with, longest first
INPUT_PREFIXES: tuple[tuple[str, str], ...] = tuple(
    sorted(((f[1], f[0]) for kind, *f in RULES if kind == "prefix"), key=lambda pc: -len(pc[0])))

#: component -> {copy: original}
DUPLICATES: dict[str, dict[str, str]] = {}
for _kind, *_f in RULES:
    if _kind == "duplicate":
        DUPLICATES.setdefault(_f[0], {})[_f[1]] = _f[2]

_IGNORE = tuple(tuple(f) for kind, *f in RULES if kind == "ignore")


def strip_prefix(name: str) -> tuple[Optional[str], str]:
    """(component the name's prefix names, or None; the name without that prefix)."""
    for prefix, component in INPUT_PREFIXES:
        if name.startswith(prefix):
            return component, name[len(prefix):]
    return None, name


def is_ignored(component: str, bare: str) -> bool:
    """True for a bare name of ``component`` that no network uses (``""``: the rules for all)."""
    for who, how, text in _IGNORE:
        if who != "*" and who != component:
            continue
        if (how == "suffix" and bare.endswith(text)) or (how == "prefix" and bare.startswith(text)) or \
                (how == "exact" and bare == text):
            return True
    return False


del _kind, _f
