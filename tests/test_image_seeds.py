"""Per-image seeds: a listed seed per image gives each image the codes it gets alone, traces
record the seeds only when they are not consecutive, and selecting images from a batch gives
the trace a run of just those images makes (what a scheduler serving many sessions relies on)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import random_model, tiny_config

from scan_core.sampling.sampler import ScanSampler, run_all
from scan_core.sampling.settings import SamplerSettings
from scan_core.sampling.trace import TraceError, image_seeds
from scan_core.sampling.trace_files import parse_trace

SETTINGS = SamplerSettings(num_steps=4, num_rounds=3, tokens_per_round=2, cfg_scale=2.0)


@pytest.fixture(scope="module")
def sampler():
    return ScanSampler(random_model(tiny_config(), seed=21), model_id="tiny")


def assert_same_run(got, want):
    """Same images, draws and seeds; probabilities and scores to 1e-5 (batch sizes may take
    other vector paths)."""
    assert got.settings == want.settings and got.seed == want.seed
    assert got.image_seeds == want.image_seeds and got.class_ids == want.class_ids
    np.testing.assert_array_equal(got.order, want.order)
    assert [s.kind for s in got.steps] == [s.kind for s in want.steps]
    for a, b in zip(got.steps, want.steps, strict=True):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.accepted, b.accepted)
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_listed_seeds_give_each_image_its_solo_codes(sampler):
    batch = run_all(sampler.generate([3, 4, 5], SETTINGS, seed=[7, 100, 8]))
    assert batch.seed == 7 and batch.image_seeds == [7, 100, 8] and batch.seeds == [7, 100, 8]
    assert batch.settings["ops"] == [{"op": "generate", "seed": 7, "seeds": [7, 100, 8]}]
    for row, (class_id, seed) in enumerate(((3, 7), (4, 100), (5, 8))):
        alone = run_all(sampler.generate([class_id], SETTINGS, seed=seed))
        assert_same_run(batch.select(row), alone)
    # Without the listed seeds the middle image would differ: the comparison above can fail.
    plain = run_all(sampler.generate([3, 4, 5], SETTINGS, seed=7))
    assert (plain.codes_at(-1)[1] != batch.codes_at(-1)[1]).any()


def test_consecutive_listed_seeds_are_the_plain_seed(sampler):
    listed = run_all(sampler.generate([1, 2], SETTINGS, seed=[5, 6]))
    plain = run_all(sampler.generate([1, 2], SETTINGS, seed=5))
    assert listed.image_seeds is None and listed.to_json() == plain.to_json()
    assert "seeds" not in listed.settings["ops"][0] and '"image_seeds"' not in listed.to_json()


def test_selected_images_are_the_run_of_those_images(sampler):
    batch = run_all(sampler.generate([3, 4, 5, 6], SETTINGS, seed=10))
    pair = batch.select([1, 2])
    assert pair.seed == 11 and pair.image_seeds is None and pair.batch_size == 2
    assert_same_run(pair, run_all(sampler.generate([4, 5], SETTINGS, seed=11)))
    swapped = batch.select([2, 0])
    assert swapped.seeds == [12, 10] and swapped.settings["ops"][0]["seeds"] == [12, 10]
    assert_same_run(swapped, run_all(sampler.generate([5, 3], SETTINGS, seed=[12, 10])))
    assert batch.seed == 10 and batch.settings["ops"] == [{"op": "generate", "seed": 10}]


def test_selection_follows_each_operations_seeds(sampler):
    """A refinement after a listed-seed generation: each op keeps its own seeds per image."""
    batch = run_all(sampler.generate([3, 4], SETTINGS, seed=[9, 2]))
    batch = run_all(sampler.refine(batch, SETTINGS, seed=40))
    picked = batch.select(1)
    assert picked.seed == 2 and picked.image_seeds is None
    assert picked.settings["ops"] == [{"op": "generate", "seed": 2}, {"op": "refine", "seed": 41}]
    alone = run_all(sampler.refine(run_all(sampler.generate([4], SETTINGS, seed=2)), SETTINGS, 41))
    np.testing.assert_array_equal(alone.codes_at(-1), picked.codes_at(-1))


def test_image_seeds_survive_json_and_old_traces_still_load(sampler):
    trace = run_all(sampler.generate([3, 4], SETTINGS.replace(num_rounds=0), seed=[9, 2]))
    loaded = parse_trace(trace.to_json())
    assert loaded.seed == 9 and loaded.image_seeds == [9, 2] and loaded.seeds == [9, 2]
    old = json.loads(trace.to_json())
    del old["image_seeds"]  # written before per-image seeds: consecutive from "seed"
    assert parse_trace(json.dumps(old)).seeds == [9, 10]


@pytest.mark.parametrize(
    "seeds", [[9], [9, "2"], [9, True], [3, 2], [9, 2**63], "9,2", [9, 10.0]], ids=repr
)
def test_bad_image_seeds_in_a_file_are_refused(sampler, seeds):
    payload = json.loads(run_all(sampler.generate([3, 4], SETTINGS, seed=[9, 2])).to_json())
    payload["image_seeds"] = seeds
    with pytest.raises(TraceError, match="image_seeds"):
        parse_trace(json.dumps(payload))


def test_seed_lists_must_fit_the_batch(sampler):
    assert image_seeds(4, 3) == [4, 5, 6] and image_seeds((8, 1), 2) == [8, 1]
    for seeds in ([1], [1, 2, 3], [1, 2.5], [1, None], "12"):
        with pytest.raises(ValueError, match="seed"):
            next(sampler.generate([1, 2], SETTINGS, seed=seeds))


def test_too_many_locks_fail_before_the_first_forward(sampler):
    """Locks that leave a round fewer than c cells used to fail after the whole generation."""
    locked = np.ones(16, dtype=bool)
    locked[0] = False
    with pytest.raises(ValueError, match="exceeds the 1 cells that may change"):
        next(sampler.generate([1], SETTINGS, seed=0, locked=locked))
    with pytest.raises(ValueError, match="locked mask has shape"):
        sampler.check_generate([1], SETTINGS, 0, np.zeros(5, dtype=bool))
    assert next(sampler.generate([1], SETTINGS.replace(num_rounds=0), 0, locked))  # no rounds
