"""A small CNN emoji classifier: the project's own feature extractor for FID-style metrics.

Inception was trained on 299 px photos; on 32 px emoji its features say little. This network
is trained on the emoji training split itself, and its penultimate layer (global average pool +
linear) plays Inception's pool3 role: ``image_features`` feeds ``image_metrics``, and
its predicted classes give a class-consistency score for class-conditional samples.

Images follow the tokenizer's convention (``scan_core.images``): float (B, 3, H, W) in [-1, 1].
Checkpoints are one safetensors file whose metadata holds ``format`` / ``version`` (as in
``checkpoint.loading``), ``kind`` = "classifier", ``config``, ``class_names`` and ``report``.

    python -m scan_core classifier train --data DATA --out OUT.safetensors [--epochs 30 --threads 1]
    python -m scan_core classifier eval --data DATA --model OUT.safetensors
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from tqdm import tqdm

from scan_core.checkpoint.files import FORMAT_NAME, FORMAT_VERSION, CheckpointError
from scan_core.evaluation.image_metrics import class_accuracy
from scan_core.files import atomic_write
from scan_core.images import uint8_to_tensor
from scan_core.model.config import strict_from_dict

__all__ = [
    "ClassifierConfig",
    "ImageClassifier",
    "classifier_metadata",
    "image_features",
    "load_classifier",
    "save_classifier",
    "train_classifier",
]

KIND = "classifier"
SHIFT_PIXELS = 2  # augmentation: emoji are centred, so small shifts are realistic, big ones not


@dataclass(frozen=True)
class ClassifierConfig:
    """Network sizes. One stage per entry of ``channels``; each stage after the first halves H, W.

    The default (32, 64, 128) with feature_dim 128 has ~306k parameters (1.2 MB in float32).
    """

    num_classes: int
    image_size: int = 32
    channels: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if not self.channels or min(self.channels) < 1 or self.feature_dim < 1:
            raise ValueError(f"channels and feature_dim must be positive, got {self}")
        if self.image_size < 2 ** (len(self.channels) - 1):
            raise ValueError(
                f"image_size {self.image_size} is too small for {len(self.channels)} stages"
            )

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, data: dict) -> ClassifierConfig:
        return strict_from_dict(cls, data)


def _stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + GELU layers (no conv bias: BatchNorm adds its own)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.GELU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.GELU(),
    )


class ImageClassifier(nn.Module):
    """Conv stages -> global average pool -> linear features (B, D) -> logits (B, classes)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        widths = (3, *config.channels)
        layers: list[nn.Module] = []
        for index in range(len(config.channels)):
            if index:
                layers.append(nn.MaxPool2d(2))
            layers.append(_stage(widths[index], widths[index + 1]))
        self.body = nn.Sequential(*layers)
        self.project = nn.Linear(config.channels[-1], config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def _check_input(self, images: Tensor) -> None:
        size = self.config.image_size
        expected = f"float (B, 3, {size}, {size}) images in [-1, 1]"
        if not isinstance(images, Tensor) or not images.is_floating_point():
            raise ValueError(f"expected {expected}, got {getattr(images, 'dtype', type(images))}")
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"expected {expected}, got shape {tuple(images.shape)}")

    def features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, feature_dim), the penultimate layer."""
        self._check_input(images)
        pooled = self.body(images).mean(dim=(2, 3))  # (B, C)
        return F.gelu(self.project(pooled))  # (B, D)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> logits (B, num_classes)."""
        return self.head(self.features(images))


# ------------------------------------------------------------------------------- inference


def _to_tensor(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], as ``images.pil_to_tensor``."""
    return uint8_to_tensor(images)


def _check_uint8_images(images: np.ndarray, name: str = "images") -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"{name} must be a uint8 numpy array, got {getattr(images, 'dtype', '?')}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (N, H, W, 3), got {images.shape}")


def image_features(
    model: ImageClassifier, images: np.ndarray, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and predicted classes of uint8 (N, H, W, 3) images.

    Returns:
        features float64 (N, feature_dim) and predicted labels int64 (N,). The model runs in eval
        mode (BatchNorm running statistics) and is put back in its previous mode afterwards.
    """
    _check_uint8_images(images)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    features, predicted = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = _to_tensor(images[start : start + batch_size]).to(device)
            feats = model.features(batch)  # (b, D)
            features.append(feats.double().cpu())
            predicted.append(model.head(feats).argmax(dim=1).cpu())
    model.train(was_training)
    if not features:
        return np.zeros((0, model.config.feature_dim)), np.zeros(0, dtype=np.int64)
    return torch.cat(features).numpy(), torch.cat(predicted).numpy()


# ------------------------------------------------------------------------------- save / load


def save_classifier(
    path: str | os.PathLike,
    model: ImageClassifier,
    class_names: list[str] | None = None,
    report: dict | None = None,
) -> Path:
    """Write weights + config (+ class names, training report) as safetensors, atomically."""
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": KIND,
        "config": json.dumps(model.config.to_dict()),
        "class_names": json.dumps(list(class_names or [])),
        "report": json.dumps(report or {}),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = safetensors_bytes(tensors, metadata=metadata)
    return atomic_write(path, lambda handle: handle.write(data))


def _open_checkpoint(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata, tensors) of a classifier file; CheckpointError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no classifier checkpoint at {path}; train one with `python -m scan_core classifier "
            f"train --data data/emoji2 --out {path}`"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        detail = (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path} is not a readable safetensors file ({detail})") from None
    if metadata.get("format") != FORMAT_NAME or metadata.get("kind") != KIND:
        found = metadata.get("kind") or "no SCAN Studio metadata"
        raise CheckpointError(f"{path} is not a classifier checkpoint (kind: {found})")
    if metadata.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {metadata.get('version')!r}; this code reads "
            f"{FORMAT_VERSION!r}"
        )
    return metadata, tensors


def _decode_metadata(path: str | os.PathLike, metadata: dict[str, str]) -> dict:
    try:
        return {
            "config": ClassifierConfig.from_dict(json.loads(metadata["config"])),
            "class_names": json.loads(metadata.get("class_names", "[]")),
            "report": json.loads(metadata.get("report", "{}")),
        }
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} has invalid classifier metadata: {error}") from None


def classifier_metadata(path: str | os.PathLike) -> dict:
    """The decoded metadata: ``config`` (ClassifierConfig), ``class_names``, ``report``."""
    return _decode_metadata(path, _open_checkpoint(path)[0])


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> ImageClassifier:
    """Load a checkpoint written by :func:`save_classifier`; the model is in eval mode."""
    metadata, tensors = _open_checkpoint(path)
    config = _decode_metadata(path, metadata)["config"]
    model = ImageClassifier(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise CheckpointError(f"{path} does not match its stored config: {first}") from None
    return model.to(device).eval()


# --------------------------------------------------------------------------------- training


def _augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random horizontal flip and a random shift of up to SHIFT_PIXELS, filling with white.

    White (1.0 in [-1, 1]) because the emoji sit on white backgrounds: a black or zero border
    would be a cue the real images never show.
    """
    count, _, height, width = images.shape
    flip = torch.rand(count, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    padded = F.pad(images, (SHIFT_PIXELS,) * 4, value=1.0)
    offsets = torch.randint(0, 2 * SHIFT_PIXELS + 1, (count, 2), generator=generator).tolist()
    return torch.stack(
        [padded[i, :, y : y + height, x : x + width] for i, (y, x) in enumerate(offsets)]
    )


def _check_split(images: np.ndarray, labels: np.ndarray, name: str) -> None:
    _check_uint8_images(images, f"{name} images")
    if np.asarray(labels).shape != (len(images),):
        raise ValueError(
            f"{name} labels must have shape ({len(images)},), got {np.asarray(labels).shape}"
        )
    if len(images) == 0:
        raise ValueError(f"the {name} split is empty")


def _cosine(step: int, total: int) -> float:
    """Learning-rate factor: half a cosine from 1 to 0 over the run."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _train_epoch(model, optimizer, scheduler, images, labels, batch_size, generator, bar) -> float:
    """One pass over shuffled, augmented batches; returns the mean training loss."""
    model.train()
    order = torch.randperm(len(images), generator=generator)
    total = 0.0
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        loss = F.cross_entropy(model(_augment(images[index], generator)), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(index)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return total / len(order)


def _fit(model, train, val, epochs, batch_size, optimizer, generator, progress) -> tuple:
    """The epoch loop; returns (history, best state dict, best epoch, best val accuracy)."""
    images, labels = _to_tensor(train[0]), torch.as_tensor(train[1], dtype=torch.long)
    steps = epochs * math.ceil(len(images) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _cosine(step, steps))
    history, best = [], (None, 0, -1.0)
    with tqdm(total=steps, desc="classifier", disable=not progress) as bar:
        for epoch in range(1, epochs + 1):
            loss = _train_epoch(
                model, optimizer, scheduler, images, labels, batch_size, generator, bar
            )
            accuracy = class_accuracy(image_features(model, val[0])[1], val[1])
            history.append({"epoch": epoch, "train_loss": loss, "val_accuracy": accuracy})
            bar.set_postfix(loss=f"{loss:.3f}", val_acc=f"{accuracy:.3f}")
            if accuracy > best[2]:  # early stopping: remember the best epoch's weights
                best = (copy.deepcopy(model.state_dict()), epoch, accuracy)
    return history, *best


def train_classifier(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    config: ClassifierConfig | None = None,
    weight_decay: float = 0.05,
) -> tuple[ImageClassifier, dict]:
    """Train with AdamW and a cosine schedule; keep the epoch with the best val accuracy.

    Args:
        train_images, val_images: uint8 (N, H, W, 3); labels int (N,).
        config: defaults to the standard sizes with num_classes = largest label + 1.

    Returns:
        The best model (eval mode) and a report: per-epoch ``history`` (train_loss,
        val_accuracy), ``best_epoch``, ``val_accuracy``, ``train_seconds`` and the settings.
    """
    _check_split(train_images, train_labels, "train")
    _check_split(val_images, val_labels, "val")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")
    num_classes = int(max(np.max(train_labels), np.max(val_labels))) + 1
    config = config or ClassifierConfig(num_classes=num_classes, image_size=train_images.shape[1])
    if num_classes > config.num_classes:
        raise ValueError(f"labels go up to {num_classes - 1} but num_classes={config.num_classes}")
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = ImageClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)  # shuffling and augmentation
    started = time.perf_counter()
    history, state, best_epoch, accuracy = _fit(
        model,
        (train_images, train_labels),
        (val_images, val_labels),
        epochs,
        batch_size,
        optimizer,
        generator,
        progress,
    )
    model.load_state_dict(state)
    report = {
        "history": history,
        "best_epoch": best_epoch,
        "val_accuracy": accuracy,
        "train_seconds": round(time.perf_counter() - started, 1),
        "epochs": epochs,
        "num_train": len(train_images),
        "num_val": len(val_images),
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
    }
    return model.eval(), report
