"""Generation for the evaluation: one refinement run read at every T, plus the random control.

Refinement with T rounds is the first T rounds of a longer run (no stopping rule is active, and
round t never looks ahead), so one run to ``max(T)`` gives the codes and wall time at every T of
the paper's Table 2 with the same seeds. The control resamples, for each image, as many randomly
chosen cells as refinement changed, so it isolates *which* cells refinement picks from *how
many* it changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from scan_core.sampling.sampler import ScanSampler
from scan_core.sampling.settings import SamplerSettings
from scan_core.sampling.trace import Trace


@dataclass
class Sweep:
    """Codes (B, N) after T refinement rounds for each T, and what it took to get there."""

    class_ids: np.ndarray  # (B,)
    codes: dict[int, np.ndarray]  # T -> (B, N)
    seconds: dict[int, float]  # T -> wall seconds per image (batched run, amortised)
    initial_scores: np.ndarray  # (B, N) quality scores before refinement
    traces: list[Trace]  # one per batch, ending after max(T) rounds

    def changed(self, rounds: int) -> np.ndarray:
        """(B, N) bool: cells whose code differs from the unrefined image after ``rounds``."""
        return self.codes[rounds] != self.codes[0]


def balanced_classes(count: int, num_classes: int) -> np.ndarray:
    """``count`` class ids cycling through every class (equal shares, remainder to the first)."""
    return np.arange(count) % num_classes


def _timed_steps(stream) -> tuple[Trace, list[str], list[float]]:
    start, kinds, stamps, trace = time.perf_counter(), [], [], None
    for item in stream:
        trace, step = item
        kinds.append(step.kind)
        stamps.append(time.perf_counter() - start)
    return trace, kinds, stamps


def run_sweep(
    sampler: ScanSampler,
    class_ids: np.ndarray,
    settings: SamplerSettings,
    rounds: list[int],
    seed: int,
    batch_size: int,
    progress: bool = True,
) -> Sweep:
    """Generate every class id once (seeds ``seed + i``), refining up to ``max(rounds)``."""
    top = max(rounds)
    settings = settings.replace(num_rounds=top, patience=0, score_threshold=1.0)
    codes = {t: [] for t in rounds}
    seconds = {t: 0.0 for t in rounds}
    initial, traces = [], []
    starts = range(0, len(class_ids), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress):
        batch = [int(c) for c in class_ids[start : start + batch_size]]
        stream = sampler.generate(batch, settings, seed=seed + start)
        trace, kinds, stamps = _timed_steps(stream)
        first_round = kinds.index("refine") if "refine" in kinds else len(kinds)
        if kinds.count("refine") != top:
            raise RuntimeError(
                f"expected {top} refinement rounds, the run made {kinds.count('refine')}"
            )
        for t in rounds:
            last = first_round - 1 + t  # index of the step that ends round t
            codes[t].append(trace.codes_at(last))
            seconds[t] += stamps[last]
        initial.append(trace.scores_at(first_round - 1))
        traces.append(trace)
    count = len(class_ids)
    return Sweep(
        np.asarray(class_ids),
        {t: np.concatenate(parts) for t, parts in codes.items()},
        {t: total / count for t, total in seconds.items()},
        np.concatenate(initial),
        traces,
    )


def random_control(
    sampler: ScanSampler,
    sweep: Sweep,
    rounds: int,
    settings: SamplerSettings,
    seed: int,
    progress: bool = True,
) -> np.ndarray:
    """(B, N) codes: each unrefined image with as many random cells resampled as refinement
    changed by ``rounds`` (accepted unconditionally, like a brushed region).

    Images are batched by their count, since one region call needs equal counts per image.
    """
    counts = sweep.changed(rounds).sum(axis=1)
    result = sweep.codes[0].copy()
    rng = np.random.default_rng(seed)
    num_tokens = result.shape[1]
    groups = [np.flatnonzero(counts == k) for k in np.unique(counts) if k > 0]
    for group in tqdm(groups, desc="random control", disable=not progress):
        classes = [int(c) for c in sweep.class_ids[group]]
        base = sampler.score(result[group], classes, settings, seed=seed)
        region = np.zeros((len(group), num_tokens), dtype=bool)
        for row in range(len(group)):
            region[row, rng.choice(num_tokens, size=int(counts[group[0]]), replace=False)] = True
        stream = sampler.regenerate_region(
            base, region, settings.replace(num_rounds=0), seed=seed + int(group[0])
        )
        trace, _, _ = _timed_steps(stream)
        result[group] = trace.codes_at(-1)
    return result
