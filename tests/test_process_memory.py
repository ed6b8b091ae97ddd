"""The studio's memory housekeeping: freezing startup objects and collecting what runs leave."""

from __future__ import annotations

import gc
import weakref

from app import process_memory


class Node:
    """A reference cycle: only the cyclic collector can free it."""

    def __init__(self):
        self.me = self


def test_freeze_hides_startup_objects_and_later_cycles_are_still_collected():
    startup = Node()
    try:
        process_memory.freeze_startup_objects()
        frozen, walked = gc.get_freeze_count(), len(gc.get_objects())
        assert walked < frozen // 10  # a collection now walks a small fraction of the objects
        later = Node()  # made after the freeze, as a request would be
        alive = weakref.ref(later)
        del later
        process_memory.release_free_memory()
        assert alive() is None  # the cycle made after the freeze was collected
    finally:
        gc.unfreeze()
    assert startup.me is startup


def test_the_arena_limit_reaches_glibc_and_is_a_no_op_without_it(monkeypatch):
    import ctypes
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert process_memory.limit_malloc_arenas(8)  # glibc accepted the setting

    def missing(name):
        raise OSError(f"{name}: no such library")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert process_memory.limit_malloc_arenas() is False
