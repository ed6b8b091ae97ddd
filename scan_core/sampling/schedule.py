"""Pure schedule functions: set sizes, generation orders, the CFG ramp (method §4, §7)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def cosine_set_sizes(num_tokens: int, num_steps: int) -> list[int]:
    """Sizes of the K sets for N tokens: RandAR's cosine plan with its end-of-sequence bug fixed.

    The cumulative target after step k is min(floor((1 - cos(pi/2 * k/K)) * N) + 1, N). Early
    steps can ask for fewer than one new token and late ones for more than remain, so every set
    is forced to be >= 1 while leaving at least one token for each later step; the sum is N.
    """
    if not 1 <= num_steps <= num_tokens:
        raise ValueError(f"num_steps must be in [1, N={num_tokens}], got {num_steps}")
    sizes, done = [], 0
    for k in range(1, num_steps + 1):
        target = min(
            math.floor((1 - math.cos(math.pi / 2 * k / num_steps)) * num_tokens) + 1, num_tokens
        )
        remaining_steps = num_steps - k
        target = max(target, done + 1)  # at least one token this step
        target = min(target, num_tokens - remaining_steps)  # at least one for every later step
        if k == num_steps:
            target = num_tokens
        sizes.append(target - done)
        done = target
    return sizes


def generation_order(
    batch_size: int,
    num_tokens: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    raster: bool = False,
    device: torch.device | str = "cpu",
) -> Tensor:
    """(B, N) long: a random permutation of the cells per image, or raster order.

    With a list of generators, row b draws from generator b alone.
    """
    if raster:
        return torch.arange(num_tokens, device=device).expand(batch_size, -1).clone()
    if isinstance(generator, list):
        keys = torch.stack([torch.rand(num_tokens, generator=g) for g in generator])
    else:
        keys = torch.rand(batch_size, num_tokens, generator=generator)
    return keys.argsort(dim=1).to(device)


def cfg_scale_at(fraction_done: float, start: float, end: float) -> float:
    """CFG scale ramped linearly from ``start`` to ``end`` over the fraction of tokens decoded."""
    fraction = min(max(fraction_done, 0.0), 1.0)
    return start + (end - start) * fraction
