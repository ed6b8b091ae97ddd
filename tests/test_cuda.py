"""The CUDA paths (marked ``gpu``): network, sampler, raster baseline, tokenizer, both trainers,
studio engine and benchmark give on the device what they give on the CPU.

They are skipped without CUDA; ``tools/gpu_check.sh`` runs them on a lent GPU. With
``SCAN_TEST_DEVICE=cpu`` they run on the CPU instead, which checks the tests themselves on a
machine without a GPU (the device copy is then a second CPU copy).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_config, tiny_vq
from safetensors.torch import load_file
from test_train import _config, _write_codes
from test_train_vq import tiny_config as vq_run_config

from app.engine import Engine, pick_device
from scan_core.checkpoint.loading import load_model, load_tokenizer
from scan_core.evaluation import bench
from scan_core.model.sequence import scan_layout
from scan_core.sampling.raster import raster_generate
from scan_core.sampling.sampler import ScanSampler, run_all
from scan_core.sampling.schedule import cosine_set_sizes
from scan_core.sampling.settings import SamplerSettings
from scan_core.training.loop import Trainer
from scan_core.training.losses import LossConfig
from scan_core.training.negatives import random_order
from scan_core.training.vq.train import VQTrainer

DEVICE = torch.device(os.environ.get("SCAN_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(),
        reason="needs CUDA (SCAN_TEST_DEVICE=cpu runs these tests on the CPU)",
    ),
]

SETTINGS = SamplerSettings(num_steps=5, num_rounds=6, tokens_per_round=2, cfg_scale=2.0)


def on_device(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    return copy.deepcopy(module).to(DEVICE, dtype)


def _layout(batch: int = 3):
    codes = torch.randint(0, 64, (batch, 16), generator=torch.Generator().manual_seed(0))
    order = random_order(batch, 16, torch.Generator().manual_seed(1), torch.device("cpu"))
    layout = scan_layout(torch.arange(1, batch + 1), codes, order, cosine_set_sizes(16, 5))
    return layout.kinds, layout.values, layout.cells, layout.mask()


def test_forward_on_the_device_matches_the_cpu():
    model = random_model(tiny_config(), seed=21)
    inputs = _layout()
    with torch.no_grad():
        expected = model(*inputs)
        got = on_device(model)(*(t.to(DEVICE) for t in inputs))
    torch.testing.assert_close(got.cpu(), expected, atol=1e-3, rtol=1e-3)


def test_a_seed_draws_the_same_image_on_the_device_as_on_the_cpu():
    """CPU generators drive every draw, so a seed means one image wherever it runs."""
    model = random_model(tiny_config(), seed=22)
    cpu = run_all(ScanSampler(model, "tiny").generate([3, 4], SETTINGS, seed=5))
    device = ScanSampler(on_device(model), "tiny", DEVICE)
    assert device.device.type == DEVICE.type
    got = run_all(device.generate([3, 4], SETTINGS, seed=5))
    assert [s.kind for s in got.steps] == [s.kind for s in cpu.steps]
    assert any(s.kind == "refine" and s.accepted.any() for s in got.steps)
    np.testing.assert_array_equal(got.codes_at(-1), cpu.codes_at(-1))
    np.testing.assert_allclose(got.scores_at(-1), cpu.scores_at(-1), atol=1e-4)
    locked = np.zeros((2, 16), dtype=bool)
    locked[:, :8] = True
    refined = run_all(device.refine(got, SETTINGS.replace(num_rounds=4), 9, locked=locked))
    np.testing.assert_array_equal(refined.codes_at(-1)[:, :8], got.codes_at(-1)[:, :8])


def test_scoring_a_grid_on_the_device_matches_the_cpu():
    model = random_model(tiny_config(), seed=24)
    codes = np.random.default_rng(0).integers(0, 64, (2, 16))
    cpu = ScanSampler(model).score(codes, [1, 2], SETTINGS, seed=3)
    got = ScanSampler(on_device(model), device=DEVICE).score(codes, [1, 2], SETTINGS, seed=3)
    np.testing.assert_allclose(got.scores_at(-1), cpu.scores_at(-1), atol=1e-4)


def test_raster_baseline_on_the_device_draws_what_the_cpu_draws():
    model = random_model(tiny_config(), seed=25)
    settings = SETTINGS.replace(cfg_scale=1.5)

    def draw(net, device):
        streams = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
        return raster_generate(net, torch.tensor([2, 7], device=device), settings, streams)

    got = draw(on_device(model), DEVICE)
    assert got.device.type == DEVICE.type
    torch.testing.assert_close(got.cpu(), draw(model, "cpu"))


def test_bf16_generation_and_refinement_stay_valid_and_close_to_fp32():
    model = random_model(tiny_config(), seed=23)
    inputs = _layout()
    half = on_device(model, torch.bfloat16)
    with torch.no_grad():
        full = model(*inputs).flatten(1)
        low = half(*(t.to(DEVICE) for t in inputs)).float().cpu().flatten(1)
    assert torch.nn.functional.cosine_similarity(full, low).min() > 0.99
    trace = run_all(ScanSampler(half, "tiny", DEVICE).generate([1, 2], SETTINGS, seed=3))
    codes, scores = trace.codes_at(-1), trace.scores_at(-1)
    assert codes.min() >= 0 and codes.max() < 64
    assert np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
    assert any(s.kind == "refine" for s in trace.steps)


def test_tokenizer_on_the_device_matches_the_cpu():
    vq = tiny_vq()
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    device_vq = on_device(vq)
    with torch.no_grad():
        codes = vq.encode(images)
        got = device_vq.encode(images.to(DEVICE)).cpu()
        assert (got == codes).float().mean() >= 0.95  # a near tie may round the other way
        pixels = device_vq.decode_codes(codes.to(DEVICE)).cpu()
        torch.testing.assert_close(pixels, vq.decode_codes(codes), atol=2e-2, rtol=2e-2)


def test_training_on_the_device_writes_checkpoints_that_load_on_the_cpu(tmp_path):
    codes_dir = _write_codes(tmp_path / "codes")
    config = _config(codes_dir, tmp_path / "run", device=DEVICE.type, max_steps=6)
    first = Trainer(config, LossConfig())
    assert first.device.type == DEVICE.type
    first.run(stop_at=3)
    resumed = Trainer(config.replace(resume=True), LossConfig())
    assert resumed.step == 3
    resumed.run()
    weights = tmp_path / "run" / "checkpoints" / "step_00000006.safetensors"
    assert all(torch.isfinite(t).all() for t in load_file(weights).values())
    model, _ = load_model(weights, device="cpu")  # strict
    assert next(model.parameters()).device.type == "cpu"


def test_tokenizer_training_on_the_device_resumes_and_loads_on_the_cpu(tmp_path):
    settings = dict(
        device=DEVICE.type,
        steps=8,
        checkpoint_every=100,
        disc_weight=0.1,
        disc_start=2,
        dead_code_steps=2,
    )
    config = vq_run_config(tmp_path, **settings)
    first = VQTrainer(config)
    assert next(first.model.parameters()).device.type == DEVICE.type
    first.run(stop_at=5)
    resumed = VQTrainer(config, resume=True)
    assert resumed.step == 5 and resumed.last_used.device.type == DEVICE.type
    final = resumed.run()
    assert np.isfinite(final["val_psnr"]) and final["val_codes_used"] > 0
    tokenizer, _ = load_tokenizer(tmp_path / "run" / "best.safetensors", device="cpu")
    assert next(tokenizer.parameters()).device.type == "cpu"


def test_the_studio_engine_generates_and_decodes_on_the_device():
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    engine = Engine.from_modules(random_model(tiny_config(), seed=3), tiny_vq(), device=DEVICE.type)
    trace = run_all(engine.generate([1], SETTINGS, 4))
    image = engine.decode(trace.codes_at(-1))
    assert image.dtype == np.uint8 and image.shape[-1] == 3


def test_the_shipped_model_runs_on_the_device():
    engine = Engine(device=DEVICE.type)
    settings = engine.default_settings()
    trace = run_all(engine.generate([engine.class_id(0)], settings, 0))
    assert (trace.codes_at(-1) >= 0).all()
    image = engine.decode(trace.codes_at(-1), display=False)
    assert image.shape[-3:] == (engine.image_size, engine.image_size, 3)


def test_the_benchmark_runs_on_the_device_in_bf16_where_supported():
    figures = bench.run_benchmark(
        tiny_config(),
        repeats=1,
        settings=SamplerSettings(num_steps=4, num_rounds=2, tokens_per_round=2),
        device=DEVICE,
    )
    assert figures["device"].startswith(DEVICE.type)
    bf16 = DEVICE.type == "cuda" and torch.cuda.is_bf16_supported()
    assert figures["dtype"] == ("bfloat16" if bf16 else "float32")
    assert figures["speedup_t0"] > 0 and figures["peak_memory_mb"] > 0
