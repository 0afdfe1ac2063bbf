"""Package structure: no import cycles between fluxmini's modules, and a command line whose
commands cannot silently vanish (a command module that fails to import breaks `fluxmini`)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import fluxmini

ROOT = os.path.dirname(os.path.abspath(fluxmini.__file__))


def _modules() -> dict:
    """Module name -> source path, for every .py file of the package (resolving symlinks, as a
    development build links the sources)."""
    mods = {}
    for dirpath, _, files in os.walk(ROOT, followlinks=True):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            mods[".".join(["fluxmini"] + rel)] = os.path.join(dirpath, f)
    return mods


def _imports(name: str, path: str, mods: dict) -> set:
    """The fluxmini modules a module imports anywhere in its body (functions included)."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in mods:
                    out.add(sub)  # `from . import convert`: the submodule
                elif target in mods:
                    out.add(target)
    out.discard(name)
    return out


def test_no_import_cycles():
    mods = _modules()
    assert {"fluxmini.model", "fluxmini.pipeline", "fluxmini.engine", "fluxmini.cli",
            "fluxmini.convert.build"} <= set(mods)
    graph = {m: _imports(m, p, mods) - {"fluxmini"} for m, p in mods.items()}  # the root only re-exports
    assert "fluxmini.pipeline" in graph["fluxmini.model"] and "fluxmini.model" not in graph["fluxmini.pipeline"]
    state: dict = {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            assert state.get(n) != "open", "import cycle: " + " -> ".join(stack + [m, n])
            if n not in state:
                visit(n, stack + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_every_command_is_registered():
    from fluxmini.cli import COMMANDS, build_parser

    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    assert set(sub.choices) == {"info", "generate", "demo", "serve", "convert", "quantize", "make-random"}
    assert len(COMMANDS) == len(sub.choices)


def test_a_broken_command_module_fails_loudly():
    # the command line used to drop a command whose import failed; now `fluxmini` itself fails
    code = "import sys; sys.modules['fluxmini.convert'] = None; import fluxmini.cli"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr and "fluxmini.convert" in r.stderr, r.stderr
