"""Judging cells: the quality head, or the token head's confidence (method §6, "Scorers").

A *scorer* (``SamplerSettings.scorer``) gives every cell of an image a score in [0, 1];
refinement regenerates the lowest-scoring cells.

- "head": the quality head's P(good) at the cell's code slot (method §5). Generation records it
  in the generation layout; :func:`rescore` judges a finished image in full context.
- "confidence": the token head's probability of the cell's current code (conditional half,
  unguided), read at a position query for the cell that sees the image without the codes of its
  group. It needs no quality head, so any model that predicts a cell from any set of others
  (RandAR's weights) can be refined. It gives no scores in the generation layout: a finished
  image is always judged in full context.

Full context, for both: the cells are cut into groups of c (``tokens_per_round``, the size of a
refinement round) spread over the grid (cell i with i + N/g, i + 2N/g, ...), so no group hides a
whole neighbourhood; each cell is judged seeing the current image except its group's codes. All
groups run in one forward, and its slots stay hidden afterwards, like rejected candidates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scan_core.model.network import SLOT_CODE, SLOT_POSITION
from scan_core.sampling.canvas import Canvas
from scan_core.sampling.settings import SamplerSettings


def has_trained_quality_head(model) -> bool:
    """Whether the model's quality head can judge: it has one, and no loader marked it as
    freshly added (``Transformer.quality_head_trained``; a RandAR file loaded as SCAN)."""
    return model.config.has_quality_head and getattr(model, "quality_head_trained", True)


def resolve_scorer(settings: SamplerSettings, model, model_id: str = "") -> SamplerSettings:
    """``settings`` with scorer "auto" replaced by the model's: "head" when its quality head is
    trained, else "confidence". Raises ValueError when "head" is asked of a model without one."""
    if settings.scorer == "auto":
        scorer = "head" if has_trained_quality_head(model) else "confidence"
        return settings.replace(scorer=scorer)
    if settings.scorer == "head" and not model.config.has_quality_head:
        name = f"model {model_id!r}" if model_id else "this model"
        raise ValueError(
            f"invalid sampler setting: scorer 'head' needs a quality head, and {name} "
            f"(arch {model.config.arch}) has none; use scorer 'confidence' (--scorer "
            "confidence), which judges each cell by the token head's probability of its code"
        )
    return settings


def spread_groups(num_tokens: int, count: int, device: torch.device | str) -> Tensor:
    """(N, N) bool: True where cells i and j share a group; groups hold ``count`` cells spread
    over the grid (cell i, i + N/g, i + 2N/g, ... for g = ceil(N / count) groups)."""
    cells = torch.arange(num_tokens, device=device)
    group = cells % math.ceil(num_tokens / count)
    return group.view(-1, 1) == group.view(1, -1)


def rescore_slots(num_tokens: int) -> int:
    """Cache slots :func:`rescore` reserves: a p and a code slot for every cell."""
    return 2 * num_tokens


def confidence_slots(num_tokens: int) -> int:
    """Cache slots :func:`confidence_scores` reserves: a position query for every cell."""
    return num_tokens


def full_context_slots(num_tokens: int, scorer: str) -> int:
    """Cache slots one full-context judgement (:func:`judge_in_full_context`) reserves."""
    return confidence_slots(num_tokens) if scorer == "confidence" else rescore_slots(num_tokens)


def judge_in_full_context(canvas: Canvas, tokens_per_round: int) -> Tensor:
    """Every cell of the complete image judged in full context by the canvas's scorer (B, N)."""
    if bool((canvas.codes < 0).any()):
        raise ValueError("judging in full context needs a complete image (every cell known)")
    if canvas.scorer == "confidence":
        return confidence_scores(canvas, tokens_per_round)
    return rescore(canvas, tokens_per_round)


def _without_group_codes(canvas: Canvas, same: Tensor) -> Tensor:
    """(B, N, capacity): the current image for one query per cell, each without the codes of
    its cell's group (``same`` (N, N), from :func:`spread_groups`)."""
    batch, n = canvas.codes.shape
    mask = canvas.visible.unsqueeze(1).repeat(1, n, 1)
    replaced = canvas.code_slot.unsqueeze(1).expand(batch, n, n)
    mask.scatter_(2, replaced, ~same.expand(batch, n, n))
    return mask


def rescore(canvas: Canvas, tokens_per_round: int) -> Tensor:
    """The quality head's judgement of every cell of the complete image in full context (B, N).

    Scores recorded while generating come from the generation layout: a cell of an early set was
    judged seeing only the sets before it (the first set, nothing but the class), so those scores
    say little. Here each cell is judged the way a refinement round judges a candidate in place
    (``[p(I)] [x'(I)]``, :func:`~model.sequence.refine_round_masks`), with its group as I: its
    code query sees the image without the group's codes, the group's p slots and its code block.
    All groups run in one forward of 2N slots, each masked to its own round.
    """
    batch, n = canvas.codes.shape
    same = spread_groups(n, tokens_per_round, canvas.codes.device)  # (N, N): query i, cell j
    slots = canvas.reserve(rescore_slots(n))
    p_slots, x_slots = slots[:n], slots[n:]
    mask = canvas.visible.unsqueeze(1).repeat(1, 2 * n, 1)  # (B, 2N, capacity)
    mask[:, n:] = _without_group_codes(canvas, same)  # p queries see the group's codes
    mask[:, :, p_slots] = same.repeat(2, 1).unsqueeze(0)  # every query sees its group's p slots
    mask[:, n:, x_slots] = same.unsqueeze(0)  # code queries see their group's code block
    kinds = torch.cat(
        [torch.full_like(canvas.codes, SLOT_POSITION), torch.full_like(canvas.codes, SLOT_CODE)],
        dim=1,
    )
    values = torch.cat([torch.zeros_like(canvas.codes), canvas.codes], dim=1)
    cells = torch.arange(n, device=canvas.codes.device)
    hidden = canvas.forward(kinds, values, cells.repeat(batch, 2), slots, mask)
    return canvas.quality(hidden[:, n:])


def confidence_scores(canvas: Canvas, tokens_per_round: int) -> Tensor:
    """The token head's confidence in every cell of the complete image, in full context (B, N).

    One position query per cell, all in one forward of N slots: the query of cell n sees the
    current image without the codes of n's group, plus the group's own queries (a block, like a
    round's p(I)). Its score is the conditional probability of n's current code
    (``Canvas.confidence``).
    """
    batch, n = canvas.codes.shape
    same = spread_groups(n, tokens_per_round, canvas.codes.device)
    slots = canvas.reserve(confidence_slots(n))
    mask = _without_group_codes(canvas, same)
    mask[:, :, slots] = same.unsqueeze(0)
    cells = torch.arange(n, device=canvas.codes.device).expand(batch, -1)
    kinds = torch.full_like(cells, SLOT_POSITION)
    hidden = canvas.forward(kinds, torch.zeros_like(cells), cells, slots, mask)
    return canvas.confidence(hidden, canvas.codes)


def confidence_round_mask(canvas: Canvas, cells: Tensor, judge_slots: Tensor) -> Tensor:
    """(B, c, capacity): confidence queries j(I) of a round over ``cells`` (B, c) see the current
    image without the codes at I, plus their own block."""
    mask = canvas.visible.clone()
    mask.scatter_(1, canvas.code_slot.gather(1, cells), False)
    mask[:, judge_slots] = True
    return mask.unsqueeze(1).expand(-1, cells.shape[1], -1)
