"""How the studio is served: address, limits and session lifetime, in one place.

``app.py``, the load test and the tests all start the server through :func:`launch`, so they run
the same policy:

- Address: ``127.0.0.1`` (this machine only) unless ``GRADIO_SERVER_NAME`` says otherwise (Hugging
  Face Spaces sets it). ``share=True`` is refused.
- Uploads: at most ``MAX_UPLOAD_BYTES`` per file (Gradio answers HTTP 413 above it) and
  ``MAX_UPLOAD_PIXELS`` per image. The pixel limit is also set as Pillow's own limit, because
  Gradio decodes the brush canvas itself, before any handler sees it.
- Queue: ``build_demo`` caps it (``app.ui.QUEUE_SIZE``). A full queue answers "Queue is full!
  Please try again." (``gradio_client`` raises ``QueueError``) and nothing else is affected.
- Sessions: a session idle for ``SESSION_TTL_S`` (no event queued or running for it) is
  forgotten whole: its studio state (trace, undo stack, gallery) and Gradio's own record of it
  (:func:`forget_idle_sessions`, run by the housekeeping thread every ``TRIM_EVERY_S``, so a
  session goes between one lifetime and one period after its last event). Its next event starts
  from an empty studio, which says so. Gradio drops a closed browser tab's state after an hour.
  Files (streamed frames, exports) are removed by ``build_demo``'s ``delete_cache`` sweep and by
  ``app.exporting.EXPORT_TTL_S``.
- Streamed images are cached write-once, and swept by age even where Gradio loses track of them
  (see :func:`write_once_image_cache`).
- glibc keeps at most ``SERVER_ARENAS`` heaps (:func:`app.process_memory.limit_malloc_arenas`).
- Every ``TRIM_EVERY_S`` the studio also hands freed heap memory back to the OS, so the
  resident set falls back after a busy spell (see :func:`start_housekeeping`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import threading
import time
import weakref
from pathlib import Path

import gradio as gr
from gradio import processing_utils
from PIL import Image

from app.inputs import MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS
from app.process_memory import (
    freeze_startup_objects,
    limit_malloc_arenas,
    release_free_memory,
)
from scan_core.files import atomic_write

LOCAL_HOST = "127.0.0.1"
SESSION_TTL_S = 3600  # idle time after which a session is forgotten
SESSION_CAPACITY = 2000  # sessions whose Gradio bookkeeping stays in memory (Gradio: 10,000)
CACHE_SWEEP = (600, 3600)  # when the demo sets no delete_cache: every 10 min, older than 1 h
TRIM_EVERY_S = 30.0  # hand freed heap pages back to the OS this often (see start_housekeeping)

_written: dict[str, None] = {}  # image files this process put in Gradio's cache (ordered set)
_written_lock = threading.Lock()
_sweeper: threading.Thread | None = None
_trimmer: threading.Thread | None = None
_served: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # demo -> session lifetime (s)
log = logging.getLogger(__name__)


class RunStops:
    """Stop requests per session, which a streaming run reads between two steps.

    The studio's Stop does not cancel the run's task (Gradio would then count the run as
    failed, and the run could not show where it stopped): the run ends normally after its
    current step, with a full view and a "stopped" line. A Stop that comes while the session's
    run is still waiting in the queue is kept for that run (``expected``); one that comes with
    nothing to stop is dropped, so it can never stop a later run.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, list[threading.Event]] = {}
        self._pending: set[str] = set()

    @contextlib.contextmanager
    def running(self, session: str | None):
        """Register a run of ``session`` for as long as the block lasts; yields its stop flag."""
        flag = threading.Event()
        if session is None:  # called outside a server (tests, notebooks): nothing can stop it
            yield flag
            return
        with self._lock:
            if session in self._pending:
                self._pending.discard(session)
                flag.set()
            self._running.setdefault(session, []).append(flag)
        try:
            yield flag
        finally:
            with self._lock:
                flags = self._running.get(session, [])
                if flag in flags:
                    flags.remove(flag)
                if not flags:
                    self._running.pop(session, None)

    def stop(self, session: str | None, expected: bool = False) -> int:
        """Ask the session's runs to stop; returns how many were running. ``expected``: the
        session has a run waiting to start, which is then stopped before its first step."""
        with self._lock:
            flags = self._running.get(session, [])
            for flag in flags:
                flag.set()
            if not flags and expected and session is not None:
                self._pending.add(session)
            return len(flags)

    def stopping(self) -> int:
        """Runs asked to stop that have not ended yet (all sessions)."""
        with self._lock:
            return sum(flag.is_set() for flags in self._running.values() for flag in flags)

    def forget(self, session: str) -> None:
        with self._lock:
            self._pending.discard(session)


STOPS = RunStops()


def session_runs(demo: gr.Blocks, session: str | None, api_names) -> int:
    """Events of ``session`` named in ``api_names`` that are waiting in ``demo``'s queue or
    running now."""
    return sum(
        event.session_hash == session and getattr(event.fn, "api_name", None) in api_names
        for event in _queued_events(demo)
    )


def default_host() -> str:
    """``GRADIO_SERVER_NAME`` when set (Spaces sets ``0.0.0.0``), else this machine only."""
    return os.environ.get("GRADIO_SERVER_NAME") or LOCAL_HOST


def limit_image_pixels(limit: int = MAX_UPLOAD_PIXELS) -> None:
    """Make Pillow refuse images over ``limit`` pixels, before it decodes them.

    Pillow raises ``DecompressionBombError`` above twice its ``MAX_IMAGE_PIXELS`` (and only warns
    between once and twice), so the setting is half the limit. This is process-wide.
    """
    Image.MAX_IMAGE_PIXELS = limit // 2


def _save_pil_write_once(
    img: Image.Image, cache_dir: str, name: str = "image", format: str = "webp"
) -> str:
    data = processing_utils.encode_pil_to_bytes(img, format)
    path = (Path(cache_dir) / processing_utils.hash_bytes(data) / f"{name}.{format}").resolve()
    with _written_lock:  # the sweeper cannot delete it (or its folder) between check and return
        try:  # the name is the content's hash: when it exists, the bytes are already there
            os.utime(path)  # files are aged by ctime: keep one that is handed out again
        except FileNotFoundError:  # new, or swept a moment ago: (re)write it
            atomic_write(path, lambda stream: stream.write(data), durable=False)
        except OSError:  # there, but not ours to touch (another user's cache): serve it as is
            pass
        _written[str(path)] = None
    return str(path)


def write_once_image_cache() -> None:
    """Make Gradio write each streamed image once, atomically, and remember it (process-wide).

    Gradio 6.31's ``save_pil_to_cache`` names a file by the hash of its bytes but rewrites it in
    place whenever the same image is sent again (scrubbing back to a step, two sessions with the
    same seed, an unchanged plot). A browser or client downloading that file meanwhile gets a
    truncated image, and uvicorn logs "Too much/little data for declared Content-Length". The
    replacement skips files that exist (same name, same bytes) and writes new ones through a
    temporary file and a rename, as Gradio already does for ``save_file_to_cache``.

    Gradio's ``delete_cache`` also misses some of these files (the brush canvas, gallery,
    compare slider and some streamed frames are never registered), so they would pile up on disk
    forever; every file written here is remembered for :func:`sweep_image_cache`.
    """
    processing_utils.save_pil_to_cache = _save_pil_write_once


def sweep_image_cache(older_than_s: float) -> int:
    """Delete the cached images this process wrote and last handed out over ``older_than_s``
    seconds ago (and their folders once empty); returns how many went."""
    now, removed = time.time(), 0
    with _written_lock:
        paths = list(_written)
    for path in paths:
        with _written_lock:  # per file: streams write new images in between
            try:
                if now - os.stat(path).st_ctime <= older_than_s:
                    continue
                os.remove(path)
                removed += 1
            except FileNotFoundError:
                pass
            except OSError:
                continue
            _written.pop(path, None)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(path))
    return removed


def _queued_events(demo: gr.Blocks) -> list:
    """Every event of ``demo`` running now or waiting in Gradio's queue."""
    queue = getattr(demo, "_queue", None)
    if queue is None:
        return []
    # Snapshots: the server's event loop changes these while this thread reads them.
    running = [event for job in list(queue.active_jobs) if job for event in job]
    waiting = [
        event
        for line in list(queue.event_queue_per_concurrency_id.values())
        for event in list(line.queue)
    ]
    return running + waiting


def busy_sessions(demo: gr.Blocks) -> set[str]:
    """Sessions of ``demo`` with an event waiting in Gradio's queue or running now."""
    return {event.session_hash for event in _queued_events(demo)}


def forget_idle_sessions(demo: gr.Blocks, idle_s: float) -> int:
    """Drop everything kept for each session of ``demo`` idle for over ``idle_s`` seconds (its
    studio state and Gradio's record of it); returns how many went.

    This is the studio's only session expiry. Gradio's own ``gr.State(time_to_live=...)`` is not
    used: it counts from the state's last write and is checked every second, so under load a
    session whose next event waited in the model queue for longer than the lifetime lost its
    trace (measured: 4 of 128 requests, 16 sessions, a 60 s lifetime). Here a session
    with an event queued or running (:func:`busy_sessions`) counts as used now: Gradio stamps a
    session only when its event starts, so a long run would otherwise look idle from its start.

    Gradio 6.31 keeps one ``SessionState`` per session: a config entry for every component and
    the values last sent and received, about 1,500 Python objects in this studio. It never drops
    one because its session ended (an API client cannot say so); only ``state_session_capacity``
    newer sessions push it out, so memory grew with every session until then.
    """
    holder = getattr(demo, "state_holder", None)
    if holder is None:  # never launched
        return 0
    now = datetime.datetime.now()
    busy = busy_sessions(demo)
    with holder.lock:
        for key in busy & holder.time_last_used.keys():
            holder.time_last_used[key] = now
    cutoff = now - datetime.timedelta(seconds=idle_s)
    stale = [key for key, used in list(holder.time_last_used.items()) if used < cutoff]
    forgotten = 0
    for key in stale:
        with holder.lock:
            if holder.time_last_used.get(key, cutoff) > cutoff:  # used again meanwhile: keep
                continue
            holder.delete_state(key)  # runs the states' delete callbacks
            holder.session_data.pop(key, None)
            holder.time_last_used.pop(key, None)
            STOPS.forget(key)
            forgotten += 1
    return forgotten


def tidy_memory() -> None:
    """Forget idle sessions of every studio this process serves, then release free memory."""
    for demo, idle_s in list(_served.items()):
        forget_idle_sessions(demo, idle_s)
    release_free_memory()


def repeat_every(period_s: float, task, stop: threading.Event, what: str) -> None:
    """Call ``task()`` every ``period_s`` seconds until ``stop`` is set. A failure is logged and
    the next call still runs: a dead housekeeper would let the disk or the heap fill up."""
    while not stop.wait(period_s):
        try:
            task()
        except Exception:  # noqa: BLE001 (logged; the loop must outlive any one call)
            log.exception("%s failed; retrying in %s s", what, period_s)


def sweep_every(every_s: float, older_than_s: float, stop: threading.Event) -> None:
    """:func:`sweep_image_cache` every ``every_s`` seconds until ``stop`` is set."""
    repeat_every(every_s, lambda: sweep_image_cache(older_than_s), stop, "image cache sweep")


def start_housekeeping(every_s: float, older_than_s: float, trim_every_s: float = TRIM_EVERY_S):
    """Once per process (later calls do nothing), two daemon threads: the image cache sweeper
    (:func:`sweep_every`) and the memory tidier (:func:`tidy_memory` every ``trim_every_s``).

    Why trim: Gradio runs handlers on a pool of threads, and glibc gives threads their own
    heaps (arenas). Memory freed after a run stays in those arenas, so without a trim the
    resident set keeps the high-water mark of every busy moment even though nothing is live
    (measured: about 140 MB more after a small load test). A trim hands the free pages back.
    It first collects garbage: Python's own full collections are rare, and cycles left by a
    run kept their memory until one came (measured: trimming alone still crept by about
    30 MB per 24 runs). ``launch`` freezes the startup objects, so this collection is cheap.
    """
    global _sweeper, _trimmer
    if _sweeper is not None:
        return
    stop = threading.Event()  # never set: housekeeping lives as long as the process
    _sweeper = threading.Thread(
        target=sweep_every,
        args=(every_s, older_than_s, stop),
        name="image-cache-sweeper",
        daemon=True,
    )
    _trimmer = threading.Thread(
        target=repeat_every,
        args=(trim_every_s, tidy_memory, stop, "memory tidy"),
        name="heap-trimmer",
        daemon=True,
    )
    _sweeper.start()
    _trimmer.start()


def launch(
    demo: gr.Blocks,
    host: str | None = None,
    port: int | None = None,
    session_ttl_s: float = SESSION_TTL_S,
    **options,
):
    """``demo.launch`` with the policy above; ``options`` override or add launch arguments."""
    if options.get("share"):
        raise ValueError("share=True is not allowed: it would publish the studio on the internet")
    limit_malloc_arenas()  # before the server's threads start (see its docstring)
    _served[demo] = session_ttl_s  # forget_idle_sessions, from the housekeeping thread
    limit_image_pixels()
    write_once_image_cache()
    start_housekeeping(*(demo.delete_cache or CACHE_SWEEP))
    freeze_startup_objects()
    settings = {
        "server_name": host or default_host(),
        "server_port": port,
        "share": False,
        "show_error": True,
        "max_file_size": MAX_UPLOAD_BYTES,
        "state_session_capacity": SESSION_CAPACITY,
    }
    return demo.launch(**(settings | options))
