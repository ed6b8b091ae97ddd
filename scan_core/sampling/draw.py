"""Drawing codes from logits: temperature, then top-k, then top-p, then multinomial (method §7)."""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Mask (to -inf) all but the top-k codes, then all outside the top-p nucleus. (..., V)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a code when the codes ranked above it already reach top_p; the best one stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_index, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_codes(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one code per row. Temperature 0 is greedy (argmax).

    Shapes: logits (..., V) -> codes (...) long, probs (...) float: the probability of each drawn
    code under the distribution it was drawn from. A list of generators gives image b (the first
    dimension) its own stream, so an image in a batch draws exactly what it draws alone.
    """
    logits = logits.float()
    if temperature == 0:
        probs = logits.softmax(dim=-1)
        codes = logits.argmax(dim=-1)
        return codes, probs.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    if isinstance(generator, list):
        codes = torch.stack([_draw(row, g) for row, g in zip(probs, generator, strict=True)])
    else:
        codes = _draw(probs, generator)
    return codes, probs.gather(-1, codes.unsqueeze(-1)).squeeze(-1)


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    flat = probs.reshape(-1, probs.shape[-1])
    if generator is not None and generator.device != flat.device:
        # CPU generators drive every device, so a seed gives the same draws on CPU and GPU.
        return (
            torch.multinomial(flat.cpu(), 1, generator=generator)
            .view(probs.shape[:-1])
            .to(probs.device)
        )
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def quality_scores(quality_logits: Tensor) -> Tensor:
    """s = P(good) from the two-way quality logits (..., 2) -> (...)."""
    return quality_logits.float().softmax(dim=-1)[..., 1]
