"""Configuration and durable state of a training run: optimizer, lr schedule, RNG, checkpoints.

A checkpoint ``step_XXXXXXXX`` is three files in ``<out>/checkpoints``:
- ``.safetensors``: the model in the project format (``checkpoint.save_checkpoint``, atomic);
- ``.ema.safetensors``: the EMA weights, when EMA is on;
- ``.train.pt``: optimizer, scheduler, step, data position, every rank's RNG states and the run's
  configs (``torch.save`` to a temp file + ``os.replace``; loads with ``weights_only=True``).
The ``latest`` file names the newest *complete* checkpoint and is replaced only after all of its
files are on disk, so a crash or a full disk mid-save leaves ``latest`` on the previous one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scan_core.files import atomic_torch_save, atomic_write_text
from scan_core.model.config import ModelConfig, model_preset
from scan_core.model.network import Transformer
from scan_core.sampling.settings import with_current_names

TRAIN_STATE_FORMAT = "scan-train-state"
TRAIN_STATE_VERSION = 1
LATEST_NAME = "latest"
QUALITY_HEAD_PREFIXES = ("dis_norm.", "dis_output.")
log = logging.getLogger("scan_core.training.train")


def _field(default, help_text: str, **kwargs):
    return field(default=default, metadata={"help": help_text}, **kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a run except the model sizes and the loss (see LossConfig)."""

    data: str = _field("", "code directory written by scan_core.datasets.extract_codes")
    out: str = _field("runs/scan", "run directory: checkpoints/, metrics.jsonl, previews/")
    preset: str = _field("SCAN-S", "model preset (scan_core.model.config.MODEL_PRESETS)")
    model_set: tuple[str, ...] = _field((), "ModelConfig overrides, e.g. grid_size=8 dim=128")
    init_from: str = _field("", "start from these weights (SCAN, RandAR or own checkpoint)")
    resume: bool = _field(False, "continue from <out>/checkpoints/latest")
    max_steps: int = _field(1000, "optimizer steps in the whole run (sets the lr schedule)")
    batch_size: int = _field(64, "images per micro-batch per process")
    grad_accum: int = _field(1, "micro-batches per optimizer step")
    lr: float = _field(4e-4, "peak learning rate")
    min_lr_ratio: float = _field(0.1, "final lr as a fraction of the peak (cosine floor)")
    warmup_steps: int = _field(100, "linear warm-up steps")
    weight_decay: float = _field(0.05, "AdamW decay, on >= 2-D parameters only")
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.95, "AdamW beta2")
    grad_clip: float = _field(1.0, "max global gradient norm (0 disables)")
    backbone_lr_scale: float = _field(1.0, "lr factor for all but the quality head")
    head_only: bool = _field(
        False, "train only the quality head (dis_norm, dis_output); the backbone is frozen"
    )
    ema_decay: float = _field(0.0, "EMA of the weights (e.g. 0.9999); 0 disables")
    seed: int = _field(0, "seed of init, data order, negatives and dropout")
    log_every: int = _field(10, "steps between metrics.jsonl lines")
    checkpoint_every: int = _field(500, "steps between checkpoints (the last step always saves)")
    keep_last: int = _field(3, "checkpoints kept on disk")
    preview_every: int = _field(0, "steps between sample grids (needs --tokenizer); 0 disables")
    preview_classes: tuple[int, ...] = _field((0, 1, 2, 3), "class ids shown in previews")
    tokenizer: str = _field("", "VQ checkpoint: decodes previews, checks the codes' origin")
    tensorboard: bool = _field(False, "also log to TensorBoard (if installed)")
    progress: bool = _field(True, "tqdm progress bar")
    device: str = _field("auto", "auto, cpu, cuda")
    fsdp: bool = _field(False, "shard parameters and optimizer state (FSDP2) under torchrun")

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# Fields that may change when a run resumes: where things go and how often, never what is learnt.
RESUMABLE_FIELDS = frozenset(
    {
        "resume",
        "log_every",
        "checkpoint_every",
        "keep_last",
        "preview_every",
        "preview_classes",
        "tokenizer",
        "tensorboard",
        "progress",
        "device",
        "init_from",
        "out",
        "data",  # the folder may move; its content is compared separately (count, tokenizer)
    }
)


class ConfigMismatchError(ValueError):
    """A resumed run was started with settings that differ from the saved run's."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/inf; training stopped without saving."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; ``latest`` still names the previous one."""


def config_diff(saved: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """Lines ``section.field: saved X, now Y`` for every difference outside RESUMABLE_FIELDS.

    A run saved before the loss fields' rename (``refine_rounds``, ``refine_size``) compares
    under today's names.
    """
    lines = []
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section, {}), current.get(section, {})
        if section == "loss":
            old = with_current_names(old)
        for name in sorted(set(old) | set(new)):
            if section == "train" and name in RESUMABLE_FIELDS:
                continue
            before, after = old.get(name, "<absent>"), new.get(name, "<absent>")
            if _normal(before) != _normal(after):
                lines.append(f"  {section}.{name}: saved {before!r}, now {after!r}")
    return lines


def _normal(value):
    return list(value) if isinstance(value, (list, tuple)) else value


class WarmupCosine:
    """lr factor: linear warm-up to 1, then cosine down to ``min_ratio`` at ``total`` steps.

    A class rather than a lambda so ``LambdaLR.state_dict`` can save it.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decay on >= 2-D parameters only (LlamaGen's rule) and the backbone lr scale.

    The quality head (``dis_norm``, ``dis_output``) keeps the full lr: it is new when fine-tuning
    from RandAR, while the backbone may move slower (``backbone_lr_scale``).
    """
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        head = is_quality_head(name)
        groups.setdefault((head, param.ndim >= 2), []).append(param)
    param_groups = [
        {
            "params": params,
            "lr": config.lr * (1.0 if head else config.backbone_lr_scale),
            "weight_decay": config.weight_decay if decay else 0.0,
        }
        for (head, decay), params in sorted(groups.items())
    ]
    # Fused AdamW on CUDA (faster); the default elsewhere, and for FSDP's sharded DTensors.
    fused = not config.fsdp and all(p.is_cuda for group in groups.values() for p in group)
    return torch.optim.AdamW(param_groups, betas=(config.beta1, config.beta2), fused=fused or None)


def parse_overrides(items: tuple[str, ...]) -> dict:
    """``("dim=128", "token_dropout=0.0")`` -> typed ModelConfig field values."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(
                f"--model-set expects field=value with a ModelConfig field, got {item!r}"
            )
        kind = type(fields[key].default)
        out[key] = raw if kind is str else kind(float(raw)) if kind is int else kind(raw)
    return out


def is_quality_head(name: str) -> bool:
    """Whether a parameter name (possibly under a ``model.`` wrapper) is the quality head's."""
    return name.split("model.", 1)[-1].startswith(QUALITY_HEAD_PREFIXES)


def freeze_backbone(model: nn.Module) -> None:
    """Leave only the quality head trainable (the head-only recipe, method §5)."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_quality_head(name))


def set_train_mode(model: Transformer, head_only: bool) -> None:
    """Training mode; with a frozen backbone only the head trains, so the backbone runs as at
    inference (no dropout) and the head learns to read the features it will score from."""
    model.train()
    if head_only:
        model.eval()
        model.dis_norm.train()
        model.dis_output.train()


def build_model(config: TrainConfig, device: torch.device) -> Transformer:
    """A fresh model from the preset, or ``--init-from`` weights (RandAR gets a new quality
    head through ``checkpoint.load_model(want_quality_head=True)``)."""
    overrides = parse_overrides(config.model_set)
    if not config.init_from:
        torch.manual_seed(config.seed)  # the same init on every rank
        return Transformer(model_preset(config.preset, **overrides)).to(device)
    from scan_core.checkpoint.loading import load_model

    loaded, report = load_model(config.init_from, want_quality_head=True, device=device)
    log.info("initialised from %s (%s layout)", config.init_from, report.layout)
    for change in report.added:
        log.info("  added: %s", change)
    if not overrides:
        return loaded
    model = Transformer(loaded.config.replace(**overrides)).to(device)
    model.load_state_dict(loaded.state_dict(), strict=True)  # refuses size changes
    return model


def capture_rng(generators: dict[str, torch.Generator]) -> dict:
    """Every RNG a step can touch, as tensors and plain values (``weights_only`` loadable)."""
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "generators": {name: gen.get_state() for name, gen in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    for name, gen in generators.items():
        gen.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _numpy_state() -> tuple:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    """Writes, lists, prunes and reads the checkpoints of one run (only rank 0 writes)."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3) -> None:
        self.directory = Path(directory)
        self.keep_last = max(1, keep_last)

    def paths(self, name: str) -> dict[str, Path]:
        return {
            "model": self.directory / f"{name}.safetensors",
            "ema": self.directory / f"{name}.ema.safetensors",
            "train": self.directory / f"{name}.train.pt",
        }

    def latest(self) -> str | None:
        """The newest complete checkpoint's name, or None."""
        pointer = self.directory / LATEST_NAME
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        paths = self.paths(name)
        if not (paths["model"].is_file() and paths["train"].is_file()):
            raise FileNotFoundError(f"{pointer} names {name}, whose files are missing")
        return name

    def save(
        self,
        step: int,
        model: nn.Module,
        train_state: dict,
        ema_model: nn.Module | None = None,
        metadata: dict | None = None,
    ) -> str:
        """Write checkpoint ``step`` completely, then point ``latest`` at it, then prune.

        Any failure (a full disk, an interrupt) removes this step's files and leaves ``latest``
        where it was; it is raised as CheckpointSaveError (interrupts are re-raised as is).
        """
        from scan_core.checkpoint.loading import save_checkpoint

        name, previous = checkpoint_name(step), self.latest()
        paths = self.paths(name)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_partials()
        try:
            save_checkpoint(paths["model"], model, "model", extra_metadata=metadata)
            if ema_model is not None:
                save_checkpoint(paths["ema"], ema_model, "model", extra_metadata=metadata)
            atomic_torch_save(train_state, paths["train"])
            atomic_write_text(self.directory / LATEST_NAME, name + "\n")
        except BaseException as error:
            if name != previous:
                for path in paths.values():
                    with contextlib.suppress(OSError):
                        path.unlink()
            self._remove_partials()
            if not isinstance(error, Exception):
                raise
            raise CheckpointSaveError(
                f"could not save checkpoint {name} ({type(error).__name__}: {error}); "
                f"latest is still {previous or 'none'}"
            ) from error
        self.prune()
        return name

    def _remove_partials(self) -> None:
        for path in self.directory.glob(".*.partial"):
            with contextlib.suppress(OSError):
                path.unlink()

    def complete_steps(self) -> list[int]:
        steps = []
        for path in self.directory.glob("step_*.train.pt"):
            with contextlib.suppress(ValueError):
                steps.append(int(path.name[len("step_") : -len(".train.pt")]))
        return sorted(steps)

    def prune(self) -> None:
        """Delete all but the newest ``keep_last`` checkpoints (never the one ``latest`` names)."""
        latest = self.latest()
        steps = self.complete_steps()
        for step in steps[: max(0, len(steps) - self.keep_last)]:
            if checkpoint_name(step) == latest:
                continue
            for path in self.paths(checkpoint_name(step)).values():
                with contextlib.suppress(OSError):
                    path.unlink()

    def load_train_state(self, name: str) -> dict:
        path = self.paths(name)["train"]
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != TRAIN_STATE_FORMAT:
            raise ValueError(f"{path} is not a training state file")
        return state

    def load_weights(self, name: str, which: str = "model") -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.paths(name)[which]))
