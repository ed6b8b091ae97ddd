"""The training loop: learning, exact resume, refusals, NaN stop, full disk, DDP/FSDP, CLI."""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_config
from PIL import Image
from safetensors.torch import load_file

import scan_core.checkpoint.loading as checkpoint_module
import scan_core.training.loop as train_loop
from scan_core.checkpoint.loading import save_checkpoint
from scan_core.datasets.codes import synthetic_codes, write_code_directory
from scan_core.model.config import vq_preset
from scan_core.model.network import Transformer
from scan_core.model.sequence import scan_layout
from scan_core.tokenizer.vq import VQModel
from scan_core.training.distributed import DistInfo
from scan_core.training.loop import Trainer
from scan_core.training.losses import LossConfig, random_order
from scan_core.training.metrics import auroc
from scan_core.training.state import (
    CheckpointSaveError,
    ConfigMismatchError,
    TrainConfig,
    TrainingDiverged,
    config_diff,
)
from scan_core.training.train import main

NO_DROPOUT = ("token_dropout=0", "resid_dropout=0", "ffn_dropout=0")


def _write_codes(directory, count=64, config=None, seed=0):
    config = config or tiny_config()
    codes, labels = synthetic_codes(count, config, generator=torch.Generator().manual_seed(seed))
    write_code_directory(directory, codes, labels, config.vocab_size, shard_size=32)
    return directory


@pytest.fixture
def codes_dir(tmp_path):
    return _write_codes(tmp_path / "codes")


def _config(codes_dir, out, **changes) -> TrainConfig:
    base = TrainConfig(
        data=str(codes_dir),
        out=str(out),
        preset="SCAN-tiny",
        model_set=NO_DROPOUT,
        max_steps=6,
        batch_size=16,
        lr=3e-3,
        warmup_steps=2,
        log_every=1,
        checkpoint_every=3,
        progress=False,
    )
    return base.replace(**changes)


# --- learning -----------------------------------------------------------------------------------


def _held_out_losses(model, seed=123):
    """Gen / Eva loss at a fixed r = 0.25 and the quality head's AUROC on fresh data."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    codes, labels = synthetic_codes(256, config, generator=generator)
    truth = codes.view(256, -1)
    from scan_core.training.losses import ScanHeads, scan_loss

    with torch.no_grad():
        out = scan_loss(
            ScanHeads(model), truth, labels, config, LossConfig(), generator, ratio=0.25
        )
        corrupt = torch.rand(truth.shape, generator=generator) < 0.3
        fed = torch.where(corrupt, torch.randint(0, 64, truth.shape, generator=generator), truth)
        order = random_order(256, 16, generator, torch.device("cpu"))
        layout = scan_layout(labels, fed, order, LossConfig().set_sizes(16))
        hidden = model(layout.kinds, layout.values, layout.cells, layout.mask())
        scores = model.quality_logits(hidden[:, layout.code_slots]).softmax(-1)[..., 1]
    clean = (fed == truth).gather(1, order)  # code slots follow the generation order
    return out.metrics["loss_gen"], out.metrics["loss_eva"], auroc(scores, clean)


def test_both_losses_fall_and_the_quality_head_separates_corrupted_codes(codes_dir, tmp_path):
    _write_codes(codes_dir, count=512)
    trainer = Trainer(
        _config(
            codes_dir,
            tmp_path / "run",
            max_steps=60,
            batch_size=32,
            warmup_steps=5,
            checkpoint_every=1000,
        ),
        LossConfig(),
    )
    trainer.model.eval()
    gen_before, eva_before, auroc_before = _held_out_losses(trainer.model)
    trainer.model.train()
    trainer.run()
    trainer.model.eval()
    gen_after, eva_after, auroc_after = _held_out_losses(trainer.model)
    assert gen_after < gen_before - 0.5, (gen_before, gen_after)
    assert eva_after < eva_before - 0.05, (eva_before, eva_after)
    assert auroc_after > 0.6, (auroc_before, auroc_after)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 60 and '"eva_auroc"' in lines[-1] and '"loss_gen"' in lines[0]


# --- resume -------------------------------------------------------------------------------------


def _final(out, step):
    directory = out / "checkpoints"
    name = f"step_{step:08d}"
    state = torch.load(directory / f"{name}.train.pt", weights_only=True)
    weights = load_file(directory / f"{name}.safetensors")
    ema = load_file(directory / f"{name}.ema.safetensors")
    return weights, ema, state


def test_resume_is_bit_identical_to_an_uninterrupted_run(codes_dir, tmp_path):
    # Dropout on, EMA on, gradient accumulation, several epochs (64 codes, 2 x 16 per step).
    changes = {"model_set": (), "ema_decay": 0.9, "grad_accum": 2, "max_steps": 6}
    Trainer(_config(codes_dir, tmp_path / "a", **changes), LossConfig()).run()
    Trainer(_config(codes_dir, tmp_path / "b", **changes), LossConfig()).run(stop_at=3)
    resumed = Trainer(_config(codes_dir, tmp_path / "b", resume=True, **changes), LossConfig())
    assert resumed.step == 3 and resumed.epoch == 1
    resumed.run()
    weights_a, ema_a, state_a = _final(tmp_path / "a", 6)
    weights_b, ema_b, state_b = _final(tmp_path / "b", 6)
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
        assert torch.equal(ema_a[key], ema_b[key]), key
    moments_a = state_a["optimizer"]["state"]
    moments_b = state_b["optimizer"]["state"]
    for index in moments_a:
        assert torch.equal(moments_a[index]["exp_avg_sq"], moments_b[index]["exp_avg_sq"])
    assert (state_a["epoch"], state_a["epoch_offset"]) == (
        state_b["epoch"],
        state_b["epoch_offset"],
    )


def test_resume_refuses_a_changed_config_with_a_diff(codes_dir, tmp_path):
    Trainer(_config(codes_dir, tmp_path / "run"), LossConfig()).run(stop_at=3)
    with pytest.raises(ConfigMismatchError) as caught:
        Trainer(
            _config(codes_dir, tmp_path / "run", resume=True, lr=1e-3), LossConfig(num_rounds=1)
        )
    message = str(caught.value)
    assert "train.lr: saved 0.003, now 0.001" in message
    assert "loss.num_rounds: saved 2, now 1" in message
    with pytest.raises(ValueError, match="pass --resume"):
        Trainer(_config(codes_dir, tmp_path / "run"), LossConfig())
    other_codes = _write_codes(tmp_path / "other", count=48)
    with pytest.raises(ConfigMismatchError, match="data.count: saved 64, now 48"):
        Trainer(_config(other_codes, tmp_path / "run", resume=True), LossConfig())
    # Where and how often things are written may change.
    ok = Trainer(_config(codes_dir, tmp_path / "run", resume=True, log_every=5), LossConfig())
    assert ok.step == 3


# --- failures -----------------------------------------------------------------------------------


def test_a_run_saved_under_the_old_loss_names_resumes_without_a_diff():
    saved = {"loss": {"refine_rounds": 2, "refine_size": 4}}
    assert config_diff(saved, {"loss": {"num_rounds": 2, "tokens_per_round": 4}}) == []
    assert config_diff(saved, {"loss": {"num_rounds": 1, "tokens_per_round": 4}}) == [
        "  loss.num_rounds: saved 2, now 1"
    ]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(codes_dir, tmp_path, monkeypatch):
    trainer = Trainer(_config(codes_dir, tmp_path / "run", checkpoint_every=2), LossConfig())
    real = train_loop.scan_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        if trainer.step == 2:  # computing step 3
            out.loss = out.loss * math.nan
        return out

    monkeypatch.setattr(train_loop, "scan_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"the loss is nan at step 3.*step_00000002"):
        trainer.run()
    assert trainer.checkpoints.latest() == "step_00000002"
    assert trainer.checkpoints.complete_steps() == [2]
    weights = trainer.checkpoints.load_weights("step_00000002")
    assert all(torch.isfinite(value).all() for value in weights.values())


def _full_disk_torch_save(obj, handle, *args, **kwargs):
    handle.write(b"half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


def _full_disk_weights(path, module, kind, extra_metadata=None):
    # Worse than the real (atomic) writer: half of the final file itself, plus a temp file.
    path.write_bytes(b"half a checkpoint")
    path.with_name(f".{path.name}.1234.partial").write_bytes(b"half")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failing", ["train_state", "weights"])
def test_full_disk_never_leaves_a_half_checkpoint_as_latest(
    codes_dir, tmp_path, monkeypatch, failing
):
    out = tmp_path / "run"
    trainer = Trainer(_config(codes_dir, out, checkpoint_every=2, max_steps=4), LossConfig())
    trainer.run(stop_at=2)
    if failing == "train_state":
        monkeypatch.setattr(torch, "save", _full_disk_torch_save)
    else:
        monkeypatch.setattr(checkpoint_module, "save_checkpoint", _full_disk_weights)
    with pytest.raises(CheckpointSaveError, match=r"No space left.*latest is still step_00000002"):
        trainer.run()
    monkeypatch.undo()
    directory = out / "checkpoints"
    assert (directory / "latest").read_text().strip() == "step_00000002"
    leftovers = sorted(p.name for p in directory.iterdir())
    assert leftovers == ["latest", "step_00000002.safetensors", "step_00000002.train.pt"]
    resumed = Trainer(
        _config(codes_dir, out, checkpoint_every=2, max_steps=4, resume=True), LossConfig()
    )
    assert resumed.step == 2
    resumed.run()
    assert resumed.checkpoints.latest() == "step_00000004"


def test_keep_last_prunes_old_checkpoints(codes_dir, tmp_path):
    trainer = Trainer(
        _config(codes_dir, tmp_path / "run", checkpoint_every=1, keep_last=2), LossConfig()
    )
    trainer.run()
    assert trainer.checkpoints.complete_steps() == [5, 6]


# --- fine-tuning, previews, command line --------------------------------------------------------


def test_init_from_randar_adds_a_quality_head_and_scales_the_backbone_lr(codes_dir, tmp_path):
    torch.manual_seed(1)
    randar = Transformer(tiny_config(arch="randar"))
    path = save_checkpoint(tmp_path / "randar.safetensors", randar, "model")
    config = _config(
        codes_dir,
        tmp_path / "run",
        init_from=str(path),
        model_set=(),
        backbone_lr_scale=0.1,
        max_steps=1,
    )
    trainer = Trainer(config, LossConfig())
    assert trainer.model_config.arch == "scan"
    torch.testing.assert_close(trainer.model.output.weight, randar.output.weight)
    names = {id(p): n for n, p in trainer.heads.named_parameters()}
    for group in trainer.optimizer.param_groups:
        head = all("dis_" in names[id(p)] for p in group["params"])
        assert group["initial_lr"] == pytest.approx(3e-3 if head else 3e-4)
        assert group["weight_decay"] == (0.05 if group["params"][0].ndim >= 2 else 0.0)
    trainer.run()


def test_head_only_trains_the_quality_head_and_leaves_the_backbone_bit_identical(
    codes_dir, tmp_path
):
    """The recipe for a backbone without a head: a jointly trained backbone whose head is reset
    regains its AUROC when only dis_norm and dis_output train, and nothing else moves."""
    _write_codes(codes_dir, count=512)
    common = dict(batch_size=32, warmup_steps=5, checkpoint_every=1000)
    backbone = Trainer(_config(codes_dir, tmp_path / "joint", max_steps=60, **common), LossConfig())
    backbone.run()
    torch.manual_seed(0)
    torch.nn.init.normal_(backbone.model.dis_output.weight, std=0.02)
    backbone.model.dis_norm.weight.data.fill_(1.0)
    path = save_checkpoint(tmp_path / "reset.safetensors", backbone.model, "model")
    with pytest.raises(ValueError, match="--init-from"):
        Trainer(_config(codes_dir, tmp_path / "x", head_only=True), LossConfig())

    config = _config(
        codes_dir, tmp_path / "head", init_from=str(path), head_only=True, max_steps=40, **common
    )
    trainer = Trainer(config, LossConfig())
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {"dis_norm.weight", "dis_output.weight"}
    assert not trainer.model.layers[0].training  # the frozen backbone runs without dropout
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.model.eval()
    _, _, auroc_before = _held_out_losses(trainer.model)
    trainer.run()
    trainer.model.eval()
    _, _, auroc_after = _held_out_losses(trainer.model)
    after = trainer.model.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == trainable
    assert auroc_before < 0.6 and auroc_after > 0.65, (auroc_before, auroc_after)


def test_previews_are_written_through_the_sampler(tmp_path):
    model_config = tiny_config(grid_size=8)  # VQ-tiny: 16 px images, 8x8 codes of 64
    codes = _write_codes(tmp_path / "codes", count=32, config=model_config)
    torch.manual_seed(0)
    tokenizer = save_checkpoint(
        tmp_path / "vq.safetensors", VQModel(vq_preset("VQ-tiny")), "tokenizer"
    )
    config = _config(
        codes,
        tmp_path / "run",
        model_set=(*NO_DROPOUT, "grid_size=8"),
        max_steps=1,
        preview_every=1,
        tokenizer=str(tokenizer),
        preview_classes=(0, 1, 2),
    )
    Trainer(config, LossConfig(num_steps=8)).run()
    image = Image.open(tmp_path / "run" / "previews" / "step_00000001.png")
    assert image.size == (3 * 16, 2 * 16)


def test_previews_skip_with_a_message_without_sampler(codes_dir, tmp_path, monkeypatch, caplog):
    # None in sys.modules makes the import raise ImportError.
    monkeypatch.setitem(sys.modules, "scan_core.sampling.sampler", None)
    trainer = Trainer(
        _config(codes_dir, tmp_path / "run", preview_every=1, max_steps=2, tokenizer=""),
        LossConfig(),
    )
    with caplog.at_level(logging.INFO, logger="scan_core.training.train"):
        trainer.run()
    skipped = [r.message for r in caplog.records if "previews skipped" in r.message]
    assert len(skipped) == 1 and "scan_core.sampling.sampler is not available" in skipped[0]


def test_command_line_runs_and_refuses(codes_dir, tmp_path, capsys):
    argv = [
        "--data",
        str(codes_dir),
        "--out",
        str(tmp_path / "run"),
        "--preset",
        "SCAN-tiny",
        "--max-steps",
        "2",
        "--batch-size",
        "8",
        "--no-progress",
        "--log-every",
        "1",
        "--no-teacher-negatives",
        "--model-set",
        *NO_DROPOUT,
    ]
    assert main(argv) == 0
    assert "done:" in capsys.readouterr().out
    assert main([*argv, "--resume", "--lr", "1e-2"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main([*argv, "--no-random-negatives", "--no-permuted-negatives"]) == 2


# --- several processes --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, configs, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for index, config in enumerate(configs):  # one spawn for all: start-up dominates
            trainer = Trainer(config, LossConfig(), DistInfo(rank, world, rank))
            trainer.run()
            state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            if config.fsdp:  # sharded DTensors: gather for the comparison
                state = {k: v.full_tensor() for k, v in state.items()}
            torch.save(state, os.path.join(result_dir, f"run{index}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters: ~20-30 s on 2 shared cores, most of it start-up
def test_two_process_ddp_keeps_ranks_identical_and_fsdp_agrees(codes_dir, tmp_path):
    ddp = _config(codes_dir, tmp_path / "ddp", max_steps=3, batch_size=8)
    fsdp = ddp.replace(out=str(tmp_path / "fsdp"), fsdp=True)
    mp.spawn(_worker, args=(2, _free_port(), [ddp, fsdp], str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"run0_rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    saved = load_file(tmp_path / "ddp" / "checkpoints" / "step_00000003.safetensors")
    assert all(torch.equal(saved[key], ranks[0][key]) for key in saved)
    torch.manual_seed(0)
    initial = Transformer(tiny_config()).state_dict()
    assert not torch.equal(initial["output.weight"], ranks[0]["output.weight"])
    # FSDP2 computes the same update from sharded state; only reduction order may differ.
    sharded = torch.load(tmp_path / "run1_rank1.pt", weights_only=True)
    fsdp_saved = load_file(tmp_path / "fsdp" / "checkpoints" / "step_00000003.safetensors")
    for key in saved:
        torch.testing.assert_close(fsdp_saved[key], saved[key], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(sharded[key], saved[key], atol=1e-5, rtol=1e-4)
