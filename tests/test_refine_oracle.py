"""Planted defects: an oracle network knows the true grid. Refinement must find and fix exactly
the corrupted cells, worst first, accept only improvements, and stop when nothing improves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from scan_core.sampling.sampler import ScanSampler, run_all
from scan_core.sampling.settings import SamplerSettings


class Oracle:
    """Any object with the network's contract works: forward -> hidden, and two heads.

    Its "hidden state" is just (kind, value, cell). The token head proposes the true code of the
    cell; the quality head scores sigmoid(4 - |code - truth|), so worse corruptions score lower.
    """

    def __init__(self, truth: torch.Tensor):
        self.config = tiny_config(n_layer=0)
        self.truth = truth

    def parameters(self):
        return iter(())

    def __call__(self, kinds, values, cells, mask=None, cache=None, cache_positions=None):
        return torch.stack([kinds, values, cells], dim=-1).float()

    def token_logits(self, hidden):
        cells = hidden[..., 2].long().clamp(min=0)
        logits = torch.full((*hidden.shape[:-1], self.config.vocab_size), -30.0)
        return logits.scatter(-1, self.truth[cells].unsqueeze(-1), 30.0)

    def quality_logits(self, hidden):
        values, cells = hidden[..., 1].long(), hidden[..., 2].long().clamp(min=0)
        distance = (values - self.truth[cells]).abs().float()
        return torch.stack([torch.zeros_like(distance), 4.0 - distance], dim=-1)


@pytest.mark.parametrize(
    "context, lookahead", [("cached", False), ("exact", False), ("cached", True)]
)
def test_refinement_fixes_exactly_the_planted_defects_worst_first(context, lookahead):
    truth = torch.arange(16) * 3 % 64
    corrupted = truth.clone()
    planted = {9: 20, 2: 10, 13: 5}  # cell -> corruption distance
    for cell, distance in planted.items():
        corrupted[cell] = truth[cell] + distance
    sampler = ScanSampler(Oracle(truth), model_id="oracle")
    settings = SamplerSettings(
        num_steps=4,
        num_rounds=10,
        tokens_per_round=1,
        cfg_scale=1.0,
        patience=2,
        context=context,
        lookahead=lookahead,
    )
    scored = sampler.score(corrupted.numpy()[None], [0], settings)
    initial = scored.scores_at(-1)[0]
    assert set(np.argsort(initial)[:3]) == set(planted)  # the head finds the defects
    trace = run_all(sampler.refine(scored, settings, seed=0))
    rounds = [s for s in trace.steps if s.kind == "refine"]
    looked = [int(s.positions[0, 0]) for s in rounds]
    kept = [bool(s.accepted[0, 0]) for s in rounds]
    assert looked[:3] == [9, 2, 13]  # worst first
    assert kept == [True, True, True, False, False]  # then two idle rounds stop it (patience)
    np.testing.assert_array_equal(trace.codes_at(-1)[0], truth.numpy())
    assert all(
        s.scores[0, looked[i]] == pytest.approx(1 / (1 + np.exp(-4)))
        for i, s in enumerate(rounds[:3])
    )


def test_candidates_that_do_not_improve_are_rejected():
    truth = torch.zeros(16, dtype=torch.long)
    sampler = ScanSampler(Oracle(truth))
    settings = SamplerSettings(num_steps=4, num_rounds=3, tokens_per_round=2, cfg_scale=1.0)
    clean = sampler.score(truth.numpy()[None], [0], settings)
    trace = run_all(sampler.refine(clean, settings, seed=0))
    assert all(not s.accepted.any() for s in trace.steps if s.kind == "refine")
    np.testing.assert_array_equal(trace.codes_at(-1), clean.codes_at(-1))


def test_score_threshold_stops_refinement_early():
    truth = torch.zeros(16, dtype=torch.long)
    sampler = ScanSampler(Oracle(truth))
    settings = SamplerSettings(
        num_steps=4, num_rounds=5, tokens_per_round=1, cfg_scale=1.0, score_threshold=0.9
    )
    clean = sampler.score(truth.numpy()[None], [0], settings)
    assert list(sampler.refine(clean, settings)) == []
