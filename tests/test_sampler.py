"""Sampler contract: each cell once, locks hold, seeds reproduce, batch = single, greedy = full
forward, both contexts agree in round 1, and bad settings get clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_config
from raster_reference import raster_layout

from scan_core.model.sequence import refine_round_masks, scan_layout
from scan_core.sampling import sampler as sampler_module
from scan_core.sampling.canvas import Canvas
from scan_core.sampling.decode import decode_sets, decode_slots, prefill
from scan_core.sampling.judge import rescore, rescore_slots
from scan_core.sampling.raster import raster_generate
from scan_core.sampling.refine import refine_rounds, refinement_slots
from scan_core.sampling.sampler import ScanSampler, run_all
from scan_core.sampling.schedule import cosine_set_sizes, generation_order
from scan_core.sampling.settings import SamplerSettings
from scan_core.sampling.trace_files import parse_trace

SETTINGS = SamplerSettings(num_steps=5, num_rounds=6, tokens_per_round=2, cfg_scale=2.0)


@pytest.fixture(scope="module")
def sampler():
    return ScanSampler(random_model(tiny_config(), seed=11), model_id="tiny")


def generated_codes(trace):
    """Codes after the generation phase (before any refinement step)."""
    last = max(i for i, s in enumerate(trace.steps) if s.kind in ("generate", "score"))
    return trace.codes_at(last)


def test_every_cell_is_generated_exactly_once(sampler):
    trace = run_all(sampler.generate([3, 4], SETTINGS, seed=1))
    drawn = np.concatenate([s.positions for s in trace.steps if s.kind == "generate"], axis=1)
    for row in drawn:
        assert sorted(row.tolist()) == list(range(16))
    assert [s.kind for s in trace.steps][:6] == ["generate"] * 5 + ["score"]
    assert not np.isnan(trace.scores_at(5)).any()  # the score step completes the heatmap


def test_same_seed_same_codes_and_batch_equals_single(sampler):
    batch = run_all(sampler.generate([3, 4], SETTINGS, seed=7))
    again = run_all(sampler.generate([3, 4], SETTINGS, seed=7))
    alone = run_all(sampler.generate([4], SETTINGS, seed=8))  # image b uses seed + b
    np.testing.assert_array_equal(batch.codes_at(-1), again.codes_at(-1))
    np.testing.assert_array_equal(batch.codes_at(-1)[1], alone.codes_at(-1)[0])
    np.testing.assert_allclose(batch.scores_at(-1)[1], alone.scores_at(-1)[0], atol=1e-5)


def test_locked_cells_never_change(sampler):
    locked = np.zeros((2, 16), dtype=bool)
    locked[:, :10] = True
    trace = run_all(sampler.generate([1, 2], SETTINGS.replace(num_rounds=8), 2, locked))
    refined = [s for s in trace.steps if s.kind == "refine"]
    assert refined and all(not locked[0][s.positions[0]].any() for s in refined)
    np.testing.assert_array_equal(generated_codes(trace)[:, :10], trace.codes_at(-1)[:, :10])


def test_zero_rounds_is_the_identity(sampler):
    """T = 0 stops after generation: the same image and scores as the generation phase of a
    refined run with the same seed, and refining it for zero rounds records nothing."""
    zero = SETTINGS.replace(num_rounds=0)
    base = run_all(sampler.generate([5], zero, seed=3))
    refined = run_all(sampler.generate([5], SETTINGS, seed=3))
    generation = len(base) - 1
    assert [s.kind for s in base.steps] == ["generate"] * 5 + ["score"]
    assert {s.kind for s in refined.steps[generation + 1 :]} == {"refine"}
    np.testing.assert_array_equal(base.codes_at(-1), refined.codes_at(generation))
    np.testing.assert_array_equal(base.scores_at(-1), refined.scores_at(generation))
    # The refined run does change this image, so the comparisons above could fail.
    assert (refined.codes_at(-1) != base.codes_at(-1)).any()
    assert list(sampler.refine(base, zero, seed=4)) == []


def test_trace_json_round_trip_replays_final_codes(sampler):
    trace = run_all(sampler.generate([1, 9], SETTINGS, seed=5))
    loaded = parse_trace(trace.to_json())
    np.testing.assert_array_equal(loaded.codes_at(-1), trace.codes_at(-1))
    for step in (0, 4, len(trace) - 1):
        np.testing.assert_array_equal(loaded.codes_at(step), trace.codes_at(step))
        np.testing.assert_allclose(loaded.scores_at(step), trace.scores_at(step), atol=1e-5)


def test_a_selected_image_replays_from_its_own_seeds(sampler):
    """Image b of a batch drew from seed + b in every operation, so its selected trace records
    those seeds and a batch-of-one replay with them gives the same codes."""
    batch = run_all(sampler.generate([3, 4, 5], SETTINGS, seed=20))
    batch = run_all(sampler.refine(batch, SETTINGS.replace(num_rounds=3), seed=40))
    picked = batch.select(2)
    assert picked.seed == 22
    assert [op["seed"] for op in picked.settings["ops"]] == [22, 42]
    assert [op["seed"] for op in batch.settings["ops"]] == [20, 40]  # the batch is untouched
    alone = run_all(sampler.generate([5], SETTINGS, seed=picked.seed))
    np.testing.assert_array_equal(alone.codes_at(5), picked.codes_at(5))  # generation + score
    again = run_all(
        sampler.refine(
            alone, SETTINGS.replace(num_rounds=3), seed=picked.settings["ops"][1]["seed"]
        )
    )
    np.testing.assert_array_equal(again.codes_at(-1), picked.codes_at(-1))


def _full_forward(model, kinds, values, cells, mask, cfg_scale, null_class):
    """No-cache forward of the whole sequence; guided logits and conditional quality."""
    hidden = model(kinds, values, cells, mask)
    null_values = values.clone()
    null_values[kinds == 0] = null_class
    hidden_null = model(kinds, null_values, cells, mask)
    return hidden, hidden_null


def test_greedy_generation_matches_full_forward_argmax():
    model = random_model(tiny_config(), seed=12)
    settings = SETTINGS.replace(temperature=0, num_rounds=0, cfg_scale=1.0)
    with pytest.warns(UserWarning, match="greedy"):
        trace = run_all(ScanSampler(model).generate([2, 6], settings, seed=1))
    codes = torch.as_tensor(trace.codes_at(-1))
    sizes = cosine_set_sizes(16, settings.num_steps)
    layout = scan_layout(torch.tensor([2, 6]), codes, torch.as_tensor(trace.order), sizes)
    hidden = model(layout.kinds, layout.values, layout.cells, layout.mask())
    argmax = model.token_logits(hidden[:, layout.position_slots]).argmax(-1)
    np.testing.assert_array_equal(argmax.numpy(), codes.gather(1, layout.order).numpy())
    scores = model.quality_logits(hidden[:, layout.code_slots]).softmax(-1)[..., 1]
    expected = torch.empty_like(scores).scatter_(1, layout.order, scores)
    np.testing.assert_allclose(trace.scores_at(-1), expected.numpy(), atol=1e-5)


def test_greedy_refinement_matches_full_forward_of_the_whole_sequence():
    model = random_model(tiny_config(), seed=13)
    settings = SETTINGS.replace(temperature=0, cfg_scale=1.0, num_rounds=5)
    with pytest.warns(UserWarning):
        trace = run_all(ScanSampler(model).generate([4], settings, seed=2))
    sizes = cosine_set_sizes(16, settings.num_steps)
    start = torch.as_tensor(generated_codes(trace))
    layout = scan_layout(torch.tensor([4]), start, torch.as_tensor(trace.order), sizes)
    kinds, values, cells = layout.kinds, layout.values, layout.cells
    base = kinds.shape[1]
    visible = torch.ones(1, base + 4 * settings.num_rounds, dtype=torch.bool)
    visible[:, base:] = False
    code_slot = torch.empty(1, 16, dtype=torch.long).scatter_(
        1, layout.order, layout.code_slots.view(1, -1)
    )
    masks = [torch.nn.functional.pad(layout.mask(), (0, visible.shape[1] - base))]
    rounds = [s for s in trace.steps if s.kind == "refine"]
    for index, step in enumerate(rounds):
        slot = base + 4 * index
        p_slots, x_slots = torch.arange(slot, slot + 2), torch.arange(slot + 2, slot + 4)
        round_cells = torch.as_tensor(step.positions)
        p_mask, x_mask = refine_round_masks(
            visible, p_slots, x_slots, code_slot.gather(1, round_cells)
        )
        kinds = torch.cat([kinds, torch.full((1, 4), 0)], dim=1)
        kinds[:, -4:-2], kinds[:, -2:] = 1, 2
        values = torch.cat(
            [values, torch.zeros(1, 2, dtype=torch.long), torch.as_tensor(step.codes)], dim=1
        )
        cells = torch.cat([cells, round_cells, round_cells], dim=1)
        masks += [p_mask, x_mask]
        accepted = torch.as_tensor(step.accepted)
        for cell, new_slot in zip(round_cells[accepted], x_slots[accepted[0]], strict=True):
            visible[0, code_slot[0, cell]] = False
            visible[0, new_slot] = True
            code_slot[0, cell] = new_slot
    mask = torch.cat(masks, dim=1)[..., : kinds.shape[1]]
    hidden = model(kinds, values, cells, mask)
    for index, step in enumerate(rounds):
        slot = base + 4 * index
        argmax = model.token_logits(hidden[:, slot : slot + 2]).argmax(-1)
        np.testing.assert_array_equal(argmax.numpy(), step.codes)
        scores = model.quality_logits(hidden[:, slot + 2 : slot + 4]).softmax(-1)[..., 1]
        np.testing.assert_allclose(
            step.scores[0, step.positions[0]][step.accepted[0]],
            scores[0][torch.as_tensor(step.accepted[0])],
            atol=1e-5,
        )


def test_greedy_raster_matches_full_forward():
    model = random_model(tiny_config(arch="llamagen"), seed=14)
    settings = SamplerSettings(temperature=0, cfg_scale=3.0, cfg_start=3.0)
    codes = raster_generate(model, torch.tensor([1, 7]), settings)
    layout = raster_layout(torch.tensor([1, 7]), codes)
    cond = model.token_logits(model(layout.kinds, layout.values, layout.cells, layout.mask()))
    null = layout.values.clone()
    null[:, 0] = 10
    uncond = model.token_logits(model(layout.kinds, null, layout.cells, layout.mask()))
    guided = uncond + 3.0 * (cond - uncond)
    np.testing.assert_array_equal(guided.argmax(-1).numpy(), codes.numpy())


@pytest.mark.parametrize("lookahead", [False, True])
def test_contexts_agree_in_round_one(sampler, lookahead):
    cached = run_all(sampler.generate([3], SETTINGS.replace(lookahead=lookahead), seed=9))
    exact = run_all(sampler.generate([3], SETTINGS.replace(context="exact"), seed=9))
    first = next(i for i, s in enumerate(cached.steps) if s.kind == "refine")
    a, b = cached.steps[first], exact.steps[first]
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.accepted, b.accepted)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_regenerate_region_changes_only_the_region(sampler):
    base = run_all(sampler.generate([2], SETTINGS.replace(num_rounds=0), seed=4))
    region = np.zeros((4, 4), dtype=bool)
    region[1:3, 1:3] = True
    trace = run_all(sampler.regenerate_region(base, region, SETTINGS, seed=5))
    kinds = [s.kind for s in trace.steps[len(base) :]]
    assert kinds[-1] == "score" and set(kinds[:-1]) == {"forced"}
    changed = trace.codes_at(-1) != base.codes_at(-1)
    assert not changed[0][~region.reshape(-1)].any()
    drawn = np.concatenate([s.positions for s in trace.steps[len(base) : -1]], axis=1)
    assert sorted(drawn[0].tolist()) == sorted(np.flatnonzero(region).tolist())


def test_refine_inside_region_only_touches_the_region(sampler):
    base = run_all(sampler.generate([2], SETTINGS.replace(num_rounds=0), seed=4))
    region = np.zeros(16, dtype=bool)
    region[:6] = True
    trace = run_all(sampler.refine(base, SETTINGS, seed=1, region=region))
    for step in trace.steps[len(base) :]:
        assert region[step.positions[0]].all()


def test_branching_mid_generation_finishes_the_image(sampler):
    trace = run_all(sampler.generate([2], SETTINGS, seed=4))
    branch = run_all(sampler.refine(trace.truncated(1), SETTINGS, seed=2))
    assert (branch.codes_at(-1) >= 0).all()
    np.testing.assert_array_equal(branch.codes_at(1), trace.codes_at(1))


def test_exact_context_after_a_branch_rebuilds_the_whole_image(sampler, monkeypatch):
    """Branching mid-generation finishes the image first; each exact-context rebuild must then
    encode every cell, the finished ones too, not only those the trace had."""
    encoded = []
    real = sampler_module.prefill

    def spy(canvas, order, set_sizes, codes):
        encoded.append(order.shape[1])
        return real(canvas, order, set_sizes, codes)

    monkeypatch.setattr(sampler_module, "prefill", spy)
    trace = run_all(sampler.generate([2], SETTINGS, seed=4))
    encoded.clear()
    run_all(sampler.refine(trace.truncated(1), SETTINGS.replace(context="exact"), seed=2))
    assert encoded[0] < 16  # the resume encodes the cells known at the branch
    assert len(encoded) > 1 and set(encoded[1:]) == {16}


def test_score_reports_every_cell(sampler):
    codes = np.random.default_rng(0).integers(0, 64, (1, 16))
    trace = sampler.score(codes, [1], SETTINGS)
    assert [s.kind for s in trace.steps] == ["score"]
    assert np.isfinite(trace.scores_at(-1)).all()
    np.testing.assert_array_equal(trace.codes_at(-1), codes)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_rounds": -1}, "num_rounds"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 17}, "num_steps"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"context": "magic"}, "context"),
        ({"lookahead": True, "context": "exact"}, "lookahead"),
    ],
)
def test_bad_settings_are_named(sampler, changes, message):
    with pytest.raises(ValueError, match=message):
        next(sampler.generate([1], SETTINGS.replace(**changes)))


@pytest.mark.parametrize(
    "changes, limit",
    [({"tokens_per_round": 17}, 16), ({"tokens_per_round": 9, "lookahead": True}, 8)],
)
def test_tokens_per_round_above_the_grid_is_refused_up_front(changes, limit):
    settings = SETTINGS.replace(**changes)
    with pytest.raises(
        ValueError,
        match=rf"tokens_per_round \(c\) = {changes['tokens_per_round']}"
        rf".* {limit}",
    ):
        settings.validate(16)
    settings.replace(num_rounds=0).validate(16)  # no rounds: c is never used
    if "lookahead" in changes:  # one round: no next round to keep apart from
        settings.replace(num_rounds=1).validate(16)


def test_bad_requests_are_explained(sampler):
    with pytest.raises(ValueError, match="class id 11 out of range"):
        next(sampler.generate([11], SETTINGS))
    base = run_all(sampler.generate([1], SETTINGS.replace(num_rounds=0), seed=1))
    with pytest.raises(ValueError, match="region"):
        next(sampler.regenerate_region(base, np.zeros(16, dtype=bool), SETTINGS))
    with pytest.raises(ValueError, match="shape"):
        next(sampler.regenerate_region(base, np.ones((3, 3), dtype=bool), SETTINGS))
    locked = np.ones(16, dtype=bool)
    locked[0] = False
    with pytest.raises(ValueError, match="tokens_per_round"):
        next(sampler.refine(base, SETTINGS, locked=locked))


def test_streams_survive_hopping_threads(sampler):
    """Gradio resumes a generator on any worker thread; every step must still work."""
    from concurrent.futures import ThreadPoolExecutor

    base = run_all(sampler.generate([2], SETTINGS.replace(num_rounds=0), seed=4))
    streams = [
        sampler.generate([1], SETTINGS, seed=1),
        sampler.refine(base, SETTINGS, seed=2),
        sampler.regenerate_region(
            base, np.eye(4, dtype=bool), SETTINGS, seed=3, refine_inside=True
        ),
    ]
    for stream in streams:
        steps = 0
        while True:
            with ThreadPoolExecutor(1) as pool:  # a fresh thread for every step
                item = pool.submit(next, stream, None).result()
            if item is None:
                break
            steps += 1
        assert steps > 1


def _peaks(monkeypatch) -> dict:
    """The highest slot each canvas reserved up to, recorded as the sampler runs."""
    peaks = {}
    reserve = Canvas.reserve

    def spy(canvas, count):
        slots = reserve(canvas, count)
        peaks[canvas] = max(peaks.get(canvas, 0), canvas.next_slot)
        return slots

    monkeypatch.setattr(Canvas, "reserve", spy)
    return peaks


def test_each_phase_fills_exactly_the_slots_it_states(monkeypatch):
    """Each phase on a canvas of exactly its stated slots: it fits, and it uses them all."""
    model = random_model(tiny_config(), seed=15)
    generator = [torch.Generator().manual_seed(s) for s in (1, 2)]
    order = generation_order(2, 16, generator)
    sizes = cosine_set_sizes(16, SETTINGS.num_steps)
    image = decode_slots(16, with_class=True)
    canvas = Canvas(model, torch.tensor([3, 4]), image, use_cfg=True)
    list(decode_sets(canvas, order, sizes, SETTINGS, generator))
    assert canvas.next_slot == canvas.capacity
    codes = canvas.codes.clone()
    for settings in (SETTINGS, SETTINGS.replace(lookahead=True), SETTINGS.replace(context="exact")):
        capacity = image + rescore_slots(16) + refinement_slots(settings, settings.num_rounds)
        canvas = Canvas(model, torch.tensor([3, 4]), capacity, use_cfg=True)
        peaks = _peaks(monkeypatch)
        prefill(canvas, order, sizes, codes)
        canvas.scores.copy_(rescore(canvas, settings.tokens_per_round))
        allowed = torch.ones(2, 16, dtype=torch.bool)

        def rebuild(canvas=canvas) -> None:
            canvas.rewind(0)
            prefill(canvas, order, sizes, canvas.codes.clone())

        exact = rebuild if settings.context == "exact" else None
        events = list(refine_rounds(canvas, settings, allowed, generator, exact))
        assert len(events) == settings.num_rounds
        assert peaks[canvas] == capacity


@pytest.mark.parametrize(
    "operation",
    ["cached", "exact", "lookahead", "rescore", "refine", "branch", "regenerate", "score"],
)
def test_operations_reserve_exactly_their_planned_capacity(sampler, monkeypatch, operation):
    """The capacity is the sum of the phases' own counts: never short, and no slot to spare."""
    base = run_all(sampler.generate([2, 5], SETTINGS.replace(num_rounds=0), seed=4))
    exact = SETTINGS.replace(context="exact", rescore=True)
    peaks = _peaks(monkeypatch)
    region = np.eye(4, dtype=bool)
    streams = {
        "cached": lambda: sampler.generate([1, 2], SETTINGS, seed=1),
        "exact": lambda: sampler.generate([1, 2], exact, seed=1),
        "lookahead": lambda: sampler.generate([1, 2], SETTINGS.replace(lookahead=True), seed=1),
        "rescore": lambda: sampler.generate([1, 2], SETTINGS.replace(rescore=True), seed=1),
        "refine": lambda: sampler.refine(base, exact, seed=2),
        "branch": lambda: sampler.refine(base.truncated(1), SETTINGS, seed=2),
        "regenerate": lambda: sampler.regenerate_region(base, region, exact, 3, None, True),
    }
    if operation == "score":
        sampler.score(base.codes_at(-1), [2, 5], SETTINGS)
    else:
        run_all(streams[operation]())
    assert len(peaks) == 1
    canvas, peak = peaks.popitem()
    assert peak == canvas.capacity
