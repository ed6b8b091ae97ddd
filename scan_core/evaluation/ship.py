"""Package trained weights as the embedded default in ``checkpoints/``.

    python -m scan_core ship --model runs/emoji2/scan_s/checkpoints/step_00002500.safetensors \\
        --tokenizer runs/vq_s/best.safetensors --data data/emoji2 --report eval.json

Each file gets a card in its metadata (data, licences, the sampler settings the evaluation chose,
the headline metrics), and ``checkpoints/manifest.json`` records every file's SHA-256 so tests
can prove the shipped files are the ones the model card describes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scan_core.checkpoint.convert import convert
from scan_core.checkpoint.loading import CheckpointError
from scan_core.files import file_sha256, read_json, write_json
from scan_core.sampling.setting_inputs import add_setting_flags, settings_from_args
from scan_core.sampling.settings import SamplerSettings

ROOT = Path(__file__).resolve().parents[2]  # the repository: scan_core/evaluation/ship.py
MODEL_FILE, TOKENIZER_FILE, MANIFEST_FILE = (
    "scan-emoji.safetensors",
    "vq-emoji.safetensors",
    "manifest.json",
)
CARD_FILE = "README.md"


def data_provenance(data: Path) -> dict:
    """Sources, licences and split of the training images, from the data manifest."""
    manifest = read_json(data / "manifest.json")
    if manifest is None:
        raise CheckpointError(f"no readable manifest.json in {data}")
    keep = ("sources", "split", "totals", "preprocessing", "image_size", "label")
    return {key: manifest[key] for key in keep if key in manifest}


def model_card(args, provenance: dict, class_names: list[str]) -> dict:
    report = read_json(args.report) if args.report else None
    card = {
        "name": "SCAN-S emoji (embedded default)",
        "class_names": class_names,
        "data": provenance,
        "card": f"checkpoints/{CARD_FILE}",
    }
    if report:
        # from_dict reads reports written before the settings' rename under today's names
        measured = SamplerSettings.from_dict(report["settings"])
        measured = measured.replace(num_rounds=report["summary"]["refined_T"])
        card["sampler"] = settings_from_args(args, measured).to_dict()
        card["evaluation"] = report["summary"]
    if args.note:
        card["note"] = args.note
    return card


def write_manifest(directory: Path) -> dict:
    """``manifest.json``: SHA-256 and size of every shipped file (the card's hash table)."""
    files = sorted(p for p in directory.iterdir() if p.suffix == ".safetensors")
    manifest = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in files}
    write_json(manifest, directory / MANIFEST_FILE)
    return manifest


def ship(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    provenance = data_provenance(Path(args.data))
    names = read_json(Path(args.data) / "class_names.json")
    names = names.get("class_names", names) if isinstance(names, dict) else names
    if not isinstance(names, list):
        raise CheckpointError(f"no class_names.json list in {args.data}")
    card = model_card(args, provenance, names)
    convert(args.model, out / MODEL_FILE, card=card)
    convert(
        args.tokenizer,
        out / TOKENIZER_FILE,
        card={"name": "VQ-S emoji", "data": provenance, "card": f"checkpoints/{CARD_FILE}"},
    )
    write_json(names, Path(args.class_names))
    return write_manifest(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scan_core ship", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True, help="the prepared emoji folder (manifest)")
    parser.add_argument(
        "--report", help="scan_core.evaluation.evaluate --out JSON (settings, metrics)"
    )
    title = "the card's recommended sampler settings (default: the report's, T its refined T)"
    add_setting_flags(parser, title=title)
    parser.add_argument("--note", help="one line the studio shows, e.g. why the default T is 0")
    parser.add_argument("--out", default=str(ROOT / "checkpoints"))
    parser.add_argument("--class-names", default=str(ROOT / "assets" / "class_names.json"))
    args = parser.parse_args(argv)
    try:
        manifest = ship(args)
    except (CheckpointError, OSError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(manifest, indent=2))
    return 0
