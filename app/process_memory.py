"""Memory and disk readings for the load test: a process's resident set (psutil if installed,
else /proc, else getrusage), a sampler thread that keeps the peak, and cache folder usage."""

from __future__ import annotations

import gc
import os
import resource
import threading
import time
from pathlib import Path

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


def _libc():
    """glibc through ctypes, or None where there is none (other systems, musl)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere). ctypes
    releases the GIL for the call, so streams in other threads keep running meanwhile."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
SERVER_ARENAS = 2


def limit_malloc_arenas(count: int = SERVER_ARENAS) -> bool:
    """Let glibc keep at most ``count`` heaps (arenas) for all threads; True if it took effect.

    By default glibc gives each busy thread a heap of its own, up to 8 per core, and a heap
    keeps its fragmented high-water mark. Gradio and PyTorch run many threads, so a server's
    resident set crept up after each busy spell even with the trim. Measured with four load
    tests in a row against one server: it ended 20-45 MB above its first baseline with the
    default arenas, 11-24 MB with two (README). Threads started later share the limited heaps;
    the model runs one job at a time, so contention costs nothing noticeable. Same effect as
    ``MALLOC_ARENA_MAX=2`` in the environment; a no-op where glibc is absent.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return libc.mallopt(M_ARENA_MAX, int(count)) == 1


def release_free_memory() -> None:
    """Collect garbage, then :func:`trim_heap`, so RSS shows live data."""
    gc.collect()
    trim_heap()


def freeze_startup_objects() -> None:
    """Collect once, then move every object alive now (modules, the model, the UI) out of the
    collector's sight (``gc.freeze``). A full collection of a loaded studio walks about 470,000
    objects, 150–500 ms with the GIL held; after the freeze it walks only what later requests
    made, a few ms, so the housekeeping thread can afford one every 30 s."""
    gc.collect()
    gc.freeze()


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
