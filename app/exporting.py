"""Timeline export (GIF, final PNG, Trace JSON), loading a Trace back, and replaying it.

Plain handlers like ``app/handlers.py``. Files go to a private temp folder per export (Gradio
copies returned files into its own cache, which ``delete_cache`` cleans); folders older than
``EXPORT_TTL_S`` are removed at the next export so the temp dir does not grow forever.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from app.engine import Engine
from app.handlers import guarded, view
from app.render import add_label, compose_frame, side_by_side
from app.state import SessionState, replay
from scan_core.export import write_gif, write_json, write_png
from scan_core.trace import Trace, TraceError

EXPORT_ROOT = Path(tempfile.gettempdir()) / "scan-studio-exports"
EXPORT_TTL_S = 3600
MAX_GIF_FRAMES = 160  # longer timelines are subsampled evenly (first and last frame kept)
PLAY_DELAY_S = 0.12


def timeline_positions(length: int, limit: int = MAX_GIF_FRAMES) -> list[int]:
    """Positions 0..length, evenly thinned to at most ``limit`` (always keeping both ends)."""
    if length + 1 <= limit:
        return list(range(length + 1))
    return sorted(set(np.linspace(0, length, limit).round().astype(int).tolist()))


def timeline_frames(
    engine: Engine, trace: Trace, heatmap_side: bool = False, opacity: float = 0.6
) -> list[np.ndarray]:
    """One labelled frame per timeline position: the image with the step's boxes, and the
    heatmap next to it when asked."""
    all_codes = replay(trace)
    positions = timeline_positions(len(trace.steps))
    images = engine.decode(np.concatenate([all_codes[p][:1] for p in positions]))
    frames = []
    for position, image in zip(positions, images, strict=True):
        step = trace.steps[position - 1] if position else None
        scores = step.scores[0] if step else trace.start_scores[0]
        marks = (step.kind, step.positions[0], step.accepted[0]) if step else None
        frame = compose_frame(image, scores, engine.grid_size, step=marks)
        if heatmap_side:
            heat = compose_frame(image, scores, engine.grid_size, heatmap=True, opacity=opacity)
            frame = side_by_side(frame, heat)
        label = f"step {position}/{len(trace.steps)} {step.kind if step else 'start'}"
        frames.append(add_label(frame, label))
    return frames


def _export_dir() -> Path:
    EXPORT_ROOT.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in EXPORT_ROOT.iterdir():
        if old.is_dir() and now - old.stat().st_mtime > EXPORT_TTL_S:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=EXPORT_ROOT))


@guarded(count=4, status_index=3)
def export(engine, state: SessionState, heatmap_side, duration_ms, hold_ms):
    """(GIF of the whole timeline, final PNG, Trace JSON, status line)."""
    trace = state.require_trace()
    duration = int(min(max(float(duration_ms), 20), 5000))
    hold = int(min(max(float(hold_ms), duration), 20000))  # never shorter than a frame
    folder = _export_dir()
    frames = timeline_frames(engine, trace, bool(heatmap_side))
    gif = write_gif(frames, folder / "scan_timeline.gif", duration, hold)
    final = engine.decode(trace.codes_at(-1) if trace.steps else trace.start_codes)[0]
    png = write_png(final, folder / "scan_final.png")
    json_path = write_json(trace.to_json(), folder / "scan_trace.json")
    status = f"exported {len(frames)} frames, the final image and the trace"
    return str(gif), str(png), str(json_path), status


@guarded()
def load_trace(engine, state: SessionState, path, heatmap, opacity):
    """Open a Trace JSON (checked strictly) and show its last step; scrub or Play to replay."""
    if not path:
        raise ValueError("choose a trace JSON file first")
    trace = Trace.from_json(Path(path).read_bytes())
    vocab = engine.bundle.model.config.vocab_size
    if (trace.grid_size, trace.vocab_size) != (engine.grid_size, vocab):
        raise TraceError(
            f"this trace is for a {trace.grid_size}x{trace.grid_size} grid with {trace.vocab_size} "
            f"codes; the loaded model uses {engine.grid_size}x{engine.grid_size} and {vocab}"
        )
    gallery = trace if trace.batch_size > 1 else None
    shown = trace.select(0) if gallery else trace
    new = state.with_trace(shown, keep_locks=False, gallery=gallery)
    note = f"loaded a trace of {len(trace.steps)} steps"
    if trace.model_id != engine.bundle.model_id:
        note += f" (made with {trace.model_id!r}, shown with {engine.bundle.model_id!r})"
    return view(engine, new, heatmap, opacity, note)


@guarded()
def play(engine, state: SessionState, heatmap, opacity):
    """Replay the timeline from step 0 to the end, one frame per step."""
    state.require_trace()
    for position in range(state.length + 1):
        yield view(engine, state.scrubbed(position), heatmap, opacity, live=True)
        time.sleep(PLAY_DELAY_S)
    yield view(engine, state.scrubbed(state.length), heatmap, opacity)
