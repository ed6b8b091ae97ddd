"""Timeline export (GIF, final PNG, Trace JSON), loading a Trace back, and replaying it.

Plain handlers like ``app/handlers.py``. Files go to a private temp folder per export (Gradio
copies returned files into its own cache, which ``delete_cache`` cleans); folders older than
``EXPORT_TTL_S`` are removed at the next export so the temp dir does not grow forever. Every file
is written atomically, and an export that fails half-way (a full disk) removes its folder, so a
partial file is never offered as a finished one.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from app.engine import Engine
from app.handlers import guarded, number_from, upload_path, view
from app.render import add_label, compose_frame, exact_colours
from app.state import MAX_GALLERY, SessionState, replay
from scan_core import Trace, TraceError, parse_trace
from scan_core.files import write_gif, write_json, write_png

EXPORT_ROOT = Path(tempfile.gettempdir()) / "scan-studio-exports"
EXPORT_TTL_S = 600  # gradio copies returned files at once; ours are only needed until then
MAX_GIF_FRAMES = 160  # longer timelines are subsampled evenly (first and last frame kept)
PLAY_DELAY_S = 0.12


def timeline_positions(length: int, limit: int = MAX_GIF_FRAMES) -> list[int]:
    """Positions 0..length, evenly thinned to at most ``limit`` (always keeping both ends)."""
    if length + 1 <= limit:
        return list(range(length + 1))
    return sorted(set(np.linspace(0, length, limit).round().astype(int).tolist()))


def timeline_frames(
    engine: Engine,
    trace: Trace,
    heatmap_side: bool = False,
    opacity: float = 1.0,
    scorer: str | None = "head",
) -> list[np.ndarray]:
    """One labelled frame per timeline position: the studio's own view (``compose_frame``: the
    image with the step's boxes, and the heatmap with its legend when asked) over a step label."""
    all_codes = replay(trace)
    positions = timeline_positions(len(trace.steps))
    images = engine.decode(np.concatenate([all_codes[p][:1] for p in positions]))
    frames = []
    for position, image in zip(positions, images, strict=True):
        step = trace.steps[position - 1] if position else None
        scores = step.scores[0] if step else trace.start_scores[0]
        marks = (step.kind, step.positions[0], step.accepted[0]) if step else None
        frame = compose_frame(
            image,
            scores,
            engine.grid_size,
            heatmap=bool(heatmap_side),
            opacity=opacity,
            step=marks,
            scorer=scorer,
        )
        label = f"step {position}/{len(trace.steps)} {step.kind if step else 'start'}"
        frames.append(add_label(frame, label))
    return frames


def gif_palette(frames: list[np.ndarray], size: int = 256) -> np.ndarray:
    """One palette for the whole GIF: first every colour the pictures draw by design (the heat
    scale, the hatch, boxes, text greys: ``exact_colours``), then the commonest other colours
    of the frames (median cut), up to ``size`` colours. Shared by all frames, so the image does
    not flicker as a per-frame palette would."""
    exact = exact_colours()
    every = max(1, sum(frame.size // 3 for frame in frames) // 1_000_000)  # enough for median cut
    pixels = np.concatenate([frame.reshape(-1, 3)[::every] for frame in frames])
    pixels = pixels[~np.isin(_packed(pixels), _packed(exact))]
    if pixels.size == 0 or size <= len(exact):
        return exact[:size]
    strip = Image.fromarray(np.ascontiguousarray(pixels[None]))
    rest = strip.quantize(size - len(exact), Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    others = np.asarray(rest.getpalette()[: 3 * (size - len(exact))], np.uint8).reshape(-1, 3)
    return np.concatenate([exact, others])


def quantise(frames: list[np.ndarray], palette: np.ndarray) -> list[np.ndarray]:
    """Each pixel -> its nearest palette colour (RGB distance, no dithering), so a colour in the
    palette stays exactly itself: (H, W, 3) uint8 frames of at most len(palette) colours, which
    the GIF writer then stores unchanged. A colour is looked up once for all frames (a timeline's
    frames share most of theirs)."""
    lookup = np.full(1 << 24, -1, dtype=np.int16)  # packed RGB -> palette index (32 MiB)
    out = []
    for frame in frames:
        packed = _packed(frame.reshape(-1, 3))
        new = np.unique(packed[lookup[packed] < 0])
        if new.size:
            lookup[new] = _nearest(new, palette)
        out.append(palette[lookup[packed]].reshape(frame.shape))
    return out


def _nearest(colours: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(N,) packed colours -> (N,) index of the nearest palette colour (squared RGB distance)."""
    rgb = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=1).astype(np.int32)
    table = palette.astype(np.int32)
    return np.concatenate(
        [
            ((chunk[:, None, :] - table[None]) ** 2).sum(axis=2).argmin(axis=1)
            for chunk in np.array_split(rgb, max(1, len(rgb) // 4096))
        ]
    )


def _packed(pixels: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 -> (N,) int32 keys r << 16 | g << 8 | b."""
    pixels = pixels.astype(np.int32)
    return (pixels[:, 0] << 16) | (pixels[:, 1] << 8) | pixels[:, 2]


def _export_dir() -> Path:
    EXPORT_ROOT.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in EXPORT_ROOT.iterdir():
        try:  # another export may be sweeping the same folder
            if old.is_dir() and now - old.stat().st_mtime > EXPORT_TTL_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue
    return Path(tempfile.mkdtemp(dir=EXPORT_ROOT))


@guarded(count=4, status_index=3)
def export(
    engine, state: SessionState, heatmap_side, duration_ms, hold_ms, opacity=1.0, scorer="head"
):
    """(GIF of the whole timeline, final PNG, Trace JSON, status line). ``opacity`` and
    ``scorer`` draw the heatmap as the canvas does (defaults: the canvas's defaults)."""
    trace = state.require_trace()
    duration = int(min(max(number_from(duration_ms, "ms per frame"), 20), 5000))
    hold = int(min(max(number_from(hold_ms, "hold last frame"), duration), 20000))  # >= a frame
    opacity = min(max(number_from(opacity, "heatmap opacity"), 0.0), 1.0)
    frames = timeline_frames(engine, trace, bool(heatmap_side), opacity, scorer)
    palette = gif_palette(frames)
    frames = quantise(frames, palette)
    final = engine.decode(trace.codes_at(-1) if trace.steps else trace.start_codes)[0]
    folder = _export_dir()
    try:
        gif = write_gif(frames, folder / "scan_timeline.gif", duration, hold)
        png = write_png(final, folder / "scan_final.png")
        json_path = write_json(trace.to_json(), folder / "scan_trace.json")
    except BaseException:  # e.g. a full disk: offer nothing rather than part of an export
        shutil.rmtree(folder, ignore_errors=True)
        raise
    status = f"exported {len(frames)} frames, the final image and the trace"
    return str(gif), str(png), str(json_path), status


@guarded()
def load_trace(engine, state: SessionState, path, heatmap, opacity):
    """Open a Trace JSON (checked strictly) and show its last step; scrub or Play to replay."""
    trace = parse_trace(upload_path(path, "a trace JSON file").read_bytes())
    check_trace_fits(engine, trace)
    gallery = trace if trace.batch_size > 1 else None
    shown = trace.select(0) if gallery else trace
    new = state.with_trace(shown, keep_locks=False, gallery=gallery)
    note = f"loaded a trace of {len(trace.steps)} steps"
    if trace.model_id != engine.bundle.model_id:
        made_with = trace.model_id if len(trace.model_id) <= 60 else f"{trace.model_id[:57]}..."
        note += f" (made with {made_with!r}, shown with {engine.bundle.model_id!r})"
    return view(engine, new, heatmap, opacity, note)


def check_trace_fits(engine: Engine, trace: Trace) -> None:
    """Refuse a (valid) trace this studio cannot continue: another grid, vocabulary or class
    set, or more images than a gallery holds."""
    config = engine.bundle.model.config
    if (trace.grid_size, trace.vocab_size) != (engine.grid_size, config.vocab_size):
        raise TraceError(
            f"this trace is for a {trace.grid_size}x{trace.grid_size} grid with {trace.vocab_size} "
            f"codes; the loaded model uses {engine.grid_size}x{engine.grid_size} and "
            f"{config.vocab_size}"
        )
    if trace.batch_size > MAX_GALLERY:
        raise TraceError(
            f"this trace holds {trace.batch_size} images; the studio shows at most {MAX_GALLERY}"
        )
    if max(trace.class_ids) > config.num_classes:  # num_classes itself means unconditional
        raise TraceError(
            f"this trace uses class {max(trace.class_ids)}; the loaded model has "
            f"{config.num_classes} classes"
        )


@guarded()
def play(engine, state: SessionState, heatmap, opacity):
    """Replay the timeline from step 0 to the end, one frame per step (at most
    ``MAX_GIF_FRAMES`` frames, so a huge loaded trace cannot hold a worker for an hour)."""
    state.require_trace()
    for position in timeline_positions(state.length):
        yield view(engine, state.scrubbed(position), heatmap, opacity, live=True)
        time.sleep(PLAY_DELAY_S)
    yield view(engine, state.scrubbed(state.length), heatmap, opacity)
