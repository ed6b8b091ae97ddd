"""Codebook upkeep while training a VQ tokenizer (``scan_core.training.vq.train``).

Usage statistics of a histogram of code assignments, and restarts of codes left unused for too
long: re-initialised from encoder outputs, with their AdamW moments zeroed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from scan_core.tokenizer.vq import VQModel


def codebook_usage(counts: Tensor) -> dict[str, float]:
    """Fraction of codes used and perplexity of a histogram of code assignments (K,)."""
    total = counts.sum()
    if total == 0:
        return {"codes_used": 0.0, "perplexity": 0.0}
    probs = counts.double() / total
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return {"codes_used": (counts > 0).double().mean().item(), "perplexity": entropy.exp().item()}


def flat_latents(model: VQModel, latents: Tensor) -> Tensor:
    """Latents (B, C, h, w) -> (B*h*w, C) as the quantizer searches them (L2-normalised or not)."""
    flat = latents.detach().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    return F.normalize(flat, dim=-1) if model.config.codebook_l2_norm else flat


@torch.no_grad()
def restart_dead_codes(
    model: VQModel,
    last_used: Tensor,
    step: int,
    patience: int,
    candidates: Tensor,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None = None,
) -> int:
    """Re-initialise codewords unused for ``patience`` steps from rows of ``candidates`` (N, C).

    Their AdamW moments are zeroed and their age reset. Returns how many codes were restarted.
    """
    dead = (step - last_used) >= patience  # (K,)
    count = int(dead.sum())
    if count == 0 or len(candidates) == 0:
        return 0
    weight = model.quantize.embedding.weight
    picks = torch.randint(len(candidates), (count,), generator=generator)
    weight[dead] = candidates[picks].to(weight.dtype)
    last_used[dead] = step
    for moment in ("exp_avg", "exp_avg_sq"):
        if moment in optimizer.state.get(weight, {}):
            optimizer.state[weight][moment][dead] = 0.0
    return count
