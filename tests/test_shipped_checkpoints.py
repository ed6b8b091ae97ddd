"""The embedded default in checkpoints/: the files the model card describes, loading strictly and
drawing images of the right size for every class, offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.engine import Engine
from scan_core.checkpoint.loading import inspect, load_model, load_tokenizer
from scan_core.evaluation.classifier import load_classifier
from scan_core.evaluation.ship import CARD_FILE, MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE
from scan_core.files import file_sha256
from scan_core.sampling.generate import decode_images
from scan_core.sampling.sampler import ScanSampler, run_all
from scan_core.sampling.settings import recommended_settings

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "checkpoints"
CLASSIFIER_FILE = "emoji-classifier.safetensors"


def test_the_manifest_hashes_match_the_files_and_the_card_lists_them():
    manifest = json.loads((SHIPPED / MANIFEST_FILE).read_text())
    assert {MODEL_FILE, TOKENIZER_FILE, CLASSIFIER_FILE} <= set(manifest)
    card = (SHIPPED / CARD_FILE).read_text()
    total = 0
    for name, entry in manifest.items():
        path = SHIPPED / name
        assert file_sha256(path) == entry["sha256"], f"{name} differs from manifest.json"
        assert path.stat().st_size == entry["bytes"]
        assert name in card and entry["sha256"] in card, f"the model card does not list {name}"
        total += entry["bytes"]
    assert total <= 40 * 2**20, "the shipped checkpoints must stay within 40 MB"


def test_the_shipped_model_loads_strictly_and_draws_every_class():
    model, report = load_model(SHIPPED / MODEL_FILE)
    tokenizer, _ = load_tokenizer(SHIPPED / TOKENIZER_FILE)
    names = json.loads((ROOT / "assets" / "class_names.json").read_text())
    assert report.card["class_names"] == names and len(names) == model.config.num_classes
    assert not report.added and not report.dropped
    config = model.config
    assert (tokenizer.config.grid_size, tokenizer.config.codebook_size) == (
        config.grid_size,
        config.vocab_size,
    )
    settings = recommended_settings(report.card, config.num_tokens)
    trace = run_all(
        ScanSampler(model.eval()).generate(list(range(config.num_classes)), settings, seed=0)
    )
    images = decode_images(tokenizer.eval(), trace.codes_at(-1))
    size = tokenizer.config.image_size
    assert images.shape == (config.num_classes, size, size, 3) and images.dtype == np.uint8
    assert images.std() > 10  # real pictures, not a flat colour


def test_the_card_records_the_data_licences_and_the_evaluation():
    _, report = load_model(SHIPPED / MODEL_FILE)
    sources = report.card["data"]["sources"]
    assert {s["licence"] for s in sources} >= {"Apache-2.0"}
    assert all(s["attribution"] for s in sources)
    evaluation = report.card["evaluation"]
    for key in ("fd_t0", "fd_refined", "fd_random_control", "auroc_random", "auroc_permuted"):
        assert np.isfinite(evaluation[key])


def test_the_classifier_is_shipped_and_the_engine_skips_it():
    classifier = load_classifier(SHIPPED / CLASSIFIER_FILE)
    assert classifier is not None
    kinds = {
        p.name: inspect(p).kind for p in SHIPPED.glob("*.safetensors") if p.name != CLASSIFIER_FILE
    }
    assert kinds == {MODEL_FILE: "model", TOKENIZER_FILE: "tokenizer"}


@pytest.mark.slow
def test_the_studio_engine_loads_the_embedded_default_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    engine = Engine()
    bundle = engine.load()
    assert bundle.model_id != "demo-random-SCAN-S"
    assert bundle.class_names == json.loads((ROOT / "assets" / "class_names.json").read_text())
    assert engine.default_settings() == recommended_settings(bundle.card, engine.num_tokens)
