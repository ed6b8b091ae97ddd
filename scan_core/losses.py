"""The SCAN training objective (paper §Model Training, SPEC §5): L = L_gen + w * L_eva.

One training sequence per image:
``[C] [p(set1)] [x(set1)] ... [p(setK)] [x(setK)]`` (the §4 layout, random order), then R
simulated refinement rounds ``[p(I)] [x(I)]`` appended after it. Gen cross-entropy is taken at
every p slot (target: the ground-truth code of that slot's cell); Eva cross-entropy at every x slot
(target 1 iff the code fed there equals the ground truth of its cell).

Inputs at x slots are the ground truth with a fraction r ~ U(0, max_negative_ratio) of positions
replaced by *negatives*, each drawn from one of the enabled sources chosen at random per position:
random codebook indices, the ground-truth code of another cell of the same image
("permuted"), or the model's own prediction for that cell under ground-truth context
("teacher"). Every target is derived from the slot's *cell* (never from its rank in the
order), so a permutation can never pair a prediction with the wrong cell.

Refinement simulation. Each appended round picks c cells I, mostly among the cells whose current
code is a negative (what low quality scores point at in the sampler), and feeds ``[p(I)]`` then
``[x(I)]``, where x(I) is the truth or, with probability r, a fresh negative. Attention masks come
from ``sequence.refine_round_masks``, the function the sampler uses. The visible context is the
class slot, the base p slots and exactly one current code slot per cell. Design decision: a
round's x slots are treated as *accepted* updates, so they become the visible code of their cells
for later rounds (the base or earlier slot they supersede is hidden). This matches the sampler's
cached context after an accepting round; since the fed codes are the truth or a negative with
probability r, the context of later rounds keeps the corruption statistics of the base sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scan_core.config import ModelConfig
from scan_core.metrics import auroc
from scan_core.model import SLOT_CODE, SLOT_POSITION, Transformer
from scan_core.schedule import cosine_set_sizes
from scan_core.sequence import Layout, refine_round_masks, scan_layout

NEGATIVE_SOURCES = ("random", "permuted", "teacher")


@dataclass(frozen=True)
class LossConfig:
    """Knobs of the SCAN objective. Defaults follow the paper (SPEC §5)."""

    eva_weight: float = 1.0  # w in L = L_gen + w * L_eva
    max_negative_ratio: float = 0.4  # r ~ U(0, max_negative_ratio) per iteration
    random_negatives: bool = True
    permuted_negatives: bool = True
    teacher_negatives: bool = True
    teacher_sample: bool = True  # teacher negatives are sampled from the softmax (else argmax)
    num_steps: int = 0  # K sets per image; 0 means N // 4 (64 for 256 tokens, the paper's K)
    raster_order: bool = False  # train in raster order instead of a random order per image
    refine_rounds: int = 2  # R simulated refinement rounds appended to every sequence
    refine_size: int = 4  # c positions per round (the sampler's default tokens_per_round)
    refine_focus: float = 0.8  # chance that a negative cell is put first in line for a round

    def __post_init__(self) -> None:
        if not self.sources():
            raise ValueError("enable at least one negative source (random, permuted, teacher)")
        if not 0.0 <= self.max_negative_ratio <= 1.0:
            raise ValueError(f"max_negative_ratio must be in [0, 1], got {self.max_negative_ratio}")
        if self.refine_rounds < 0 or self.refine_size < 1 or self.num_steps < 0:
            raise ValueError("refine_rounds >= 0, refine_size >= 1 and num_steps >= 0 required")
        if not 0.0 <= self.refine_focus <= 1.0:
            raise ValueError(f"refine_focus must be in [0, 1], got {self.refine_focus}")

    def sources(self) -> tuple[str, ...]:
        flags = (self.random_negatives, self.permuted_negatives, self.teacher_negatives)
        return tuple(name for name, on in zip(NEGATIVE_SOURCES, flags, strict=True) if on)

    def set_sizes(self, num_tokens: int) -> list[int]:
        steps = self.num_steps or max(1, num_tokens // 4)
        return cosine_set_sizes(num_tokens, min(steps, num_tokens))


class ScanHeads(nn.Module):
    """The transformer plus both heads in one ``forward``.

    DDP and FSDP only see parameters used inside ``forward``; the heads live outside
    ``Transformer.forward``, so training wraps this module instead.
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        kinds: Tensor,
        values: Tensor,
        cells: Tensor,
        mask: Tensor,
        gen_slots: Tensor,
        eva_slots: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Token logits (B, P, V) at ``gen_slots`` (P,) and quality logits (B, Q, 2) at
        ``eva_slots`` (Q,)."""
        hidden = self.model(kinds, values, cells, mask)
        token = self.model.token_logits(hidden[:, gen_slots])
        quality = self.model.quality_logits(hidden[:, eva_slots])
        return token, quality


@dataclass
class TrainingSequence:
    """Slots, mask and targets of one training batch. Shapes: (B, L) unless noted."""

    kinds: Tensor
    values: Tensor
    cells: Tensor
    mask: Tensor  # (B, L, L) bool
    gen_slots: Tensor  # (P,) p slots whose token logits are trained
    eva_slots: Tensor  # (Q,) x slots whose quality logits are trained
    gen_targets: Tensor  # (B, P) ground-truth code of each p slot's cell
    eva_targets: Tensor  # (B, Q) 1 where the fed code equals the ground truth


@dataclass
class LossOutput:
    loss: Tensor
    loss_gen: Tensor
    loss_eva: Tensor
    metrics: dict[str, float]


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
    ``cells``; pairing row t with cell t is the upstream bug (SPEC §8).
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


def _extend(tensor: Tensor, length: int, fill: int) -> Tensor:
    out = torch.full((tensor.shape[0], length), fill, dtype=tensor.dtype, device=tensor.device)
    out[:, : tensor.shape[1]] = tensor
    return out


def build_training_sequence(
    truth: Tensor,
    class_ids: Tensor,
    order: Tensor,
    ratio: float,
    config: LossConfig,
    vocab_size: int,
    teacher: Tensor | None,
    generator: torch.Generator | None,
) -> TrainingSequence:
    """Corrupt the ground truth, lay it out (SPEC §4) and append the refinement rounds.

    Shapes: truth (B, N) long codes by cell (raster), class_ids (B,), order (B, N),
    teacher (B, N) by cell or None.
    """
    batch, num_tokens = truth.shape
    sources = config.sources()
    negatives = draw_negatives(truth, vocab_size, sources, teacher, generator)
    corrupt = negative_positions(batch, num_tokens, ratio, generator, truth.device)
    inputs = torch.where(corrupt, negatives, truth)
    layout = scan_layout(class_ids, inputs, order, config.set_sizes(num_tokens))
    return append_refinement_rounds(
        layout, truth, inputs, ratio, config, vocab_size, teacher, generator
    )


def append_refinement_rounds(
    layout: Layout,
    truth: Tensor,
    inputs: Tensor,
    ratio: float,
    config: LossConfig,
    vocab_size: int,
    teacher: Tensor | None,
    generator: torch.Generator | None,
) -> TrainingSequence:
    """Append R rounds ``[p(I)] [x(I)]`` to ``layout`` and derive every target from the cells.

    ``inputs`` (B, N) are the codes fed at the base x slots, by cell. See the module docstring
    for what each round sees; the masks are ``sequence.refine_round_masks``.
    """
    batch, num_tokens = truth.shape
    device = truth.device
    count = min(config.refine_size, num_tokens)
    base_length = layout.kinds.shape[1]
    length = base_length + 2 * count * config.refine_rounds
    kinds = _extend(layout.kinds, length, SLOT_CODE)
    values = _extend(layout.values, length, 0)
    cells = _extend(layout.cells, length, -1)
    mask = torch.zeros(batch, length, length, dtype=torch.bool, device=device)
    mask[:, :base_length, :base_length] = layout.mask()
    # current_slot[b, n]: the slot holding cell n's visible code; it starts at the base x slot.
    code_slots = layout.code_slots.expand(batch, -1)
    current_slot = torch.empty_like(truth).scatter_(
        1, layout.cells[:, layout.code_slots], code_slots
    )
    current_code = inputs.clone()
    visible = torch.zeros(batch, length, dtype=torch.bool, device=device)
    visible[:, 0] = True
    visible[:, layout.position_slots] = True
    visible.scatter_(1, current_slot, True)
    gen_parts, eva_parts = [layout.position_slots], [layout.code_slots]
    for round_index in range(config.refine_rounds):
        chosen = choose_refine_cells(current_code != truth, count, config.refine_focus, generator)
        fresh = draw_negatives(truth, vocab_size, config.sources(), teacher, generator)
        use_negative = torch.rand(chosen.shape, generator=generator, device=device) < ratio
        fed = torch.where(use_negative, fresh.gather(1, chosen), truth.gather(1, chosen))
        p_slots = base_length + 2 * count * round_index + torch.arange(count, device=device)
        x_slots = p_slots + count
        kinds[:, p_slots] = SLOT_POSITION
        cells[:, p_slots] = chosen
        cells[:, x_slots] = chosen
        values[:, x_slots] = fed
        replaced = current_slot.gather(1, chosen)
        position_mask, code_mask = refine_round_masks(visible, p_slots, x_slots, replaced)
        mask[:, p_slots] = position_mask
        mask[:, x_slots] = code_mask
        # Accepted update: x(I) becomes the visible code of I for later rounds.
        visible.scatter_(1, replaced, False)
        visible[:, x_slots] = True
        current_slot.scatter_(1, chosen, x_slots.expand(batch, -1))
        current_code.scatter_(1, chosen, fed)
        gen_parts.append(p_slots)
        eva_parts.append(x_slots)
    gen_slots, eva_slots = torch.cat(gen_parts), torch.cat(eva_parts)
    gen_targets = truth.gather(1, cells[:, gen_slots])
    eva_targets = (values[:, eva_slots] == truth.gather(1, cells[:, eva_slots])).long()
    return TrainingSequence(
        kinds, values, cells, mask, gen_slots, eva_slots, gen_targets, eva_targets
    )


def scan_loss(
    heads: nn.Module,
    truth: Tensor,
    labels: Tensor,
    model_config: ModelConfig,
    config: LossConfig,
    generator: torch.Generator | None,
    teacher_heads: nn.Module | None = None,
    ratio: float | None = None,
) -> LossOutput:
    """L = L_gen + w * L_eva on one batch (paper §Model Training, SPEC §5).

    Args:
        heads: a ``ScanHeads`` (possibly wrapped by DDP/FSDP); its forward gives both heads.
        truth: (B, N) long ground-truth codes, raster order. labels: (B,) long class ids.
        teacher_heads: module for the no-grad teacher-forcing pass (default ``heads``); the
            trainer passes the unwrapped module so the pass skips DDP's bookkeeping.
        ratio: the negative fraction r; drawn from U(0, max_negative_ratio) when None.
    """
    batch, num_tokens = truth.shape
    device = truth.device
    class_ids = drop_classes(
        labels, model_config.num_classes, model_config.class_dropout, generator
    )
    if config.raster_order:
        order = torch.arange(num_tokens, device=device).expand(batch, -1).clone()
    else:
        order = random_order(batch, num_tokens, generator, device)
    if ratio is None:
        draw = torch.rand((), generator=generator, device=device)
        ratio = float(draw) * config.max_negative_ratio
    teacher = None
    if config.teacher_negatives:
        teacher = teacher_predictions(
            teacher_heads or heads,
            class_ids,
            truth,
            order,
            config.set_sizes(num_tokens),
            config.teacher_sample,
            generator,
        )
    sequence = build_training_sequence(
        truth, class_ids, order, ratio, config, model_config.vocab_size, teacher, generator
    )
    return sequence_loss(heads, sequence, config.eva_weight, ratio)


def sequence_loss(
    heads: nn.Module, sequence: TrainingSequence, eva_weight: float, ratio: float = 0.0
) -> LossOutput:
    """Cross-entropies and batch metrics (accuracies, quality-head AUROC) of a built sequence."""
    s = sequence
    token_logits, quality_logits = heads(
        s.kinds, s.values, s.cells, s.mask, s.gen_slots, s.eva_slots
    )
    loss_gen = F.cross_entropy(token_logits.flatten(0, 1).float(), s.gen_targets.flatten())
    loss_eva = F.cross_entropy(quality_logits.flatten(0, 1).float(), s.eva_targets.flatten())
    loss = loss_gen + eva_weight * loss_eva
    with torch.no_grad():
        scores = quality_logits.float().softmax(dim=-1)[..., 1]
        metrics = {
            "loss": float(loss),
            "loss_gen": float(loss_gen),
            "loss_eva": float(loss_eva),
            "gen_accuracy": float((token_logits.argmax(-1) == s.gen_targets).float().mean()),
            "eva_accuracy": float((quality_logits.argmax(-1) == s.eva_targets).float().mean()),
            "eva_auroc": auroc(scores, s.eva_targets),
            "negative_ratio": ratio,
            "eva_positive_fraction": float(s.eva_targets.float().mean()),
        }
    return LossOutput(loss, loss_gen, loss_eva, metrics)
