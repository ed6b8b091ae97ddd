"""Self-calibrated refinement (paper eq. 2-6, method §6).

Each round: pick the c lowest scores among the cells allowed to change (I), regenerate them
against the current image (Gen at ``[p(I)]``), judge the candidates in place, and accept per
cell where the new score beats the old one. Untouched scores stay. Judging is the scorer's
(``sampling.judge``): the quality head reads the candidates' code slots ``[x'(I)]`` against the
stored scores; the confidence scorer adds position queries ``[j(I)]`` that see the image without
I's codes and compares the token head's probability of each candidate with that of the code it
would replace. Either way the candidates' code slots are written, so an accepted one becomes
the cell's code in the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from scan_core.model.network import SLOT_CODE, SLOT_POSITION
from scan_core.model.sequence import refine_round_masks
from scan_core.sampling.canvas import Canvas
from scan_core.sampling.draw import sample_codes
from scan_core.sampling.judge import confidence_round_mask
from scan_core.sampling.settings import SamplerSettings


@dataclass
class RoundEvent:
    """One refinement round: where it looked, what it proposed, what it kept."""

    cells: Tensor  # (B, c)
    codes: Tensor  # (B, c) candidates
    probs: Tensor  # (B, c)
    accepted: Tensor  # (B, c) bool


def select_worst(scores: Tensor, allowed: Tensor, count: int) -> Tensor:
    """The ``count`` lowest-scoring allowed cells per image (B, count), lowest first (eq. 2)."""
    if int(allowed.sum(dim=1).min()) < count:
        raise ValueError(
            f"tokens_per_round (c) = {count} exceeds the {int(allowed.sum(1).min())} cells that "
            "may change (unlocked, inside the region); lower c or unlock more cells"
        )
    masked = torch.where(allowed, scores.nan_to_num(nan=-1.0), torch.full_like(scores, 2.0))
    return masked.topk(count, dim=1, largest=False).indices


def round_slots(count: int, scorer: str = "head") -> int:
    """Cache slots one round over ``count`` cells reserves: p(I), the candidates x'(I) and,
    under the confidence scorer, its queries j(I)."""
    return (3 if scorer == "confidence" else 2) * count


def refinement_slots(settings: SamplerSettings, rounds: int) -> int:
    """Cache slots ``rounds`` rounds reserve. Cached context: every round's slots stay. Exact
    context: after each round the cache is rebuilt from slot 0 (a prefill no longer than the
    image it replaces) or rewound to where the rounds began, so one round's slots suffice."""
    if rounds == 0:
        return 0
    kept = 1 if settings.context == "exact" else rounds
    return kept * round_slots(settings.tokens_per_round, settings.scorer)


@dataclass
class _RoundSlots:
    """The slots of one round, (c,) each: p(I), x'(I) and j(I) (empty under the head)."""

    p: Tensor
    x: Tensor
    judge: Tensor


def _reserve_round(canvas: Canvas, count: int) -> _RoundSlots:
    slots = canvas.reserve(round_slots(count, canvas.scorer))
    return _RoundSlots(slots[:count], slots[count : 2 * count], slots[2 * count :])


def _draw(canvas: Canvas, hidden: Tensor, settings: SamplerSettings, generator) -> tuple:
    """Candidate codes and their probabilities from the hidden states of p slots."""
    logits = canvas.token_logits(hidden, settings.cfg_scale)
    return sample_codes(logits, settings.temperature, settings.top_k, settings.top_p, generator)


@dataclass
class _Queries:
    """One kind of query in a forward. Shapes: kinds, values, cells (B, S); slots (S,);
    mask (B, S, capacity)."""

    kinds: Tensor
    values: Tensor
    cells: Tensor
    slots: Tensor
    mask: Tensor


def _forward(canvas: Canvas, queries: list[_Queries]) -> Tensor:
    """All queries in one forward, side by side; hidden (rows, S1 + S2 + ..., D)."""

    def joined(field: str) -> Tensor:  # slots are (S,); the rest are batch-first
        return torch.cat([getattr(q, field) for q in queries], dim=0 if field == "slots" else 1)

    fields = ("kinds", "values", "cells", "slots", "mask")
    return canvas.forward(*(joined(field) for field in fields))


def _proposing(canvas: Canvas, cells: Tensor, slots: _RoundSlots) -> _Queries:
    """p(I): position queries for ``cells`` (B, c) that see the current image, the codes they
    replace included, and their own block."""
    replaced = canvas.code_slot.gather(1, cells)
    p_mask, _ = refine_round_masks(canvas.visible, slots.p, slots.x, replaced)
    kinds = torch.full_like(cells, SLOT_POSITION)
    return _Queries(kinds, torch.zeros_like(cells), cells, slots.p, p_mask)


def _judging(canvas: Canvas, cells: Tensor, codes: Tensor, slots: _RoundSlots) -> list[_Queries]:
    """Queries that judge candidates ``codes`` at ``cells`` (B, c) against the image as it is
    now: their code slots x'(I), which see it without I's codes (and p(I), and their block),
    and under the confidence scorer the queries j(I) (``judge.confidence_round_mask``)."""
    replaced = canvas.code_slot.gather(1, cells)
    x_mask = refine_round_masks(canvas.visible, slots.p, slots.x, replaced)[1]
    queries = [_Queries(torch.full_like(cells, SLOT_CODE), codes, cells, slots.x, x_mask)]
    if canvas.scorer == "confidence":
        j_mask = confidence_round_mask(canvas, cells, slots.judge)
        kinds, values = torch.full_like(cells, SLOT_POSITION), torch.zeros_like(cells)
        queries.append(_Queries(kinds, values, cells, slots.judge, j_mask))
    return queries


def _accept(canvas: Canvas, hidden: Tensor, cells: Tensor, codes: Tensor, x_slots: Tensor):
    """Greedy acceptance (eq. 5-6): keep a candidate only where its score beats the old code's.

    ``hidden`` (rows, S, D) starts with the :func:`_judging` queries. The quality head scores
    the candidates at x'(I) against the stored scores; the confidence scorer reads both the
    candidate's and the old code's probability at j(I), in the same context."""
    count = cells.shape[1]
    if canvas.scorer == "confidence":
        judged = hidden[:, count : 2 * count]
        new = canvas.confidence(judged, codes)
        old = canvas.confidence(judged, canvas.codes.gather(1, cells))
    else:
        new, old = canvas.quality(hidden[:, :count]), canvas.scores.gather(1, cells)
    accepted = new > old.nan_to_num(nan=-1.0)
    rows = torch.arange(canvas.batch_size, device=cells.device).view(-1, 1).expand_as(cells)
    replaced = canvas.code_slot.gather(1, cells)
    slots = x_slots.expand_as(cells)
    canvas.visible[rows[accepted], replaced[accepted]] = False
    canvas.visible[rows[accepted], slots[accepted]] = True
    canvas.code_slot[rows[accepted], cells[accepted]] = slots[accepted]
    canvas.codes[rows[accepted], cells[accepted]] = codes[accepted]
    canvas.scores[rows[accepted], cells[accepted]] = new[accepted]
    return accepted


def refine_rounds(
    canvas: Canvas,
    settings: SamplerSettings,
    allowed: Tensor,
    generator: torch.Generator | None,
    rebuild: Callable[[], None] | None = None,
) -> Iterator[RoundEvent]:
    """Run up to ``settings.num_rounds`` rounds over the cells where ``allowed`` (B, N).

    ``rebuild`` (exact context) re-encodes the current image after a round that accepted
    something; without it (cached context) the round's slots stay and the mask hides old ones.
    """
    if settings.lookahead:
        yield from _lookahead_rounds(canvas, settings, allowed, generator)
        return
    round_start, idle = canvas.next_slot, 0
    for _ in range(settings.num_rounds):
        if _converged(canvas, settings, allowed, idle):
            return
        cells = select_worst(canvas.scores, allowed, settings.tokens_per_round)
        slots = _reserve_round(canvas, cells.shape[1])
        hidden = _forward(canvas, [_proposing(canvas, cells, slots)])
        codes, probs = _draw(canvas, hidden, settings, generator)
        hidden = _forward(canvas, _judging(canvas, cells, codes, slots))
        accepted = _accept(canvas, hidden, cells, codes, slots.x)
        idle = 0 if bool(accepted.any()) else idle + 1
        if rebuild is not None:
            if bool(accepted.any()):
                rebuild()
            else:
                canvas.rewind(round_start)  # nothing changed: reuse the round's slots
        yield RoundEvent(cells, codes, probs, accepted)


def _converged(canvas: Canvas, settings: SamplerSettings, allowed: Tensor, idle: int) -> bool:
    if settings.patience and idle >= settings.patience:
        return True
    if settings.score_threshold < 1.0:
        worst = torch.where(allowed, canvas.scores, torch.ones_like(canvas.scores)).min()
        return bool(worst > settings.score_threshold)
    return False


@dataclass
class _Pending:
    """Candidates drawn in one forward of lookahead, to be judged in the next."""

    cells: Tensor  # (B, c)
    codes: Tensor  # (B, c)
    probs: Tensor  # (B, c)
    slots: _RoundSlots  # the candidates will be written at slots.x


def _lookahead_rounds(canvas, settings, allowed, generator) -> Iterator[RoundEvent]:
    """One forward per round: evaluate round t's candidates alongside regenerating round t+1.

    Round t+1's cells are picked from the scores known before round t is judged, outside round
    t's cells, and its queries see the image without round t's candidates. Candidates are
    always judged against the image as it is when they are evaluated.
    """
    pending, idle, rounds = None, 0, settings.num_rounds
    for index in range(rounds + 1):
        proposing = index < rounds and not _converged(canvas, settings, allowed, idle)
        queries = (
            [] if pending is None else _judging(canvas, pending.cells, pending.codes, pending.slots)
        )
        width = sum(q.cells.shape[1] for q in queries)
        if proposing:
            cells = select_worst(
                canvas.scores, _outside(allowed, pending), settings.tokens_per_round
            )
            slots = _reserve_round(canvas, cells.shape[1])
            queries.append(_proposing(canvas, cells, slots))
        if not queries:
            return
        hidden = _forward(canvas, queries)
        if pending is not None:
            accepted = _accept(canvas, hidden, pending.cells, pending.codes, pending.slots.x)
            idle = 0 if bool(accepted.any()) else idle + 1
            yield RoundEvent(pending.cells, pending.codes, pending.probs, accepted)
        # A stop rule that fires now discards the round proposed in the same forward.
        if not proposing or _converged(canvas, settings, allowed, idle):
            return
        codes, probs = _draw(canvas, hidden[:, width:], settings, generator)
        pending = _Pending(cells, codes, probs, slots)


def _outside(allowed: Tensor, pending: _Pending | None) -> Tensor:
    """``allowed`` (B, N) without the pending round's cells."""
    if pending is None:
        return allowed
    return allowed.clone().scatter_(1, pending.cells, False)
