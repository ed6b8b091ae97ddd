"""Full-context rescoring (``SamplerSettings.rescore``): each cell is judged exactly as a
refinement round would judge the same code in place, nothing else changes, and every operation
that ends with a finished image records the rescored heatmap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_config

from scan_core.sampling.canvas import Canvas
from scan_core.sampling.decode import decode_slots, prefill
from scan_core.sampling.judge import rescore, rescore_slots
from scan_core.sampling.refine import _forward, _judging, _proposing, _reserve_round
from scan_core.sampling.sampler import ScanSampler, run_all
from scan_core.sampling.schedule import cosine_set_sizes, generation_order
from scan_core.sampling.settings import SamplerSettings
from scan_core.sampling.trace_files import parse_trace

SETTINGS = SamplerSettings(num_steps=5, num_rounds=4, tokens_per_round=3, cfg_scale=2.0)
N = 16


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=21)


def encoded(model, codes: torch.Tensor, order: torch.Tensor) -> Canvas:
    """A canvas holding ``codes`` in the generation layout of ``order``, room for 2N more;
    ``canvas.scores`` holds the generation layout's scores."""
    capacity = decode_slots(N, with_class=True) + rescore_slots(N)
    canvas = Canvas(model, torch.tensor([3, 7]), capacity, True)
    layout = prefill(canvas, order, cosine_set_sizes(N, SETTINGS.num_steps), codes)
    canvas.scores.scatter_(1, order, layout)
    return canvas


def test_each_cell_is_scored_as_a_refinement_round_would_score_it_in_place(model):
    codes = torch.as_tensor(np.random.default_rng(1).integers(0, 64, (2, N)))
    order = generation_order(2, N, [torch.Generator().manual_seed(s) for s in (4, 5)])
    canvas = encoded(model, codes, order)
    visible = canvas.visible.clone()
    scores = rescore(canvas, SETTINGS.tokens_per_round)
    assert torch.equal(canvas.visible, visible) and torch.equal(canvas.codes, codes)
    groups = -(-N // SETTINGS.tokens_per_round)  # ceil: 6 groups, cells i, i + 6, i + 12
    for group in range(groups):
        cells = torch.arange(group, N, groups).expand(2, -1)
        alone = encoded(model, codes, order)  # a round over just this group, judging its codes
        slots = _reserve_round(alone, cells.shape[1])
        _forward(alone, [_proposing(alone, cells, slots)])  # x'(I) sees p(I)
        hidden = _forward(alone, _judging(alone, cells, codes.gather(1, cells), slots))
        judged = alone.quality(hidden[:, : cells.shape[1]])
        torch.testing.assert_close(scores.gather(1, cells), judged, atol=1e-5, rtol=1e-5)


def test_rescoring_differs_from_the_generation_layout(model):
    """The point of it: a cell of the first set no longer judges itself nearly blind."""
    codes = torch.as_tensor(np.random.default_rng(2).integers(0, 64, (2, N)))
    order = generation_order(2, N, [torch.Generator().manual_seed(s) for s in (6, 7)])
    canvas = encoded(model, codes, order)
    first_set = order[:, :2]  # cosine sizes for 16 cells in 5 sets start with 2
    layout = canvas.scores.gather(1, first_set)
    full = rescore(canvas, SETTINGS.tokens_per_round).gather(1, first_set)
    assert not torch.allclose(full, layout, atol=1e-3)


def test_generation_with_rescore_adds_one_score_step_and_draws_the_same_codes(model):
    sampler = ScanSampler(model, "tiny")
    plain = run_all(sampler.generate([1, 2], SETTINGS.replace(num_rounds=0), seed=3))
    again = run_all(sampler.generate([1, 2], SETTINGS.replace(num_rounds=0, rescore=True), seed=3))
    kinds = [step.kind for step in again.steps]
    assert kinds == [step.kind for step in plain.steps] + ["score"]
    last = again.steps[-1]
    assert sorted(last.positions[0].tolist()) == list(range(N))
    np.testing.assert_array_equal(again.codes_at(-1), plain.codes_at(-1))  # no extra draws
    assert np.isfinite(again.scores_at(-1)).all()
    assert not np.allclose(again.scores_at(-1), plain.scores_at(-1))


def test_refinement_after_rescore_runs_replays_and_round_trips(model):
    sampler = ScanSampler(model, "tiny")
    settings = SETTINGS.replace(rescore=True)
    trace = run_all(sampler.generate([4], settings, seed=8))
    assert [s.kind for s in trace.steps].count("refine") == settings.num_rounds
    loaded = parse_trace(trace.to_json())
    assert loaded.settings["rescore"] is True
    replay = run_all(sampler.generate([4], SamplerSettings.from_dict(loaded.settings), seed=8))
    np.testing.assert_array_equal(replay.codes_at(-1), trace.codes_at(-1))


def test_scoring_a_grid_always_judges_in_full_context(model):
    sampler = ScanSampler(model, "tiny")
    codes = np.random.default_rng(3).integers(0, 64, (2, N))
    trace = sampler.score(codes, [3, 7], SETTINGS, seed=5)
    assert [s.kind for s in trace.steps] == ["score"]
    order = generation_order(2, N, sampler._generators(5, 2))  # the order score() draws
    expected = rescore(encoded(model, torch.as_tensor(codes), order), SETTINGS.tokens_per_round)
    np.testing.assert_allclose(trace.scores_at(-1), expected.numpy(), atol=1e-5)


def test_forced_regeneration_with_rescore_scores_the_whole_image_before_refining(model):
    sampler = ScanSampler(model, "tiny")
    codes = np.random.default_rng(3).integers(0, 64, (1, N))
    base = sampler.score(codes, [2], SETTINGS)
    region = np.zeros((1, N), dtype=bool)
    region[0, :5] = True
    forced = run_all(
        sampler.regenerate_region(
            base, region, SETTINGS.replace(rescore=True), seed=1, refine_inside=True
        )
    )
    kinds = [s.kind for s in forced.steps[1:]]
    assert "forced" in kinds and kinds[kinds.index("refine") - 1] == "score"
    assert sorted(forced.steps[1 + kinds.index("refine") - 1].positions[0]) == list(range(N))
    np.testing.assert_array_equal(forced.codes_at(-1)[0, 5:], codes[0, 5:])
