"""A preallocated key/value cache owned by the caller (the sampler), never by the model.

One model can therefore serve many generations at once: each holds its own cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from scan_core.model.config import ModelConfig


@dataclass
class KVCache:
    """Keys and values for every layer, each (B, H, capacity, head_dim).

    Slots are written by position vectors (``Attention`` does ``k[:, :, positions] = new``), so
    one call writes a whole set. The caller knows which slots it wrote (the sampler's canvas
    keeps that). The sizes are kept beside the tensors so that a model without layers (a test
    oracle) still has a cache with a size.
    """

    keys: list[Tensor]
    values: list[Tensor]
    batch_size: int
    capacity: int

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        batch_size: int,
        capacity: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        shape = (batch_size, config.n_head, capacity, config.head_dim)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        return cls(keys, values, batch_size, capacity)

    def layer(self, index: int) -> tuple[Tensor, Tensor]:
        return self.keys[index], self.values[index]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
