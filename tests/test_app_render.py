"""Studio pieces without a server: brush mapping, overlays, GIFs, timeline/undo/branching state,
and the handlers driven directly on a tiny random engine (4x4 grid of an 8x8 image)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_model, tiny_config, tiny_vq
from PIL import Image

from app import exporting, handlers
from app.engine import Engine, read_class_names
from app.render import (
    COLOURS,
    HEAT_LEVELS,
    NOT_SCORED,
    PANEL_GAP,
    brush_mask,
    compose_frame,
    heat_colours,
    heat_legend,
    heat_ramp,
    heatmap_overlay,
    mask_to_grid,
    paint_empty_cells,
    score_curves,
    score_plot,
    score_words,
    step_boxes,
    upscale,
)
from app.state import MAX_UNDO, SessionState, compare_position, frame_at, replay
from scan_core.sampling.trace import Trace

# CFG off and small K/T/c keep each run to a handful of tiny forwards.
SETTINGS = dict(cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0)  # by name, as the API
SETTINGS |= dict(num_steps=4, num_rounds=3, tokens_per_round=2, scorer="auto")
LOOK = (True, 0.5)  # heatmap on, opacity
API_LOOK = {"heatmap": True, "opacity": 0.5}  # LOOK by name, for API calls that name settings


def tiny_engine() -> Engine:
    model = random_model(tiny_config(), seed=3)
    return Engine.from_modules(model, tiny_vq(), model_id="tiny", notes=["tiny test model"])


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_engine()


@pytest.fixture(scope="module")
def generated(engine) -> SessionState:
    outputs = list(handlers.generate(engine, SessionState(), "class 2", 5, 1, *LOOK, **SETTINGS))
    return outputs[-1][handlers.VIEW_OUTPUTS.index("state")]


def state_of(outputs) -> SessionState:
    return outputs[handlers.VIEW_OUTPUTS.index("state")]


# --------------------------------------------------------------------------------- brush


def test_brush_mask_is_or_of_layer_alpha_and_ignores_colour():
    layer_a = np.zeros((10, 12, 4), np.uint8)
    layer_b = np.zeros((10, 12, 4), np.uint8)
    layer_a[0, 0] = (0, 0, 0, 255)  # a black stroke still counts: only alpha matters
    layer_b[9, 11, 3] = 255
    mask = brush_mask({"background": None, "layers": [layer_a, layer_b], "composite": None})
    assert mask.sum() == 2 and mask[0, 0] and mask[9, 11]
    assert brush_mask({"background": None, "layers": [], "composite": None}) is None
    assert brush_mask(None) is None


@pytest.mark.parametrize("size", [(256, 256), (250, 333), (17, 9)])
def test_mask_to_grid_uses_linspace_bands_for_any_size(size):
    height, width = size
    mask = np.zeros(size, dtype=bool)
    rows, cols = np.linspace(0, height, 5).round().astype(int), np.linspace(0, width, 5)
    cols = cols.round().astype(int)
    mask[rows[1] : rows[2], cols[3] : cols[4]] = True  # exactly cell (1, 3)
    grid = mask_to_grid(mask, 4)
    expected = np.zeros((4, 4), bool)
    expected[1, 3] = True
    np.testing.assert_array_equal(grid, expected)


def test_mask_to_grid_threshold_ignores_a_stray_pixel():
    mask = np.zeros((100, 100), bool)
    mask[5, 5] = True  # 1 of 625 pixels in cell (0, 0)
    mask[30:50, 30:50] = True  # most of cell (1, 1)
    grid = mask_to_grid(mask, 4)
    assert not grid[0, 0] and grid[1, 1] and grid.sum() == 1
    assert not mask_to_grid(None, 4).any()


# ------------------------------------------------------------------------------ overlays


def test_heatmap_overlay_shape_and_unscored_cells_hatched():
    image = np.full((8, 8, 3), 100, np.uint8)
    scores = np.array([0.0, 1.0, np.nan, 0.5])
    out = heatmap_overlay(image, scores, 2, opacity=1.0)
    assert out.shape == image.shape and out.dtype == np.uint8
    # opacity 1: each cell is its scale colour; score 0 (likely flawed) is brighter than score 1.
    assert (out[:4, :4] == heat_colours(np.array([0.0]))[0]).all()
    assert out[:4, :4].sum() > out[:4, 4:].sum()
    # The unscored cell (1, 0) is the neutral hatch (both greys), not the image.
    unscored = {tuple(colour) for colour in out[4:, :4].reshape(-1, 3)}
    assert unscored == set(NOT_SCORED)
    np.testing.assert_array_equal(heatmap_overlay(image, scores, 2, 0.0), image)
    half = heatmap_overlay(image, scores, 2, 0.5)[4:, :4].astype(int)  # blended like the rest
    assert ((half > 100) & (half < max(NOT_SCORED)[0])).all()


def test_heat_colours_are_steps_of_the_scale_from_black_to_yellow():
    ramp = heat_ramp()
    assert ramp.shape == (HEAT_LEVELS, 3) and tuple(ramp[0]) == (0, 0, 4)  # score 1: black
    assert ramp[-1].min() > 150 and ramp[-1][2] < ramp[-1][:2].min()  # score 0: yellow
    brightness = ramp.astype(int).sum(axis=1)
    assert (np.diff(brightness) > 0).all()  # one way, no step repeats another
    colours = heat_colours(np.array([1.0, 0.0, 0.5, np.nan, 2.0]))
    np.testing.assert_array_equal(colours[:3], ramp[[0, -1, round((HEAT_LEVELS - 1) / 2)]])
    assert tuple(colours[3]) == NOT_SCORED[0] and tuple(colours[4]) == tuple(ramp[0])


def test_step_boxes_refine_red_rejected_green_accepted():
    image = np.zeros((40, 40, 3), np.uint8)
    out = step_boxes(image, "refine", np.array([0, 3]), np.array([False, True]), grid=2)
    assert tuple(out[0, 0]) == COLOURS["refine"]  # cell 0: top-left corner of its outline
    assert tuple(out[20, 20]) == COLOURS["accepted"]  # cell 3 starts at (20, 20)
    assert tuple(out[10, 10]) == (0, 0, 0)  # inside the boxes nothing is drawn
    assert step_boxes(image, "score", np.array([0]), np.array([True]), 2) is image


def test_compose_frame_puts_the_heatmap_beside_the_image_and_marks_locked_cells():
    image = np.zeros((32, 32, 3), np.uint8)
    scores = np.full(4, 0.5)
    locked = np.array([False, False, False, True])
    frame = compose_frame(image, scores, 2, heatmap=True, opacity=1.0, locked=locked)
    width = 2 * 32 + PANEL_GAP  # image | heatmap, the legend under both
    assert frame.shape == (32 + PANEL_GAP + heat_legend(width).shape[0], width, 3)
    heat = frame[:32, 32 + PANEL_GAP :]  # opacity 1: the colour of 0.5
    assert tuple(heat[4, 4]) == tuple(heat_colours(np.array([0.5]))[0])
    assert tuple(frame[16, 16]) == COLOURS["locked"]  # boxes on the image panel
    bare = compose_frame(image, scores, 2, heatmap=True, colour_legend=False)
    assert bare.shape == (32, width, 3)
    plain = compose_frame(image, scores, 2, locked=locked)
    assert plain.shape == image.shape
    assert tuple(plain[16, 16]) == COLOURS["locked"] and tuple(plain[0, 0]) == (0, 0, 0)
    assert (plain[16, :16] > 0).all() and (plain[:16, 16] > 0).all()  # faint grid lines
    assert not compose_frame(image, scores, 2, grid_lines=False).any()


def scale_levels(picture: np.ndarray) -> np.ndarray:
    """The heat scale drawn in ``picture`` (a legend, a frame) as levels of ``heat_ramp``, read
    left to right along the row that holds the most scale colours (-1: not a scale colour)."""
    ramp = heat_ramp().astype(np.int32)
    keys = (ramp[:, 0] << 16) | (ramp[:, 1] << 8) | ramp[:, 2]
    pixels = picture.astype(np.int32)
    packed = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    row = packed[np.isin(packed, keys).sum(axis=1).argmax()]
    lookup = dict(zip(keys.tolist(), range(len(keys)), strict=True))
    return np.array([lookup.get(key, -1) for key in row.tolist()])


def assert_monotone_scale(levels: np.ndarray) -> None:
    """The scale runs once from black (level 0) to yellow, each step in order, none repeated
    after another (a banded, re-quantised bar fails this)."""
    on = np.flatnonzero(levels >= 0)
    run = levels[on[0] : on[-1] + 1]
    assert (run >= 0).all(), "the scale has pixels that are not scale colours"
    assert (np.diff(run) >= 0).all() and run[0] == 0 and run[-1] == HEAT_LEVELS - 1
    assert len(set(run.tolist())) == HEAT_LEVELS


def test_heat_legend_reads_good_to_likely_flawed_with_a_not_scored_entry():
    legend = heat_legend(520)
    assert legend.shape[1] == 520 and legend.dtype == np.uint8
    assert_monotone_scale(scale_levels(legend))
    hatch_pixels = (legend[..., None, :] == np.asarray(NOT_SCORED)).all(axis=3).any(axis=2)
    assert hatch_pixels.sum() > 50  # the "not scored" swatch
    ink = legend.sum(axis=2) < 200
    assert ink[:, : legend.shape[1] // 5].sum() > 100  # words at the good end and below it
    assert not np.array_equal(heat_legend(520, "confidence"), legend)  # names its scorer
    assert score_words(None) == score_words("head")  # before any step: today's head scores
    with pytest.raises(ValueError, match="unknown scorer"):
        heat_legend(520, "oracle")
    assert heat_legend(72).shape[1] == 72  # a tiny canvas still gets a (cramped) legend


def ink_height(picture: np.ndarray) -> int:
    """Rows spanned by dark text in ``picture``."""
    rows = np.flatnonzero((picture.astype(int).sum(axis=2) < 300).any(axis=1))
    return int(rows.max() - rows.min() + 1) if rows.size else 0


def test_legend_text_stays_legible_on_a_phone():
    """Shown 380 px wide (a phone), the legend's words are still 9 px tall or more: the text
    grows with the picture instead of keeping one size."""
    for width in (520, 1040):
        legend = heat_legend(width)
        words = legend[: legend.shape[0] // 2, : width // 8]  # "black = good", row 1 left
        assert ink_height(words) * 380 / width >= 9, width


def test_empty_cells_are_painted_and_upscale_is_nearest():
    image = np.full((4, 4, 3), 200, np.uint8)
    out = paint_empty_cells(image, np.array([True, False, True, True]), 2)
    assert (out[:2, :2] == 200).all() and (out[:2, 2:] < 100).all()
    big = upscale(np.arange(12, dtype=np.uint8).reshape(2, 2, 3), 3)
    assert big.shape == (6, 6, 3) and (big[:3, :3] == big[0, 0]).all()


def test_score_curves_and_plot():
    means, mins = score_curves(
        [np.array([np.nan, np.nan]), np.array([0.2, np.nan]), np.array([0.2, 0.6])]
    )
    assert np.isnan(means[0]) and means[1] == pytest.approx(0.2) and mins[2] == pytest.approx(0.2)
    plot = score_plot(means, mins, position=2, size=(300, 150))
    assert plot.shape == (150, 300, 3) and plot.dtype == np.uint8


def test_score_plot_marks_the_last_step_inside_the_axes():
    means, mins = np.linspace(0.4, 0.8, 20), np.linspace(0.1, 0.5, 20)
    plain = score_plot(means, mins, None, size=(400, 200))
    marked = score_plot(means, mins, 20, size=(400, 200))
    changed = np.flatnonzero((plain != marked).any(axis=(0, 2)))
    assert changed.size and changed.max() < 400 - 10  # drawn, and clear of the right edge
    red = (np.abs(marked.astype(int) - (214, 39, 40)).sum(axis=2) < 40)[:, changed]
    assert red.sum() > 20  # the min-score dot at the shown step


def test_score_plot_has_the_heat_scale_in_words_and_phone_sized_text():
    plot = score_plot(np.linspace(0.4, 0.8, 30), np.linspace(0.1, 0.5, 30), 12)
    assert plot.shape == (280, 560, 3)
    # The scale runs up the right of the axes: black (score 1, good) above yellow (score 0).
    dark = (plot.astype(int).sum(axis=2) < 30) & (np.arange(560) > 380)
    yellow = (plot[..., 0] > 240) & (plot[..., 1] > 220) & (plot[..., 2] < 180)
    assert dark.sum() > 50 and yellow[:, 380:].sum() > 50
    assert np.flatnonzero(dark.any(axis=1)).mean() < np.flatnonzero(yellow.any(axis=1)).mean()
    # The title (the first line of text from the top) is 9 px tall or more on a 380 px phone.
    ink = (plot[:, :200].astype(int).sum(axis=2) < 300).any(axis=1)
    top = np.flatnonzero(ink)[0]
    title = np.flatnonzero(~ink[top:])[0]
    assert title * 380 / 560 >= 9
    with_words = score_plot(np.ones(3), np.ones(3), scorer="confidence")
    assert not np.array_equal(with_words, score_plot(np.ones(3), np.ones(3)))


# ---------------------------------------------------------------------------------- GIFs


def gif_durations(path) -> list[int]:
    with Image.open(path) as gif:
        assert gif.info.get("loop") == 0  # loops forever
        durations = []
        for index in range(gif.n_frames):
            gif.seek(index)
            durations.append(gif.info["duration"])
    return durations


def test_timeline_frames_one_per_position_with_labels(engine, generated):
    frames = exporting.timeline_frames(engine, generated.trace, heatmap_side=True)
    assert len(frames) == generated.length + 1
    assert len({frame.shape for frame in frames}) == 1
    single = exporting.timeline_frames(engine, generated.trace, heatmap_side=False)
    assert single[0].shape[1] < frames[0].shape[1]
    # The GIF frame is the studio's own view: image | heatmap | legend, not the image twice.
    image = engine.decode(generated.trace.codes_at(-1)[:1])[0]
    view = compose_frame(image, generated.trace.scores_at(-1)[0], engine.grid_size, heatmap=True)
    assert frames[-1].shape[1] == view.shape[1]
    assert exporting.timeline_positions(1000, 50)[-1] == 1000


# ------------------------------------------------------------------------ state bookkeeping


def _trace(steps: int) -> Trace:
    from scan_core.sampling.trace import Step

    trace = Trace({}, 0, "t", [0], 2, 8, np.full((1, 4), -1), np.full((1, 4), np.nan))
    for i in range(steps):
        cell = np.array([[i % 4]])
        scores = np.full((1, 4), 0.1 * i)
        trace.steps.append(
            Step("generate", cell, np.array([[i]]), np.ones((1, 1)), np.ones((1, 1), bool), scores)
        )
    return trace


def test_timeline_positions_and_replay_match_codes_at():
    trace = _trace(4)
    frames = replay(trace)
    assert len(frames) == 5 and (frames[0] == -1).all()
    for position in range(1, 5):
        np.testing.assert_array_equal(frames[position], trace.codes_at(position - 1))
        codes, scores, step = frame_at(trace, position)
        np.testing.assert_array_equal(codes, frames[position])
        assert step is trace.steps[position - 1]
    assert frame_at(trace, 0)[2] is None
    assert compare_position(trace) == 4


def test_undo_and_branching():
    state = SessionState().with_trace(_trace(3))
    assert state.position == 3 and state.undo == ()
    state = state.with_trace(_trace(4))
    assert len(state.undo) == 1 and state.position == 4
    back = state.undone()
    assert back.length == 3 and back.position == 3 and back.undo == ()
    with pytest.raises(ValueError, match="nothing to undo"):
        back.undone()
    assert len(state.scrubbed(2).branch_base().steps) == 2
    assert state.scrubbed(99).position == 4 and state.scrubbed(-5).position == 0
    with pytest.raises(ValueError, match="empty canvas"):
        state.scrubbed(0).branch_base()
    for _ in range(MAX_UNDO + 5):
        state = state.with_trace(_trace(1))
    assert len(state.undo) == MAX_UNDO


def test_class_names_file_fallbacks(tmp_path):
    assert read_class_names(tmp_path / "none.json", 2)[0] == ["class 0", "class 1"]
    (tmp_path / "names.json").write_text('["cat", "dog"]')
    assert read_class_names(tmp_path / "names.json", 2) == (["cat", "dog"], [])
    names, notes = read_class_names(tmp_path / "names.json", 3)
    assert names[2] == "class 2" and notes


# ------------------------------------------------------------------------ handlers directly


def test_generate_streams_every_step_then_the_full_view(engine):
    outputs = list(handlers.generate(engine, SessionState(), "class 1", 0, 2, *LOOK, **SETTINGS))
    final = outputs[-1]
    state = state_of(final)
    assert len(outputs) == state.length + 1  # one live yield per step, then the final view
    assert state.gallery is not None and len(final[-1]) == 2  # gallery of both seeds
    width = 2 * engine.image_size * engine.display_scale + PANEL_GAP  # image | heatmap
    assert final[0].shape[1] == width and final[0].shape[0] > width // 2  # legend under both
    assert isinstance(final[handlers.VIEW_OUTPUTS.index("editor")], dict)
    picked = handlers.pick(engine, state, 1, *LOOK)
    assert "seed 1" in picked[handlers.STATUS_INDEX] and len(state_of(picked).undo) == 1


def test_brush_regenerate_lock_refine_undo(engine, generated):
    grid_mask = np.zeros((64, 64, 4), np.uint8)
    grid_mask[:16, :16, 3] = 255  # cell 0 of the 4x4 grid
    editor = {"background": None, "layers": [grid_mask], "composite": None}
    outputs = list(
        handlers.regenerate_region(engine, generated, editor, False, 1, *LOOK, **SETTINGS)
    )
    edited = state_of(outputs[-1])
    new_kinds = [step.kind for step in edited.trace.steps[generated.length :]]
    assert new_kinds == ["forced", "score"]  # one forced set for one cell, then its score
    np.testing.assert_array_equal(
        edited.trace.codes_at(-1)[0, 1:], generated.trace.codes_at(-1)[0, 1:]
    )
    locked = state_of(handlers.lock(engine, edited, editor, *LOOK))
    assert locked.locked[0] and locked.locked.sum() == 1
    refined = state_of(list(handlers.refine(engine, locked, 2, *LOOK, **SETTINGS))[-1])
    for step in refined.trace.steps[edited.length :]:
        assert 0 not in step.positions[0]  # locked cell never selected
    assert state_of(handlers.undo(engine, refined, *LOOK)).length == edited.length


def test_branch_from_an_earlier_step(engine, generated):
    early = state_of(handlers.scrub(engine, generated, 2, *LOOK))
    assert early.position == 2
    outputs = list(handlers.refine(engine, early, 3, *LOOK, **SETTINGS))
    branched = state_of(outputs[-1])
    # The branch keeps steps 0..1, finishes the image, then refines: a new timeline.
    assert branched.trace.steps[:2] == generated.trace.steps[:2]
    assert branched.undo[-1][0] is generated.trace


@pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a server warns
def test_errors_become_a_status_line_and_leave_state_alone(engine, generated):
    zero_steps = SETTINGS | {"num_steps": 0}
    bad = list(handlers.generate(engine, generated, "class 1", 0, 1, *LOOK, **zero_steps))
    assert len(bad) == 1 and "num_steps" in bad[0][handlers.STATUS_INDEX]
    assert bad[0][handlers.VIEW_OUTPUTS.index("state")] != generated  # a skip, not a state
    empty = {"background": None, "layers": [], "composite": None}
    out = list(handlers.regenerate_region(engine, generated, empty, False, 0, *LOOK, **SETTINGS))
    assert "paint" in out[-1][handlers.STATUS_INDEX]
    assert (
        "upload"
        in handlers.score_image(engine, generated, None, "class 0", 0, *LOOK, **SETTINGS)[
            handlers.STATUS_INDEX
        ]
    )
    assert "nothing to undo" in handlers.undo(engine, SessionState(), *LOOK)[4]


def test_upload_any_mode_and_size_is_scored(engine, tmp_path):
    path = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 4), np.uint8)).save(path)
    out = handlers.score_image(engine, SessionState(), str(path), "class 0", 0, *LOOK, **SETTINGS)
    state = state_of(out)
    assert state.length == 1 and state.trace.steps[0].kind == "score"
    assert not np.isnan(state.trace.scores_at(-1)).any()


def test_export_then_load_round_trip(engine, generated):
    gif, png, json_path, status = exporting.export(engine, generated, True, 50, 500)
    # one labelled frame per timeline position, the last one held
    assert gif_durations(gif) == [50] * generated.length + [500]
    assert Image.open(png).size[0] == engine.image_size * engine.display_scale
    loaded = state_of(exporting.load_trace(engine, SessionState(), json_path, *LOOK))
    np.testing.assert_array_equal(loaded.trace.codes_at(-1), generated.trace.codes_at(-1))
    broken = f"{json_path}.bad"
    with open(broken, "w") as handle:
        handle.write('{"format": "scan-trace", "version": 99}')
    with pytest.warns(UserWarning, match="unsupported trace version"):
        out = exporting.load_trace(engine, SessionState(), broken, *LOOK)
    assert "version" in out[handlers.STATUS_INDEX]
