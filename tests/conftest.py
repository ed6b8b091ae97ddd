"""Shared tiny fixtures. Everything here is small enough to run in milliseconds on a CPU."""

from __future__ import annotations

import os

import pytest
import torch

from scan_core.model.config import VQ_PRESETS, ModelConfig
from scan_core.model.network import Transformer
from scan_core.tokenizer.vq import VQModel


def tiny_config(**changes) -> ModelConfig:
    """Two layers, head_dim 16, a 4x4 grid of 64 codes, 10 classes; dropout off for exactness."""
    base = ModelConfig(
        dim=64,
        n_layer=2,
        n_head=4,
        vocab_size=64,
        num_classes=10,
        grid_size=4,
        multiple_of=32,
        token_dropout=0.0,
        resid_dropout=0.0,
        ffn_dropout=0.0,
    )
    return base.replace(**changes)


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A model with random (non-zero) weights everywhere, heads included, in eval mode."""
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model.eval().requires_grad_(False)


def tiny_vq() -> VQModel:
    """VQ-tiny on 8x8 images: a 4x4 grid of 64 codes, like ``tiny_config``; eval mode."""
    return VQModel(VQ_PRESETS["VQ-tiny"][0].replace(image_size=8)).eval().requires_grad_(False)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread for every test: the models here are tiny, and on a shared 2-core
    machine a second thread only adds contention (measured up to 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model() -> Transformer:
    return random_model(tiny_config())


# Property tests (hypothesis): one fixed, reproducible profile, loaded by default. Tests that need
# fewer or more examples say so with their own @settings.
try:
    from hypothesis import settings as hypothesis_settings

    hypothesis_settings.register_profile(
        "ci", max_examples=60, deadline=None, derandomize=True, database=None
    )
    hypothesis_settings.load_profile("ci")
except ImportError:  # hypothesis is a test extra; without it the property tests are skipped
    pass


# -- the browser tests (test_e2e_*) ---------------------------------------------------------------

CHROMIUM = os.environ.get("SCAN_CHROMIUM", "/usr/bin/chromium")
BROWSER_FLAGS = [
    "--no-sandbox",  # CI runs as root in a container; no GPU, no background traffic either
    "--disable-gpu",
    "--disable-background-networking",  # no network here: don't let Chromium try
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per module (Playwright's sync API allows one instance per thread)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=BROWSER_FLAGS
        )
        try:
            yield browser
        finally:
            browser.close()
