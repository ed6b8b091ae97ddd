"""Command line of the emoji classifier: ``python -m scan_core classifier train|eval``."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from scan_core.evaluation.classifier import (
    ClassifierConfig,
    image_features,
    load_classifier,
    save_classifier,
    train_classifier,
)
from scan_core.evaluation.image_metrics import class_accuracy


def _read_data(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    path = folder / f"{split}.npz"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; --data needs train.npz and val.npz")
    with np.load(path, allow_pickle=False) as data:
        return data["images"], data["labels"]


def _class_names(folder: Path, num_classes: int) -> list[str]:
    """Names from the dataset's manifest.json (or class_names.json); indices otherwise."""
    for name, key in (("manifest.json", "class_names"), ("class_names.json", None)):
        path = folder / name
        if path.is_file():
            content = json.loads(path.read_text(encoding="utf-8"))
            names = content.get(key) if key else content
            if isinstance(names, list) and len(names) == num_classes:
                return [str(n) for n in names]
    return [str(index) for index in range(num_classes)]


def _train_command(args: argparse.Namespace) -> None:
    folder = Path(args.data)
    train, val = _read_data(folder, "train"), _read_data(folder, "val")
    num_classes = int(max(train[1].max(), val[1].max())) + 1
    config = ClassifierConfig(
        num_classes=num_classes,
        image_size=train[0].shape[1],
        channels=tuple(int(c) for c in args.channels.split(",")),
        feature_dim=args.feature_dim,
    )
    settings = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    model, report = train_classifier(
        *train, *val, **settings, progress=not args.no_progress, config=config
    )
    manifest = folder / "manifest.json"
    if manifest.is_file():  # ties the checkpoint to the exact data it was trained on
        report["data_manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    report["data"] = str(folder)
    out = save_classifier(args.out, model, _class_names(folder, num_classes), report)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"saved {out}: val accuracy {report['val_accuracy']:.4f} at epoch "
        f"{report['best_epoch']}/{args.epochs}, {parameters:,} parameters, "
        f"{out.stat().st_size / 2**20:.2f} MiB, {report['train_seconds']:.0f} s"
    )


def _eval_command(args: argparse.Namespace) -> None:
    model = load_classifier(args.model)
    images, labels = _read_data(Path(args.data), args.split)
    predicted = image_features(model, images)[1]
    accuracy = class_accuracy(predicted, labels)
    print(f"{args.split} accuracy {accuracy:.4f} ({len(labels)} images, {args.model})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scan_core classifier", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train on <data>/train.npz, select on val.npz")
    train.add_argument("--data", required=True, help="folder with train.npz and val.npz")
    train.add_argument("--out", required=True, help="output .safetensors file")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--channels", default="32,64,128", help="comma-separated stage widths")
    train.add_argument("--feature-dim", type=int, default=128)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate = commands.add_parser("eval", help="accuracy of a checkpoint on a split")
    evaluate.add_argument("--model", required=True, help="classifier .safetensors file")
    evaluate.add_argument("--data", required=True, help="folder with <split>.npz")
    evaluate.add_argument("--split", default="val")
    for command in (train, evaluate):
        command.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        _train_command(args) if args.command == "train" else _eval_command(args)
    except ValueError as error:  # CheckpointError included: one line, no traceback
        raise SystemExit(f"error: {error}") from None
    return 0
