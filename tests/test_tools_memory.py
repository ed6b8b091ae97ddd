"""The load tools' readings: resident memory, its sampled peak, and a folder's usage."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from tools.memory import MemorySampler, cache_usage, heap_mb, memory_mb, settled_cache_usage


def test_the_reading_sees_memory_this_process_touches():
    before, _ = memory_mb()
    # A fresh anonymous mapping: the allocator cannot hand back pages that are already resident
    # (np.ones could, after earlier tests freed large blocks), so writing it must raise RSS.
    with mmap.mmap(-1, 64 * 2**20) as block:
        block.write(b"\x01" * (64 * 2**20))
        after, _ = memory_mb()
    assert after - before > 48, (before, after)


def test_the_sampler_keeps_the_peak_it_saw():
    sampler = MemorySampler(os.getpid())
    rss = sampler.sample()
    assert rss is not None and sampler.peak >= rss > 0


def test_a_vanished_process_reads_as_unknown_not_as_an_error():
    assert memory_mb(2**22 + 12345) == (None, None)  # above Linux's default pid_max


def test_folder_usage_counts_files_in_subfolders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.bin").write_bytes(b"x" * 2**20)
    (tmp_path / "two.bin").write_bytes(b"")
    assert cache_usage(str(tmp_path)) == {"files": 2, "mb": 1.0}
    assert settled_cache_usage(str(tmp_path), wait_s=0.0) == {"files": 2, "mb": 1.0}


def test_the_heap_reading_counts_native_blocks_while_they_live():
    if heap_mb() is None:
        pytest.skip("no glibc mallinfo2 here")
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    before = heap_mb()["in_use"]
    block = libc.malloc(32 * 2**20)  # what torch or oneDNN would hold, unseen by Python
    try:
        held = heap_mb()["in_use"]
    finally:
        libc.free(block)
    assert held - before >= 31 and heap_mb()["in_use"] - before < 1, (before, held)


def test_batch_memory_reads_after_loading_and_after_each_run_twice():
    from test_app_render import tiny_engine

    from tools import batch_memory

    rows = batch_memory.measure(tiny_engine(), sizes=[1, 2], num_rounds=1)
    assert [(r["after"], r["batch"]) for r in rows] == [
        ("load", None),
        ("first pass", 1),
        ("first pass", 2),
        ("second pass", 1),
        ("second pass", 2),
    ]
    assert all(r["rss_mb"] and r["heap_in_use_mb"] for r in rows), rows
