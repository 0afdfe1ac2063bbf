"""What every benchmark prints next to its figures: the CPU they were measured on."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The model name from /proc/cpuinfo (Linux), else what the platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
