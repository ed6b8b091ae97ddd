"""Pure pictures for the studio (numpy / PIL / matplotlib, no gradio, no torch).

Colours live here and only here: the sampler's ``Trace`` says what happened, this module says
how it looks. Images are uint8 (H, W, 3); a code grid of side ``grid`` covers the image in equal
square cells (the display size is an integer multiple of the grid, see ``display_scale``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps, font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

HEAT_COLORMAP = "inferno"  # of 1 - score: dark = the model trusts this patch, bright = doubts it
HEAT_END_NAMES = ("black", "yellow")  # inferno's two ends (score 1, score 0), named in the legend
# The heat scale has this many steps, not inferno's 256: a GIF palette (256 colours) then holds
# every one of them exactly and still has 100 colours for the image (app/exporting.py).
HEAT_LEVELS = 128
NOT_SCORED = ((196, 196, 196), (150, 150, 150))  # hatch of cells without a score: neutral greys
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
WHITE = (255, 255, 255)
PLOT_COLOURS = {"mean": "#1f77b4", "min": "#d62728", "position": "#333333"}
# Text is 1/30 of the picture's width: 17 px on the 520 px canvas, still 12 px when a phone
# shows it 380 px wide, and 26 px when a slide shows the GIF 800 px wide. Never below 11 px.
TEXT_FRACTION, MIN_TEXT = 1 / 30, 11


@dataclass(frozen=True)
class ScoreWords:
    """What a scorer's numbers mean, in words for the legends."""

    source: str  # who made the scores
    high: str  # a score near 1
    low: str  # a score near 0


SCORE_WORDS = {
    "head": ScoreWords("quality head", "good", "likely flawed"),  # the quality head's P(good)
    "confidence": ScoreWords("token confidence", "confident", "doubtful"),  # token head P(code)
}


def score_words(scorer: str | None = "head") -> ScoreWords:
    """The legend words for ``scorer`` ("head" or "confidence"; None, as a trace says before
    its first step: "head")."""
    scorer = scorer or "head"
    if scorer not in SCORE_WORDS:
        raise ValueError(f"unknown scorer {scorer!r}; expected one of {sorted(SCORE_WORDS)}")
    return SCORE_WORDS[scorer]


def text_size(width: int) -> int:
    """Font size in pixels for text in a picture ``width`` pixels wide (see TEXT_FRACTION)."""
    return max(MIN_TEXT, round(width * TEXT_FRACTION))


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


@functools.cache
def heat_ramp() -> np.ndarray:
    """(HEAT_LEVELS, 3) uint8: the heat scale from score 1 (good, black) to 0 (yellow)."""
    rgba = colormaps[HEAT_COLORMAP](np.linspace(0.0, 1.0, HEAT_LEVELS))
    ramp = (rgba[:, :3] * 255).round().astype(np.uint8)
    ramp.flags.writeable = False  # cached and shared
    return ramp


def heat_colours(scores: np.ndarray) -> np.ndarray:
    """(N,) scores -> (N, 3) uint8 colours of the heat scale; NaN (not scored) -> NOT_SCORED[0]."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    badness = np.clip(1.0 - np.nan_to_num(scores, nan=1.0), 0.0, 1.0)
    colours = heat_ramp()[np.rint(badness * (HEAT_LEVELS - 1)).astype(int)]
    colours[np.isnan(scores)] = NOT_SCORED[0]
    return colours


def hatch(height: int, width: int, stripe: int) -> np.ndarray:
    """(height, width, 3) light grey with darker diagonal stripes: the look of "not scored"."""
    yy, xx = np.mgrid[:height, :width]
    dark = ((yy + xx) // max(1, stripe)) % 3 == 0
    return np.where(dark[..., None], NOT_SCORED[1], NOT_SCORED[0]).astype(np.uint8)


def heatmap_overlay(image: np.ndarray, scores: np.ndarray, grid: int, opacity: float) -> np.ndarray:
    """Blend each cell with the heat colour of its score, or with the grey hatch where it has
    no score yet, at ``opacity`` (1: the colours alone, as the studio shows them by default)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    colours = heat_colours(scores).reshape(grid, grid, 3)
    height, width = image.shape[:2]
    rows = np.searchsorted(cell_bounds(height, grid), np.arange(height), side="right") - 1
    cols = np.searchsorted(cell_bounds(width, grid), np.arange(width), side="right") - 1
    per_pixel = colours[rows][:, cols]  # (H, W, 3)
    unscored = np.isnan(scores).reshape(grid, grid)[rows][:, cols]
    if unscored.any():
        stripes = hatch(height, width, max(2, height // 64))  # 4 px stripes at 256 px
        per_pixel = np.where(unscored[..., None], stripes, per_pixel)
    alpha = float(np.clip(opacity, 0.0, 1.0))  # 1: exactly the scale's colours
    return (image * (1.0 - alpha) + per_pixel * alpha).round().astype(np.uint8)


def heat_legend(width: int, scorer: str | None = "head") -> np.ndarray:
    """The heatmap's legend, a white band ``width`` wide to go under the panels.

    Row 1: "black = good", the heat scale from score 1 to 0, "yellow = likely flawed" (the
    scorer's words). Row 2: the grey hatch "not scored", and which scorer made the scores.
    Text is sized to the width (``text_size``) and shrunk only where it would not fit.
    """
    words = score_words(scorer)
    ends = (f"{HEAT_END_NAMES[0]} = {words.high}", f"{HEAT_END_NAMES[1]} = {words.low}")
    notes = ("not scored", f"scores: {words.source}")
    size = text_size(width)
    while size > 6 and not _legend_fits(_font(size), width, ends, notes):
        size -= 1
    font, (left, right), gap = _font(size), _legend_margins(size, width), max(3, size // 2)
    row = round(size * 1.7)
    band = Image.new("RGB", (width, 2 * row), WHITE)
    draw, middle = ImageDraw.Draw(band), row // 2
    draw.text((left, middle), ends[0], fill=TEXT, font=font, anchor="lm")
    draw.text((right, middle), ends[1], fill=TEXT, font=font, anchor="rm")
    start = left + math.ceil(font.getlength(ends[0])) + gap
    stop = right - math.ceil(font.getlength(ends[1])) - gap
    if stop > start:
        steps = np.linspace(0, HEAT_LEVELS - 1, stop - start).round().astype(int)
        scale = np.repeat(heat_ramp()[steps][None], size, axis=0)
        band.paste(Image.fromarray(scale), (start, middle - size // 2))
    swatch = Image.fromarray(hatch(size, size, max(2, size // 5)))
    band.paste(swatch, (left, row + middle - size // 2))
    draw.text((left + size + gap, row + middle), notes[0], fill=TEXT, font=font, anchor="lm")
    draw.text((right, row + middle), notes[1], fill=TEXT, font=font, anchor="rm")
    return np.asarray(band)


def _legend_margins(size: int, width: int) -> tuple[int, int]:
    """First and last x of the legend's content: a quarter of the text size in from each edge."""
    margin = max(1, size // 4)
    return margin, width - 1 - margin


def _legend_fits(font: ImageFont.ImageFont, width: int, ends, notes) -> bool:
    """Whether both legend rows fit ``width``, the scale keeping at least 4 text heights."""
    size, gap = font.size, max(3, font.size // 2)
    left, right = _legend_margins(size, width)
    scale = sum(font.getlength(text) for text in ends) + 2 * gap + 4 * size
    swatch = size + sum(font.getlength(text) for text in notes) + 3 * gap
    return max(scale, swatch) <= right - left


def exact_colours() -> np.ndarray:
    """(K, 3) uint8: every colour these pictures draw by design (the heat scale, the hatch,
    boxes, empty cells, text greys from TEXT to white), for a GIF palette to keep exactly."""
    greys = np.linspace(TEXT[0], 255, 16).round()[:, None].repeat(3, axis=1)  # text anti-aliasing
    named = [*NOT_SCORED, *EMPTY, *COLOURS.values(), TEXT, WHITE]
    colours = np.concatenate([heat_ramp(), np.asarray(named), greys]).astype(np.uint8)
    return np.unique(colours, axis=0)


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
    scorer: str | None = "head",
) -> np.ndarray:
    """The main view: the image with its cell grid, locked cells and this step's boxes; with
    ``heatmap``, the heatmap of ``scorer``'s scores (blended over the image at ``opacity``)
    beside it, and its legend (``heat_legend``) under both.

    Side by side rather than one overlay: a heatmap over a noisy image is hard to read, and the
    boxes stay on the plain image. The legend goes under the panels, not beside them, so the
    picture stays narrow and its text stays legible when a phone shrinks it.
    """
    frame = draw_grid(image, grid) if grid_lines else image
    if locked is not None and np.any(locked):
        frame = draw_boxes(frame, np.flatnonzero(locked), grid, COLOURS["locked"], 1)
    if step is not None:
        frame = step_boxes(frame, step[0], step[1], step[2], grid)
    if not heatmap:
        return frame
    heat = heatmap_overlay(image, scores, grid, opacity)
    panels = side_by_side(frame, draw_grid(heat, grid) if grid_lines else heat, gap=PANEL_GAP)
    if not colour_legend:
        return panels
    legend = heat_legend(panels.shape[1], scorer)
    return np.concatenate([panels, np.full((PANEL_GAP, panels.shape[1], 3), 255, np.uint8), legend])


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
    means: np.ndarray,
    mins: np.ndarray,
    position: int | None = None,
    size=(560, 280),
    scorer: str | None = "head",
) -> np.ndarray:
    """Mean and min score over steps; the shown step (1..n) gets a line and dots. The heat scale
    runs up the right edge with the legend's words at its ends, so the plot reads like the map.

    Sizes are in pixels (the figure has 72 dpi, so a point is a pixel): text is ``text_size`` of
    the width, lines a sixth of that, and at most 5 step ticks.
    """
    words, text = score_words(scorer), text_size(size[0])
    line = max(2.0, text / 6)
    figure = Figure(figsize=(size[0] / 72, size[1] / 72), dpi=72)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    _draw_curves(axes, {"mean": means, "min": mins}, position, line)
    axes.set_title(f"{words.source} score", loc="left", fontsize=text)
    # Bottom right, in the row of the x label: clear of the title and the scale's words.
    figure.legend(
        fontsize=text,
        loc="lower right",
        bbox_to_anchor=(1.0, 0.0),
        ncols=2,
        frameon=False,
        borderaxespad=0.1,
        handlelength=1.2,
        columnspacing=1.0,
    )
    axes.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    axes.set_ylim(-0.03, 1.03)
    axes.set_yticks([0.0, 0.5, 1.0], ["0", "0.5", "1"])
    axes.set_xlabel("step", fontsize=text)
    axes.tick_params(labelsize=text, width=line / 2, length=text / 3)
    axes.grid(alpha=0.25)
    _scale_strip(axes, words, text)
    figure.tight_layout(pad=0.3)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _draw_curves(axes, curves: dict[str, np.ndarray], position: int | None, line: float) -> None:
    """The curves over steps 1..n, and the shown step as a dashed line with a dot per curve.

    The x range has a margin on both sides, so the dots stay inside the axes at the last step.
    """
    count = len(next(iter(curves.values())))
    for name, curve in curves.items():
        axes.plot(np.arange(1, count + 1), curve, label=name, color=PLOT_COLOURS[name], lw=line)
    if position and 1 <= position <= count:
        axes.axvline(position, color=PLOT_COLOURS["position"], linestyle="--", linewidth=line / 2)
        for name, curve in curves.items():
            if np.isfinite(curve[position - 1]):
                dot = dict(markersize=4 * line, markeredgecolor="white", zorder=3)
                axes.plot([position], [curve[position - 1]], "o", color=PLOT_COLOURS[name], **dot)
    margin = max(0.6, 0.025 * count)
    axes.set_xlim(1 - margin, max(count, 1) + margin)


def _scale_strip(axes, words: ScoreWords, text: float) -> None:
    """The heat scale as a thin strip right of ``axes`` (score 1 black at the top), its ends
    labelled with the scorer's words, as in ``heat_legend``."""
    strip = axes.inset_axes((1.015, 0.0, 0.022, 1.0))
    # Rows from score 0 (yellow, bottom) to 1 (black, top), spanning the score axis's 0..1.
    strip.imshow(heat_ramp()[::-1, None], aspect="auto", origin="lower", extent=(0, 1, 0, 1))
    strip.set_ylim(axes.get_ylim())
    strip.set_xticks([])
    strip.yaxis.tick_right()
    strip.set_yticks([0.0, 1.0], [words.low, words.high])
    strip.tick_params(labelsize=text, length=0, pad=text / 4)
    for spine in strip.spines.values():
        spine.set_visible(False)


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


def add_label(image: np.ndarray, text: str, height: int | None = None) -> np.ndarray:
    """Append a white band with ``text`` under the image (the GIF's step label), in the same
    size and indent as the legend's text unless ``height`` is given."""
    size = text_size(image.shape[1]) if height is None else max(6, round(height / 1.6))
    height = round(size * 1.6) if height is None else height
    band = Image.new("RGB", (image.shape[1], height), WHITE)
    left = _legend_margins(size, image.shape[1])[0]
    ImageDraw.Draw(band).text((left, height // 2), text, fill=TEXT, font=_font(size), anchor="lm")
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
        return ImageFont.load_default(size)
