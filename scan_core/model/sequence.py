"""Sequence layouts and attention masks shared by training and sampling (method §4).

SCAN layout: ``[C] [p(set1)] [x(set1)] [p(set2)] [x(set2)] ... [p(setK)] [x(setK)]``, length
1 + 2N. Every bracket is a *block*; a block sees every earlier block and itself (block-causal).
Training and inference must use the same layout and masks, so both import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from scan_core.model.network import SLOT_CLASS, SLOT_CODE, SLOT_POSITION


@dataclass
class Layout:
    """Slots of a batch of sequences. All (B, L) long except where noted.

    ``blocks`` (L,) is shared by the batch (set sizes are the same for every image).
    ``position_slots`` / ``code_slots`` (N,) give the slot index of the t-th generated token's
    p and x slot; ``order`` (B, N) gives its cell.
    """

    kinds: Tensor
    values: Tensor
    cells: Tensor
    blocks: Tensor
    position_slots: Tensor
    code_slots: Tensor
    order: Tensor

    def mask(self) -> Tensor:
        """Block-causal training mask (1, L, L)."""
        return block_causal_mask(self.blocks, self.blocks).unsqueeze(0)


def block_causal_mask(query_blocks: Tensor, key_blocks: Tensor) -> Tensor:
    """(Lq, Lk) bool: a query in block b may attend keys in blocks <= b."""
    return key_blocks.unsqueeze(0) <= query_blocks.unsqueeze(1)


def set_boundaries(set_sizes: list[int]) -> list[tuple[int, int]]:
    """(start, end) offsets into the generation order for each set."""
    bounds, start = [], 0
    for size in set_sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def scan_layout(class_ids: Tensor, codes: Tensor, order: Tensor, set_sizes: list[int]) -> Layout:
    """Build the full SCAN training sequence.

    Args:
        class_ids: (B,) long (use num_classes for the null class).
        codes: (B, N) long codes in raster order; the value placed in each x slot.
        order: (B, N) long, a permutation of cells per image (the generation order).
        set_sizes: sizes of the K sets, summing to N.
    """
    batch, num_tokens = codes.shape
    if sum(set_sizes) != num_tokens or min(set_sizes) < 1:
        raise ValueError(f"set sizes {set_sizes} must be >= 1 and sum to N = {num_tokens}")
    device = codes.device
    length = 1 + 2 * num_tokens
    kinds = torch.full((batch, length), SLOT_CODE, dtype=torch.long, device=device)
    values = torch.zeros(batch, length, dtype=torch.long, device=device)
    cells = torch.full((batch, length), -1, dtype=torch.long, device=device)
    blocks = torch.zeros(length, dtype=torch.long, device=device)
    position_slots = torch.empty(num_tokens, dtype=torch.long, device=device)
    code_slots = torch.empty(num_tokens, dtype=torch.long, device=device)
    kinds[:, 0] = SLOT_CLASS
    values[:, 0] = class_ids
    ordered_codes = codes.gather(1, order)
    slot = 1
    for k, (start, end) in enumerate(set_boundaries(set_sizes)):
        size = end - start
        p_range = torch.arange(slot, slot + size, device=device)
        x_range = p_range + size
        kinds[:, p_range] = SLOT_POSITION
        cells[:, p_range] = order[:, start:end]
        cells[:, x_range] = order[:, start:end]
        values[:, x_range] = ordered_codes[:, start:end]
        blocks[p_range] = 2 * k + 1
        blocks[x_range] = 2 * k + 2
        position_slots[start:end] = p_range
        code_slots[start:end] = x_range
        slot += 2 * size
    return Layout(kinds, values, cells, blocks, position_slots, code_slots, order)


def refine_round_masks(
    visible: Tensor, position_slots: Tensor, code_slots: Tensor, replaced_slots: Tensor
) -> tuple[Tensor, Tensor]:
    """Attention masks of one refinement round ``[p(I)] [x'(I)]`` appended to a sequence.

    The round's queries see the *current image*: ``visible`` (B, Lk) marks the class slot, the
    base p slots and exactly one code slot per cell (superseded and rejected code slots, and the
    slots of earlier rounds' p blocks, are hidden). p(I) sees that context, including the codes
    it is replacing, plus its own block. x'(I) sees the context minus the codes at I
    (``replaced_slots`` (B, c)), plus p(I) and its own block, so it scores each candidate as if it
    were in place. Training uses this same function for its appended rounds (method §5).

    Returns:
        position_mask, code_mask: bool (B, c, Lk).
    """
    count = position_slots.numel()
    position_mask = visible.clone()
    position_mask[:, position_slots] = True
    code_mask = visible.clone()
    code_mask.scatter_(1, replaced_slots, False)
    code_mask[:, position_slots] = True
    code_mask[:, code_slots] = True
    expand = (-1, count, -1)
    return position_mask.unsqueeze(1).expand(*expand), code_mask.unsqueeze(1).expand(*expand)
