"""Suite-wide report header: which CPU ran the tests and which of its kernel paths were tested.

Results of the numeric tests depend on the CPU (its SIMD paths, in our kernels and in torch's),
and the development and CI machines change between sessions, so every run says where it ran.
"""

from __future__ import annotations

import platform

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
    return f"{model}; flags: {' '.join(f for f in _FLAGS if f in flags) or 'none of ' + ','.join(_FLAGS)}"


def pytest_report_header(config):
    lines = [f"cpu: {cpu_description()}"]
    try:
        from fluxmini import _core
    except ImportError as e:  # the suite then fails loudly in every engine test; say why up front
        return lines + [f"fluxmini engine: NOT IMPORTABLE ({e})"]
    lines.append(f"fluxmini CPU kernels: quantized matmul {'fluxmini' if _core.cpu_qmatmul_available() else 'ggml'}"
                 f" by default, VAE convolution {'fluxmini' if _core.cpu_conv2d_available() else 'ggml'};"
                 " forced paths tested: portable (plain C++) and ggml, plus the vector paths above")
    return lines
