"""Next-set decoding on a ``Canvas``: generation, forced regeneration, and prefill (method §4, §6).

Generation is forced regeneration of every cell on an empty canvas: both decode cells in sets,
each set seeing the previous ones, and accept every drawn code. Chunk j feeds
``[x(set j-1)] [p(set j)]`` (the first chunk starts with the class token), reads the quality
scores of set j-1 and the token logits of set j; one last chunk ``[x(last set)]`` scores it.
Under the confidence scorer the code chunks are still fed (they are the image's context), but
their scores stay unknown (``Canvas.layout_scores``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from scan_core.model.network import SLOT_CLASS, SLOT_CODE, SLOT_POSITION
from scan_core.model.sequence import set_boundaries
from scan_core.sampling.canvas import Canvas
from scan_core.sampling.draw import sample_codes
from scan_core.sampling.schedule import cfg_scale_at
from scan_core.sampling.settings import SamplerSettings


@dataclass
class SetEvent:
    """What one chunk did: the set it drew (kind "generate"/"forced") or scored ("score")."""

    kind: str
    cells: Tensor  # (B, S)
    codes: Tensor  # (B, S)
    probs: Tensor  # (B, S), NaN for a pure scoring chunk


@dataclass
class _Blocks:
    """Slots planned for one decoding operation (class?, then p/x per set)."""

    class_slot: Tensor | None
    position_slots: list[Tensor]
    code_slots: list[Tensor]


def decode_slots(num_cells: int, with_class: bool) -> int:
    """Cache slots one decoding (or prefill) of ``num_cells`` cells reserves: a p and a code
    slot per cell, and the class slot when it opens the sequence."""
    return int(with_class) + 2 * num_cells


def _plan_slots(canvas: Canvas, set_sizes: list[int], with_class: bool) -> _Blocks:
    """Reserve the operation's slots in sequence order: class?, then p and x of each set."""
    slots = canvas.reserve(decode_slots(sum(set_sizes), with_class))
    class_slot, start = (slots[:1], 1) if with_class else (None, 0)
    canvas.op_block[slots[:start]] = 0
    positions, codes = [], []
    for j, size in enumerate(set_sizes):
        positions.append(slots[start : start + size])
        codes.append(slots[start + size : start + 2 * size])
        canvas.op_block[positions[-1]] = 2 * j + 1
        canvas.op_block[codes[-1]] = 2 * j + 2
        start += 2 * size
    return _Blocks(class_slot, positions, codes)


def _chunk(canvas: Canvas, blocks: _Blocks, j: int, cell_sets: list[Tensor]):
    """kinds, values, cells (B, L) and slots (L,) of chunk j."""
    parts = []
    batch = canvas.batch_size
    if j == 0 and blocks.class_slot is not None:
        cells = torch.full((batch, 1), -1, dtype=torch.long, device=canvas.codes.device)
        parts.append((SLOT_CLASS, canvas.class_ids.view(-1, 1), cells, blocks.class_slot))
    if j > 0:
        cells = cell_sets[j - 1]
        parts.append((SLOT_CODE, canvas.codes.gather(1, cells), cells, blocks.code_slots[j - 1]))
    if j < len(cell_sets):
        cells = cell_sets[j]
        parts.append((SLOT_POSITION, torch.zeros_like(cells), cells, blocks.position_slots[j]))
    kinds = torch.cat([torch.full_like(p[2], p[0]) for p in parts], dim=1)
    values = torch.cat([p[1] for p in parts], dim=1)
    cells = torch.cat([p[2] for p in parts], dim=1)
    slots = torch.cat([p[3] for p in parts])
    return kinds, values, cells, slots


def decode_sets(
    canvas: Canvas,
    cells: Tensor,
    set_sizes: list[int],
    settings: SamplerSettings,
    generator: torch.Generator | None,
    kind: str = "generate",
) -> Iterator[SetEvent]:
    """Draw codes for ``cells`` (B, M), taken in that order in sets of ``set_sizes``.

    The cells' old codes (if any) must already be hidden from ``canvas.visible``. Yields one
    event per set drawn and a final "score" event. Afterwards the new slots form the context.
    """
    with_class = canvas.next_slot == 0
    blocks = _plan_slots(canvas, set_sizes, with_class)
    bounds = set_boundaries(set_sizes)
    cell_sets = [cells[:, a:b] for a, b in bounds]
    num_tokens = canvas.codes.shape[1]
    for j in range(len(cell_sets) + 1):
        kinds, values, chunk_cells, slots = _chunk(canvas, blocks, j, cell_sets)
        mask = canvas.chunk_mask(canvas.op_block[slots])
        hidden = canvas.forward(kinds, values, chunk_cells, slots, mask)
        offset = 1 if (j == 0 and with_class) else 0
        if j > 0:
            previous = cell_sets[j - 1]
            width = previous.shape[1]
            scores = canvas.layout_scores(hidden[:, offset : offset + width])
            canvas.scores.scatter_(1, previous, scores)
            offset += width
        if j == len(cell_sets):
            nan = torch.full(previous.shape, float("nan"), device=previous.device)
            yield SetEvent("score", previous, canvas.codes.gather(1, previous), nan)
            break
        done = int((canvas.codes[0] >= 0).sum())
        scale = cfg_scale_at(done / num_tokens, settings.cfg_start, settings.cfg_scale)
        logits = canvas.token_logits(hidden[:, offset:], scale)
        codes, probs = sample_codes(
            logits, settings.temperature, settings.top_k, settings.top_p, generator
        )
        canvas.codes.scatter_(1, cell_sets[j], codes)
        yield SetEvent(kind, cell_sets[j], codes, probs)
    _adopt(canvas, blocks, cells)


def _adopt(canvas: Canvas, blocks: _Blocks, cells: Tensor) -> None:
    """Make the operation's slots the context: one p and one code slot per decoded cell."""
    batch = canvas.batch_size
    rows = torch.arange(batch, device=cells.device).view(-1, 1)
    old_p = canvas.position_slot.gather(1, cells)
    hide = old_p[old_p >= 0]
    canvas.visible[rows.expand_as(old_p)[old_p >= 0], hide] = False
    p_slots = torch.cat(blocks.position_slots).expand(batch, -1)
    x_slots = torch.cat(blocks.code_slots).expand(batch, -1)
    canvas.position_slot.scatter_(1, cells, p_slots)
    canvas.code_slot.scatter_(1, cells, x_slots)
    canvas.visible[rows, p_slots] = True
    canvas.visible[rows, x_slots] = True
    if blocks.class_slot is not None:
        canvas.visible[:, blocks.class_slot] = True
    canvas.end_operation()


def hide_cells(canvas: Canvas, cells: Tensor) -> None:
    """Remove the current codes of ``cells`` (B, M) from the context before redrawing them."""
    rows = torch.arange(canvas.batch_size, device=cells.device).view(-1, 1).expand_as(cells)
    slots = canvas.code_slot.gather(1, cells)
    known = slots >= 0
    canvas.visible[rows[known], slots[known]] = False
    canvas.codes.scatter_(1, cells, -1)
    canvas.scores.scatter_(1, cells, float("nan"))


def prefill(canvas: Canvas, order: Tensor, set_sizes: list[int], codes: Tensor) -> Tensor:
    """Write the SCAN sequence of a known grid into an empty canvas in one forward.

    ``order`` (B, M) lists the known cells in generation order; ``codes`` (B, N) the grid.
    Returns the scores (B, M) the network gives those cells in that layout
    (``Canvas.layout_scores``).
    """
    if canvas.next_slot != 0:
        raise RuntimeError("prefill needs an empty canvas (rewind(0) first)")
    canvas.codes.copy_(codes)
    blocks = _plan_slots(canvas, set_sizes, with_class=True)
    cell_sets = [order[:, a:b] for a, b in set_boundaries(set_sizes)]
    parts = [_chunk(canvas, blocks, 0, cell_sets)]
    parts += [_chunk(canvas, blocks, j, cell_sets) for j in range(1, len(cell_sets) + 1)]
    kinds, values, cells, slots = (torch.cat([p[i] for p in parts], dim=-1) for i in range(4))
    hidden = canvas.forward(kinds, values, cells, slots, canvas.chunk_mask(canvas.op_block[slots]))
    is_code = kinds[0] == SLOT_CODE
    scores = canvas.layout_scores(hidden[:, is_code])  # code slots appear in order of the sets
    _adopt(canvas, blocks, order)
    return scores
