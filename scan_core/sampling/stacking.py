"""Continuing several traces in one sampler run: what they must share, and the trace of them all.

A refinement or region regeneration first re-encodes a trace's current image in its generation
order, then draws sets and rounds whose sizes follow the settings and, for a region, the number
of cells brushed. Images that agree on all of that (``continuation_key``) can be continued as one
batch: ``stack_continuations`` puts their current images side by side (codes, generation
orders, scores and the scorer that made them) with each image's own seed, locks and region, and
the sampler continues them so that each image gets the codes it would get alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from scan_core.sampling.settings import SamplerSettings
from scan_core.sampling.trace import Step, Trace, image_masks, image_seeds


def continuation_key(
    sampler,
    trace: Trace,
    settings: SamplerSettings,
    seed,
    locked: np.ndarray | None,
    region: np.ndarray | None,
    forced: bool,
    refine_inside: bool = False,
) -> tuple | None:
    """What continuations of traces must share to run as one batch; None when this one must
    run alone: an image not yet finished (a branch mid-generation), early stopping (``patience``
    and ``score_threshold`` decide for the whole batch), or any input the sampler would refuse
    (it then fails alone, with the sampler's own message).

    ``forced``: a region regeneration (``region`` is the brushed cells; ``refine_inside`` keeps
    refining there); otherwise a refinement, inside ``region`` when given.
    """
    try:
        settings = sampler.check_generate(trace.class_ids, settings)  # resolved; class ids
        config = sampler.config
        if (trace.grid_size, trace.vocab_size) != (config.grid_size, config.vocab_size):
            return None
        if settings.patience > 0 or settings.score_threshold < 1.0:
            return None
        if (trace.codes_at(-1) < 0).any():
            return None
        images, grid = trace.batch_size, config.grid_size
        image_seeds(seed, images)
        allowed = np.ones((images, grid * grid), dtype=bool)
        if locked is not None:
            allowed &= ~image_masks(locked, images, grid, "locked")
        if region is not None or forced:
            allowed &= image_masks(region, images, grid, "region")
        counts = allowed.sum(axis=1)
        rounds = settings.num_rounds if refine_inside or not forced else 0
        if rounds and counts.min() < settings.tokens_per_round:
            return None
        if forced and (counts.min() < 1 or counts.min() != counts.max()):
            return None
    except (ValueError, TypeError, IndexError):
        return None
    scores = trace.scores_at(-1)
    return (
        "regenerate_region" if forced else "refine",
        settings,
        int(counts[0]) if forced else None,
        rounds,
        trace.order is None,
        trace.scorer_at(-1),
        bool(np.isnan(scores).any()),
    )


def stack_continuations(parts: Sequence[tuple], grid_size: int) -> tuple:
    """Arguments that continue several traces in one run: ``parts`` lists (trace, seed,
    locked, region) for each (keyed alike by ``continuation_key``); returns the same four for
    all of them, in order: ``stacked`` traces, each image's seed, and the masks side by side
    (no locks, or the whole grid, where a part has none; region None when no part has one)."""
    traces = [part[0] for part in parts]
    images = [trace.batch_size for trace in traces]
    seeds = [s for (trace, seed, _, _) in parts for s in image_seeds(seed, trace.batch_size)]
    locked = stacked_mask([part[2] for part in parts], images, grid_size, "locked")
    region = None
    if any(part[3] is not None for part in parts):
        region = stacked_mask([part[3] for part in parts], images, grid_size, "region")
    return stacked(traces), seeds, locked, region


def stacked(traces: Sequence[Trace]) -> Trace:
    """One trace holding the current image of every trace, in order: continuing it with each
    image's seed continues each trace (keyed alike by ``continuation_key``) as it would alone.
    Its history is not theirs: it starts from their current codes, with one empty step that
    carries their scores and scorer."""
    first = traces[0]
    codes = np.concatenate([t.codes_at(-1) for t in traces])
    orders = None if first.order is None else np.concatenate([t.order for t in traces])
    trace = Trace.new_run(
        op="stacked",
        settings={},
        seed=[s for t in traces for s in t.seeds],
        model_id=first.model_id,
        class_ids=[c for t in traces for c in t.class_ids],
        grid_size=first.grid_size,
        vocab_size=first.vocab_size,
        start_codes=codes,
        order=orders,
    )
    scorer = first.scorer_at(-1)
    if scorer is not None:
        empty = np.zeros((codes.shape[0], 0), dtype=np.int64)
        scores = np.concatenate([t.scores_at(-1) for t in traces])
        step = Step("score", empty, empty, empty.astype(np.float32), empty.astype(bool), scores)
        step.scorer = scorer
        trace.steps.append(step)
    return trace


def stacked_mask(masks: Sequence, images: Sequence[int], grid_size: int, name: str) -> np.ndarray:
    """(sum(images), N) bool: each mask as the sampler takes it (``image_masks``); where one is
    None, no cell for locks and every cell for a region."""
    n = grid_size * grid_size
    parts = [
        np.full((count, n), name == "region")
        if mask is None
        else image_masks(mask, count, grid_size, name)
        for mask, count in zip(masks, images, strict=True)
    ]
    return np.concatenate(parts)
