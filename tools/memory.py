"""Memory and disk readings for the load and timing tools: a process's resident set (psutil if
installed, else /proc, else getrusage), a thread that keeps its peak, and a folder's usage."""

from __future__ import annotations

import ctypes
import os
import resource
import threading
import time
from pathlib import Path

from app.process_memory import glibc

try:
    import psutil
except ImportError:  # optional: /proc (Linux) or getrusage serve instead
    psutil = None


def memory_mb(pid: int | None = None) -> tuple[float | None, float | None]:
    """(resident, peak resident) of ``pid`` (default: this process) in MiB; None if unknown."""
    pid = pid or os.getpid()
    if psutil is not None:
        try:
            info = psutil.Process(pid).memory_info()
        except psutil.Error:  # a vanished process: unknown, not fatal
            return None, None
        peak = getattr(info, "peak_wset", None)  # Windows only; elsewhere the sampler's max
        return info.rss / 2**20, None if peak is None else peak / 2**20
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        kib = lambda name: float(fields[name].split()[0]) / 1024  # noqa: E731
        return kib("VmRSS"), kib("VmHWM")
    except (OSError, KeyError, ValueError):
        if pid != os.getpid():
            return None, None
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return None, peak_kib / 1024


class MemorySampler(threading.Thread):
    """Samples a process's resident set every ``interval`` s and keeps the peak."""

    def __init__(self, pid: int | None, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def sample(self) -> float | None:
        rss, hwm = memory_mb(self.pid)
        self.peak = max(self.peak, rss or 0.0, hwm or 0.0)
        return rss

    def stop(self) -> None:
        self._done.set()
        self.join()


def cache_usage(folder: str) -> dict:
    """Files and MiB under ``folder`` (files may vanish meanwhile: Gradio sweeps its cache)."""
    count = size = 0
    for path in Path(folder).rglob("*"):
        try:
            if path.is_file():
                count, size = count + 1, size + path.stat().st_size
        except OSError:
            continue
    return {"files": count, "mb": round(size / 2**20, 1)}


def settled_cache_usage(folder: str, wait_s: float = 10.0) -> dict:
    """``cache_usage`` once Gradio's shutdown sweep (it runs after ``close()`` returns) is done."""
    usage, deadline = cache_usage(folder), time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        usage, previous = cache_usage(folder), usage
        if usage == previous:
            break
    return usage


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h), all size_t
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def heap_mb() -> dict | None:
    """This process's C heap from glibc (``mallinfo2``): MiB in live blocks (``in_use``, heap
    and mmapped), and MiB free inside the heap (``free``; pages a trim handed back still count
    there, so it is not resident memory). Unlike the resident set, ``in_use`` counts live native
    memory (torch, oneDNN, PIL) and nothing freed. None without glibc 2.33+."""
    libc = glibc()
    info = getattr(libc, "mallinfo2", None)
    if info is None:
        return None
    info.restype = _MallInfo2
    got = info()
    mib = lambda n: round(n / 2**20, 1)  # noqa: E731
    return {"in_use": mib(got.uordblks + got.hblkhd), "free": mib(got.fordblks)}
