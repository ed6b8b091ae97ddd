"""Pure pictures for the studio (numpy / PIL / matplotlib, no gradio, no torch).

Colours live here and only here: the sampler's ``Trace`` says what happened, this module says
how it looks. Images are uint8 (H, W, 3); a code grid of side ``grid`` covers the image in equal
square cells (the display size is an integer multiple of the grid, see ``display_scale``).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from matplotlib import colormaps, font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

HEAT_COLORMAP = "inferno"  # of 1 - score: bright = the model doubts this patch
COLOURS = {
    "refine": (235, 45, 45),  # candidates of this refinement round (red)
    "accepted": (40, 215, 90),  # candidates kept because they scored better (green)
    "generate": (70, 170, 255),  # the set just drawn
    "forced": (255, 165, 0),  # a user-forced region being redrawn
    "locked": (120, 110, 255),  # cells refinement may not touch
}
EMPTY = ((40, 40, 40), (58, 58, 58))  # checkerboard for cells with no code yet
BRUSH_THRESHOLD = 0.05  # a cell counts as brushed when more than 5% of its pixels are painted
GRID_ALPHA = 0.3  # cell-boundary lines: 30% white, visible on dark patches, faint on light ones
PANEL_GAP = 8  # white pixels between the image and its heatmap
TEXT = (20, 20, 20)
BAR_LABELS = ("bad", "good")  # 1 - score high (top) / low (bottom)
BAR_TITLE = "quality (1 − score)"
PLOT_COLOURS = {"mean": "#1f77b4", "min": "#d62728", "position": "#333333"}


# ------------------------------------------------------------------------------- grids, scale


def display_scale(image_size: int, target: int) -> int:
    """Integer upscale factor that brings ``image_size`` to at least ``target`` pixels."""
    return max(1, math.ceil(target / max(1, image_size)))


def upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """NEAREST upscaling by an integer factor: each code patch stays a crisp block."""
    if scale == 1:
        return image
    return image.repeat(scale, axis=0).repeat(scale, axis=1)


def cell_bounds(size: int, grid: int) -> np.ndarray:
    """Pixel edges of ``grid`` bands over ``size`` pixels: (grid + 1,) ints."""
    return np.linspace(0, size, grid + 1).round().astype(int)


def paint_empty_cells(image: np.ndarray, known: np.ndarray, grid: int) -> np.ndarray:
    """Cover the cells without a code (``known`` (N,) False) with a small checkerboard."""
    known = np.asarray(known, dtype=bool).reshape(grid, grid)
    if known.all():
        return image
    out = image.copy()
    rows, cols = cell_bounds(image.shape[0], grid), cell_bounds(image.shape[1], grid)
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    checker = np.where(((yy // 2 + xx // 2) % 2)[..., None] == 0, EMPTY[0], EMPTY[1])
    for r, c in zip(*np.nonzero(~known), strict=True):
        box = (slice(rows[r], rows[r + 1]), slice(cols[c], cols[c + 1]))
        out[box] = checker[box]
    return out


# ----------------------------------------------------------------------------------- overlays


def heat_colours(scores: np.ndarray) -> np.ndarray:
    """(N,) scores -> (N, 3) uint8 colours of 1 - score (NaN scores map to black)."""
    badness = 1.0 - np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=1.0)
    rgba = colormaps[HEAT_COLORMAP](np.clip(badness, 0.0, 1.0))
    return (rgba[:, :3] * 255).round().astype(np.uint8)


def heatmap_overlay(image: np.ndarray, scores: np.ndarray, grid: int, opacity: float) -> np.ndarray:
    """Blend each cell with the colour of 1 - its score; cells without a score stay as they are."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    colours = heat_colours(scores).reshape(grid, grid, 3).astype(np.float64)
    alpha = np.where(np.isnan(scores), 0.0, float(np.clip(opacity, 0.0, 1.0))).reshape(grid, grid)
    height, width = image.shape[:2]
    rows = np.searchsorted(cell_bounds(height, grid), np.arange(height), side="right") - 1
    cols = np.searchsorted(cell_bounds(width, grid), np.arange(width), side="right") - 1
    per_pixel = colours[rows][:, cols]  # (H, W, 3)
    a = alpha[rows][:, cols][..., None]
    return (image * (1.0 - a) + per_pixel * a).round().astype(np.uint8)


def colour_bar(height: int) -> np.ndarray:
    """The heatmap's legend: a vertical ramp of 1 - score, "bad" (1) at the top, "good" (0) at
    the bottom, titled "quality (1 − score)" along its side when there is room."""
    size = max(10, round(height / 19))  # ~13 px at the 256 px display size
    font, strip = _font(size), max(8, size)
    labels = [(text, font.getbbox(text)) for text in BAR_LABELS]
    text_width = max(box[2] for _, box in labels)
    bar = Image.new("RGB", (strip + text_width + 12, height), (255, 255, 255))
    ramp = heat_colours(np.linspace(0.0, 1.0, height))  # score 0 (bad) at the top
    bar.paste(Image.fromarray(np.repeat(ramp[:, None], strip, axis=1)), (3, 0))
    draw, x = ImageDraw.Draw(bar), strip + 7
    draw.text((x, -labels[0][1][1]), labels[0][0], fill=TEXT, font=font)
    draw.text((x, height - labels[1][1][3] - 1), labels[1][0], fill=TEXT, font=font)
    title = _rotated_text(BAR_TITLE, font)
    if title.height + 2 * (size + 6) <= height:  # between the two labels
        bar.paste(title, (x, (height - title.height) // 2))
    return np.asarray(bar)


def _rotated_text(text: str, font: ImageFont.ImageFont) -> Image.Image:
    """``text`` in black on white, turned to read from bottom to top."""
    left, top, right, bottom = font.getbbox(text)
    band = Image.new("RGB", (right - left + 2, bottom - top + 2), (255, 255, 255))
    ImageDraw.Draw(band).text((1 - left, 1 - top), text, fill=TEXT, font=font)
    return band.rotate(90, expand=True)


def draw_grid(image: np.ndarray, grid: int, alpha: float = GRID_ALPHA) -> np.ndarray:
    """Faint light lines on the inner code-cell boundaries, so the patches can be told apart."""
    if grid < 2:
        return image
    out = image.astype(np.float64)
    rows = cell_bounds(image.shape[0], grid)[1:-1]
    cols = cell_bounds(image.shape[1], grid)[1:-1]
    line = np.zeros(image.shape[:2], dtype=bool)
    line[rows, :] = True
    line[:, cols] = True
    out[line] = out[line] * (1.0 - alpha) + 255.0 * alpha
    return out.round().astype(np.uint8)


def draw_boxes(
    image: np.ndarray, cells: np.ndarray, grid: int, colour: tuple[int, int, int], width: int = 2
) -> np.ndarray:
    """Outline the given cells (flat, raster order) in ``colour``."""
    cells = np.asarray(cells, dtype=np.int64).reshape(-1)
    if cells.size == 0:
        return image
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    rows, cols = cell_bounds(image.shape[0], grid), cell_bounds(image.shape[1], grid)
    width = max(1, min(width, (rows[1] - rows[0]) // 4))
    for cell in cells:
        r, c = divmod(int(cell), grid)
        box = (cols[c], rows[r], cols[c + 1] - 1, rows[r + 1] - 1)
        draw.rectangle(box, outline=colour, width=width)
    return np.asarray(canvas)


def step_boxes(
    image: np.ndarray, kind: str | None, positions, accepted, grid: int, width: int = 2
) -> np.ndarray:
    """Mark what a step did: refine rounds red (looked at) and green (changed); new sets blue."""
    if kind is None or kind == "score":
        return image
    positions = np.asarray(positions).reshape(-1)
    if kind != "refine":
        return draw_boxes(image, positions, grid, COLOURS[kind], width)
    accepted = np.asarray(accepted, dtype=bool).reshape(-1)
    image = draw_boxes(image, positions[~accepted], grid, COLOURS["refine"], width)
    return draw_boxes(image, positions[accepted], grid, COLOURS["accepted"], width)


def compose_frame(
    image: np.ndarray,
    scores: np.ndarray,
    grid: int,
    *,
    heatmap: bool = False,
    opacity: float = 1.0,
    colour_legend: bool = True,
    step: tuple[str, np.ndarray, np.ndarray] | None = None,
    locked: np.ndarray | None = None,
    grid_lines: bool = True,
) -> np.ndarray:
    """The main view: the image with its cell grid, locked cells and this step's boxes; with
    ``heatmap``, the quality heatmap (blended over the image at ``opacity``) beside it, + legend.

    Side by side rather than one overlay: a heatmap over a noisy image is hard to read, and the
    boxes stay on the plain image. Both panels keep the image's height.
    """
    frame = draw_grid(image, grid) if grid_lines else image
    if locked is not None and np.any(locked):
        frame = draw_boxes(frame, np.flatnonzero(locked), grid, COLOURS["locked"], 1)
    if step is not None:
        frame = step_boxes(frame, step[0], step[1], step[2], grid)
    if not heatmap:
        return frame
    heat = heatmap_overlay(image, scores, grid, opacity)
    panels = [frame, draw_grid(heat, grid) if grid_lines else heat]
    if colour_legend:
        panels.append(colour_bar(image.shape[0]))
    return side_by_side(*panels, gap=PANEL_GAP)


# --------------------------------------------------------------------------- plots and frames


def score_curves(step_scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and min of the known scores after each step (NaN where nothing is scored yet)."""
    means, mins = [], []
    for scores in step_scores:
        known = np.asarray(scores, dtype=np.float64)
        known = known[~np.isnan(known)]
        means.append(known.mean() if known.size else np.nan)
        mins.append(known.min() if known.size else np.nan)
    return np.asarray(means), np.asarray(mins)


def score_plot(
    means: np.ndarray, mins: np.ndarray, position: int | None = None, size=(860, 260)
) -> np.ndarray:
    """Mean and min quality score over steps; the shown step (1..n) gets a line and dots.

    The x range has a margin on both sides, so the marker stays inside the axes at the last step.
    """
    figure = Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    count = len(means)
    steps = np.arange(1, count + 1)
    for name, curve in (("mean", means), ("min", mins)):
        axes.plot(steps, curve, label=f"{name} score", color=PLOT_COLOURS[name], linewidth=2)
    if position and 1 <= position <= count:
        axes.axvline(position, color=PLOT_COLOURS["position"], linestyle="--", linewidth=1.2)
        for name, curve in (("mean", means), ("min", mins)):
            if np.isfinite(curve[position - 1]):
                axes.plot(
                    [position],
                    [curve[position - 1]],
                    "o",
                    markersize=8,
                    zorder=3,
                    color=PLOT_COLOURS[name],
                    markeredgecolor="white",
                )
    axes.set_title("quality score per step", loc="left", fontsize=12)
    axes.legend(
        fontsize=11,
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncols=2,
        frameon=False,
        borderaxespad=0.1,
    )
    margin = max(0.6, 0.025 * count)
    axes.set_xlim(1 - margin, max(count, 1) + margin)
    axes.set_ylim(-0.03, 1.03)
    axes.set_xlabel("step", fontsize=12)
    axes.set_ylabel("score", fontsize=12)
    axes.tick_params(labelsize=11)
    axes.grid(alpha=0.25)
    figure.tight_layout(pad=0.5)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def side_by_side(*images: np.ndarray, gap: int = 6) -> np.ndarray:
    """Images next to each other on white, top-aligned."""
    height = max(image.shape[0] for image in images)
    width = sum(image.shape[1] for image in images) + gap * (len(images) - 1)
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for image in images:
        out[: image.shape[0], x : x + image.shape[1]] = image
        x += image.shape[1] + gap
    return out


def add_label(image: np.ndarray, text: str, height: int = 18) -> np.ndarray:
    """Append a white band with ``text`` under the image (the GIF's step label)."""
    band = Image.new("RGB", (image.shape[1], height), (255, 255, 255))
    ImageDraw.Draw(band).text((4, 3), text, fill=(0, 0, 0), font=_font(11))
    return np.concatenate([image, np.asarray(band)], axis=0)


# ------------------------------------------------------------------------------------- brush


def brush_mask(value) -> np.ndarray | None:
    """The painted pixels of an ImageEditor value: OR over layers of alpha > 0 (None if none)."""
    if not isinstance(value, dict):
        return None
    mask = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        layer = np.asarray(layer)
        painted = layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[2] == 4 else layer > 0
        if painted.ndim == 3:
            painted = painted.any(axis=2)
        mask = painted if mask is None or mask.shape != painted.shape else mask | painted
    return mask


def mask_to_grid(mask: np.ndarray | None, grid: int, threshold: float = BRUSH_THRESHOLD):
    """(H, W) painted pixels -> (grid, grid) cells whose painted fraction exceeds ``threshold``.

    Works for any image size: the rows and columns are cut into ``grid`` linspace bands.
    """
    cells = np.zeros((grid, grid), dtype=bool)
    if mask is None or mask.size == 0:
        return cells
    rows, cols = cell_bounds(mask.shape[0], grid), cell_bounds(mask.shape[1], grid)
    for r in range(grid):
        for c in range(grid):
            patch = mask[rows[r] : rows[r + 1], cols[c] : cols[c + 1]]
            cells[r, c] = patch.size > 0 and patch.mean() > threshold
    return cells


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans, which matplotlib ships (it has "−"), else Pillow's default font."""
    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except (OSError, ValueError):
        return ImageFont.load_default()
