"""Model work for many sessions at once: their runs step together, in shared forwards.

A batch costs far less than its parts (``python -m tools.batch_sizes``, embedded model, T = 16,
one CPU thread: 0.52 s per image alone, 0.32 at 2, 0.23 at 4, 0.18 at 8, 0.16 at 16), so
``BatchScheduler`` gathers requests from different sessions into one sampler run and hands
each session only its own images. No gradio here; the engine creates one
(``Engine.scheduler``).

- Queue: every request joins one FIFO queue of at most ``max_queue`` waiting requests; one
  more is refused with ``BusyError``, in the words Gradio uses for its own full queue.
- Runs: requests start runs between steps while there is room, at most ``max_runs`` runs and
  ``max_batch`` images in all, first come first served (a request of more images than that runs
  when nothing else does, never split). Every running run makes its next step at the same time
  (``scan_core.Together``: each run keeps its own cache and seeds, and their model forwards
  merge into one), so a newcomer's first step comes with the others' next one: it waits about
  one step, not a whole run, and every run goes at the pace of the shared forward.
- Window: with nothing running, a generation waits until ``window_s`` after it arrived (less
  once ``max_batch`` images are waiting to join it). Every compatible request waiting when a
  run starts joins it (stacked: one cache, one run); while runs go on, the step they make is
  the window.
- Compatible: the same settings in every field, as the sampler resolves them, and none that
  stops early. ``patience`` and ``score_threshold`` decide for the whole batch (a round is idle
  only when no image accepted anything; the threshold reads the batch's lowest score), so a
  request with either runs alone. Everything else acts per image: class, locks, and seeds (each
  image draws from its own request's ``seed + b``), so a request yields the same codes in any
  batch as alone (scores to float rounding).
- Refinement and region regeneration share runs too, when their layouts agree
  (``scan_core.sampling.stacking``): finished images, the same settings, scores made the same
  way, and for regions as many cells brushed; the run continues their images side by side,
  each with its own seed, locks and region, and each session's trace keeps its own history.
  A branch from mid-generation, or a request with early stopping, runs alone.
- Pace: the scheduler has no thread that runs by itself. A stream that needs its next step
  and has none waiting does the next unit of work itself, one unit at a time, under the
  engine's lock: start the runs there is room for, then step every run once (the runs' steps
  run on ``Together``'s worker threads for that unit). The other members' steps wait in their
  own outboxes, so every session gets its steps as the runs make them
  (``BatchStream.steps_waiting`` says how far behind a reader is).
- Stop: closing a stream (Stop closes it; a closed tab closes the handler that holds it; a
  forgotten one is garbage-collected) withdraws its share: it leaves the queue, or the running
  batch stops handing it steps (its images still ride along). A run with no member left ends.
- Errors: each request is checked alone before it joins (``ScanSampler.check_generate``); a bad
  one fails alone, with the sampler's message, at its stream's first step. An error during a
  run reaches every member of that run still listening; the other runs go on.
"""

from __future__ import annotations

import functools
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np

from scan_core import (
    STEP_END,
    SamplerSettings,
    ScanSampler,
    Step,
    Together,
    Trace,
    continuation_key,
    stack_continuations,
    stacked_mask,
)

WINDOW_S = 0.025  # how long a generation waits for others to share its run
# Images stepped together. With 16 sessions, room for 16 cut the p95 first frame from 11.0 s
# (room for 8) to 6.2 s, against 31.1 s unbatched; runs then go slower, all at once
# (docs/results.md, "Sessions sharing batched runs").
MAX_BATCH = 16
MAX_QUEUE = 32  # waiting requests, like the studio's Gradio queue (app.ui.QUEUE_SIZE)
# Runs stepped together (compatible requests that arrive together stack into one run, so 8 runs
# still hold 16 images). Measured with 8: docs/results.md, "Sessions sharing batched runs".
MAX_RUNS = 8
BUSY_MESSAGE = "Queue is full! Please try again."  # Gradio's words (gradio_client QueueError)


class BusyError(RuntimeError):
    """The scheduler's queue is full; the request was not taken."""

    def __init__(self) -> None:
        super().__init__(BUSY_MESSAGE)


@dataclass(eq=False)
class _Request:
    """One session's request: what to run, where its results go, and whether anyone listens."""

    start: Callable[[ScanSampler, list[_Request]], Iterator] | None  # its (batch's) sampler run
    images: int
    arrival: float
    key: tuple | None = None  # requests with equal keys may share a run; None: alone
    class_ids: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    locked: np.ndarray | None = None  # (images, N) bool
    continued: Continuation | None = None  # a refinement or region run
    outbox: deque = field(default_factory=deque)  # Step, Exception, or STEP_END
    trace: Trace | None = None  # this request's own trace, from its first step
    rows: list[int] = field(default_factory=list)  # its images' rows in the run
    batch_images: int | None = None  # images in the run it shared
    withdrawn: bool = False


@dataclass(eq=False)
class _Run:
    stream: Iterator
    members: list[_Request]
    images: int


class BatchStream:
    """One request's share of model work: an iterator of (trace, step) holding only its images,
    like ``ScanSampler.generate``'s (the trace grows by one step per item). ``close()`` (or
    dropping the stream) withdraws the request."""

    def __init__(self, scheduler: BatchScheduler, request: _Request) -> None:
        self._scheduler, self._request = scheduler, request
        self._finalizer = weakref.finalize(self, scheduler._withdraw, request)

    @property
    def batch_images(self) -> int | None:
        """Images in the run this request shared (itself included); None before it started."""
        return self._request.batch_images

    @property
    def steps_waiting(self) -> int:
        """Steps the run has already made for this stream that it has not read yet: a reader
        this far behind may skip drawing all but the newest."""
        return sum(isinstance(item, Step) for item in list(self._request.outbox))

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[Trace, Step]:
        request = self._request
        while not request.outbox and not request.withdrawn:
            self._scheduler._work_for(request)
        if request.withdrawn:
            raise StopIteration
        item = request.outbox.popleft()
        if item is STEP_END:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        request.trace.steps.append(item)
        return request.trace, item

    def close(self) -> None:
        self._finalizer()


class BatchScheduler:
    """Runs sessions' model work, batching generations that can share a run (module docstring).

    ``sampler``: the ScanSampler, or a function returning the current one (the engine's may be
    replaced by a reload). ``lock``: held around every model step (the engine's lock), so other
    model work interleaves between steps. ``clock``: seconds, for arrivals and the window.
    """

    def __init__(
        self,
        sampler: ScanSampler | Callable[[], ScanSampler],
        lock: AbstractContextManager | None = None,
        window_s: float = WINDOW_S,
        max_batch: int = MAX_BATCH,
        max_queue: int = MAX_QUEUE,
        clock: Callable[[], float] = time.monotonic,
        max_runs: int = MAX_RUNS,
    ) -> None:
        self._sampler = sampler if callable(sampler) else (lambda: sampler)
        self._lock = lock if lock is not None else threading.RLock()
        self.window_s, self.max_batch, self.max_queue = window_s, max_batch, max_queue
        if max_runs < 1:
            raise ValueError(f"max_runs must be at least 1, got {max_runs}")
        self.max_runs = max_runs
        self._clock = clock
        self._queue: deque[_Request] = deque()
        self._changed = threading.Condition()  # guards the queue; told of every arrival
        self._drive = threading.Lock()  # one unit of work at a time
        self._runs: list[_Run] = []  # running, oldest first
        self._together = Together()  # steps them at once, their forwards merged

    @property
    def waiting(self) -> int:
        """Requests waiting for a run."""
        with self._changed:
            self._prune()
            return len(self._queue)

    @property
    def running(self) -> int:
        """Images in the running batches (0 when none runs)."""
        return sum(run.images for run in list(self._runs))

    # -- requests ------------------------------------------------------------------------------

    def generate(
        self,
        class_ids: list[int],
        settings: SamplerSettings,
        seed: int = 0,
        locked: np.ndarray | None = None,
    ) -> BatchStream:
        """Generate an image per class id (image b from ``seed + b``), maybe in a shared run."""
        sampler = self._sampler()
        try:
            resolved = sampler.check_generate(class_ids, settings, seed, locked)
        except (ValueError, TypeError) as error:  # the sampler's own message, at the first step
            return self._refused(error)
        images, n = len(class_ids), sampler.config.num_tokens
        if locked is not None:
            locked = np.broadcast_to(np.asarray(locked, dtype=bool).reshape(-1, n), (images, n))
        alone = resolved.patience > 0 or resolved.score_threshold < 1.0
        start = functools.partial(_generate, settings=resolved)
        request = _Request(start, images, self._clock(), None if alone else ("generate", resolved))
        request.class_ids = list(class_ids)
        listed = isinstance(seed, (list, tuple))  # checked: one per image
        request.seeds = [int(s) for s in seed] if listed else [int(seed) + b for b in range(images)]
        request.locked = locked
        return self._submit(request)

    def refine(self, trace, settings, seed=0, locked=None, region=None) -> BatchStream:
        """``ScanSampler.refine``, maybe in a shared run."""
        return self._continue(Continuation(trace, settings, seed, locked, region))

    def regenerate_region(
        self, trace, region, settings, seed=0, locked=None, refine_inside=False
    ) -> BatchStream:
        """``ScanSampler.regenerate_region``, maybe in a shared run."""
        return self._continue(Continuation(trace, settings, seed, locked, region, refine_inside))

    def _continue(self, work: Continuation) -> BatchStream:
        request = _Request(
            _continue, work.trace.batch_size, self._clock(), work.key(self._sampler())
        )
        request.continued = work
        return self._submit(request)

    def _submit(self, request: _Request) -> BatchStream:
        with self._changed:
            self._prune()
            if len(self._queue) >= self.max_queue:
                return self._refused(BusyError())
            self._queue.append(request)
            self._changed.notify_all()
        return BatchStream(self, request)

    def _refused(self, error: Exception) -> BatchStream:
        """A stream that raises ``error`` at its first step and never joined the queue."""
        request = _Request(None, 0, self._clock())
        request.outbox.append(error)
        return BatchStream(self, request)

    def _withdraw(self, request: _Request) -> None:
        """The request's reader is gone: it leaves the queue, or stops receiving the run's steps;
        a running batch with no member left ends now, unless a step is running (then it ends
        after its next turn).

        Waits for no lock: a stream may be garbage-collected on any thread, at any allocation,
        even one holding a lock here. The queue drops withdrawn requests when next it looks.
        """
        request.withdrawn = True
        request.outbox.clear()
        if self._drive.acquire(blocking=False):  # no step is running, so none of ours is
            try:
                for run in list(self._runs):
                    if all(m.withdrawn for m in run.members):
                        self._end(run, STEP_END)
            finally:
                self._drive.release()

    def _prune(self) -> None:
        """Drop withdrawn requests from the queue (hold ``_changed``)."""
        if any(r.withdrawn for r in self._queue):
            self._queue = deque(r for r in self._queue if not r.withdrawn)

    # -- running -------------------------------------------------------------------------------

    def _work_for(self, request: _Request) -> None:
        """One unit of work on behalf of ``request``, whose outbox is empty: unless another
        reader's unit filled it meanwhile, start runs for waiting requests while there is room
        (``max_runs`` runs, ``max_batch`` images), then advance every run a step together."""
        with self._drive:
            if request.outbox or request.withdrawn:
                return
            while len(self._runs) < self.max_runs:
                run = self._start_run()
                if run is None:
                    break
                self._runs.append(run)
            for run in list(self._runs):
                if all(m.withdrawn for m in run.members):
                    self._end(run, STEP_END)
            runs = list(self._runs)
            if not runs:
                return
            with self._lock:
                items = self._together.step([run.stream for run in runs])
            for run, item in zip(runs, items, strict=True):
                self._hand_out(run, item)

    def _start_run(self) -> _Run | None:
        members = self._gather(self.max_batch - self.running)
        if not members:
            return None
        offset = 0
        for member in members:
            member.rows = list(range(offset, offset + member.images))
            offset += member.images
        for member in members:
            member.batch_images = offset
        base = self._sampler()
        sampler = base.with_model(self._together.model(base.model))
        return _Run(members[0].start(sampler, members), members, offset)

    def _gather(self, room: int) -> list[_Request]:
        """Take the oldest request and those that may share its run, up to ``room`` images
        (a larger request runs when nothing else does). With nothing running it first waits
        for its window; while runs go on, the step they make is the window."""
        with self._changed:
            self._prune()
            if not self._queue:
                return []
            head = self._queue[0]
            if head.images > room and self._runs:  # first come, first served: wait for room
                return []
            room = max(room, head.images)
            deadline = head.arrival + self.window_s
            if head.key is not None and not self._runs:
                while (left := deadline - self._clock()) > 0 and self._room(head, deadline, room):
                    self._changed.wait(left)
                self._prune()
            if head.withdrawn:  # gone while it waited
                return []
            cutoff = max(deadline, self._clock())  # every request waiting now may join
            members, images = [head], head.images
            for request in list(self._queue)[1:]:
                if self._joins(request, head, cutoff) and images + request.images <= room:
                    members.append(request)
                    images += request.images
            self._queue = deque(r for r in self._queue if r not in members)
            return members

    @staticmethod
    def _joins(request: _Request, head: _Request, deadline: float) -> bool:
        return head.key is not None and request.key == head.key and request.arrival <= deadline

    def _room(self, head: _Request, deadline: float, room: int) -> bool:
        """Whether the head's run could take more images than have arrived to join it."""
        joining = [r for r in self._queue if r is head or self._joins(r, head, deadline)]
        return sum(r.images for r in joining) < room

    def _hand_out(self, run: _Run, item: object) -> None:
        """Hand each listening member its images' share of the run's step ``item`` (or the
        run's end, or the error its step raised)."""
        if item is STEP_END or isinstance(item, BaseException):
            self._end(run, item)
            return
        trace, step = item
        whole = len(run.members) == 1
        for member in run.members:
            if member.withdrawn:
                continue
            if member.trace is None:  # its own trace, as of before this step
                member.trace = _own_trace(member, trace, whole)
            member.outbox.append(step if whole else step.select(member.rows))
            if member.withdrawn:  # withdrawn meanwhile (on another thread): hold nothing
                member.outbox.clear()
        if all(m.withdrawn for m in run.members):  # every reader left during the step
            self._end(run, STEP_END)

    def _end(self, run: _Run, item: object) -> None:
        """Close the run's sampler stream (freeing its cache) and tell its members ``item``
        (``STEP_END`` or the error that ended it). Hold ``_drive``."""
        self._runs = [r for r in self._runs if r is not run]
        getattr(run.stream, "close", lambda: None)()
        for member in run.members:
            if not member.withdrawn:
                member.outbox.append(item)


@dataclass
class Continuation:
    """A refinement, or (``refine_inside`` not None) a region regeneration, of ``trace``."""

    trace: Trace
    settings: SamplerSettings
    seed: int | list[int]
    locked: np.ndarray | None
    region: np.ndarray | None
    refine_inside: bool | None = None

    @property
    def forced(self) -> bool:
        return self.refine_inside is not None

    def key(self, sampler: ScanSampler) -> tuple | None:
        """What it must share with others to run with them (``continuation_key``)."""
        work = (self.trace, self.settings, self.seed, self.locked, self.region, self.forced)
        return continuation_key(sampler, *work, bool(self.refine_inside))

    def start(self, sampler: ScanSampler, trace: Trace, seed, locked, region) -> Iterator:
        if self.forced:
            return sampler.regenerate_region(
                trace, region, self.settings, seed, locked, self.refine_inside
            )
        return sampler.refine(trace, self.settings, seed, locked, region)


def _continue(sampler: ScanSampler, members: list[_Request]) -> Iterator:
    """One refinement or region run: of one member's own trace, or of every member's current
    image side by side (their own seeds, locks and regions)."""
    works = [member.continued for member in members]
    first = works[0]
    if len(works) == 1:
        return first.start(sampler, first.trace, first.seed, first.locked, first.region)
    parts = [(w.trace, w.seed, w.locked, w.region) for w in works]
    return first.start(sampler, *stack_continuations(parts, sampler.config.grid_size))


def _own_trace(member: _Request, trace: Trace, whole: bool) -> Trace:
    """A member's trace before the run's first step (``trace``, the run's, after it): a
    continuation's own history with the operation the run recorded for its images, or its
    images' part of the run."""
    mine = trace.select(member.rows) if not whole else trace.copy()
    if member.continued is not None and not whole:
        own = member.continued.trace.copy()
        own.settings.setdefault("ops", []).append(mine.settings["ops"][-1])
        return own
    mine.steps.pop()
    return mine


def _generate(sampler: ScanSampler, members: list[_Request], settings: SamplerSettings):
    """One generation run for every member's images (their own classes, seeds and locks)."""
    class_ids = [c for m in members for c in m.class_ids]
    seeds = [s for m in members for s in m.seeds]
    locked = None
    if any(m.locked is not None for m in members):
        masks, images = [m.locked for m in members], [m.images for m in members]
        locked = stacked_mask(masks, images, sampler.config.grid_size, "locked")
    return sampler.generate(class_ids, settings, seeds, locked)
