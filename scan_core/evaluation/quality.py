"""Does the scorer find flaws? AUROC of ``1 - score`` for corrupted cells (method §5 sources) on
held-out code grids, and for the cells refinement later changed in the model's own images.

Held-out grids are scored the way the sampler scores an uploaded image (``ScanSampler.score``:
every cell in full context), by the settings' scorer (the quality head or the token head's
confidence, ``sampling.judge``), because those scores are what refinement ranks.
"""

from __future__ import annotations

import numpy as np
import torch

from scan_core.sampling.sampler import ScanSampler
from scan_core.sampling.schedule import cosine_set_sizes
from scan_core.sampling.settings import SamplerSettings
from scan_core.training.metrics import auroc
from scan_core.training.negatives import (
    NEGATIVE_SOURCES,
    draw_negatives,
    negative_positions,
    random_order,
    teacher_predictions,
)


def corrupt(
    truth: torch.Tensor,
    source: str,
    ratio: float,
    vocab_size: int,
    teacher: torch.Tensor | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ``round(ratio * N)`` random cells per grid by negatives of one source.

    Returns (codes, flawed) with flawed True where the code differs from the truth (a negative
    that happens to equal the truth is no flaw)."""
    batch, num_tokens = truth.shape
    negatives = draw_negatives(truth, vocab_size, (source,), teacher, generator)
    chosen = negative_positions(batch, num_tokens, ratio, generator, truth.device)
    codes = torch.where(chosen, negatives, truth)
    return codes, codes != truth


def _teacher(sampler: ScanSampler, truth, classes, settings, generator) -> torch.Tensor:
    """The model's own sample for every cell under ground-truth context (random order)."""
    num_tokens = truth.shape[1]
    order = random_order(truth.shape[0], num_tokens, generator, truth.device)
    sizes = cosine_set_sizes(num_tokens, settings.num_steps)
    model = sampler.model

    def token_head(kinds, values, cells, mask, gen_slots, eva_slots):
        # ScanHeads without the quality head, which a RandAR model lacks (teachers need none)
        return model.token_logits(model(kinds, values, cells, mask)[:, gen_slots]), None

    with torch.inference_mode():
        return teacher_predictions(token_head, classes, truth, order, sizes, True, generator)


def detection_auroc(
    sampler: ScanSampler,
    codes: np.ndarray,
    class_ids: np.ndarray,
    settings: SamplerSettings,
    ratio: float = 0.25,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, float]:
    """AUROC of ``1 - score`` (flawed = positive) per negative source on held-out grids (B, N),
    each cell judged by ``settings.scorer``."""
    results = {}
    for source in NEGATIVE_SOURCES:
        generator = torch.Generator().manual_seed(seed)
        scores, flaws = [], []
        for start in range(0, len(codes), batch_size):
            truth = torch.as_tensor(codes[start : start + batch_size], dtype=torch.long)
            classes = [int(c) for c in class_ids[start : start + batch_size]]
            teacher = None
            if source == "teacher":
                teacher = _teacher(
                    sampler,
                    truth.to(sampler.device),
                    torch.as_tensor(classes, device=sampler.device),
                    settings,
                    torch.Generator(sampler.device).manual_seed(seed + start),
                ).cpu()
            bad, flawed = corrupt(
                truth, source, ratio, sampler.config.vocab_size, teacher, generator
            )
            trace = sampler.score(bad.numpy(), classes, settings, seed=seed + start)
            scores.append(trace.scores_at(-1))
            flaws.append(flawed.numpy())
        flat_scores = torch.as_tensor(1.0 - np.concatenate(scores))
        results[source] = auroc(flat_scores, torch.as_tensor(np.concatenate(flaws)))
    return results


def changed_cell_auroc(initial_scores: np.ndarray, changed: np.ndarray) -> float:
    """AUROC of ``1 - score`` before refinement for the cells refinement went on to change."""
    return auroc(torch.as_tensor(1.0 - initial_scores), torch.as_tensor(changed))
