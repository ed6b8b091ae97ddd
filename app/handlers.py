"""Event handlers: plain functions of (engine, state, widget values) -> widget values.

``app/wiring.py`` binds the engine and wires these to components; tests call them directly.
Every "view" handler returns ``VIEW_OUTPUTS`` in this order:
(image, compare, plot, timeline, status, state, editor). Streaming handlers yield that tuple
per step with ``gr.skip()`` for what only changes at the end (the compare). Their ``editor``
is always a skip: the brush canvas goes only to an open Brush tab (:func:`brush_view`), since
a hidden image editor replays every background it was sent when it is shown, and sending one
per timeline move froze the page. Streams end with a "done" (or
"stopped") line; a run stops between two steps when its ``stop`` callable says so.
Sampler settings come as keyword arguments named after their fields (``num_steps=16``), never
by position; the model card's value stands in for any left out. Expected errors (bad settings,
bad files, wrong traces) become a warning toast plus a status line; the session state is left as
it was, so the studio stays usable.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from app.engine import ROOT, Engine
from app.inputs import (  # noqa: F401 (re-exported: exporting and the tests use them here)
    MAX_SEED,
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_PIXELS,
    REQUEST_LIMITS,
    STATUS_INDEX,
    VIEW_OUTPUTS,
    brushed_cells,
    fit_note,
    guarded,
    image_mode,
    new_seed,
    number_from,
    opacity_from,
    seed_from,
    settings_from,
    upload_path,
    without_paths,
)
from app.render import add_label, compose_frame, score_curves, score_plot
from app.state import (
    MAX_GALLERY,
    Plan,
    SessionState,
    compare_position,
    done_line,
    frame_at,
    progress_line,
    step_summary,
)
from scan_core.images import load_image

LIVE_PLOT_EVERY_S = 0.5  # the score plot costs ~0.05-0.3 s on a CPU: redraw it at most this often


class LiveRuns:
    """How many runs stream at once, across sessions. A live frame with the score plot costs
    about ten times one without (54 ms against 4.7 ms, decoded image cached: ``python -m
    tools.timing``), so with n runs streaming each redraws the plot every n x
    LIVE_PLOT_EVERY_S: together they redraw it about as often as one run does (every run's
    last view has it anyway)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    @contextmanager
    def streaming(self) -> Iterator[None]:
        with self._lock:
            self.count += 1
        try:
            yield
        finally:
            with self._lock:
                self.count -= 1

    def plot_due(self, last_plot: float, now: float) -> bool:
        return now - last_plot >= LIVE_PLOT_EVERY_S * max(1, self.count)


LIVE_RUNS = LiveRuns()
EXAMPLES_DIR = ROOT / "assets" / "examples"
# The example images and the category each belongs to (assets/examples/ATTRIBUTION.md).
EXAMPLES = (
    ("emoji_hot_face.png", "Smileys & Emotion"),
    ("emoji_frog.png", "Animals & Nature"),
    ("emoji_sushi.png", "Food & Drink"),
    ("emoji_taxi.png", "Travel & Places"),
    ("emoji_balloon.png", "Activities"),
    ("emoji_gem_stone.png", "Objects"),
)


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
    timeline: bool = True,
) -> tuple:
    """VIEW_OUTPUTS for the state's trace at its position; ``live`` skips the slow extras,
    ``plot=False`` the score plot (a live frame between two plot redraws) and ``timeline=False``
    leaves the slider alone (the user is moving it). The brush canvas is never sent from here:
    :func:`brush_view` sends it to an open Brush tab."""
    if state.trace is None:
        slider = gr.Slider(minimum=0, maximum=1, value=0, step=1) if timeline else gr.skip()
        return None, None, None, slider, status or "", state, gr.skip()
    trace, grid = state.trace, engine.grid_size
    codes, scores, step = frame_at(trace, state.position)
    image = engine.decode(codes)[0]
    marks = None if step is None else (step.kind, step.positions[0], step.accepted[0])
    scorer = None if step is None else step.scorer  # the legend names what made the scores
    main = compose_frame(
        image,
        scores[0],
        grid,
        heatmap=bool(heatmap),
        step=marks,
        opacity=opacity_from(opacity),
        locked=state.locked,
        scorer=scorer,
    )
    chart = gr.skip()
    if plot or not live:
        means, mins = score_curves([s.scores[0] for s in trace.steps])
        last = trace.steps[-1].scorer if trace.steps else None
        chart = score_plot(means, mins, state.position, scorer=last)
    slider = gr.skip()
    if timeline:
        slider = gr.Slider(minimum=0, maximum=max(state.length, 1), value=state.position, step=1)
    text = status or step_summary(trace, state.position)
    if live:
        return main, gr.skip(), chart, slider, text, state, gr.skip()
    before = engine.decode(frame_at(trace, compare_position(trace))[0])[0]
    return main, (before, image), chart, slider, text, state, gr.skip()


def brush_value(engine: Engine, state: SessionState):
    """The brush canvas for the shown step: its image with the cell grid and locked cells, and
    a clean brush layer (None before anything is shown)."""
    if state.trace is None:
        return None
    codes, scores, _ = frame_at(state.trace, state.position)
    image = engine.decode(codes)[0]
    canvas = compose_frame(image, scores[0], engine.grid_size, locked=state.locked)
    return {"background": canvas, "layers": [], "composite": None}


def brush_view(engine: Engine, state: SessionState, brush_open: bool, position=None):
    """The brush canvas when the Brush tab is open (else nothing is sent); ``position`` is the
    timeline's value when the user just moved it (the state may not have caught up yet)."""
    if not brush_open or not isinstance(state, SessionState):
        return gr.skip()
    if position is not None:
        try:
            state = state.scrubbed(round(number_from(position, "timeline position", float)))
        except ValueError:
            return gr.skip()
    return brush_value(engine, state)


def button_states(state: SessionState) -> tuple:
    """Which actions can act now: (refine, undo, replay, export, regenerate, lock, unlock)."""
    known = isinstance(state, SessionState)
    has = known and state.trace is not None
    undo = known and bool(state.undo)
    locked = has and state.locked is not None
    live = (has, undo, has, has, has, has, locked)
    return tuple(gr.Button(interactive=flag) for flag in live)


def _stream(engine, state, stream, heatmap, opacity, plan, stop=None, *, gallery=False, **changes):
    """Yield a live view per sampler step, then the full view of the finished (or stopped)
    trace with a "done" / "stopped" line. A session behind a shared run (newer steps already
    waiting) draws only the newest: drawing a frame costs more than a model step on a CPU, so
    drawing every step of every member would undo what sharing the run saved.

    ``stop()`` is asked after each step; when it says yes the run ends there, keeping what it
    made (a valid trace), and still ends with the full view. With ``gallery`` every output
    tuple gets one more item: the gallery of the whole batch (redrawn with the score plot, so
    a multi-image run shows all its images growing), and the state remembers the batch for
    picking another image.
    """
    trace, extra = None, (gr.skip(),) if gallery else ()
    stopped = stop is not None and stop()
    plotted = -math.inf
    with LIVE_RUNS.streaming():
        for trace, _ in () if stopped else stream:
            if getattr(stream, "steps_waiting", 0):  # a shared run is ahead: draw its newest step
                if stop is not None and stop():
                    stopped = True
                    break
                continue
            # select()/copy() detach from the sampler's trace, which keeps growing after the yield.
            live = state.with_trace(_first(trace), **changes)
            plot = LIVE_RUNS.plot_due(plotted, time.monotonic())
            plotted = time.monotonic() if plot else plotted
            if gallery and plot and trace.batch_size > 1:
                extra = (gallery_items(engine, trace),)
            line = progress_line(live.trace, plan)
            yield (*view(engine, live, heatmap, opacity, line, live=True, plot=plot), *extra)
            extra = (gr.skip(),) if gallery else ()
            if stop is not None and stop():
                stopped = True
                break
    getattr(stream, "close", lambda: None)()  # a stopped run frees its sampler now
    if trace is None:
        if stopped:
            yield (*view(engine, state, heatmap, opacity, "stopped before the run started"), *extra)
            return
        raise ValueError("nothing to run: set refinement rounds T above 0")
    if gallery:
        changes |= {"gallery": trace.copy() if trace.batch_size > 1 else None, "shown": 0}
        extra = (gallery_items(engine, trace),)
    final = state.with_trace(_first(trace), **changes)
    line = done_line(final.trace, plan, stopped)
    yield (*view(engine, final, heatmap, opacity, line), *extra)


def _first(trace):
    return trace.select(0) if trace.batch_size > 1 else trace.copy()


def gallery_items(engine: Engine, trace, shown: int = 0) -> list[tuple[np.ndarray, str]]:
    """The latest image of every batch row, captioned with its seed (row b used seed + b) and
    which one the canvas shows."""
    images = engine.decode(trace.codes_at(-1))
    return [
        (image, f"seed {trace.seed + b}" + (" · shown" if b == shown else ""))
        for b, image in enumerate(images)
    ]


# ------------------------------------------------------------------------------ model runs


@guarded(len(VIEW_OUTPUTS) + 1)
def generate(
    engine, state, class_name, seed, count, heatmap, opacity, *, stop=None, **setting_values
):
    """Generate ``count`` images (seeds seed .. seed+count-1), streaming image 0; + gallery."""
    settings = settings_from(engine, setting_values)
    class_id, seed = engine.class_id(class_name), seed_from(seed)
    count = int(min(max(number_from(count, "number of images", int), 1), MAX_GALLERY))
    sets = min(settings.num_steps, engine.num_tokens)
    plan = Plan(sets=sets, rounds=settings.num_rounds, images=count, seed=seed)
    # Through the scheduler: concurrent sessions' generations may share one run (app.batching).
    stream = engine.generate([class_id] * count, settings, seed, batched=True)
    # Locks belong to the previous image's content, so a new image starts without any.
    yield from _stream(
        engine, state, stream, heatmap, opacity, plan, stop, gallery=True, keep_locks=False
    )


@guarded()
def refine(engine, state, seed, heatmap, opacity, *, stop=None, **setting_values):
    """More refinement rounds from the shown step (a branch when it is not the last one)."""
    settings = settings_from(engine, setting_values)
    base = state.branch_base()
    plan = Plan(start=len(base.steps), rounds=settings.num_rounds, seed=seed_from(seed))
    stream = engine.refine(base, settings, plan.seed, state.locked, batched=True)
    yield from _stream(engine, state, stream, heatmap, opacity, plan, stop)


@guarded()
def regenerate_region(
    engine, state, brush, refine_inside, seed, heatmap, opacity, *, stop=None, **setting_values
):
    """Force new codes where the user brushed (locked cells excepted), optionally refine there."""
    settings = settings_from(engine, setting_values)
    region = brushed_cells(engine, brush)
    if not region.any():
        raise ValueError("paint the patches to regenerate on the brush canvas first")
    if state.locked is not None and not (region & ~state.locked).any():
        raise ValueError("every painted patch is locked: unlock them or paint other patches")
    base = state.branch_base()
    cells = int((region if state.locked is None else region & ~state.locked).sum())
    # The sampler draws a region in the schedule's K scaled to the region's share of the grid.
    sets = max(1, min(cells, round(settings.num_steps * cells / engine.num_tokens)))
    rounds = settings.num_rounds if refine_inside else 0
    plan = Plan(start=len(base.steps), sets=sets, rounds=rounds, seed=seed_from(seed))
    stream = engine.regenerate_region(
        base, region, settings, plan.seed, state.locked, bool(refine_inside), batched=True
    )
    yield from _stream(engine, state, stream, heatmap, opacity, plan, stop)


@guarded(len(VIEW_OUTPUTS) + 1)
def score_image(engine, state, image_file, class_name, seed, heatmap, opacity, **setting_values):
    """Upload -> centre crop -> tokenize -> quality scores; the start of a new timeline.

    One more output than a view: the scored frame again, for a preview beside the upload. The
    status says what was done to fit the image (converted, cropped, scaled) and the class it
    was scored under, which Refine then keeps.
    """
    path = upload_path(image_file, "an image to upload")
    settings = settings_from(engine, setting_values)
    class_id = engine.class_id(class_name)
    mode = image_mode(path)
    image = load_image(path, max_pixels=MAX_UPLOAD_PIXELS, apply_exif_orientation=True)
    codes = engine.encode(image)
    trace = engine.score(codes, [class_id], settings, seed_from(seed))
    new = state.with_trace(trace, keep_locks=False, gallery=None)
    fit = fit_note(image.size, mode, engine.image_size)
    class_shown = engine.bundle.class_names[class_id]
    note = f"scored {path.name} ({fit}) under class {class_shown!r}, which Refine keeps"
    outputs = view(engine, new, heatmap, opacity, f"{note} · {step_summary(new.trace, 1)}")
    return (*outputs, outputs[0])


@guarded(len(VIEW_OUTPUTS) + 1)
def rescore(engine, state, class_name, seed, heatmap, opacity, **setting_values):
    """Score the shown image again under another class, when it is a scored image (an upload
    or an example): the class it is refined under is the one it is scored under."""
    trace = state.trace
    if trace is None or not trace.steps or trace.steps[0].kind != "score":
        return tuple(gr.skip() for _ in range(len(VIEW_OUTPUTS) + 1))
    settings = settings_from(engine, setting_values)
    class_id = engine.class_id(class_name)
    codes, _, _ = frame_at(trace, state.position)
    if (codes < 0).any():
        raise ValueError("the shown step has empty cells: move the timeline to a later step")
    new = state.with_trace(engine.score(codes, [class_id], settings, seed_from(seed)))
    note = f"scored again under class {engine.bundle.class_names[class_id]!r}"
    outputs = view(engine, new, heatmap, opacity, f"{note} · {step_summary(new.trace, 1)}")
    return (*outputs, outputs[0])


def example_class(names: list[str], category: str, fallback: str) -> str:
    """The class an example image belongs to: the Noto class of its category when the model
    has one (the examples are Noto emoji), else any class of that category, else ``fallback``."""
    matches = [name for name in names if name.endswith(category)]
    noto = [name for name in matches if name.startswith("Noto")]
    return (noto or matches or [fallback])[0]


def example_images() -> list[tuple[np.ndarray, str]]:
    """The example images (as pixels, so they are served from Gradio's cache wherever the
    studio was started) with their names."""
    items = []
    for name, _ in EXAMPLES:
        with Image.open(EXAMPLES_DIR / name) as image:
            items.append(
                (np.asarray(image.convert("RGBA")), Path(name).stem.removeprefix("emoji_"))
            )
    return items


@guarded(len(VIEW_OUTPUTS) + 2)
def score_example(engine, state, index, fallback_class, seed, heatmap, opacity, **setting_values):
    """Score example image ``index`` under its own category's class (``fallback_class`` when
    the model has none): ``score_image``'s outputs, then the class it was scored under."""
    index = number_from(index, "example", int)
    if not 0 <= index < len(EXAMPLES):
        raise ValueError(f"pick an example between 0 and {len(EXAMPLES) - 1}")
    name, category = EXAMPLES[index]
    chosen = example_class(engine.bundle.class_names, category, fallback_class)
    path = EXAMPLES_DIR / name
    outputs = score_image(engine, state, path, chosen, seed, heatmap, opacity, **setting_values)
    return (*outputs, chosen)


def first_frame(engine: Engine) -> tuple[np.ndarray, np.ndarray]:
    """What the canvas and the plot show before anything is made: the empty grid, saying what
    will appear there, and the empty score plot."""
    empty = np.full((1, engine.num_tokens), -1)
    image = engine.decode(empty)[0]
    scores = np.full(engine.num_tokens, np.nan)
    frame = compose_frame(image, scores, engine.grid_size, heatmap=True, scorer=engine.auto_scorer)
    frame = add_label(frame, "Generate paints the image here, set by set")
    return frame, score_plot(np.array([]), np.array([]))


# ------------------------------------------------------------------------- edits and views


@guarded()
def scrub(engine, state, position, heatmap, opacity):
    """Show another timeline step (also re-renders after a heatmap toggle).

    The slider is left as it is: the user is holding it, and a reply for a step the thumb has
    already left would pull it back (drags then ended on the wrong step).
    """
    position = number_from(position, "timeline position", float)
    return view(engine, state.scrubbed(round(position)), heatmap, opacity, timeline=False)


@guarded()
def lock(engine, state, brush, heatmap, opacity):
    """Add the brushed cells to the locked set (refinement will not touch them)."""
    state.require_trace()
    cells = brushed_cells(engine, brush)
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
    new = state.with_trace(batch.select(index), keep_locks=False, gallery=batch, shown=index)
    where = f"image {index + 1} of {batch.batch_size} (seed {batch.seed + index})"
    return view(engine, new, heatmap, opacity, f"{where} · {step_summary(new.trace, new.length)}")
