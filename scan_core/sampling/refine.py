"""Self-calibrated refinement (paper eq. 2-6, method §6).

Each round: pick the c lowest quality scores among the cells allowed to change (I), regenerate
them against the current image (Gen at ``[p(I)]``), score the candidates in place (Eva at
``[x'(I)]``), and accept per cell where the new score beats the old one. Untouched scores stay.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from scan_core.model.network import SLOT_CODE, SLOT_POSITION
from scan_core.model.sequence import refine_round_masks
from scan_core.sampling.canvas import Canvas
from scan_core.sampling.draw import sample_codes
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


def round_slots(count: int) -> int:
    """Cache slots one round over ``count`` cells reserves: p(I), then the candidates x'(I)."""
    return 2 * count


def refinement_slots(settings: SamplerSettings, rounds: int) -> int:
    """Cache slots ``rounds`` rounds reserve. Cached context: every round's slots stay. Exact
    context: after each round the cache is rebuilt from slot 0 (a prefill no longer than the
    image it replaces) or rewound to where the rounds began, so one round's slots suffice."""
    if rounds == 0:
        return 0
    kept = 1 if settings.context == "exact" else rounds
    return kept * round_slots(settings.tokens_per_round)


def rescore_slots(num_tokens: int) -> int:
    """Cache slots :func:`rescore` reserves: a p and a code slot for every cell."""
    return 2 * num_tokens


def _reserve_round(canvas: Canvas, count: int) -> tuple[Tensor, Tensor]:
    """p slots and candidate (x) slots (count,) each for a round over ``count`` cells."""
    slots = canvas.reserve(round_slots(count))
    return slots[:count], slots[count:]


def _draw(canvas: Canvas, hidden: Tensor, settings: SamplerSettings, generator) -> tuple:
    """Candidate codes and their probabilities from the hidden states of p slots."""
    logits = canvas.token_logits(hidden, settings.cfg_scale)
    return sample_codes(logits, settings.temperature, settings.top_k, settings.top_p, generator)


def _propose(canvas: Canvas, cells: Tensor, settings: SamplerSettings, generator) -> tuple:
    """Run [p(I)] against the current image; return candidates, probs and the round's slots."""
    p_slots, x_slots = _reserve_round(canvas, cells.shape[1])
    replaced = canvas.code_slot.gather(1, cells)
    p_mask, x_mask = refine_round_masks(canvas.visible, p_slots, x_slots, replaced)
    kinds = torch.full_like(cells, SLOT_POSITION)
    hidden = canvas.forward(kinds, torch.zeros_like(cells), cells, p_slots, p_mask)
    codes, probs = _draw(canvas, hidden, settings, generator)
    return codes, probs, x_slots, x_mask


def _accept(canvas: Canvas, cells: Tensor, codes: Tensor, new_scores: Tensor, x_slots: Tensor):
    """Greedy acceptance (eq. 5-6): keep a candidate only where its score beats the old one."""
    old = canvas.scores.gather(1, cells).nan_to_num(nan=-1.0)
    accepted = new_scores > old
    rows = torch.arange(canvas.batch_size, device=cells.device).view(-1, 1).expand_as(cells)
    replaced = canvas.code_slot.gather(1, cells)
    slots = x_slots.expand_as(cells)
    canvas.visible[rows[accepted], replaced[accepted]] = False
    canvas.visible[rows[accepted], slots[accepted]] = True
    canvas.code_slot[rows[accepted], cells[accepted]] = slots[accepted]
    canvas.codes[rows[accepted], cells[accepted]] = codes[accepted]
    canvas.scores[rows[accepted], cells[accepted]] = new_scores[accepted]
    return accepted


def _evaluate(canvas: Canvas, cells, codes, x_slots, x_mask) -> Tensor:
    kinds = torch.full_like(cells, SLOT_CODE)
    hidden = canvas.forward(kinds, codes, cells, x_slots, x_mask)
    return canvas.quality(hidden)


def rescore(canvas: Canvas, tokens_per_round: int) -> Tensor:
    """Judge every cell of the current (complete) image in full context; the scores (B, N).

    Scores recorded while generating come from the generation layout: a cell of an early set was
    judged seeing only the sets before it (the first set, nothing but the class), so those scores
    say little. Here each cell is judged the way a refinement round judges a candidate in place
    (``[p(I)] [x'(I)]``, :func:`~model.sequence.refine_round_masks`): it sees the whole image
    except its group's own codes. Groups hold ``tokens_per_round`` cells (the c that rounds are
    trained with) spread over the grid (cell i with i + N/g, i + 2N/g, ...), so no group hides a
    whole neighbourhood. All groups run in one forward of 2N slots, each masked to its own round.
    Nothing visible changes: the new slots stay hidden, like rejected candidates.
    """
    batch, n = canvas.codes.shape
    if bool((canvas.codes < 0).any()):
        raise ValueError("rescore needs a complete image (every cell known)")
    device = canvas.codes.device
    cells = torch.arange(n, device=device)
    group = cells % math.ceil(n / tokens_per_round)
    same = group.view(-1, 1) == group.view(1, -1)  # (N, N): query cell i, other cell j
    slots = canvas.reserve(rescore_slots(n))
    p_slots, x_slots = slots[:n], slots[n:]
    mask = canvas.visible.unsqueeze(1).repeat(1, 2 * n, 1)  # (B, 2N, capacity)
    code_rows = mask[:, n:]
    replaced = canvas.code_slot.unsqueeze(1).expand(batch, n, n)
    code_rows.scatter_(2, replaced, ~same.expand(batch, n, n))  # hide the group's codes
    mask[:, :, p_slots] = same.repeat(2, 1).unsqueeze(0)  # every query sees its group's p slots
    code_rows[:, :, x_slots] = same.unsqueeze(0)  # code queries see their group's code block
    kinds = torch.cat(
        [torch.full_like(canvas.codes, SLOT_POSITION), torch.full_like(canvas.codes, SLOT_CODE)],
        dim=1,
    )
    values = torch.cat([torch.zeros_like(canvas.codes), canvas.codes], dim=1)
    hidden = canvas.forward(kinds, values, cells.repeat(batch, 2), slots, mask)
    return canvas.quality(hidden[:, n:])


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
        codes, probs, x_slots, x_mask = _propose(canvas, cells, settings, generator)
        new_scores = _evaluate(canvas, cells, codes, x_slots, x_mask)
        accepted = _accept(canvas, cells, codes, new_scores, x_slots)
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
    p_slots: Tensor  # (c,)
    x_slots: Tensor  # (c,) where the candidates will be written


@dataclass
class _Queries:
    """One kind of query in a lookahead forward. Shapes: kinds, values, cells (B, S);
    slots (S,); mask (B, S, capacity)."""

    kinds: Tensor
    values: Tensor
    cells: Tensor
    slots: Tensor
    mask: Tensor


def _lookahead_rounds(canvas, settings, allowed, generator) -> Iterator[RoundEvent]:
    """One forward per round: evaluate round t's candidates alongside regenerating round t+1.

    Round t+1's cells are picked from the scores known before round t is judged (so they never
    include round t's cells), and its queries see the image without round t's candidates.
    Candidates are always judged against the image as it is when they are evaluated.
    """
    pending, idle, rounds = None, 0, settings.num_rounds
    for index in range(rounds + 1):
        proposing = index < rounds and not _converged(canvas, settings, allowed, idle)
        queries = [] if pending is None else [_judging(canvas, pending)]
        if proposing:
            proposed, next_x_slots = _proposing(canvas, settings, allowed, pending)
            queries.append(proposed)
        if not queries:
            return
        hidden = _forward(canvas, queries)
        width = 0
        if pending is not None:
            width = pending.cells.shape[1]
            scores = canvas.quality(hidden[:, :width])
            accepted = _accept(canvas, pending.cells, pending.codes, scores, pending.x_slots)
            idle = 0 if bool(accepted.any()) else idle + 1
            yield RoundEvent(pending.cells, pending.codes, pending.probs, accepted)
        # A stop rule that fires now discards the round proposed in the same forward.
        if not proposing or _converged(canvas, settings, allowed, idle):
            return
        codes, probs = _draw(canvas, hidden[:, width:], settings, generator)
        pending = _Pending(proposed.cells, codes, probs, proposed.slots, next_x_slots)


def _forward(canvas: Canvas, queries: list[_Queries]) -> Tensor:
    """All queries in one forward, side by side; hidden (rows, S1 + S2, D)."""

    def joined(field: str) -> Tensor:  # slots are (S,); the rest are batch-first
        return torch.cat([getattr(q, field) for q in queries], dim=0 if field == "slots" else 1)

    fields = ("kinds", "values", "cells", "slots", "mask")
    return canvas.forward(*(joined(field) for field in fields))


def _judging(canvas: Canvas, pending: _Pending) -> _Queries:
    """Code queries that judge the pending candidates against the image as it is now."""
    cells = pending.cells
    x_mask = _code_mask(canvas, cells, pending.p_slots, pending.x_slots)
    kinds = torch.full_like(cells, SLOT_CODE)
    return _Queries(kinds, pending.codes, cells, pending.x_slots, x_mask)


def _proposing(canvas: Canvas, settings, allowed: Tensor, pending: _Pending | None) -> tuple:
    """p queries for the next round (the worst allowed cells outside the pending round's) and
    the slots its candidates will take."""
    if pending is not None:
        allowed = allowed.clone()
        allowed.scatter_(1, pending.cells, False)
    cells = select_worst(canvas.scores, allowed, settings.tokens_per_round)
    p_slots, x_slots = _reserve_round(canvas, cells.shape[1])
    replaced = canvas.code_slot.gather(1, cells)
    p_mask, _ = refine_round_masks(canvas.visible, p_slots, x_slots, replaced)
    kinds = torch.full_like(cells, SLOT_POSITION)
    return _Queries(kinds, torch.zeros_like(cells), cells, p_slots, p_mask), x_slots


def _code_mask(canvas: Canvas, cells: Tensor, p_slots: Tensor, x_slots: Tensor) -> Tensor:
    """Mask for judging candidates at ``cells`` against the image as it is now."""
    replaced = canvas.code_slot.gather(1, cells)
    return refine_round_masks(canvas.visible, p_slots, x_slots, replaced)[1]
