"""Images -> sharded VQ codes for training (``python -m scan_core extract_codes``).

Usage::

    python -m scan_core extract_codes --images DIR --tokenizer VQ.safetensors --out CODES \
        [--labels labels.csv] [--flip] [--shard-size 4096] [--image-size 256]

``DIR`` holds one sub-folder per class (sorted names give the class ids), or any files listed in
``--labels`` (CSV rows ``path,label``; the label is an integer id or a class name). ``--images``
may also be an ``.npz`` with ``images`` (n, S, S, 3) uint8 and ``labels`` (n,), as written by
``scan_core.datasets.emoji`` (class names from a ``class_names.json`` beside it). Each image is
ADM centre-cropped (``scan_core.images.center_crop_adm``) and encoded; ``--flip`` also stores the
codes of the mirrored image. Output format: see ``scan_core.datasets.codes``.

Resumable: every finished shard is written atomically, so a rerun with the same inputs skips
them. Unreadable images are named in the manifest, skipped and counted; more than
``--max-bad-fraction`` of them stops the run with an error.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from scan_core.datasets.codes import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    code_dtype,
    shard_name,
    write_manifest,
    write_shard,
)
from scan_core.files import file_sha256
from scan_core.images import center_crop_adm, load_image, pil_to_tensor
from scan_core.tokenizer.vq import VQModel

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class ExtractionError(RuntimeError):
    """Extraction cannot go on; the message says why and what to do."""


@dataclass
class ShardResult:
    count: int
    bad: list[dict] = field(default_factory=list)
    per_class: dict[int, int] = field(default_factory=dict)


def list_images(
    images_dir: str | os.PathLike, labels_file: str | os.PathLike | None = None
) -> tuple[list[tuple[str, int]], list[str]]:
    """(relative path, class id) for every image, sorted, and the class names."""
    root = Path(images_dir)
    if root.is_file() and root.suffix == ".npz":
        items, names = _from_array_file(root)
    elif not root.is_dir():
        raise ExtractionError(f"--images {root} is neither a directory nor an .npz of images")
    else:
        items, names = _from_labels(root, labels_file) if labels_file else _from_folders(root)
    if not items:
        raise ExtractionError(f"no images found in {root} (looked for {sorted(IMAGE_SUFFIXES)})")
    return items, names


def _from_folders(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        if loose:
            raise ExtractionError(
                f"{root} holds images but no class sub-folders: put each class in its own "
                "folder, or pass --labels FILE with rows 'path,label'"
            )
        return [], []
    items = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                items.append((path.relative_to(root).as_posix(), label))
    return items, classes


def _from_array_file(path: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """Items of an image array file: the "path" of row i is ``"#i"``."""
    with np.load(path) as data:
        if "images" not in data.files or "labels" not in data.files:
            raise ExtractionError(f"{path} needs 'images' and 'labels' arrays, has {data.files}")
        labels = data["labels"].astype(np.int64)
    names_file = path.parent / "class_names.json"
    if names_file.is_file():
        names = [str(name) for name in json.loads(names_file.read_text())]
    else:
        names = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
    return [(f"#{index}", int(label)) for index, label in enumerate(labels)], names


def _open_image(root: Path, rel: str, arrays: dict) -> Image.Image:
    """A listed image: a file under ``root``, or row ``#i`` of the image array file ``root``."""
    if not rel.startswith("#"):
        return load_image(root / rel)
    if "images" not in arrays:
        with np.load(root) as data:
            arrays["images"] = data["images"]
    return Image.fromarray(arrays["images"][int(rel[1:])]).convert("RGB")


def _from_labels(root: Path, labels_file) -> tuple[list[tuple[str, int]], list[str]]:
    with open(labels_file, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row and not row[0].startswith("#")]
    if rows and [cell.strip().lower() for cell in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    bad_rows = [row for row in rows if len(row) < 2]
    if bad_rows:
        raise ExtractionError(f"{labels_file}: rows must be 'path,label', got {bad_rows[0]}")
    raw = [(row[0].strip(), row[1].strip()) for row in rows]
    if all(label.lstrip("-").isdigit() for _, label in raw):
        ids = [int(label) for _, label in raw]
        if ids and min(ids) < 0:
            raise ExtractionError(f"{labels_file}: class ids must be >= 0")
        names = [str(i) for i in range(max(ids) + 1)] if ids else []
    else:
        names = sorted({label for _, label in raw})
        ids = [names.index(label) for _, label in raw]
    return sorted((path, label) for (path, _), label in zip(raw, ids, strict=True)), names


def load_tokenizer_file(path: str | os.PathLike, device: torch.device) -> tuple[VQModel, dict]:
    """The tokenizer and the description stored in the manifest (file hash, path, config)."""
    from scan_core.checkpoint.loading import load_tokenizer

    tokenizer, report = load_tokenizer(path, device=device)
    info = {
        "sha256": file_sha256(path),
        "path": os.fspath(path),
        "config": report.config.to_dict(),
        "preset": report.preset,
    }
    return tokenizer, info


def plan_manifest(
    items: list[tuple[str, int]],
    names: list[str],
    tokenizer_info: dict,
    grid: tuple[int, int],
    vocab_size: int,
    options: dict,
) -> dict:
    """The manifest before any shard exists (``complete`` false); its fingerprint guards resume."""
    listing = "\n".join(f"{path}\t{label}" for path, label in items).encode()
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "complete": False,
        "tokenizer": tokenizer_info,
        "grid": list(grid),
        "vocab_size": vocab_size,
        "class_names": names,
        "flip": options["flip"],
        "image_size": options["image_size"],
        "shard_size": options["shard_size"],
        "listing_sha256": hashlib.sha256(listing).hexdigest(),
        "counts": {"images": len(items)},
    }


_FINGERPRINT = ("tokenizer", "grid", "vocab_size", "flip", "image_size", "shard_size")


def check_resume(out_dir: Path, plan: dict) -> None:
    """Refuse to mix two different extractions in one output directory."""
    path = out_dir / MANIFEST_NAME
    if not path.exists():
        return
    old = json.loads(path.read_text())
    keys = (*_FINGERPRINT, "listing_sha256")
    diff = [key for key in keys if old.get(key) != plan.get(key)]
    if diff:
        raise ExtractionError(
            f"{out_dir} already holds codes from a different extraction (differs in "
            f"{', '.join(diff)}); pass another --out or delete that directory"
        )


def encode_shard(
    items: list[tuple[str, int]],
    root: Path,
    tokenizer: VQModel,
    options: dict,
    progress: tqdm,
) -> tuple[dict[str, np.ndarray], ShardResult]:
    """Load, crop and encode one shard's images; unreadable files are recorded, not fatal."""
    device = next(tokenizer.parameters()).device
    grid, dtype = options["grid"], code_dtype(options["vocab_size"])
    codes, flips, labels, paths, bad = [], [], [], [], []
    for start in range(0, len(items), options["batch_size"]):
        images = []
        for rel, label in items[start : start + options["batch_size"]]:
            try:
                image = _open_image(root, rel, options.setdefault("arrays", {}))
                images.append(center_crop_adm(image, options["image_size"]))
            except (ValueError, OSError) as error:  # what load_image raises for a bad file
                bad.append({"path": rel, "reason": str(error).splitlines()[0][:300]})
                continue
            labels.append(label)
            paths.append(rel)
        progress.update(min(options["batch_size"], len(items) - start))
        if not images:
            continue
        pixels = pil_to_tensor(images).to(device)
        codes.append(tokenizer.encode(pixels).cpu().numpy().astype(dtype))
        if options["flip"]:
            flips.append(tokenizer.encode(pixels.flip(-1)).cpu().numpy().astype(dtype))
    empty = np.zeros((0, *grid), dtype=dtype)
    arrays = {
        "codes": np.concatenate(codes) if codes else empty,
        "labels": np.asarray(labels, dtype=np.int64),
        "paths": np.asarray(paths, dtype=str),
        "bad_paths": np.asarray([b["path"] for b in bad], dtype=str),
        "bad_reasons": np.asarray([b["reason"] for b in bad], dtype=str),
    }
    if options["flip"]:
        arrays["codes_flip"] = np.concatenate(flips) if flips else empty
    return arrays, _summarise(arrays)


def _summarise(arrays) -> ShardResult:
    bad = [
        {"path": str(path), "reason": str(reason)}
        for path, reason in zip(arrays["bad_paths"], arrays["bad_reasons"], strict=True)
    ]
    labels, counts = np.unique(arrays["labels"], return_counts=True)
    per_class = {int(k): int(v) for k, v in zip(labels, counts, strict=True)}
    return ShardResult(len(arrays["labels"]), bad, per_class)


def _read_finished(path: Path) -> ShardResult:
    with np.load(path) as shard:
        return _summarise({key: shard[key] for key in ("labels", "bad_paths", "bad_reasons")})


def _too_many_bad(bad: list[dict], total: int, limit: float) -> None:
    if len(bad) > limit * total:
        shown = "; ".join(f"{b['path']}: {b['reason']}" for b in bad[:5])
        raise ExtractionError(
            f"{len(bad)} of {total} images are unreadable, over --max-bad-fraction {limit} "
            f"(first: {shown}). Fix or remove them, or raise the limit; finished shards are kept"
        )


def extract(
    images_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    labels_file: str | os.PathLike | None = None,
    flip: bool = False,
    shard_size: int = 4096,
    image_size: int | None = None,
    batch_size: int = 64,
    max_bad_fraction: float = 0.01,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Extract every image's codes into ``out_dir``; returns the complete manifest."""
    root, out = Path(images_dir), Path(out_dir)
    items, names = list_images(root, labels_file)
    torch_device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    )
    tokenizer, info = load_tokenizer_file(tokenizer_path, torch_device)
    size = image_size or tokenizer.config.image_size
    factor = tokenizer.downsample_factor
    if size % factor:
        raise ExtractionError(f"--image-size {size} is not a multiple of the tokenizer's {factor}")
    grid = (size // factor,) * 2
    vocab = tokenizer.config.codebook_size
    options = {"flip": flip, "image_size": size, "shard_size": shard_size}
    plan = plan_manifest(items, names, info, grid, vocab, options)
    out.mkdir(parents=True, exist_ok=True)
    check_resume(out, plan)
    write_manifest(out, plan)
    options |= {"grid": grid, "vocab_size": vocab, "batch_size": batch_size}
    results = _run_shards(items, root, out, tokenizer, options, max_bad_fraction, progress)
    return _finish(out, plan, results)


def _run_shards(items, root, out, tokenizer, options, max_bad_fraction, progress) -> list:
    shard_size = options["shard_size"]
    results, bad = [], []
    with tqdm(total=len(items), desc="extract", unit="img", disable=not progress) as bar:
        for index, start in enumerate(range(0, len(items), shard_size)):
            path = out / shard_name(index)
            part = items[start : start + shard_size]
            if path.exists():  # finished in an earlier run (shards are written atomically)
                result = _read_finished(path)
                bar.update(len(part))
            else:
                arrays, result = encode_shard(part, root, tokenizer, options, bar)
                write_shard(path, arrays)
            results.append((path.name, result))
            bad += result.bad
            _too_many_bad(bad, len(items), max_bad_fraction)
    return results


def _finish(out: Path, plan: dict, results: list[tuple[str, ShardResult]]) -> dict:
    per_class = [0] * len(plan["class_names"])
    for _, result in results:
        for label, count in result.per_class.items():
            per_class[label] += count
    bad = [b for _, result in results for b in result.bad]
    manifest = plan | {
        "complete": True,
        "shards": [{"file": name, "count": result.count} for name, result in results],
        "counts": {
            "images": plan["counts"]["images"],
            "codes": sum(result.count for _, result in results),
            "bad": len(bad),
            "per_class": per_class,
        },
        "bad_files": bad,
    }
    write_manifest(out, manifest)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scan_core extract_codes",
        description="Encode images into sharded VQ codes for SCAN training.",
    )
    parser.add_argument(
        "--images", required=True, help="folder (one sub-folder per class) or an images .npz"
    )
    parser.add_argument("--labels", help="CSV of 'path,label' rows (paths relative to --images)")
    parser.add_argument("--tokenizer", required=True, help="VQ checkpoint (own format or .pt)")
    parser.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    parser.add_argument("--flip", action="store_true", help="also store mirrored-image codes")
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--image-size", type=int, help="crop size (default: the tokenizer's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-bad-fraction", type=float, default=0.01)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = extract(
            args.images,
            args.tokenizer,
            args.out,
            args.labels,
            args.flip,
            args.shard_size,
            args.image_size,
            args.batch_size,
            args.max_bad_fraction,
            args.device,
            not args.no_progress,
        )
    except (ExtractionError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = manifest["counts"]
    print(
        f"{counts['codes']} code grids ({'x'.join(map(str, manifest['grid']))}) from "
        f"{counts['images']} images, {counts['bad']} unreadable, in {args.out}"
    )
    for entry in manifest["bad_files"][:20]:
        print(f"  skipped {entry['path']}: {entry['reason']}")
    return 0
