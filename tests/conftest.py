"""Suite-wide report header: which CPU ran the tests and which of its kernel paths were tested.

Results of the numeric tests depend on the CPU (its SIMD paths, in our kernels and in torch's),
and the development and CI machines change between sessions, so every run says where it ran.

FLUXMINI_TEST_INSTALLED=1 (what `.ci/run` sets when it runs `python -m pytest tests -q` from the
repository root against the installed wheel) makes the run refuse a fluxmini that does not come
from site-packages, so a wheel test can never pass on the sources in python/.
"""

from __future__ import annotations

import os
import platform
import sysconfig
from pathlib import Path

import pytest

# x86-64 flags that select a code path somewhere (ours, ggml's or torch's)
_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
          "avx512_bf16", "amx_int8")


def cpu_description() -> str:
    """Model name and the path-selecting flags from /proc/cpuinfo (Linux), else platform's words."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return f"{platform.processor() or platform.machine()} (no /proc/cpuinfo: flags unknown)"
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                 platform.machine())
    flags_line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(flags_line.split(":", 1)[-1].split())
    # platform.machine() first: under qemu-user (scripts/arm64_check.sh) /proc/cpuinfo is the host's
    return (f"{platform.machine()}: {model}; "
            f"flags: {' '.join(f for f in _FLAGS if f in flags) or 'none of ' + ','.join(_FLAGS)}")


def _installed_package_check() -> None:
    """With FLUXMINI_TEST_INSTALLED=1, fluxmini and its engine must be the installed ones."""
    if os.environ.get("FLUXMINI_TEST_INSTALLED") != "1":
        return
    import fluxmini
    from fluxmini import _core

    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    for what, path in (("fluxmini", fluxmini.__file__), ("fluxmini._core", _core.__file__)):
        resolved = Path(path).resolve()  # a development build links its files to python/
        if not any(s in resolved.parents for s in site):
            raise pytest.UsageError(f"FLUXMINI_TEST_INSTALLED=1 but {what} comes from {resolved}, not from "
                                    f"site-packages ({', '.join(map(str, sorted(site)))}): install the wheel and do not put "
                                    "python/ or a development build on PYTHONPATH")


def pytest_configure(config):
    _installed_package_check()


def pytest_report_header(config):
    lines = [f"cpu: {cpu_description()}"]
    try:
        from fluxmini import _core
    except ImportError as e:  # the suite then fails loudly in every engine test; say why up front
        return lines + [f"fluxmini engine: NOT IMPORTABLE ({e})"]
    lines.append(f"fluxmini from: {os.path.dirname(_core.__file__)}"
                 + (" (installed package required: FLUXMINI_TEST_INSTALLED=1)"
                    if os.environ.get("FLUXMINI_TEST_INSTALLED") == "1" else ""))
    # The quantized matmul's instruction-set paths (cpu_qmatmul.h): test_cpu_qmatmul.py forces each
    # one this CPU has (FLUXMINI_KERNELS=path) and skips the others; ggml's matmul is forced too.
    all_paths = ("avx512vnni", "avxvnni", "avx2", "portable")
    have = _core.testing.qmatmul_paths()
    try:
        default = _core.testing.qmatmul_engine_path()
    except Exception as e:  # a bad FLUXMINI_KERNELS: every model load then says so
        default = f"none ({e})"
    lacking = [p for p in all_paths if p not in have]
    if os.environ.get("FLUXMINI_CPU_WITHOUT"):
        lacking.append(f"as FLUXMINI_CPU_WITHOUT={os.environ['FLUXMINI_CPU_WITHOUT']} pretends")
    lines.append(f"fluxmini quantized matmul: paths on this CPU {', '.join(have)}; engine default {default}; "
                 f"forced and tested: {', '.join(have)}, ggml"
                 + (f"; not tested (CPU lacks): {', '.join(lacking)}" if lacking else ""))
    try:
        attn_default = _core.testing.attention_engine_path()
    except Exception as e:
        attn_default = f"none ({e})"
    lines.append(f"fluxmini fused attention: paths on this CPU {', '.join(_core.testing.attention_paths())}; "
                 f"engine default {attn_default}; each forced and tested (test_cpu_attention.py)")
    lines.append(f"fluxmini VAE convolution: {'fluxmini (' + _core.testing.conv_engine_path() + ')' if _core.testing.cpu_conv2d_available() else 'ggml'}"
                 f" by default; forced and tested: {', '.join(_core.testing.conv_paths())}, ggml")
    return lines
