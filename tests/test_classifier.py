"""The emoji feature classifier: shapes, checkpoint round trips, a tiny training run, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scan_core.checkpoint.files import CheckpointError
from scan_core.evaluation.classifier import (
    ClassifierConfig,
    ImageClassifier,
    classifier_metadata,
    image_features,
    load_classifier,
    save_classifier,
    train_classifier,
)
from scan_core.evaluation.classifier_cli import main

TINY = ClassifierConfig(num_classes=3, image_size=16, channels=(8, 16), feature_dim=12)


def squares(count: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Red (label 0) or blue (label 1) squares of random size and place on white, with noise."""
    rng = np.random.default_rng(seed)
    images = np.full((count, size, size, 3), 255.0)
    labels = rng.integers(0, 2, count)
    for image, label in zip(images, labels, strict=True):
        side = rng.integers(4, 9)
        top, left = rng.integers(0, size - side, 2)
        image[top : top + side, left : left + side] = (220, 30, 30) if label == 0 else (30, 30, 220)
    images += rng.normal(0, 20, images.shape)
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def tiny_model(seed: int = 0) -> ImageClassifier:
    torch.manual_seed(seed)
    return ImageClassifier(TINY).eval()


def test_shapes_and_features_match_forward():
    model = tiny_model()
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    features = model.features(images)
    assert features.shape == (5, 12)
    assert model(images).shape == (5, 3)
    torch.testing.assert_close(model.head(features), model(images))


def test_default_config_size():
    model = ImageClassifier(ClassifierConfig(num_classes=18))
    assert sum(p.numel() for p in model.parameters()) == 306_290  # ~1.2 MB in float32


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(2, 16, 16, 3), r"got shape \(2, 16, 16, 3\)"),
        (torch.zeros(2, 3, 32, 32), r"expected float \(B, 3, 16, 16\)"),
        (torch.zeros(3, 16, 16), "got shape"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "torch.uint8"),
    ],
)
def test_bad_input_shapes_are_explained(images, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().features(images)


def test_image_features_matches_the_model_and_batches():
    model = tiny_model()
    images, _ = squares(10, seed=1)
    features, predicted = image_features(model, images, batch_size=3)
    assert features.dtype == np.float64 and features.shape == (10, 12)
    assert predicted.shape == (10,)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        np.testing.assert_allclose(features, model.features(tensor).double().numpy(), atol=1e-5)
        np.testing.assert_array_equal(predicted, model(tensor).argmax(1).numpy())
    with pytest.raises(ValueError, match="uint8"):
        image_features(model, images.astype(np.float32))


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    model.train()
    model(torch.rand(4, 3, 16, 16))  # move the BatchNorm running statistics off their init
    model.eval()
    path = save_classifier(tmp_path / "c.safetensors", model, ["a", "b", "c"], {"val": 0.5})
    loaded = load_classifier(path)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)
    info = classifier_metadata(path)
    assert info["config"] == TINY
    assert info["class_names"] == ["a", "b", "c"] and info["report"] == {"val": 0.5}
    assert not loaded.training
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp files left


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no classifier checkpoint at .*train one"):
        load_classifier(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_classifier(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "scan-studio", "kind": "vq"})
    with pytest.raises(CheckpointError, match="not a classifier checkpoint"):
        load_classifier(other)


def test_training_separates_red_from_blue():
    train_images, train_labels = squares(192, seed=2)
    val_images, val_labels = squares(64, seed=3)
    config = ClassifierConfig(num_classes=2, image_size=16, channels=(8, 16), feature_dim=16)
    options = dict(epochs=3, batch_size=32, lr=1e-2, seed=0, progress=False, config=config)
    model, report = train_classifier(train_images, train_labels, val_images, val_labels, **options)
    assert report["val_accuracy"] >= 0.95
    assert len(report["history"]) == 3
    best = max(report["history"], key=lambda row: row["val_accuracy"])
    assert report["best_epoch"] == best["epoch"]
    assert not model.training
    _, predicted = image_features(model, val_images)
    assert (predicted == val_labels).mean() == report["val_accuracy"]  # best weights restored


def test_training_is_reproducible():
    images, labels = squares(40, seed=4)
    config = ClassifierConfig(num_classes=2, image_size=16, channels=(4,), feature_dim=4)
    options = dict(epochs=1, batch_size=16, seed=7, progress=False, config=config)
    first = train_classifier(images, labels, images, labels, **options)[1]["history"]
    second = train_classifier(images, labels, images, labels, **options)[1]["history"]
    assert first == second


def test_cli_train_and_eval(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for split, seed, count in (("train", 5, 96), ("val", 6, 32)):
        images, labels = squares(count, seed)
        np.savez(data / f"{split}.npz", images=images, labels=labels)
    (data / "manifest.json").write_text(json.dumps({"class_names": ["red", "blue"]}))
    out = tmp_path / "model.safetensors"
    args = ["--data", str(data), "--channels", "8,16", "--feature-dim", "8", "--threads", "1"]
    assert main(["train", *args, "--out", str(out), "--epochs", "2", "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert summary.startswith(f"saved {out}: val accuracy") and summary.count("\n") == 1
    info = classifier_metadata(out)
    assert info["class_names"] == ["red", "blue"]
    assert len(info["report"]["data_manifest_sha256"]) == 64
    assert main(["eval", "--model", str(out), "--data", str(data), "--threads", "1"]) == 0
    accuracy = float(capsys.readouterr().out.split()[2])
    assert accuracy == pytest.approx(info["report"]["val_accuracy"])


def test_cli_reports_missing_data(tmp_path):
    with pytest.raises(SystemExit, match="train.npz not found"):
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m.safetensors")])
