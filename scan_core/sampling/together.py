"""Step several sampler runs at once, their model forwards merged into one (continuous batching).

A run (``ScanSampler.generate``, ``refine``, ...) is an iterator whose ``next()`` makes one or
more model forwards between bits of sampling. ``Together.step(streams)`` calls ``next()`` on
every stream at once, each on a worker thread, with a sampler whose model (``Together.model``)
does not run a forward itself: it hands the forward over and waits. Once every stream still
inside its ``next()`` waits on a forward, all those forwards run as one
(``Transformer.forward_chunks``: every linear layer reads its weights once for all of them),
and each stream goes on with its own part. A generation step, a refinement round and a region
regeneration share forwards alike, whatever their settings or cache sizes: only the linear
layers are shared, so each run computes what it computes alone (to float rounding).

Used on the thread that calls ``step`` (or anywhere else), ``Together.model`` is the plain model.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from scan_core.model.network import Chunk

STEP_END = object()  # what ``step`` gives for a stream that had no step left


@dataclass(eq=False)
class _Forward:
    """One stream's forward, waiting to run with the others."""

    model: object
    chunk: Chunk
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None


class _Handing(threading.local):
    mailbox: queue.SimpleQueue | None = None  # set on a worker while it runs a stream's step


class Together:
    """Steps several runs together (module docstring). One per model server; ``step`` is
    called by one thread at a time."""

    def __init__(self, bucket: bool | None = None) -> None:
        # Pad merged forwards to a few row counts (``bucket_rows``) where kernels keep state
        # per shape: None pads models in bfloat16 or float16, whose oneDNN kernels do.
        self.bucket = bucket
        self._handing = _Handing()
        self._pool: ThreadPoolExecutor | None = None
        self._workers = 0
        self.forwards = 0  # merged forwards run so far (a test's and a benchmark's count)

    def model(self, model) -> SharedModel:
        """``model`` for a sampler whose runs this steps: its forwards wait to run merged."""
        return SharedModel(model, self)

    def step(self, streams: list[Iterator]) -> list[object]:
        """``next()`` of every stream at once: per stream its item, ``STEP_END``, or the exception
        its step raised (another stream's error does not reach it)."""
        if len(streams) == 1:
            return [_next(streams[0])]
        mailbox: queue.SimpleQueue = queue.SimpleQueue()
        pool = self._pool_for(len(streams))
        for index, stream in enumerate(streams):
            pool.submit(self._work, index, stream, mailbox)
        results: list[object] = [STEP_END] * len(streams)
        busy, waiting = len(streams), []
        while busy:
            kind, index, payload = mailbox.get()
            if kind == "done":
                results[index] = payload
                busy -= 1
            else:
                waiting.append(payload)
            if waiting and len(waiting) == busy:  # nobody can go on without a forward
                self._run(waiting)
                waiting = []
        return results

    def _pool_for(self, count: int) -> ThreadPoolExecutor:
        """Workers for ``count`` streams: each stream needs its own, since every one of them
        may be waiting on a forward at the same time."""
        if self._pool is None or self._workers < count:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(count, thread_name_prefix="scan-together")
            self._workers = count
        return self._pool

    def _work(self, index: int, stream: Iterator, mailbox: queue.SimpleQueue) -> None:
        self._handing.mailbox = mailbox
        item: object = STEP_END
        try:
            item = _next(stream)
        except BaseException as error:  # noqa: BLE001 (the caller waits for every stream)
            item = error
        finally:
            self._handing.mailbox = None
            mailbox.put(("done", index, item))

    def _hand_over(self, model, chunk: Chunk):
        """On a worker: the forward, run merged with the others. Elsewhere: run now."""
        mailbox = self._handing.mailbox
        if mailbox is None:
            return _call(model, chunk)
        forward = _Forward(model, chunk)
        mailbox.put(("forward", -1, forward))
        forward.done.wait()
        if forward.error is not None:
            raise forward.error
        return forward.result

    @torch.inference_mode()  # the runs' caches are inference tensors
    def _run(self, forwards: list[_Forward]) -> None:
        """Every waiting forward, merged per model; when a merged forward fails, each runs
        alone, so a bad one fails only its own stream."""
        try:
            groups: dict[int, list[_Forward]] = {}
            for forward in forwards:
                groups.setdefault(id(forward.model), []).append(forward)
            for group in groups.values():
                if not self._merged(group):
                    for forward in group:
                        _alone(forward)
        finally:
            for forward in forwards:
                forward.done.set()

    def _merged(self, group: list[_Forward]) -> bool:
        """Run the group's forwards as one; False when they must run one by one (a single
        forward, a model without ``forward_chunks``, or a merged forward that failed)."""
        model = group[0].model
        if len(group) == 1 or not hasattr(model, "forward_chunks"):
            return False
        try:
            outs = model.forward_chunks([f.chunk for f in group], self._buckets(model))
        except Exception:  # noqa: BLE001 (each then runs alone: only a bad one fails)
            return False
        self.forwards += 1
        for forward, out in zip(group, outs, strict=True):
            forward.result = out
        return True

    def _buckets(self, model) -> bool:
        if self.bucket is not None:
            return self.bucket
        return next(iter(model.parameters())).dtype in (torch.bfloat16, torch.float16)


def _call(model, chunk: Chunk):
    """The plain forward of one chunk."""
    return model(
        chunk.kinds, chunk.values, chunk.cells, chunk.mask, chunk.cache, chunk.cache_positions
    )


def _alone(forward: _Forward) -> None:
    try:
        forward.result = _call(forward.model, forward.chunk)
    except Exception as error:  # noqa: BLE001 (raised on the stream's own thread)
        forward.error = error


def _next(stream: Iterator) -> object:
    try:
        return next(stream, STEP_END)
    except Exception as error:  # noqa: BLE001 (given to the stream's owner)
        return error


class SharedModel:
    """A model whose forwards, made inside ``Together.step``, wait to run merged; everything
    else (config, heads, parameters) is the model's own."""

    def __init__(self, model, together: Together) -> None:
        self._model, self._together = model, together

    def __call__(self, kinds, values, cells, mask=None, cache=None, cache_positions=None):
        chunk = Chunk(kinds, values, cells, mask, cache, cache_positions)
        return self._together._hand_over(self._model, chunk)

    def __getattr__(self, name: str):
        return getattr(self._model, name)
