"""Event handlers: plain functions of (engine, state, widget values) -> widget values.

``app/ui.py`` binds the engine and wires these to components; tests call them directly. Every
"view" handler returns ``VIEW_OUTPUTS`` in this order:
(image, compare, plot, timeline, status, state, editor). Streaming handlers yield that tuple
per step with ``gr.skip()`` for what only changes at the end (the brush canvas, the compare).
Sampler settings come as keyword arguments named after their fields (``num_steps=16``), never
by position; the model card's value stands in for any left out. Expected errors (bad settings,
bad files, wrong traces) become a warning toast plus a status line; the session state is left as
it was, so the studio stays usable.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path

import gradio as gr
import numpy as np

from app.engine import Engine
from app.render import brush_mask, compose_frame, mask_to_grid, score_curves, score_plot
from app.state import MAX_GALLERY, SessionState, compare_position, frame_at, step_summary
from scan_core import CheckpointError, TraceError
from scan_core.images import load_image
from scan_core.sampling.setting_inputs import number_from, settings_from_values
from scan_core.sampling.settings import SamplerSettings, short_repr

log = logging.getLogger(__name__)

VIEW_OUTPUTS = ("image", "compare", "plot", "timeline", "status", "state", "editor")
STATUS_INDEX = VIEW_OUTPUTS.index("status")
EXPECTED_ERRORS = (ValueError, TraceError, CheckpointError, OSError)
MAX_SEED = 2**31 - 1
# Limits for settings whose own range is open, as they reach the handlers through the API where
# no slider bounds them: wider than the UI's sliders (the UI never trips them), narrow enough that
# one request can neither tie the model up for minutes nor allocate a huge cache.
REQUEST_LIMITS = {"num_rounds": 200, "cfg_scale": 20.0, "temperature": 5.0, "tokens_per_round": "N"}
MIN_TEMPERATURE = 0.01  # except 0 (greedy): logits / T overflows float32 for tiny T
MAX_UPLOAD_BYTES = 20 * 2**20  # also gradio's max_file_size (app/serving.py)
MAX_UPLOAD_PIXELS = 24_000_000  # a 24 MP photo; also Pillow's limit when serving
LIVE_PLOT_EVERY_S = 0.5  # the score plot costs ~0.1-0.3 s on a CPU: redraw it at most this often


# ------------------------------------------------------------------------------ error guard


def _failure(count: int, status_index: int, message: str) -> tuple:
    outputs = [gr.skip()] * count
    outputs[status_index] = f"⚠️ {message}"
    return tuple(outputs)


def _report(error: Exception) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        log.error("disk full: %s", error)
        message = "the server's disk is full: nothing was saved; try again later"
    elif isinstance(error, EXPECTED_ERRORS):
        message = str(error) or type(error).__name__
    else:  # a bug: keep the traceback in the server log, show one line to the user
        log.exception("handler failed")
        message = f"internal error ({type(error).__name__}: {error}); see the server log"
    gr.Warning(message)
    return message


def guarded(count: int = len(VIEW_OUTPUTS), status_index: int = STATUS_INDEX):
    """Turn any exception into a warning + status line, for plain and generator handlers."""

    def decorate(fn):
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def stream(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as error:  # noqa: BLE001 (reported, never re-raised)
                    yield _failure(count, status_index, _report(error))

            return stream

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as error:  # noqa: BLE001
                return _failure(count, status_index, _report(error))

        return call

    return decorate


# --------------------------------------------------------------------------------- inputs


def _bounded(value, name: str, low, high, kind=float):
    number = number_from(value, name, kind)
    if not low <= number <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {short_repr(number)}")
    return number


def settings_from(engine: Engine, values: Mapping[str, object]) -> SamplerSettings:
    """Widget or API values by setting name -> validated settings, the rest the model card's
    (ValueError names the bad one and its range)."""
    vocab = engine.bundle.model.config.vocab_size
    settings = settings_from_values(
        values, engine.default_settings(), engine.num_tokens, vocab, REQUEST_LIMITS
    )
    if 0 < settings.temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return settings.replace(top_k=min(settings.top_k, vocab))  # k >= V: no filter


def seed_from(seed) -> int:
    return _bounded(seed, "seed", 0, MAX_SEED, int)


def opacity_from(opacity) -> float:
    """Heatmap opacity, clamped to [0, 1]."""
    return min(max(number_from(opacity, "heatmap opacity"), 0.0), 1.0)


def upload_path(path, what: str) -> Path:
    """A file the user sent: a regular file of at most ``MAX_UPLOAD_BYTES``.

    Gradio only hands over files it received (uploads land in its cache under a sanitised
    name); this check keeps handlers safe when called directly (no devices, FIFOs or folders).
    """
    if not path:
        raise ValueError(f"choose {what} first")
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{what} must be a file path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} is missing or not a regular file: {path.name}")
    size = path.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise ValueError(
            f"{what} is {size / 2**20:.1f} MiB; the limit is {MAX_UPLOAD_BYTES // 2**20} MiB"
        )
    return path


def new_seed() -> int:
    """The dice button: a fresh seed (not from the sampler's generators)."""
    return random.randint(0, 999_999)


def brushed_cells(engine: Engine, editor_value) -> np.ndarray:
    """(N,) bool cells painted on the brush canvas (ValueError for a malformed value)."""
    try:
        mask = brush_mask(editor_value)
        if mask is not None and np.ndim(mask) != 2:
            raise ValueError
        cells = mask_to_grid(mask, engine.grid_size)
    except (TypeError, ValueError, IndexError):
        raise ValueError(
            "the brush canvas value is not an image editor value with RGBA layers"
        ) from None
    return cells.reshape(-1)


# ----------------------------------------------------------------------------------- views


def view(
    engine: Engine,
    state: SessionState,
    heatmap: bool,
    opacity: float,
    status: str | None = None,
    *,
    live: bool = False,
    plot: bool = True,
) -> tuple:
    """VIEW_OUTPUTS for the state's trace at its position; ``live`` skips the slow extras and
    ``plot=False`` the score plot (a live frame between two plot redraws)."""
    if state.trace is None:
        timeline = gr.Slider(minimum=0, maximum=1, value=0, step=1)
        return None, None, None, timeline, status or "", state, gr.skip()
    trace, grid = state.trace, engine.grid_size
    codes, scores, step = frame_at(trace, state.position)
    image = engine.decode(codes)[0]
    marks = None if step is None else (step.kind, step.positions[0], step.accepted[0])
    main = compose_frame(
        image,
        scores[0],
        grid,
        heatmap=bool(heatmap),
        step=marks,
        opacity=opacity_from(opacity),
        locked=state.locked,
    )
    chart = gr.skip()
    if plot or not live:
        means, mins = score_curves([s.scores[0] for s in trace.steps])
        chart = score_plot(means, mins, state.position)
    timeline = gr.Slider(minimum=0, maximum=max(state.length, 1), value=state.position, step=1)
    text = status or step_summary(trace, state.position)
    if live:
        return main, gr.skip(), chart, timeline, text, state, gr.skip()
    before = engine.decode(frame_at(trace, compare_position(trace))[0])[0]
    canvas = compose_frame(image, scores[0], grid, locked=state.locked)
    editor = {"background": canvas, "layers": [], "composite": None}
    return main, (before, image), chart, timeline, text, state, editor


def _stream(engine, state, stream, heatmap, opacity, *, gallery: bool = False, **changes):
    """Yield a live view per sampler step, then the full view of the finished trace.

    With ``gallery`` every output tuple gets one more item: the gallery of the whole batch
    (only at the end), and the state remembers the batch for picking another image.
    """
    trace, extra = None, (gr.skip(),) if gallery else ()
    plotted = -math.inf
    for trace, _ in stream:
        # select()/copy() detach from the sampler's trace, which keeps growing after the yield.
        live = state.with_trace(_first(trace), **changes)
        plot = time.monotonic() - plotted >= LIVE_PLOT_EVERY_S
        plotted = time.monotonic() if plot else plotted
        yield (*view(engine, live, heatmap, opacity, live=True, plot=plot), *extra)
    if trace is None:
        raise ValueError("nothing to run: set refinement rounds T above 0")
    if gallery:
        changes["gallery"] = trace.copy() if trace.batch_size > 1 else None
        extra = (gallery_items(engine, trace),)
    final = state.with_trace(_first(trace), **changes)
    yield (*view(engine, final, heatmap, opacity), *extra)


def _first(trace):
    return trace.select(0) if trace.batch_size > 1 else trace.copy()


def gallery_items(engine: Engine, trace) -> list[tuple[np.ndarray, str]]:
    """The final image of every batch row, captioned with its seed (row b used seed + b)."""
    images = engine.decode(trace.codes_at(-1))
    return [(image, f"seed {trace.seed + b}") for b, image in enumerate(images)]


# ------------------------------------------------------------------------------ model runs


@guarded(len(VIEW_OUTPUTS) + 1)
def generate(engine, state, class_name, seed, count, heatmap, opacity, **setting_values):
    """Generate ``count`` images (seeds seed .. seed+count-1), streaming image 0; + gallery."""
    settings = settings_from(engine, setting_values)
    class_id, seed = engine.class_id(class_name), seed_from(seed)
    count = int(min(max(number_from(count, "number of images", int), 1), MAX_GALLERY))
    stream = engine.generate([class_id] * count, settings, seed)
    # Locks belong to the previous image's content, so a new image starts without any.
    yield from _stream(engine, state, stream, heatmap, opacity, gallery=True, keep_locks=False)


@guarded()
def refine(engine, state, seed, heatmap, opacity, **setting_values):
    """More refinement rounds from the shown step (a branch when it is not the last one)."""
    settings = settings_from(engine, setting_values)
    base = state.branch_base()
    stream = engine.refine(base, settings, seed_from(seed), state.locked)
    yield from _stream(engine, state, stream, heatmap, opacity)


@guarded()
def regenerate_region(
    engine, state, editor_value, refine_inside, seed, heatmap, opacity, **setting_values
):
    """Force new codes where the user brushed (locked cells excepted), optionally refine there."""
    settings = settings_from(engine, setting_values)
    region = brushed_cells(engine, editor_value)
    if not region.any():
        raise ValueError("paint the patches to regenerate on the brush canvas first")
    if state.locked is not None and not (region & ~state.locked).any():
        raise ValueError("every painted patch is locked: unlock them or paint other patches")
    base = state.branch_base()
    stream = engine.regenerate_region(
        base, region, settings, seed_from(seed), state.locked, bool(refine_inside)
    )
    yield from _stream(engine, state, stream, heatmap, opacity)


@guarded()
def score_image(engine, state, path, class_name, seed, heatmap, opacity, **setting_values):
    """Upload -> centre crop -> tokenize -> quality scores; the start of a new timeline."""
    path = upload_path(path, "an image to upload")
    settings = settings_from(engine, setting_values)
    image = load_image(path, max_pixels=MAX_UPLOAD_PIXELS, apply_exif_orientation=True)
    codes = engine.encode(image)
    trace = engine.score(codes, [engine.class_id(class_name)], settings, seed_from(seed))
    new = state.with_trace(trace, keep_locks=False, gallery=None)
    return view(engine, new, heatmap, opacity)


# ------------------------------------------------------------------------- edits and views


@guarded()
def scrub(engine, state, position, heatmap, opacity):
    """Show another timeline step (also re-renders after a heatmap toggle)."""
    position = number_from(position, "timeline position", float)
    return view(engine, state.scrubbed(round(position)), heatmap, opacity)


@guarded()
def lock(engine, state, editor_value, heatmap, opacity):
    """Add the brushed cells to the locked set (refinement will not touch them)."""
    state.require_trace()
    cells = brushed_cells(engine, editor_value)
    if not cells.any():
        raise ValueError("paint the patches to lock on the brush canvas first")
    old = state.locked if state.locked is not None else np.zeros_like(cells)
    new = state.with_locked(old | cells)
    return view(engine, new, heatmap, opacity, f"{int(new.locked.sum())} cells locked")


@guarded()
def unlock_all(engine, state, heatmap, opacity):
    return view(engine, state.with_locked(None), heatmap, opacity, "all cells unlocked")


@guarded()
def undo(engine, state, heatmap, opacity):
    return view(engine, state.undone(), heatmap, opacity)


@guarded()
def pick(engine, state, index, heatmap, opacity):
    """Continue with image ``index`` of the last multi-seed run."""
    batch = state.gallery
    if batch is None:
        raise ValueError("no multi-image run to pick from")
    index = number_from(index, "gallery index", int)
    if not 0 <= index < batch.batch_size:
        raise ValueError(f"pick an image between 0 and {batch.batch_size - 1}")
    new = state.with_trace(batch.select(index), keep_locks=False, gallery=batch)
    return view(engine, new, heatmap, opacity, f"picked the image with seed {batch.seed + index}")
