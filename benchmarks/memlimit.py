#!/usr/bin/env python3
"""Run `fluxmini generate` inside a memory cgroup with a hard limit and no swap (not a test).

    sudo python benchmarks/memlimit.py -m /tmp/cpp13-q4_0.gguf --limits 1024 1536 2048 0 \\
        --size 512 --cache cold warm --json out.jsonl

Needs root and a memory cgroup: cgroup v2 (`memory.max`, `memory.swap.max = 0`, `memory.peak`)
where the memory controller is on the unified hierarchy, else cgroup v1 (`memory.limit_in_bytes`,
`memory.memsw.limit_in_bytes` = the same limit where swap accounting exists,
`memory.max_usage_in_bytes`). A limit of 0 runs in a cgroup without a limit (peak still measured).

Each run is a fresh process. Reported per run:
  result     finished, or killed (the kernel's OOM killer, seen as SIGKILL and the cgroup's oom
             count), or failed (another exit status; its stderr tail is printed), or timeout
  wall       seconds from start to exit of the whole process (load, text encoding, sampling, decode)
  cg_peak    the cgroup's peak charge in MiB: anonymous memory plus the page cache the run brought
             in (pages already cached before the run stay charged to whoever read them first)
  hwm        VmHWM of the process in MiB (anonymous + mapped file pages, both count as resident)
  anon/file  the largest RssAnon / RssFile seen while sampling /proc/PID/status every 20 ms (MiB)
  resident   share of the model file in the page cache just before the run (mincore)
  cpu        user + system CPU seconds of the process (sampled; the last sample before it exits)
  load       the 1-minute load average when the run ended (a shared machine: say so with timings)
"Cold" drops the model file's pages from the page cache first (posix_fadvise DONTNEED; pages
another process has mapped stay, which `resident` shows); "warm" reads the whole file first.
Figures are only comparable on one machine: name its CPU next to them.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20


# ------------------------------------------------------------------------------------- cgroups
def find_memory_cgroup() -> tuple:
    """(version, mount point) of a memory cgroup hierarchy this process can use, or raise."""
    mounts = []
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, fstype, opts = line.split()[:4]
            mounts.append((mnt, fstype, opts.split(",")))
    for mnt, fstype, _ in mounts:  # v2 first: the unified hierarchy with the memory controller
        if fstype == "cgroup2":
            try:
                with open(os.path.join(mnt, "cgroup.controllers")) as f:
                    if "memory" in f.read().split():
                        return 2, mnt
            except OSError:
                pass
    for mnt, fstype, opts in mounts:
        if fstype == "cgroup" and "memory" in opts:
            return 1, mnt
    raise SystemExit("no memory cgroup hierarchy is mounted (neither cgroup v2 with the memory controller "
                     "nor cgroup v1 memory): run on a host or container that exposes one")


class MemCgroup:
    def __init__(self, limit_mib: int):
        self.version, root = find_memory_cgroup()
        self.path = os.path.join(root, f"fluxmini-memlimit-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.mkdir(self.path)
        except OSError as e:
            raise SystemExit(f"cannot create the cgroup {self.path}: {e} (run as root; in a container the "
                             "cgroup file system must be writable)") from None
        if self.version == 2:
            parent = os.path.dirname(self.path)
            try:  # the parent must hand the memory controller down
                with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                    f.write("+memory")
            except OSError:
                pass
            if limit_mib:
                self._write("memory.max", str(limit_mib * MIB))
                self._write("memory.swap.max", "0", optional=True)
        else:
            if limit_mib:
                self._write("memory.limit_in_bytes", str(limit_mib * MIB))
                # swap accounting: memory + swap at the same limit means no swap
                self._write("memory.memsw.limit_in_bytes", str(limit_mib * MIB), optional=True)
            self._write("memory.swappiness", "0", optional=True)

    def _write(self, name: str, value: str, optional: bool = False) -> None:
        try:
            with open(os.path.join(self.path, name), "w") as f:
                f.write(value)
        except OSError:
            if not optional:
                raise

    def _read(self, name: str):
        try:
            with open(os.path.join(self.path, name)) as f:
                return f.read()
        except OSError:
            return None

    def add(self, pid: int) -> None:
        self._write("cgroup.procs", str(pid))

    def peak_mib(self):
        v = self._read("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes")
        return int(v) / MIB if v and v.strip().isdigit() else None

    def oom_kills(self) -> int:
        if self.version == 2:
            text = self._read("memory.events") or ""
        else:
            text = self._read("memory.oom_control") or ""
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)


# ------------------------------------------------------------------------------- page cache
def resident_fraction(path: str) -> float:
    """Share of the file's pages in the page cache (mincore on a fresh mapping; nan if unknown)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        p = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    if p is None or p == ctypes.c_void_p(-1).value:
        return float("nan")
    n = (size + page - 1) // page
    vec = (ctypes.c_ubyte * n)()
    try:
        if libc.mincore(p, size, vec) != 0:
            return float("nan")
    finally:
        libc.munmap(p, size)
    return sum(v & 1 for v in bytes(vec)) / n


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_cache(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(16 * MIB):
            pass


# ------------------------------------------------------------------------------------- a run
def cpu_seconds(pid: int):
    """user + system CPU seconds of a live process (its threads included), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def status_kib(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "RssAnon", "RssFile", "VmRSS"):
                    out[k] = int(v.split()[0])
    except (OSError, ValueError):
        pass
    return out


def run_one(args, limit_mib: int, cache: str) -> dict:
    if cache == "cold":
        drop_cache(args.model)
    elif cache == "warm":
        warm_cache(args.model)
    resident = resident_fraction(args.model)
    out_png = os.path.join(tempfile.gettempdir(), f"memlimit-{os.getpid()}.png")
    cmd = [sys.executable, "-m", "fluxmini.cli", "generate", "-m", args.model, "-p", args.prompt, "-o", out_png,
           "-W", str(args.size), "-H", str(args.size), "--steps", str(args.steps), "--t5-length",
           str(args.t5_length), "-q", "-v", "-t", str(args.threads)] + args.extra
    cg = MemCgroup(limit_mib)
    try:
        procs = os.path.join(cg.path, "cgroup.procs")

        def enter_cgroup():  # in the child before exec: everything it runs is charged to the cgroup
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=enter_cgroup)
        peak = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0, "cpu": 0.0}
        import threading

        stop = threading.Event()

        def sample():
            while not stop.is_set():
                s = status_kib(proc.pid)
                c = cpu_seconds(proc.pid)
                if c is not None:
                    peak["cpu"] = c
                for k in ("RssAnon", "RssFile", "VmHWM"):
                    peak[k] = max(peak[k], s.get(k, 0))
                stop.wait(0.02)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        timed_out = False
        try:
            stdout, stderr = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            timed_out = True
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
        rc = proc.returncode
        ooms = cg.oom_kills()
        if timed_out:
            result = "timeout"
        elif rc == 0:
            result = "finished"
        elif rc == -signal.SIGKILL or ooms:
            result = "killed"
        else:
            result = "failed"
        stages = {}
        for line in stderr.decode(errors="replace").splitlines():
            if line.startswith("fluxmini"):
                stages.setdefault("log", []).append(line[len("fluxmini:"):].strip())
        rec = {"limit_mib": limit_mib, "cache": cache, "size": args.size, "model": os.path.basename(args.model),
               "result": result, "rc": rc, "oom_kills": ooms, "wall_s": round(wall, 2),
               "cg_peak_mib": round(cg.peak_mib() or 0, 1), "hwm_mib": round(peak["VmHWM"] / 1024, 1),
               "anon_mib": round(peak["RssAnon"] / 1024, 1), "file_mib": round(peak["RssFile"] / 1024, 1),
               "resident_before": round(resident, 3), "cpu_s": round(peak["cpu"], 1),
               "load_avg": os.getloadavg()[0], "extra": args.extra, "cgroup": f"v{cg.version}",
               "log": stages.get("log", [])[-60:]}
        if result == "failed":
            rec["stderr_tail"] = stderr.decode(errors="replace")[-1500:]
        return rec
    finally:
        cg.remove()
        try:
            os.unlink(out_png)
        except OSError:
            pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--limits", type=int, nargs="+", default=[3072, 2048, 1536, 1024, 0],
                    help="hard limits in MiB (0: no limit); default 3072 2048 1536 1024 0")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--t5-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", nargs="+", choices=["cold", "warm", "asis"], default=["warm"])
    ap.add_argument("--prompt", default="a red fox in fresh snow at dawn")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before a run is killed (default 1800)")
    ap.add_argument("--json", default=None, help="append one JSON line per run to this file")
    ap.add_argument("extra", nargs="*", help="more `fluxmini generate` arguments (after --)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("memlimit: creating a cgroup needs root", file=sys.stderr)
        return 2
    for cache in args.cache:
        for limit in args.limits:
            rec = run_one(args, limit, cache)
            line = json.dumps(rec)
            print(f"{rec['model']} {rec['size']}² limit {limit or 'none'} MiB, {cache}: {rec['result']}, "
                  f"wall {rec['wall_s']:.1f} s, cgroup peak {rec['cg_peak_mib']:.0f} MiB, VmHWM {rec['hwm_mib']:.0f} "
                  f"MiB, RssAnon max {rec['anon_mib']:.0f} MiB, RssFile max {rec['file_mib']:.0f} MiB, "
                  f"resident before {100 * rec['resident_before']:.0f}%, CPU {rec['cpu_s']:.0f} s, load {rec['load_avg']:.1f}",
                  flush=True)
            if rec.get("stderr_tail"):
                print(rec["stderr_tail"], file=sys.stderr)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
