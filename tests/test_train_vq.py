"""VQ tokenizer trainer: losses fall, dead codes come back, exact resumption, the NaN stop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scan_core.checkpoint.loading import load_tokenizer
from scan_core.model.config import vq_preset
from scan_core.tokenizer.vq import VQModel
from scan_core.training.vq.train import (
    TrainingDiverged,
    VQTrainConfig,
    VQTrainer,
    batch_indices,
    build_optimizer,
    build_parser,
    lr_factor,
    restart_dead_codes,
)


def shapes_dataset(directory, count: int, size: int = 16, seed: int = 0) -> None:
    """Coloured rectangles on white, emoji-like: (count, size, size, 3) uint8 per split."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", count), ("val", max(4, count // 4))):
        images = np.full((n, size, size, 3), 255, dtype=np.uint8)
        for image in images:
            top, left = rng.integers(0, size // 2, 2)
            height, width = rng.integers(3, size // 2, 2)
            image[top : top + height, left : left + width] = rng.integers(0, 256, 3)
        np.savez(directory / f"{split}.npz", images=images, labels=np.zeros(n, np.int64))


def tiny_config(tmp_path, **changes) -> VQTrainConfig:
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        shapes_dataset(data, 32)
    base = VQTrainConfig(
        data=str(data),
        preset="VQ-tiny",  # 16x16 images, 8x8 grid, 64 codes of dimension 4
        out=str(tmp_path / "run"),
        steps=30,
        batch_size=8,
        lr=2e-3,
        warmup_steps=2,
        log_every=5,
        eval_every=10,
        checkpoint_every=10,
    )
    return base.replace(**changes)


def test_reconstruction_loss_falls(tmp_path):
    trainer = VQTrainer(tiny_config(tmp_path, dead_code_steps=10))
    losses = []
    for _ in range(30):
        losses.append(trainer.train_step()["recon"])
        trainer.step += 1
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_run_writes_metrics_checkpoints_and_best(tmp_path):
    config = tiny_config(tmp_path, steps=20, keep_last=1)
    trainer = VQTrainer(config)
    final = trainer.run()
    out = tmp_path / "run"
    assert set(final) == {"val_psnr", "val_psnr_pooled", "val_codes_used"}
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [
        "step_00000020.safetensors",
        "step_00000020.train.pt",
    ]  # keep_last=1 pruned step 10
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"codes_used", "perplexity", "steps_per_s"} <= set(records[0])
    assert any("val_psnr" in record for record in records)
    best = json.loads((out / "best.json").read_text())
    tokenizer, _ = load_tokenizer(out / "best.safetensors")
    assert tokenizer.config == vq_preset("VQ-tiny") and best["val_psnr"] == trainer.best_psnr


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    model = VQModel(vq_preset("VQ-tiny"))
    optimizer = build_optimizer(model, VQTrainConfig(), set())
    weight = model.quantize.embedding.weight
    with torch.no_grad():  # collapse the codebook: every code equals code 0, so only 0 is chosen
        weight.copy_(weight[:1].expand_as(weight))
    weight.grad = torch.ones_like(weight)
    optimizer.step()  # creates AdamW moments for the codebook
    candidates = torch.nn.functional.normalize(torch.randn(256, weight.shape[1]), dim=-1)
    assert model.quantize.nearest_codes(candidates).unique().numel() == 1
    last_used = torch.zeros(len(weight), dtype=torch.long)
    last_used[0] = 10  # code 0 is alive, every other code was last used at step 0
    kept = weight[0].detach().clone()
    count = restart_dead_codes(model, last_used, 10, 5, candidates, optimizer)
    assert count == len(weight) - 1
    assert torch.equal(weight[0].detach(), kept)
    assert (last_used == 10).all()
    assert optimizer.state[weight]["exp_avg"][1:].abs().sum() == 0
    assert model.quantize.nearest_codes(candidates).unique().numel() > len(weight) // 2
    assert restart_dead_codes(model, last_used, 11, 5, candidates, optimizer) == 0


def test_resume_is_bit_identical(tmp_path):
    # Discriminator, flips and code restarts all on, so their state must survive the restart.
    settings = dict(steps=8, checkpoint_every=100, disc_weight=0.1, disc_start=2)
    settings.update(dead_code_steps=2)
    straight = VQTrainer(tiny_config(tmp_path, out=str(tmp_path / "a"), **settings))
    straight.run()
    config = tiny_config(tmp_path, out=str(tmp_path / "b"), **settings)
    VQTrainer(config).run(stop_at=5)  # a checkpoint is written where a run stops
    resumed = VQTrainer(config, resume=True)
    assert resumed.step == 5
    resumed.run()
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    for name, tensor in straight.discriminator.state_dict().items():
        assert torch.equal(tensor, resumed.discriminator.state_dict()[name]), name
    assert torch.equal(straight.last_used, resumed.last_used)


def test_resume_refuses_changed_settings_and_silent_overwrite(tmp_path):
    config = tiny_config(tmp_path, steps=4)
    VQTrainer(config).run()
    with pytest.raises(FileExistsError, match="--resume"):
        VQTrainer(config)
    with pytest.raises(ValueError, match="lr"):
        VQTrainer(config.replace(lr=1e-4), resume=True)
    assert VQTrainer(config.replace(steps=6), resume=True).step == 4  # longer runs are fine


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = VQTrainer(tiny_config(tmp_path, checkpoint_every=3))
    trainer.run(stop_at=3)
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_00000003.safetensors")
    trainer.model.decoder.register_forward_hook(lambda module, args, out: out * float("nan"))
    with pytest.raises(TrainingDiverged, match="step 3.*step_00000003"):
        trainer.run()
    assert trainer.step == 3
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), f"{name} was updated by the NaN step"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "diverged" and last["kept"] == "step_00000003"


def test_stop_request_finishes_the_step_and_saves(tmp_path):
    config = tiny_config(tmp_path, checkpoint_every=100)
    trainer = VQTrainer(config)
    calls = []

    def stop_during_fifth_step(module, args, out):
        calls.append(1)
        if len(calls) == 5:
            trainer.stop_requested = True  # what the SIGINT / SIGTERM handler of main() does

    trainer.model.decoder.register_forward_hook(stop_during_fifth_step)
    trainer.run()
    assert trainer.step == 5
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    assert VQTrainer(config, resume=True).step == 5


def test_batches_cover_each_epoch_once():
    seen = torch.cat([batch_indices(step, 5, 12, seed=3) for step in range(12)])  # 5 epochs
    for epoch in range(5):
        assert sorted(seen[epoch * 12 : (epoch + 1) * 12].tolist()) == list(range(12))
    assert torch.equal(batch_indices(7, 5, 12, seed=3), batch_indices(7, 5, 12, seed=3))


def test_lr_schedule_and_cli_flags():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    args = vars(build_parser().parse_args(["--steps", "7", "--no-flip", "--threads", "1"]))
    assert args.pop("resume") is False
    config = VQTrainConfig(**args)
    assert (config.steps, config.flip, config.threads) == (7, False, 1)
