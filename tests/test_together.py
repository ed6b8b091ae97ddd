"""Several runs stepped at once with merged forwards (``scan_core.sampling.together``): the
packed forward equals separate ones, runs of different kinds and settings keep their solo
traces, forwards really merge, and one run's failure stays its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_config
from test_image_seeds import assert_same_run

from scan_core import STEP_END, Together
from scan_core.model.kv_cache import KVCache
from scan_core.model.network import SLOT_CODE, SLOT_POSITION, Chunk, bucket_rows
from scan_core.sampling.sampler import ScanSampler, run_all
from scan_core.sampling.settings import SamplerSettings

SETTINGS = SamplerSettings(num_steps=4, num_rounds=3, tokens_per_round=2, cfg_scale=2.0)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=5)


def _chunk(model, batch: int, length: int, capacity: int, seed: int) -> Chunk:
    g = torch.Generator().manual_seed(seed)
    n = model.config.num_tokens
    kinds = torch.randint(SLOT_POSITION, SLOT_CODE + 1, (batch, length), generator=g)
    values = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
    cells = torch.randint(0, n, (batch, length), generator=g)
    mask = torch.rand(batch, length, capacity, generator=g) < 0.6
    mask[:, :, :length] |= torch.eye(length, dtype=torch.bool)  # every query sees itself
    cache = KVCache.allocate(model.config, batch, capacity)
    return Chunk(kinds, values, cells, mask, cache, torch.arange(length))


@pytest.mark.parametrize("bucket", [False, True])
@torch.inference_mode()
def test_a_packed_forward_equals_separate_forwards_and_writes_the_same_caches(model, bucket):
    shapes = [(1, 3, 7), (4, 5, 9), (2, 1, 4)]
    alone = [_chunk(model, *shape, seed=i) for i, shape in enumerate(shapes)]
    packed = [_chunk(model, *shape, seed=i) for i, shape in enumerate(shapes)]
    want = [model(c.kinds, c.values, c.cells, c.mask, c.cache, c.cache_positions) for c in alone]
    got = model.forward_chunks(packed, bucket=bucket)
    for w, g, a, p in zip(want, got, alone, packed, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        for layer in range(model.config.n_layer):
            torch.testing.assert_close(p.cache.layer(layer)[0], a.cache.layer(layer)[0])


def _drain(together: Together, streams: list) -> list:
    """Step every stream together until all end; the last trace of each (or its error)."""
    last: list = [None] * len(streams)
    live = list(range(len(streams)))
    while live:
        items = together.step([streams[i] for i in live])
        for i, item in zip(list(live), items, strict=True):
            if item is STEP_END:
                live.remove(i)
            elif isinstance(item, BaseException):
                last[i] = item
                live.remove(i)
            else:
                last[i] = item[0]
    return last


def test_runs_of_every_kind_stepped_together_keep_their_solo_traces(model):
    solo = ScanSampler(model, model_id="tiny")
    together = Together()
    shared = solo.with_model(together.model(model))
    base = run_all(solo.generate([1, 2], SETTINGS, 3))
    region = np.zeros(model.config.num_tokens, dtype=bool)
    region[:5] = True
    other = SETTINGS.replace(cfg_scale=1.0, num_rounds=1, context="exact")
    jobs = [
        lambda s: s.generate([4], SETTINGS, 7),
        lambda s: s.generate([0, 5, 6], other, 11),
        lambda s: s.refine(base, SETTINGS.replace(num_rounds=4), 2),
        lambda s: s.regenerate_region(base, region, SETTINGS, 5, refine_inside=True),
    ]
    traces = _drain(together, [job(shared) for job in jobs])
    assert together.forwards >= 5  # the forwards were merged, not run one by one
    for trace, job in zip(traces, jobs, strict=True):
        assert_same_run(trace, run_all(job(solo)))


def test_a_run_whose_forward_fails_fails_alone(model):
    together = Together()
    shared = together.model(model)
    good = ScanSampler(model, model_id="tiny").with_model(shared)

    def broken():
        chunk = _chunk(model, 1, 3, 7, seed=0)
        yield shared(
            chunk.kinds,
            chunk.values,
            chunk.cells,
            chunk.mask[:, :2],
            chunk.cache,
            chunk.cache_positions,
        )  # a mask for two queries, three queries

    def raising():
        yield from ()
        raise ValueError("not a forward at all")

    traces = _drain(together, [good.generate([3], SETTINGS, 1), broken(), raising()])
    assert isinstance(traces[1], RuntimeError)
    assert isinstance(traces[2], ValueError) and "not a forward" in str(traces[2])
    assert_same_run(traces[0], run_all(ScanSampler(model).generate([3], SETTINGS, 1)))


def test_outside_a_step_the_shared_model_is_the_model(model):
    together = Together()
    shared = together.model(model)
    assert shared.config is model.config and shared.token_logits == model.token_logits
    trace = run_all(ScanSampler(shared).generate([2], SETTINGS, 4))
    assert_same_run(trace, run_all(ScanSampler(model).generate([2], SETTINGS, 4)))
    assert together.forwards == 0


def test_buckets_hold_every_row_count_with_at_most_a_quarter_more_rows():
    sizes = [bucket_rows(rows) for rows in range(1, 4097)]
    assert all(rows <= size <= max(rows, 1.25 * rows) for rows, size in enumerate(sizes, 1))
    assert sizes[:8] == list(range(1, 9)) and bucket_rows(17) == 20 and bucket_rows(33) == 40
    assert len(set(sizes)) <= 8 + 4 * 9  # four shapes per doubling past 8 rows
