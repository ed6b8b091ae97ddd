"""The SCAN training objective (paper §Model Training, method §5): L = L_gen + w * L_eva.

One training sequence per image:
``[C] [p(set1)] [x(set1)] ... [p(setK)] [x(setK)]`` (the §4 layout, random order), then T
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

from scan_core.model.config import ModelConfig
from scan_core.model.network import SLOT_CODE, SLOT_POSITION, Transformer
from scan_core.model.sequence import Layout, refine_round_masks, scan_layout
from scan_core.sampling.schedule import cosine_set_sizes
from scan_core.training.metrics import auroc
from scan_core.training.negatives import (
    NEGATIVE_SOURCES,
    choose_refine_cells,
    draw_negatives,
    drop_classes,
    negative_positions,
    random_order,
    teacher_predictions,
)

__all__ = [
    "NEGATIVE_SOURCES",
    "LossConfig",
    "LossOutput",
    "ScanHeads",
    "TrainingSequence",
    "append_refinement_rounds",
    "build_training_sequence",
    "choose_refine_cells",
    "draw_negatives",
    "drop_classes",
    "negative_positions",
    "random_order",
    "scan_loss",
    "sequence_loss",
    "teacher_predictions",
]


@dataclass(frozen=True)
class LossConfig:
    """Knobs of the SCAN objective. Defaults follow the paper (method §5)."""

    eva_weight: float = 1.0  # w in L = L_gen + w * L_eva
    max_negative_ratio: float = 0.4  # r ~ U(0, max_negative_ratio) per iteration
    random_negatives: bool = True
    permuted_negatives: bool = True
    teacher_negatives: bool = True
    teacher_sample: bool = True  # teacher negatives are sampled from the softmax (else argmax)
    num_steps: int = 0  # K sets per image; 0 means N // 4 (64 for 256 tokens, the paper's K)
    raster_order: bool = False  # train in raster order instead of a random order per image
    num_rounds: int = 2  # T simulated refinement rounds appended to every sequence
    tokens_per_round: int = 4  # c cells per round (the sampler's default c too)
    refine_focus: float = 0.8  # chance that a negative cell is put first in line for a round

    def __post_init__(self) -> None:
        # A generation-only run (RandAR's objective) places no negatives and needs no source.
        if not self.sources() and not self.generation_only():
            raise ValueError(
                "enable at least one negative source (random, permuted, teacher), or train "
                "generation-only with --max-negative-ratio 0 --num-rounds 0"
            )
        if not 0.0 <= self.max_negative_ratio <= 1.0:
            raise ValueError(f"max_negative_ratio must be in [0, 1], got {self.max_negative_ratio}")
        if self.num_rounds < 0 or self.tokens_per_round < 1 or self.num_steps < 0:
            raise ValueError("num_rounds >= 0, tokens_per_round >= 1 and num_steps >= 0 required")
        if not 0.0 <= self.refine_focus <= 1.0:
            raise ValueError(f"refine_focus must be in [0, 1], got {self.refine_focus}")

    def generation_only(self) -> bool:
        """No negatives and no simulated rounds: the sequence RandAR trains on."""
        return self.max_negative_ratio == 0.0 and self.num_rounds == 0

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
    """Corrupt the ground truth, lay it out (method §4) and append the refinement rounds.

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


@dataclass
class _RoundCanvas:
    """The growing sequence plus which slot holds each cell's current (visible) code."""

    kinds: Tensor  # (B, L)
    values: Tensor
    cells: Tensor
    mask: Tensor  # (B, L, L)
    visible: Tensor  # (B, L) the context a refinement query sees
    current_slot: Tensor  # (B, N) slot of each cell's visible code
    current_code: Tensor  # (B, N) the code in that slot


def _start_canvas(layout: Layout, inputs: Tensor, length: int) -> _RoundCanvas:
    batch = inputs.shape[0]
    base_length = layout.kinds.shape[1]
    mask = torch.zeros(batch, length, length, dtype=torch.bool, device=inputs.device)
    mask[:, :base_length, :base_length] = layout.mask()
    code_cells = layout.cells[:, layout.code_slots]
    current_slot = torch.empty_like(inputs).scatter_(
        1, code_cells, layout.code_slots.expand(batch, -1)
    )
    visible = torch.zeros(batch, length, dtype=torch.bool, device=inputs.device)
    visible[:, 0] = True  # the class slot
    visible[:, layout.position_slots] = True
    visible.scatter_(1, current_slot, True)
    return _RoundCanvas(
        _extend(layout.kinds, length, SLOT_CODE),
        _extend(layout.values, length, 0),
        _extend(layout.cells, length, -1),
        mask,
        visible,
        current_slot,
        inputs.clone(),
    )


def _write_round(
    canvas: _RoundCanvas, chosen: Tensor, fed: Tensor, p_slots: Tensor, x_slots: Tensor
) -> None:
    """Write ``[p(I)] [x(I)]`` with the sampler's masks, then accept x(I) as the current codes."""
    c = canvas
    c.kinds[:, p_slots] = SLOT_POSITION
    c.cells[:, p_slots] = chosen
    c.cells[:, x_slots] = chosen
    c.values[:, x_slots] = fed
    replaced = c.current_slot.gather(1, chosen)
    position_mask, code_mask = refine_round_masks(c.visible, p_slots, x_slots, replaced)
    c.mask[:, p_slots] = position_mask
    c.mask[:, x_slots] = code_mask
    # Accepted update: x(I) becomes the visible code of I for later rounds, p(I) stays hidden.
    c.visible.scatter_(1, replaced, False)
    c.visible[:, x_slots] = True
    c.current_slot.scatter_(1, chosen, x_slots.expand_as(chosen))
    c.current_code.scatter_(1, chosen, fed)


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
    """Append T rounds ``[p(I)] [x(I)]`` to ``layout`` and derive every target from the cells.

    ``inputs`` (B, N) are the codes fed at the base x slots, by cell. See the module docstring
    for what each round sees; the masks are ``sequence.refine_round_masks``.
    """
    device = truth.device
    count = min(config.tokens_per_round, truth.shape[1])
    base_length = layout.kinds.shape[1]
    canvas = _start_canvas(layout, inputs, base_length + 2 * count * config.num_rounds)
    gen_parts, eva_parts = [layout.position_slots], [layout.code_slots]
    for round_index in range(config.num_rounds):
        is_negative = canvas.current_code != truth
        chosen = choose_refine_cells(is_negative, count, config.refine_focus, generator)
        fresh = draw_negatives(truth, vocab_size, config.sources(), teacher, generator)
        use_negative = torch.rand(chosen.shape, generator=generator, device=device) < ratio
        fed = torch.where(use_negative, fresh.gather(1, chosen), truth.gather(1, chosen))
        p_slots = base_length + 2 * count * round_index + torch.arange(count, device=device)
        x_slots = p_slots + count
        _write_round(canvas, chosen, fed, p_slots, x_slots)
        gen_parts.append(p_slots)
        eva_parts.append(x_slots)
    gen_slots, eva_slots = torch.cat(gen_parts), torch.cat(eva_parts)
    cells, values = canvas.cells, canvas.values
    gen_targets = truth.gather(1, cells[:, gen_slots])
    eva_targets = (values[:, eva_slots] == truth.gather(1, cells[:, eva_slots])).long()
    return TrainingSequence(
        canvas.kinds, values, cells, canvas.mask, gen_slots, eva_slots, gen_targets, eva_targets
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
    """L = L_gen + w * L_eva on one batch (paper §Model Training, method §5).

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
