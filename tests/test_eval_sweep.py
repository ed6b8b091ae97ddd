"""The evaluation's generation sweep, random control and flaw-detection pieces, on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scan_core.evaluation.evaluate import t_grid
from scan_core.evaluation.quality import changed_cell_auroc, corrupt, detection_auroc
from scan_core.evaluation.sweep import balanced_classes, random_control, run_sweep
from scan_core.sampling.sampler import ScanSampler, run_all
from scan_core.sampling.settings import SamplerSettings
from tests.conftest import random_model, tiny_config

SETTINGS = SamplerSettings(num_steps=4, num_rounds=3, tokens_per_round=2, cfg_scale=2.0)


@pytest.fixture(scope="module")
def sampler():
    return ScanSampler(random_model(tiny_config()), "tiny")


def test_t_grid_is_even_from_zero_to_twice_the_default_and_holds_it():
    assert t_grid(16, 5) == [0, 8, 16, 24, 32]
    assert t_grid(3, 3) == [0, 3, 6]
    assert t_grid(5, 4) == [0, 3, 5, 7, 10]  # the default is added when the steps miss it
    assert t_grid(0, 3) == [0, 1]  # rounds to distinct steps


def test_balanced_classes_cycle_through_every_class():
    assert balanced_classes(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_reading_round_t_of_a_long_run_equals_a_run_with_t_rounds(sampler):
    classes = balanced_classes(6, 10)
    sweep = run_sweep(sampler, classes, SETTINGS, [0, 2, 5], seed=3, batch_size=4, progress=False)
    assert sorted(sweep.codes) == [0, 2, 5] and sweep.codes[5].shape == (6, 16)
    assert sweep.seconds[0] <= sweep.seconds[2] <= sweep.seconds[5]
    for t in (0, 2):  # batches of 4 and 2 with seeds seed + start, as the sweep runs them
        for start, stop in ((0, 4), (4, 6)):
            alone = run_all(
                sampler.generate(
                    [int(c) for c in classes[start:stop]],
                    SETTINGS.replace(num_rounds=t),
                    seed=3 + start,
                )
            )
            np.testing.assert_array_equal(alone.codes_at(-1), sweep.codes[t][start:stop])
    assert not np.isnan(sweep.initial_scores).any()
    assert sweep.changed(0).sum() == 0


def test_the_control_resamples_no_more_cells_than_refinement_changed(sampler):
    classes = balanced_classes(8, 10)
    sweep = run_sweep(sampler, classes, SETTINGS, [0, 3], seed=0, batch_size=8, progress=False)
    control = random_control(sampler, sweep, 3, SETTINGS, seed=1, progress=False)
    counts = sweep.changed(3).sum(axis=1)
    moved = (control != sweep.codes[0]).sum(axis=1)
    assert (moved <= counts).all()
    assert moved.sum() > 0 or counts.sum() == 0
    untouched = counts == 0
    np.testing.assert_array_equal(control[untouched], sweep.codes[0][untouched])


def test_corrupt_replaces_the_asked_share_and_labels_by_equality():
    truth = torch.randint(0, 64, (5, 16), generator=torch.Generator().manual_seed(0))
    for source in ("random", "permuted"):
        codes, flawed = corrupt(truth, source, 0.25, 64, None, torch.Generator().manual_seed(1))
        assert torch.equal(flawed, codes != truth)
        assert ((codes != truth).sum(dim=1) <= 4).all() and flawed.any()
    teacher = (truth + 1) % 64  # a teacher that is always wrong: every chosen cell is a flaw
    codes, flawed = corrupt(truth, "teacher", 0.5, 64, teacher, torch.Generator().manual_seed(2))
    assert (flawed.sum(dim=1) == 8).all()


def test_detection_auroc_reports_every_source_in_range(sampler):
    codes = np.random.default_rng(0).integers(0, 64, (12, 16))
    result = detection_auroc(sampler, codes, np.arange(12) % 10, SETTINGS, batch_size=5)
    assert set(result) == {"random", "permuted", "teacher"}
    assert all(0.0 <= value <= 1.0 for value in result.values())


def test_changed_cell_auroc_is_one_for_a_head_that_scored_the_changed_cells_lowest():
    scores = np.array([[0.9, 0.1, 0.8, 0.2]])
    assert changed_cell_auroc(scores, np.array([[False, True, False, True]])) == 1.0
    assert changed_cell_auroc(scores, np.array([[True, False, True, False]])) == 0.0
