"""A full-forward raster sequence, the reference that raster decoding and converted LlamaGen
checkpoints are checked against. The library decodes raster order with a KV cache
(``scan_core.sampling.raster``) and never builds this whole sequence, so it lives with the tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scan_core.model.network import SLOT_CLASS, SLOT_CODE
from scan_core.model.sequence import Layout


def raster_layout(class_ids: Tensor, codes: Tensor) -> Layout:
    """LlamaGen's sequence ``[C, x_0 .. x_{N-2}]``: the output at slot i predicts code i.

    Every slot is its own block, so the mask is causal. ``position_slots[i]`` is the slot whose
    logits predict cell i; ``code_slots[i]`` the slot that holds code i (the last is never fed).
    """
    batch, num_tokens = codes.shape
    device = codes.device
    kinds = torch.full((batch, num_tokens), SLOT_CODE, dtype=torch.long, device=device)
    kinds[:, 0] = SLOT_CLASS
    values = torch.cat([class_ids.view(batch, 1), codes[:, :-1]], dim=1)
    cells = torch.arange(-1, num_tokens - 1, device=device).expand(batch, -1).clone()
    blocks = torch.arange(num_tokens, device=device)
    position_slots = torch.arange(num_tokens, device=device)
    code_slots = torch.arange(1, num_tokens + 1, device=device)
    order = torch.arange(num_tokens, device=device).expand(batch, -1)
    return Layout(kinds, values, cells, blocks, position_slots, code_slots, order)
