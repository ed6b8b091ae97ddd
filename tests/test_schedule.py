"""Schedules are pure functions: check their invariants everywhere, not just at the defaults."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scan_core.sampling.draw import filter_logits, sample_codes
from scan_core.sampling.schedule import cfg_scale_at, cosine_set_sizes, generation_order


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 1024), st.data())
def test_cosine_sets_are_nonempty_and_sum_to_n(num_tokens, data):
    num_steps = data.draw(st.integers(1, num_tokens))
    sizes = cosine_set_sizes(num_tokens, num_steps)
    assert len(sizes) == num_steps
    assert sum(sizes) == num_tokens
    assert min(sizes) >= 1


def test_cosine_sets_grow_like_the_paper_default():
    sizes = cosine_set_sizes(256, 64)
    assert sizes[0] == 1 and sizes[-1] > 4  # slow start, fast finish
    assert cosine_set_sizes(256, 256) == [1] * 256
    assert cosine_set_sizes(7, 1) == [7]


@pytest.mark.parametrize("steps", [0, -1, 257])
def test_cosine_sets_reject_bad_step_counts(steps):
    with pytest.raises(ValueError, match="num_steps"):
        cosine_set_sizes(256, steps)


def test_generation_order_is_a_permutation_and_seeded():
    first = generation_order(3, 16, torch.Generator().manual_seed(1))
    again = generation_order(3, 16, torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    assert all(sorted(row.tolist()) == list(range(16)) for row in first)
    assert torch.equal(generation_order(2, 5, raster=True)[1], torch.arange(5))


def test_cfg_ramp_is_linear_and_clamped():
    assert cfg_scale_at(0.0, 1.0, 4.0) == 1.0
    assert cfg_scale_at(0.5, 1.0, 4.0) == 2.5
    assert cfg_scale_at(2.0, 1.0, 4.0) == 4.0


def test_top_k_and_top_p_keep_the_right_codes():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept_k = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept_k.tolist() == [[True, True, False, False]]
    kept_p = torch.isfinite(filter_logits(logits, top_p=0.7))
    assert kept_p.tolist() == [[True, True, False, False]]
    kept_tiny = torch.isfinite(filter_logits(logits, top_p=0.01))
    assert kept_tiny.tolist() == [[True, False, False, False]]


def test_greedy_sampling_is_argmax_and_reports_its_probability():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    codes, probs = sample_codes(logits, temperature=0)
    assert codes.tolist() == [1]
    assert probs.item() == pytest.approx(logits.softmax(-1)[0, 1].item())


def test_per_image_generators_make_rows_independent():
    logits = torch.zeros(2, 5, 50)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    codes, _ = sample_codes(logits, generator=gens)
    alone, _ = sample_codes(logits[1:], generator=[torch.Generator().manual_seed(4)])
    assert torch.equal(codes[1:], alone)
