"""Negatives for the SCAN objective (paper §Model Training, method §5) and the cells a simulated
refinement round revisits. Every function takes an explicit ``generator`` and draws on the device
of its tensors, so a seeded run is reproducible on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scan_core.model.sequence import scan_layout

NEGATIVE_SOURCES = ("random", "permuted", "teacher")


def drop_classes(
    labels: Tensor, num_classes: int, probability: float, generator: torch.Generator | None
) -> Tensor:
    """Replace labels by the null class (index num_classes) with the given probability (CFG)."""
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < probability
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


def random_order(
    batch_size: int, num_tokens: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """(B, N) random permutations drawn on ``device``.

    Same rule as ``schedule.generation_order``, which draws on the CPU; the trainer's generator
    lives on the training device, so the keys are drawn there.
    """
    keys = torch.rand(batch_size, num_tokens, generator=generator, device=device)
    return keys.argsort(dim=1)


def negative_positions(
    batch_size: int, num_tokens: int, ratio: float, generator: torch.Generator | None, device
) -> Tensor:
    """(B, N) bool with exactly round(ratio * N) True cells per image, at random."""
    count = round(ratio * num_tokens)
    keys = torch.rand(batch_size, num_tokens, generator=generator, device=device)
    ranks = keys.argsort(dim=1).argsort(dim=1)
    return ranks < count


def draw_negatives(
    truth: Tensor,
    vocab_size: int,
    sources: tuple[str, ...],
    teacher: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """One candidate negative per cell, each from a source chosen uniformly among ``sources``.

    Shapes: truth (B, N) long, teacher (B, N) indexed by cell -> (B, N) long. A candidate may
    equal the truth; callers label by equality, so such a "negative" is a positive.
    """
    batch, num_tokens = truth.shape
    device = truth.device
    candidates = []
    if "random" in sources:
        candidates.append(
            torch.randint(0, vocab_size, truth.shape, generator=generator, device=device)
        )
    if "permuted" in sources and num_tokens > 1:
        # The ground truth of a different cell of the same image: shift by 1..N-1 cells.
        offset = torch.randint(1, num_tokens, truth.shape, generator=generator, device=device)
        other = (torch.arange(num_tokens, device=device) + offset) % num_tokens
        candidates.append(truth.gather(1, other))
    if "teacher" in sources:
        if teacher is None:
            raise ValueError("teacher negatives are enabled but no teacher predictions were given")
        candidates.append(teacher)
    if not candidates:  # only "permuted" with a single cell: nothing else to permute with
        candidates.append(
            torch.randint(0, vocab_size, truth.shape, generator=generator, device=device)
        )
    stacked = torch.stack(candidates)  # (S, B, N)
    pick = torch.randint(
        0, len(candidates), (1, batch, num_tokens), generator=generator, device=device
    )
    return stacked.gather(0, pick).squeeze(0)


@torch.no_grad()
def teacher_predictions(
    heads: nn.Module,
    class_ids: Tensor,
    truth: Tensor,
    order: Tensor,
    set_sizes: list[int],
    sample: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """The model's own code for every cell under ground-truth context, indexed BY CELL (B, N).

    Row t of the token logits belongs to the p slot ``position_slots[t]``, whose cell is
    ``order[:, t]`` -- not t. The prediction is scattered to that cell, read from the layout's
    ``cells``; pairing row t with cell t is the upstream bug (method §8).
    """
    layout = scan_layout(class_ids, truth, order, set_sizes)
    no_slots = layout.code_slots[:0]
    logits, _ = heads(
        layout.kinds, layout.values, layout.cells, layout.mask(), layout.position_slots, no_slots
    )
    logits = logits.float()
    if sample:
        probs = logits.softmax(dim=-1).reshape(-1, logits.shape[-1])
        predicted = torch.multinomial(probs, 1, generator=generator).view(truth.shape)
    else:
        predicted = logits.argmax(dim=-1)
    slot_cells = layout.cells[:, layout.position_slots]  # (B, N): the cell of each p slot
    return torch.empty_like(predicted).scatter_(1, slot_cells, predicted)


def choose_refine_cells(
    is_negative: Tensor, count: int, focus: float, generator: torch.Generator | None
) -> Tensor:
    """(B, c) distinct cells per image: negatives first with probability ``focus`` each.

    Mirrors the sampler picking the lowest quality scores: mostly bad codes, sometimes good
    ones, which teaches the quality head not to over-trust its ranking.
    """
    device = is_negative.device
    keys = torch.rand(is_negative.shape, generator=generator, device=device)
    promote = torch.rand(is_negative.shape, generator=generator, device=device) < focus
    keys = keys + (is_negative & promote).to(keys.dtype)
    return keys.topk(count, dim=1).indices
