"""Progress and timing reports on stderr: the pipeline's steps and the converter's bytes."""

from __future__ import annotations

import sys
import time
from typing import Optional


def _is_tty(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed stream
        return False


def peak_rss_mb() -> Optional[float]:
    """Peak resident memory of this process in MiB (None where the platform does not say).

    Linux: VmHWM of /proc/self/status (ru_maxrss there keeps the high-water mark of the process
    image before exec, e.g. of a big parent that started this one). Elsewhere ru_maxrss.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024.0  # bytes on macOS, KiB elsewhere


class StepReporter:
    """The pipeline's progress and verbose timings on stderr.

    progress: a tqdm bar over the steps when the stream is a terminal, else a line per step
    (logs stay readable); verbose: per-stage timings.
    """

    def __init__(self, progress: bool, verbose: bool, stream=None):
        self.progress = bool(progress)
        self.verbose = bool(verbose)
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None

    def log(self, msg: str) -> None:
        if not self.verbose:
            return
        if self.bar is not None:
            self.bar.write(f"fluxmini: {msg}", file=self.stream)
        else:
            print(f"fluxmini: {msg}", file=self.stream, flush=True)

    def start_steps(self, total: int) -> None:
        if not self.progress or not _is_tty(self.stream):
            return
        try:
            from tqdm import tqdm
        except ImportError:  # a dependency, but a missing one only costs the bar
            return
        self.bar = tqdm(total=total, desc="sampling", unit="step", file=self.stream, leave=False,
                        dynamic_ncols=True)

    def step(self, i: int, total: int, seconds: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.log(f"step {i}/{total}: {seconds:.3f} s")
        elif self.progress or self.verbose:
            print(f"fluxmini: step {i}/{total} ({seconds:.3f} s)", file=self.stream, flush=True)

    def end_steps(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ByteProgress:
    """The converter's progress over bytes written: tqdm, else one stderr line rewritten at most
    twice a second."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.n = 0
        self._bar = None
        self._t0 = self._last = time.monotonic()
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)

    def update(self, n: int) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= 0.5 or self.n >= self.total:
            self._last = now
            pct = 100.0 * self.n / self.total if self.total else 100.0
            rate = self.n / max(now - self._t0, 1e-9) / 1e6
            sys.stderr.write(f"\r{self.desc}: {pct:5.1f}% {self.n / 1e9:.2f}/{self.total / 1e9:.2f} GB "
                             f"{rate:.0f} MB/s")
            sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")
            sys.stderr.flush()
