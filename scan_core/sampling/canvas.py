"""The sampler's working state: codes, scores and a KV cache over one growing slot sequence.

Every operation (generation, refinement, forced regeneration, scoring) appends blocks of slots
to one cache whose capacity is fixed up front, so memory never grows per step (the sum of what
the operation's phases reserve: ``scan_core.sampling.capacity``). ``visible``
marks the slots that form the *current image context*: the class slot, one p slot and one code
slot per cell. Queries attend to ``visible`` plus the blocks of the running operation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scan_core.model.kv_cache import KVCache
from scan_core.model.network import SLOT_CLASS
from scan_core.sampling.draw import quality_scores

NO_BLOCK = 2**40


def cache_rows(batch: int, use_cfg: bool) -> int:
    """KV-cache rows: the batch, and under CFG its null-class twin."""
    return 2 * batch if use_cfg else batch


class Canvas:
    """Codes (B, N) (-1 = empty), scores (B, N) (NaN = unknown) and the cache that explains them.

    With CFG the cache holds 2B rows: the conditional batch, then the same with the null class.
    ``scorer`` names what made the scores: "head" or "confidence" (``sampling.judge``).
    """

    def __init__(
        self,
        model,
        class_ids: Tensor,
        capacity: int,
        use_cfg: bool,
        dtype=None,
        scorer: str = "head",
    ):
        config = model.config
        device = class_ids.device
        self.model = model
        self.class_ids = class_ids
        self.use_cfg = use_cfg
        self.scorer = scorer
        batch = class_ids.shape[0]
        if dtype is None:
            dtype = next(iter(model.parameters()), torch.zeros(())).dtype
        self.cache = KVCache.allocate(config, cache_rows(batch, use_cfg), capacity, device, dtype)
        self.codes = torch.full((batch, config.num_tokens), -1, dtype=torch.long, device=device)
        self.scores = torch.full((batch, config.num_tokens), float("nan"), device=device)
        self.visible = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.position_slot = torch.full_like(self.codes, -1)  # slot of each cell's p token
        self.code_slot = torch.full_like(self.codes, -1)  # slot of each cell's current code
        # Block id of each slot within the running operation; NO_BLOCK outside it.
        self.op_block = torch.full((capacity,), NO_BLOCK, dtype=torch.long, device=device)
        self.next_slot = 0

    @property
    def batch_size(self) -> int:
        return self.class_ids.shape[0]

    @property
    def capacity(self) -> int:  # not the cache's: a model without layers has no cache tensors
        return self.visible.shape[1]

    def reserve(self, count: int) -> Tensor:
        """Slot positions for ``count`` new slots; errors if the planned capacity is exceeded."""
        if self.next_slot + count > self.capacity:
            raise RuntimeError(
                f"KV cache capacity {self.capacity} exceeded ({self.next_slot} + {count}); "
                "the operation planned too few slots"
            )
        slots = torch.arange(self.next_slot, self.next_slot + count, device=self.codes.device)
        self.next_slot += count
        return slots

    def rewind(self, slot: int) -> None:
        """Forget slots from ``slot`` on (they will be overwritten)."""
        self.visible[:, slot:] = False
        self.op_block[slot:] = NO_BLOCK
        self.next_slot = slot

    def chunk_mask(self, row_blocks: Tensor) -> Tensor:
        """(B, L, capacity): the current image plus the operation's blocks up to each row's."""
        inside = self.op_block.view(1, 1, -1) <= row_blocks.view(1, -1, 1)
        return self.visible.unsqueeze(1) | inside

    def end_operation(self) -> None:
        self.op_block.fill_(NO_BLOCK)

    def forward(self, kinds: Tensor, values: Tensor, cells: Tensor, slots: Tensor, mask: Tensor):
        """Run one chunk for the batch (and its null-class twin under CFG).

        Shapes: kinds, values, cells (B, L); slots (L,); mask (B or 1, L, capacity).
        Returns hidden (rows, L, D).
        """
        mask = mask[..., : self.next_slot]  # nothing past the reserved slots is written
        if self.use_cfg:
            null_values = torch.where(
                kinds == SLOT_CLASS, torch.full_like(values, self.model.config.num_classes), values
            )
            kinds, cells = kinds.repeat(2, 1), cells.repeat(2, 1)
            values = torch.cat([values, null_values])
            mask = mask.repeat(2, 1, 1) if mask.shape[0] > 1 else mask
        return self.model(kinds, values, cells, mask, self.cache, slots)

    def token_logits(self, hidden: Tensor, cfg_scale: float) -> Tensor:
        """Guided logits u + s (c - u) (method §7). hidden (rows, S, D) -> (B, S, V)."""
        logits = self.model.token_logits(hidden)
        if not self.use_cfg:
            return logits
        cond, uncond = logits.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    def quality(self, hidden: Tensor) -> Tensor:
        """Quality scores from the conditional half. hidden (rows, S, D) -> (B, S)."""
        return quality_scores(self.model.quality_logits(hidden[: self.batch_size]))

    def layout_scores(self, hidden: Tensor) -> Tensor:
        """Scores of code slots in the generation layout: the quality head's; unknown (NaN) under
        the confidence scorer, which judges only in full context. (rows, S, D) -> (B, S)."""
        if self.scorer == "confidence":
            return torch.full(
                (self.batch_size, hidden.shape[1]), float("nan"), device=hidden.device
            )
        return self.quality(hidden)

    def confidence(self, hidden: Tensor, codes: Tensor) -> Tensor:
        """The token head's probability of ``codes`` (B, S) at position queries, from the
        conditional half without guidance. hidden (rows, S, D) -> (B, S)."""
        logits = self.model.token_logits(hidden[: self.batch_size])  # (B, S, V) float32
        chosen = logits.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
        return (chosen - logits.logsumexp(dim=-1)).exp()
