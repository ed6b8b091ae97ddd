"""Configuration and durable state of a VQ tokenizer run (``python -m scan_core train_vq``).

The run's config (one CLI flag per field); the random streams, pure functions of (seed, step) so
that a resumed run is bit-identical to an uninterrupted one; the lr schedule; the optimizer; and
the atomic writes behind ``checkpoints/step_XXXXXXXX.train.pt`` and ``checkpoints/latest``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

TRAIN_STATE_FORMAT = "scan-vq-train-state"
TRAIN_STATE_VERSION = 1
# Fields that may change between a run and its resumption (they do not change the weights).
RESUMABLE_CHANGES = ("data", "out", "steps", "threads", "log_every", "eval_every")
RESUMABLE_CHANGES += ("checkpoint_every", "keep_last", "device")


def _field(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class VQTrainConfig:
    """A tokenizer training run. CLI flags are generated from these fields."""

    data: str = _field(
        "data/emoji", "directory with train.npz / val.npz (scan_core.datasets.emoji)"
    )
    preset: str = _field("VQ-S", "tokenizer preset from scan_core.model.config.VQ_PRESETS")
    out: str = _field("runs/vq_s", "run directory: checkpoints, metrics.jsonl, best.safetensors")
    steps: int = _field(20_000, "total optimizer steps (the cosine schedule spans them)")
    batch_size: int = _field(16, "images per step (16 suits 1 CPU thread; raise it on a GPU)")
    lr: float = _field(4e-4, "peak learning rate (AdamW), also the discriminator's")
    min_lr_ratio: float = _field(0.05, "final lr as a fraction of the peak (cosine decay)")
    warmup_steps: int = _field(200, "linear warm-up steps")
    weight_decay: float = _field(0.05, "AdamW decay on conv weights; never on codebook or 1-D")
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.95, "AdamW beta2")
    grad_clip: float = _field(1.0, "max gradient norm (0 = off)")
    recon_loss: str = _field("l2", "pixel loss: l1 or l2")
    disc_weight: float = _field(0.0, "PatchGAN generator-loss weight (0 = no discriminator)")
    disc_start: int = _field(2_000, "step at which the discriminator switches on")
    disc_adaptive: bool = _field(True, "scale the GAN term by the gradient-norm ratio")
    dead_code_steps: int = _field(200, "restart codes unused for this many steps (0 = never)")
    flip: bool = _field(True, "random horizontal flips")
    log_every: int = _field(50, "steps per log line / code-usage window")
    eval_every: int = _field(250, "steps between held-out PSNR evaluations")
    checkpoint_every: int = _field(250, "steps between checkpoints")
    keep_last: int = _field(3, "step checkpoints kept (best.safetensors is kept apart)")
    seed: int = _field(0, "seed of the weights, batch order, flips and code restarts")
    threads: int = _field(0, "torch CPU threads (0 = torch's default)")
    device: str = _field("auto", "auto (CUDA when present, else the CPU), cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        if self.recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")
        for name in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def replace(self, **changes) -> VQTrainConfig:
        return dataclasses.replace(self, **changes)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite; no weights were updated at that step."""


# ------------------------------------------------------------------------------ pure helpers


def step_generator(seed: int, stream: str, index: int) -> torch.Generator:
    """An independent generator for (seed, stream, index): resumption needs no stored state."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def batch_indices(step: int, batch_size: int, num_images: int, seed: int) -> Tensor:
    """Indices for ``step``: consecutive slices of one random permutation per epoch, (B,)."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // num_images, positions % num_images
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        order = torch.randperm(num_images, generator=step_generator(seed, "epoch", epoch))
        here = epochs == epoch
        out[here] = order[offsets[here]]
    return out


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def to_model_range(pixels: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1], exactly as ``images.pil_to_tensor``."""
    return pixels.float() / 127.5 - 1.0


# -------------------------------------------------------------------------------- optimizer


def build_optimizer(
    module: nn.Module, config: VQTrainConfig, no_decay: set[str]
) -> torch.optim.AdamW:
    """AdamW with decay on >= 2-D weights only, never on the parameters named in ``no_decay``."""
    decay, plain = [], []
    for name, param in module.named_parameters():
        (plain if param.ndim < 2 or name in no_decay else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


# ---------------------------------------------------------------------------------- files


def config_changes(saved: dict, current: VQTrainConfig) -> list[str]:
    """Differences that would break an exact resumption, as "name: saved -> current"."""
    now = dataclasses.asdict(current)
    return [
        f"{name}: {saved.get(name)!r} -> {now[name]!r}"
        for name in now
        if name not in RESUMABLE_CHANGES and saved.get(name) != now[name]
    ]


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"
