"""The timeline GIF: its heatmap and legend look like the studio canvas, its colour scale keeps
every step exactly (no palette banding), and the file is written atomically."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_app_render import assert_monotone_scale, scale_levels, tiny_engine

from app import exporting
from app.render import NOT_SCORED, PANEL_GAP, compose_frame, exact_colours, heat_colours
from app.state import SessionState
from scan_core.sampling.trace import Step, Trace

GRID = 4  # the tiny engine's grid (8x8 images shown at 256 px)
# Known scores for the last step: a spread over [0, 1], and one cell still unscored.
KNOWN = np.linspace(0.0, 1.0, GRID * GRID)
KNOWN[5] = np.nan


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def known_trace() -> Trace:
    """Two steps by hand: draw every cell (half of them scored), then score them all."""
    cells = GRID * GRID
    codes = (np.arange(cells) * 7 % 64)[None]
    trace = Trace(
        {}, 0, "tiny", [0], GRID, 64, np.full((1, cells), -1), np.full((1, cells), np.nan)
    )
    first = np.where(np.arange(cells) % 2 == 0, 0.3, np.nan)[None]
    everything = np.arange(cells)[None]
    yes = np.ones((1, cells), bool)
    trace.steps.append(Step("generate", everything, codes, np.ones((1, cells)), yes, first))
    trace.steps.append(Step("score", everything, codes, np.ones((1, cells)), yes, KNOWN[None]))
    return trace


def gif_frames(path) -> list[np.ndarray]:
    with Image.open(path) as gif:
        frames = []
        for index in range(gif.n_frames):
            gif.seek(index)
            frames.append(np.asarray(gif.convert("RGB")))
    return frames


@pytest.fixture(scope="module")
def exported(engine, tmp_path_factory):
    """(the GIF's frames, the canvas view of the last step) for the known trace."""
    state = SessionState().with_trace(known_trace())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exporting, "EXPORT_ROOT", tmp_path_factory.mktemp("exports"))
        gif, *_, status = exporting.export(engine, state, True, 50, 500)
    assert status.startswith("exported 3 frames"), status
    image = engine.decode(state.trace.codes_at(-1))[0]
    canvas = compose_frame(image, KNOWN, GRID, heatmap=True)  # the studio's default look
    return gif_frames(gif), canvas


def cell_centres(panel: np.ndarray) -> np.ndarray:
    """(GRID * GRID, 3) colours at the centre of each cell of a square panel, raster order."""
    size = panel.shape[0]
    centres = ((np.arange(GRID) + 0.5) * size / GRID).astype(int)
    return panel[centres][:, centres].reshape(-1, 3)


def test_gif_heatmap_has_the_canvas_colours(exported, engine):
    frames, canvas = exported
    size = engine.image_size * engine.display_scale
    last = frames[-1]
    gif_heat = cell_centres(last[:size, size + PANEL_GAP :].astype(int))
    canvas_heat = cell_centres(canvas[:size, size + PANEL_GAP :].astype(int))
    scored = ~np.isnan(KNOWN)
    assert np.abs(gif_heat - canvas_heat)[scored].max() <= 2  # the GIF draws what the canvas does
    assert np.abs(gif_heat - heat_colours(KNOWN).astype(int))[scored].max() <= 2
    assert tuple(gif_heat[5]) in set(NOT_SCORED)  # the unscored cell: the grey hatch


def test_gif_colour_scale_is_monotone_and_the_canvas_one(exported, engine):
    frames, canvas = exported
    size = engine.image_size * engine.display_scale
    legend = frames[-1][size + PANEL_GAP : canvas.shape[0]]
    assert_monotone_scale(scale_levels(legend))
    # Word for word too; only the text's anti-aliasing greys move to nearby palette colours.
    assert np.abs(legend.astype(int) - canvas[size + PANEL_GAP :]).max() <= 12


def test_gif_keeps_every_frame_as_quantised(engine, tmp_path, monkeypatch):
    """The GIF writer stores the palette frames unchanged (no second quantisation)."""
    monkeypatch.setattr(exporting, "EXPORT_ROOT", tmp_path)
    state = SessionState().with_trace(known_trace())
    frames = exporting.timeline_frames(engine, state.trace, heatmap_side=True)
    palette = exporting.gif_palette(frames)
    gif, *_ = exporting.export(engine, state, True, 50, 500)
    for written, frame in zip(gif_frames(gif), exporting.quantise(frames, palette), strict=True):
        np.testing.assert_array_equal(written, frame)


def test_palette_keeps_the_drawn_colours_and_maps_the_rest_to_the_nearest():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    exact = exact_colours()
    frame = np.concatenate([photo, np.resize(exact, (64, 64, 3))], axis=1)
    palette = exporting.gif_palette([frame])
    assert len(palette) <= 256
    assert {tuple(c) for c in exact} <= {tuple(c) for c in palette}
    out = exporting.quantise([frame], palette)[0]
    np.testing.assert_array_equal(out[:, 64:], frame[:, 64:])  # drawn colours: exactly
    assert len(np.unique(out.reshape(-1, 3), axis=0)) <= 256
    pixels = photo.reshape(-1, 3).astype(int)
    distances = ((pixels[:, None] - palette.astype(int)[None]) ** 2).sum(axis=2)
    chosen = ((out[:, :64].reshape(-1, 3).astype(int) - pixels) ** 2).sum(axis=1)
    np.testing.assert_array_equal(chosen, distances.min(axis=1))  # the nearest, no dither


def test_a_failed_gif_write_leaves_no_file(engine, tmp_path, monkeypatch):
    """The GIF goes through scan_core.files (a temp file renamed into place): a write that
    fails half-way leaves neither a partial GIF nor a temp file, even before the export
    removes its folder (switched off here to look inside), and the export offers nothing."""
    monkeypatch.setattr(exporting, "EXPORT_ROOT", tmp_path)
    monkeypatch.setattr(exporting.shutil, "rmtree", lambda *args, **kwargs: None)
    real_save = Image.Image.save

    def half_then_fail(self, fp, format=None, **params):
        if format == "GIF":
            fp.write(b"GIF89a" + b"\0" * 100)
            raise OSError(28, "No space left on device")
        return real_save(self, fp, format, **params)

    monkeypatch.setattr(Image.Image, "save", half_then_fail)
    state = SessionState().with_trace(known_trace())
    with pytest.warns(UserWarning, match="disk is full"):
        *files, status = exporting.export(engine, state, True, 50, 500)
    assert "nothing was saved" in status and not any(isinstance(f, str) for f in files)
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1 and list(folders[0].iterdir()) == []
