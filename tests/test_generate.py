"""Bulk generation CLI end to end on tiny checkpoints, its sharding and resume logic, and the
atomic writers in scan_core.files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_config
from PIL import Image

from scan_core import files as export
from scan_core.checkpoint.loading import save_checkpoint
from scan_core.model.config import vq_preset
from scan_core.sampling import generate
from scan_core.sampling.generate import Job, make_jobs, plan_shards, shard_indices
from scan_core.sampling.trace_files import parse_trace
from scan_core.tokenizer.vq import VQModel

# 3 steps + 1 score step + 2 rounds: 6 steps per image, so 6 GIF frames.
FAST = ["--num-steps", "3", "--num-rounds", "2", "--tokens-per-round", "2", "--cfg-scale", "2.0"]
NUM_STEPS = 6


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny SCAN model (4x4 grid, 64 codes) and a VQ-tiny tokenizer with the same grid."""
    root = tmp_path_factory.mktemp("checkpoints")
    model = save_checkpoint(root / "model.safetensors", random_model(tiny_config()), "model")
    torch.manual_seed(0)
    vq = VQModel(vq_preset("VQ-tiny", image_size=8)).eval()  # 8 px / downsample 2 = 4x4 grid
    tokenizer = save_checkpoint(root / "vq.safetensors", vq, "tokenizer")
    wrong = save_checkpoint(root / "vq16.safetensors", VQModel(vq_preset("VQ-tiny")), "tokenizer")
    return {"model": str(model), "tokenizer": str(tokenizer), "wrong_grid": str(wrong)}


def cli(checkpoints, out, *extra, tokenizer=None) -> int:
    argv = ["--model", checkpoints["model"], "--tokenizer", tokenizer or checkpoints["tokenizer"]]
    return generate.main([*argv, "--out", str(out), *FAST, *extra])


@pytest.fixture
def counted(monkeypatch):
    """Counts generate_shard calls (shards actually generated, not skipped)."""
    calls = []
    original = generate.generate_shard

    def counting(*args, **kwargs):
        calls.append(args[5])  # the shard index
        return original(*args, **kwargs)

    monkeypatch.setattr(generate, "generate_shard", counting)
    return calls


def test_end_to_end_writes_png_gif_json_and_npz(checkpoints, tmp_path):
    out = tmp_path / "run"
    args = ("--classes", "1", "2", "--seeds", "0", "1", "--batch-size", "2")
    assert cli(checkpoints, out, *args, "--gif", "--gif-scale", "8", "--npz") == 0
    jobs = make_jobs([1, 2], [0, 1])
    pngs = []
    for job in jobs:
        png = np.asarray(Image.open(out / "samples" / f"{job.name}.png"))
        assert png.shape == (8, 8, 3) and png.dtype == np.uint8
        pngs.append(png)
        gif = Image.open(out / "samples" / f"{job.name}.gif")
        assert gif.n_frames == NUM_STEPS  # one frame per step, none merged
        assert gif.size[0] == 64  # 8 px upscaled 8x (NEAREST), plus a progress strip below
        trace = parse_trace((out / "samples" / f"{job.name}.json").read_text())
        assert trace.class_ids == [job.class_id] and trace.seed == job.seed
        assert [op["seed"] for op in trace.settings["ops"]] == [job.seed]  # replayable alone
        assert len(trace.steps) == NUM_STEPS and (trace.codes_at(-1) >= 0).all()
    samples = np.load(out / "samples.npz")
    assert samples["arr_0"].shape == (4, 8, 8, 3) and samples["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(samples["arr_0"], np.stack(pngs))  # job order
    np.testing.assert_array_equal(samples["arr_1"], [1, 1, 2, 2])
    assert not list(out.rglob("*.partial"))


def test_an_image_does_not_depend_on_the_batch_size(checkpoints, tmp_path):
    args = ("--classes", "3", "--seeds", "4", "5", "6")
    assert cli(checkpoints, tmp_path / "b1", *args, "--batch-size", "1") == 0
    assert cli(checkpoints, tmp_path / "b3", *args, "--batch-size", "3") == 0
    for seed in (4, 5, 6):
        name = Job(3, seed).name
        one, three = (
            parse_trace((tmp_path / run / "samples" / f"{name}.json").read_text())
            for run in ("b1", "b3")
        )
        np.testing.assert_array_equal(one.codes_at(-1), three.codes_at(-1))
        np.testing.assert_allclose(one.scores_at(-1), three.scores_at(-1), atol=1e-4)
        # The decoder's batched convolutions may round a pixel differently.
        one, three = (
            np.asarray(Image.open(tmp_path / run / "samples" / f"{name}.png"), float)
            for run in ("b1", "b3")
        )
        assert np.abs(one - three).max() <= 1


def test_resume_skips_finished_shards(checkpoints, tmp_path, counted):
    out = tmp_path / "run"
    args = ("--classes", "1", "2", "--seeds", "0", "--batch-size", "1")
    assert cli(checkpoints, out, *args) == 0
    assert counted == [0, 1]
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert cli(checkpoints, out, *args) == 0
    assert counted == [0, 1]  # nothing regenerated
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    (out / "shards" / "shard_000001.done").unlink()  # as if killed before the marker
    assert cli(checkpoints, out, *args) == 0
    assert counted == [0, 1, 1]


def test_a_rerun_with_other_settings_is_refused(checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(checkpoints, out, "--classes", "1", "--batch-size", "1") == 0
    assert cli(checkpoints, out, "--classes", "1", "--batch-size", "1", "--num-rounds", "1") == 2
    assert "other settings" in capsys.readouterr().err


def test_a_run_written_before_the_settings_rename_resumes(checkpoints, tmp_path, counted):
    out = tmp_path / "run"
    args = ("--classes", "1", "--batch-size", "1")
    assert cli(checkpoints, out, *args) == 0
    manifest = json.loads((out / "run.json").read_text())
    settings = manifest["settings"]
    settings["refine_rounds"] = settings.pop("num_rounds")  # the name run.json held before
    (out / "run.json").write_text(json.dumps(manifest))
    assert cli(checkpoints, out, *args) == 0
    assert counted == [0]  # resumed, nothing regenerated
    assert cli(checkpoints, out, *args, "--num-rounds", "1") == 2  # the old name still compared


def test_plan_shards_keeps_seeds_consecutive_and_covers_every_job():
    jobs = make_jobs([7, 8], [0, 1, 2, 5])
    shards = plan_shards(jobs, batch_size=2)
    assert [[(j.class_id, j.seed) for j in s] for s in shards] == [
        [(7, 0), (7, 1)],
        [(7, 2)],
        [(7, 5)],
        [(8, 0), (8, 1)],
        [(8, 2)],
        [(8, 5)],
    ]
    assert [j for s in shards for j in s] == jobs
    with pytest.raises(generate.GenerateError, match="repeated"):
        make_jobs([1, 1], [0])


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_shard_indices_are_disjoint_and_complete(world):
    assigned = [shard_indices(10, rank, world) for rank in range(world)]
    flat = sorted(i for ranks in assigned for i in ranks)
    assert flat == list(range(10))


def test_two_ranks_split_the_jobs_and_rank_zero_merges(checkpoints, tmp_path, monkeypatch, counted):
    out = tmp_path / "run"
    args = ("--classes", "1", "2", "3", "--seeds", "0", "--batch-size", "1", "--npz")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):  # rank 1 first: rank 0 then finds every shard done and merges
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert cli(checkpoints, out, *args) == 0
        assert (out / "samples.npz").exists() == (rank == "0")
    assert counted == [1, 0, 2]
    records = [json.loads((out / "shards" / f"shard_{i:06d}.done").read_text()) for i in range(3)]
    assert [r["rank"] for r in records] == [0, 1, 0]
    assert [r["jobs"] for r in records] == [[[1, 0]], [[2, 0]], [[3, 0]]]
    np.testing.assert_array_equal(np.load(out / "samples.npz")["arr_1"], [1, 2, 3])


def test_merge_refuses_an_unfinished_run(checkpoints, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ("--classes", "1", "2", "--seeds", "0", "--batch-size", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli(checkpoints, out, *args) == 0
    monkeypatch.setenv("RANK", "0")
    assert cli(checkpoints, out, *args, "--merge") == 2
    assert "1 of 2 shards are not finished" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "/nonexistent/model.safetensors"}, "model"),
        ({"classes": ["11"]}, "class ids [11] out of range"),
        ({"tokenizer": "wrong_grid"}, "model and tokenizer do not match"),
        ({"extra": ["--tokens-per-round", "99"]}, "tokens_per_round"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(checkpoints, tmp_path, capsys, change, message):
    paths = dict(checkpoints)
    model = change.get("model", paths["model"])
    tokenizer = paths[change["tokenizer"]] if "tokenizer" in change else paths["tokenizer"]
    argv = ["--model", model, "--tokenizer", tokenizer, "--out", str(tmp_path / "run"), *FAST]
    argv += ["--classes", *change.get("classes", ["1"]), *change.get("extra", [])]
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "run.json").exists()  # a corrected rerun is not refused


# ---------------------------------------------------------------------------- atomic writers

WRITERS = {
    "png": lambda p: export.write_png(np.zeros((4, 4, 3), np.uint8), p),
    "gif": lambda p: export.write_gif([np.zeros((4, 4, 3), np.uint8)] * 2, p),
    "json": lambda p: export.write_json({"a": 1}, p),
    "npy": lambda p: export.write_npy(np.zeros((2, 4, 4, 3), np.uint8), p),
    "npz": lambda p: export.write_npz(p, {"arr_0": [np.zeros((1, 4, 4, 3), np.uint8)] * 2}),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_failed_write_leaves_the_old_file_and_no_partial_one(kind, tmp_path, monkeypatch):
    path = tmp_path / f"out.{kind}"
    path.write_bytes(b"old")

    def crash(_fd):
        raise OSError("disk full")

    monkeypatch.setattr(export.os, "fsync", crash)  # fails after the data is written
    with pytest.raises(OSError, match="disk full"):
        WRITERS[kind](path)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == [path.name]


def test_a_write_that_fails_midway_leaves_nothing(tmp_path):
    path = tmp_path / "samples.npz"
    pieces = [np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 5, 4, 3), np.uint8)]
    with pytest.raises(ValueError, match="differ"):
        export.write_npz(path, {"labels": np.arange(2), "arr_0": pieces})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_writers_round_trip(kind, tmp_path):
    path = WRITERS[kind](tmp_path / f"sub/out.{kind}")  # parent directories are created
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o644
    if kind == "npz":
        assert np.load(path)["arr_0"].shape == (2, 4, 4, 3)
    if kind == "gif":
        gif = Image.open(path)
        assert gif.n_frames == 1  # identical frames merge: callers must make frames differ


def test_dtype_flag_sets_the_precision_and_a_pinned_one_is_recorded(checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(checkpoints, out, "--classes", "1", "--dtype", "bfloat16") == 0
    assert "precision: bfloat16" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["dtype"] == "bfloat16"
    trace = parse_trace((out / "samples" / f"{Job(1, 0).name}.json").read_text())
    assert (trace.codes_at(-1) >= 0).all()
    # The same folder in another precision would mix two kinds of samples: refused.
    assert cli(checkpoints, out, "--classes", "1", "--dtype", "float32") == 2
    with pytest.raises(SystemExit):
        cli(checkpoints, tmp_path / "bad", "--classes", "1", "--dtype", "float16")
