"""``python -m scan_core ship``: cards in the metadata, a manifest that matches the files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scan_core.checkpoint.loading import load_model, load_tokenizer, save_checkpoint
from scan_core.evaluation import ship
from scan_core.files import file_sha256
from scan_core.model.config import vq_preset
from scan_core.sampling.settings import recommended_settings
from scan_core.tokenizer.vq import VQModel
from tests.conftest import random_model, tiny_config

REPO = Path(__file__).resolve().parents[1]
NAMES = ["Noto / a", "Noto / b", "Noto / c"]


def _inputs(tmp_path):
    torch.manual_seed(0)
    model = save_checkpoint(
        tmp_path / "m.safetensors", random_model(tiny_config(num_classes=3)), "model"
    )
    vq = save_checkpoint(
        tmp_path / "v.safetensors", VQModel(vq_preset("VQ-tiny", image_size=8)), "tokenizer"
    )
    data = tmp_path / "data"
    data.mkdir()
    source = {"licence": "Apache-2.0", "attribution": "Noto Emoji by Google"}
    (data / "manifest.json").write_text(json.dumps({"sources": [source], "totals": {"train": 9}}))
    (data / "class_names.json").write_text(json.dumps(NAMES))
    report = tmp_path / "report.json"
    settings = {"num_steps": 4, "num_rounds": 6, "tokens_per_round": 2, "cfg_scale": 2.0}
    summary = {"refined_T": 6, "fd_t0": 2.0, "fd_refined": 1.5}
    report.write_text(json.dumps({"settings": settings, "summary": summary}))
    return model, vq, data, report


def _argv(model, vq, data, out, names) -> list[str]:
    """The flags every ship run needs."""
    argv = [
        "--model",
        model,
        "--tokenizer",
        vq,
        "--data",
        data,
        "--out",
        out,
        "--class-names",
        names,
    ]
    return [str(arg) for arg in argv]


def test_ship_writes_cards_manifest_and_class_names(tmp_path):
    model, vq, data, report = _inputs(tmp_path)
    out, names = tmp_path / "checkpoints", tmp_path / "class_names.json"
    argv = [*_argv(model, vq, data, out, names), "--report", str(report)]
    assert ship.main([*argv, "--num-rounds", "0", "--note", "T = 0: refinement did not help"]) == 0
    manifest = json.loads((out / ship.MANIFEST_FILE).read_text())
    assert set(manifest) == {ship.MODEL_FILE, ship.TOKENIZER_FILE}
    for name, entry in manifest.items():
        assert entry["sha256"] == file_sha256(out / name)
    _, report_m = load_model(out / ship.MODEL_FILE)
    card = report_m.card
    assert card["class_names"] == NAMES == json.loads(names.read_text())
    assert card["evaluation"]["fd_refined"] == 1.5 and card["note"].startswith("T = 0")
    settings = recommended_settings(card, 16)
    assert (settings.num_rounds, settings.num_steps, settings.cfg_scale) == (0, 4, 2.0)
    _, report_v = load_tokenizer(out / ship.TOKENIZER_FILE)
    assert report_v.card["data"]["sources"][0]["licence"] == "Apache-2.0"


def test_ship_writes_into_the_repository_by_default():
    parser_defaults = {}

    def capture(args):
        parser_defaults.update(out=args.out, class_names=args.class_names)
        return {}

    real, ship.ship = ship.ship, capture
    try:
        ship.main(["--model", "m", "--tokenizer", "t", "--data", "d"])
    finally:
        ship.ship = real
    assert Path(parser_defaults["out"]) == REPO / "checkpoints"
    assert Path(parser_defaults["class_names"]) == REPO / "assets" / "class_names.json"


def test_ship_says_what_is_missing(tmp_path, capsys):
    model, vq, data, _ = _inputs(tmp_path)
    (data / "class_names.json").unlink()
    argv = _argv(model, vq, data, tmp_path / "out", tmp_path / "n.json")
    assert ship.main(argv) == 2
    assert "class_names.json" in capsys.readouterr().err
