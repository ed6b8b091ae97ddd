"""Emoji image dataset for the small tokenizer and model: Noto Emoji, optionally Twemoji.

Images come from the npm packages of iamcal/emoji-data (``emoji-datasource-<style>@16.0.0``):
``package/img/<style>/64/*.png`` (64 px) and ``package/emoji.json`` (category, skin tones, order).

Choices, each recorded in ``manifest.json``:
- Label = category index (9 categories; "Component", the bare skin-tone swatches, is dropped).
  With ``--twemoji`` the label is style x category (18 classes).
- People & Body has 386 base emoji but 1,875 skin-tone variants. We keep every base emoji (the
  default yellow) plus at most ``max_skin_variants`` (default 1) variants per base, drawn only from
  the uniform-tone ones (couples with two different tones are skipped) by an RNG seeded with the
  base's code, so tones spread evenly. People & Body then holds ~709 images, not 2,261.
  ``--max-skin-variants -1`` keeps every variant.
- Held-out split by base emoji, stratified by category: a base and all its variants (and its
  other style) land on the same side. ~10% of the bases of each category go to val.
- Transparency is composited onto white at the native 64 px, then the RGB image is resized
  (Lanczos), so colours stored under transparent pixels never bleed into the result.

Outputs (``--out``): ``train.npz`` / ``val.npz`` (``images`` (n, S, S, 3) uint8, ``labels`` (n,)
int64, ``base_ids``, ``unified``, ``names``), ``class_names.json`` and ``manifest.json``. Equal
inputs give byte-identical files (fixed zip timestamps, no wall-clock data).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from scan_core.datasets.emoji_examples import EXAMPLES, write_examples
from scan_core.datasets.emoji_package import (
    SOURCES,
    Package,
    Source,
    fetch_tarball,
    file_sha256,
    load_packages,
    read_package,
)
from scan_core.images import to_rgb

# The npm packages (SOURCES, fetch_tarball, read_package, ...) live in emoji_package and the
# example pictures in emoji_examples; their names stay importable from here.
__all__ = [
    "CATEGORIES",
    "DROPPED_CATEGORIES",
    "EXAMPLES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "METADATA_LICENCE",
    "NATIVE_SIZE",
    "PREPROCESSING",
    "SKIN_TONE_RULE",
    "SOURCES",
    "SPLIT_UNIT",
    "EmojiImage",
    "Package",
    "Source",
    "choose_variants",
    "class_names",
    "fetch_tarball",
    "file_sha256",
    "is_uniform_tone",
    "load_packages",
    "load_rgba",
    "load_split",
    "main",
    "prepare",
    "read_package",
    "render",
    "select_images",
    "split_bases",
    "write_examples",
    "write_npz",
]

FORMAT_NAME = "scan-emoji"
FORMAT_VERSION = 1
NATIVE_SIZE = 64
# Unicode's category order; the index is the class label (stable across package versions).
CATEGORIES = (
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
)
DROPPED_CATEGORIES = ("Component",)
METADATA_LICENCE = (
    "emoji.json and packaging: iamcal/emoji-data, MIT (Copyright (c) 2013 Cal Henderson)"
)
PREPROCESSING = "RGBA composited onto white at 64 px, then Lanczos resize to image_size"
SPLIT_UNIT = "base emoji (skin-tone variants and styles follow their base), per category"
SKIN_TONE_RULE = (
    "every base emoji plus up to max_variants_per_base uniform-tone variants, drawn with "
    "random.Random(f'{seed}/{base_id}'); -1 keeps all variants"
)
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps keep the .npz files reproducible


@dataclass(frozen=True)
class EmojiImage:
    """One picture: a base emoji or one of its skin-tone variants, in one style."""

    base_id: str  # unified code of the base emoji, shared by its variants and styles
    unified: str  # this picture's own code sequence
    name: str  # short name, e.g. "grinning"
    category: str
    style: str
    image: str  # file name under package/img/<style>/64/
    sort_order: int


# ------------------------------------------------------------------------------------ selection


def is_uniform_tone(key: str) -> bool:
    """A skin-variation key like "1F3FB" or "1F3FB-1F3FB" (every person in the same tone)."""
    return len(set(key.split("-"))) == 1


def choose_variants(base_id: str, keys: list[str], max_variants: int, seed: int) -> list[str]:
    """The skin-tone variants kept for one base emoji (deterministic; see the module docstring)."""
    if max_variants < 0:
        return sorted(keys)
    uniform = sorted(key for key in keys if is_uniform_tone(key))
    # A string seed is hashed with SHA-512 by `random`, so this is stable across processes.
    return sorted(
        random.Random(f"{seed}/{base_id}").sample(uniform, min(max_variants, len(uniform)))
    )


def select_images(
    package: Package, max_skin_variants: int, seed: int
) -> tuple[list[EmojiImage], dict[str, int]]:
    """Every kept picture of one package, in sort order, and counts of what was left out."""
    style = package.source.style
    flag = f"has_img_{style}"
    kept, skipped = [], {"dropped_category": 0, "skin_variant_cap": 0, "missing_image": 0}
    for entry in sorted(package.entries, key=lambda e: (e["sort_order"], e["unified"])):
        category, base_id = entry["category"], entry["unified"]
        variants = entry.get("skin_variations") or {}
        if category in DROPPED_CATEGORIES:
            skipped["dropped_category"] += 1 + len(variants)
            continue
        if category not in CATEGORIES:
            raise ValueError(f"unknown emoji category {category!r} ({base_id}); update CATEGORIES")
        chosen = choose_variants(base_id, list(variants), max_skin_variants, seed)
        skipped["skin_variant_cap"] += len(variants) - len(chosen)
        for item in [entry] + [variants[key] for key in chosen]:
            if not item.get(flag, True) or item["image"] not in package.pngs:
                skipped["missing_image"] += 1
                continue
            name = entry["short_name"] + ("" if item is entry else f":{item['unified']}")
            kept.append(
                EmojiImage(
                    base_id,
                    item["unified"],
                    name,
                    category,
                    style,
                    item["image"],
                    entry["sort_order"],
                )
            )
    return kept, skipped


def split_bases(images: list[EmojiImage], val_fraction: float, seed: int) -> set[str]:
    """Base ids held out for validation: ``val_fraction`` of each category's bases."""
    val: set[str] = set()
    for index, category in enumerate(CATEGORIES):
        bases = sorted({(im.sort_order, im.base_id) for im in images if im.category == category})
        if not bases:
            continue
        count = round(val_fraction * len(bases))
        if val_fraction > 0 and len(bases) >= 2:
            count = min(max(count, 1), len(bases) - 1)  # both sides see every category
        order = np.random.default_rng([seed, index]).permutation(len(bases))
        val.update(bases[i][1] for i in order[:count])
    return val


# ---------------------------------------------------------------------------------------- pixels


def load_rgba(data: bytes) -> Image.Image:
    """PNG bytes in any mode (RGBA, LA, P with transparency, ...) -> an RGBA image."""
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        return opened.convert("RGBA")


def render(rgba: Image.Image, size: int) -> np.ndarray:
    """Composite onto white at the native size, then resize: (size, size, 3) uint8."""
    rgb = to_rgb(rgba)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), resample=Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """``np.savez_compressed`` with fixed timestamps (byte-reproducible); returns the sha256."""
    temp = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())
    temp.replace(path)
    return file_sha256(path)


def load_split(directory: str | Path, split: str) -> dict[str, np.ndarray]:
    """Read ``<directory>/<split>.npz`` written by :func:`prepare` (no pickles)."""
    with np.load(Path(directory) / f"{split}.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


# --------------------------------------------------------------------------------------- prepare


def class_names(styles: list[str]) -> list[str]:
    """Category names; with several styles, "<style label> / <category>" in style-major order."""
    if len(styles) == 1:
        return list(CATEGORIES)
    return [f"{SOURCES[style].label} / {category}" for style in styles for category in CATEGORIES]


def _arrays(images: list[EmojiImage], packages: dict[str, Package], styles, size) -> dict:
    labels = [
        styles.index(im.style) * len(CATEGORIES) + CATEGORIES.index(im.category) for im in images
    ]
    pixels = [render(load_rgba(packages[im.style].pngs[im.image]), size) for im in images]
    return {
        "images": np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8),
        "labels": np.asarray(labels, dtype=np.int64),
        "base_ids": np.asarray([im.base_id for im in images], dtype=str),
        "unified": np.asarray([im.unified for im in images], dtype=str),
        "names": np.asarray([im.name for im in images], dtype=str),
    }


def _counts(labels: np.ndarray, names: list[str]) -> dict[str, int]:
    return {name: int((labels == index).sum()) for index, name in enumerate(names)}


def _source_record(package: Package) -> dict:
    source = package.source
    return {
        "style": source.style,
        "package": source.package,
        "version": source.version,
        "tarball": package.path.name,
        "tarball_sha256": package.sha256,
        "licence": source.licence,
        "attribution": source.attribution,
    }


def prepare(
    out: str | Path,
    packages: list[Package],
    size: int = 32,
    seed: int = 0,
    val_fraction: float = 0.1,
    max_skin_variants: int = 1,
) -> dict:
    """Write the dataset for ``packages`` (first style first) to ``out``; return the manifest."""
    if size <= 0 or size > NATIVE_SIZE:
        raise ValueError(f"size must be in 1..{NATIVE_SIZE}, got {size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_style = {package.source.style: package for package in packages}
    styles = list(by_style)
    images, skipped = [], {}
    for style in styles:
        kept, skipped[style] = select_images(by_style[style], max_skin_variants, seed)
        images += kept
    val_bases = split_bases(images, val_fraction, seed)
    names = class_names(styles)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_files, counts = {}, {}
    for split in ("train", "val"):
        chosen = [im for im in images if (im.base_id in val_bases) == (split == "val")]
        arrays = _arrays(chosen, by_style, styles, size)
        manifest_files[f"{split}.npz"] = write_npz(out / f"{split}.npz", arrays)
        counts[split] = _counts(arrays["labels"], names)
        counts[f"{split}_bases"] = len({im.base_id for im in chosen})
    (out / "class_names.json").write_text(json.dumps(names, indent=2) + "\n")
    manifest_files["class_names.json"] = file_sha256(out / "class_names.json")
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "image_size": size,
        "native_size": NATIVE_SIZE,
        "preprocessing": PREPROCESSING,
        "class_names": names,
        "label": "category index" if len(styles) == 1 else "style index * 9 + category index",
        "counts": counts,
        "totals": {split: sum(counts[split].values()) for split in ("train", "val")},
        "split": {"seed": seed, "val_fraction": val_fraction, "unit": SPLIT_UNIT},
        "skin_tones": {"max_variants_per_base": max_skin_variants, "rule": SKIN_TONE_RULE},
        "dropped_categories": list(DROPPED_CATEGORIES),
        "skipped": skipped,
        "sources": [_source_record(by_style[style]) for style in styles],
        "metadata_licence": METADATA_LICENCE,
        "files": manifest_files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scan_core emoji_data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="build train.npz / val.npz and the manifest")
    prep.add_argument("--out", required=True, help="output directory, e.g. data/emoji")
    prep.add_argument("--size", type=int, default=32, help="image side in pixels (<= 64)")
    prep.add_argument("--twemoji", action="store_true", help="add Twemoji as a second style")
    prep.add_argument("--seed", type=int, default=0, help="seed of the split and variant choice")
    prep.add_argument("--val-fraction", type=float, default=0.1, help="share of base emoji in val")
    prep.add_argument("--max-skin-variants", type=int, default=1, help="per base; -1 keeps all")
    examples = commands.add_parser("examples", help="copy example PNGs + ATTRIBUTION.md")
    examples.add_argument("--out", default="assets/examples")
    for sub in (prep, examples):
        sub.add_argument("--tarball", action="append", default=[], help="a local .tgz (repeat)")
        sub.add_argument("--download-dir", type=Path, help="keep npm downloads here")
    args = parser.parse_args(argv)
    try:
        if args.command == "examples":
            (package,) = load_packages(["google"], args.tarball, args.download_dir)
            for path in write_examples(args.out, package):
                print(path)
            return 0
        styles = ["google", "twitter"] if args.twemoji else ["google"]
        packages = load_packages(styles, args.tarball, args.download_dir)
        manifest = prepare(
            args.out, packages, args.size, args.seed, args.val_fraction, args.max_skin_variants
        )
    except (RuntimeError, ValueError, OSError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"totals": manifest["totals"], "counts": manifest["counts"]}, indent=2))
    return 0
