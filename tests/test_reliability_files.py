"""Files under the studio: checkpoints (safetensors by default, pickles only when trusted, never
a path from a request), checkpoints deleted, rewritten, truncated or corrupted while loaded (and
reloads that refuse them), a full disk while a checkpoint or an export is written, and the image
cache (written once, swept). Partial files never appear as finished ones."""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_config
from PIL import Image
from reliability_support import LOOK, SETTINGS, one_thread  # noqa: F401 (autouse fixture)
from test_app_render import tiny_engine

import app.engine as engine_module
from app import exporting, handlers, serving
from app.engine import DEMO_NOTE, Engine
from app.state import SessionState
from app.ui import build_demo
from scan_core.checkpoint import files as checkpoint_io
from scan_core.checkpoint.loading import CheckpointError, save_checkpoint
from scan_core.model.config import vq_preset
from scan_core.sampling.sampler import run_all
from scan_core.sampling.settings import SamplerSettings
from scan_core.tokenizer.vq import VQModel

ROOT = Path(__file__).resolve().parents[1]
RUN = SamplerSettings(num_steps=4, num_rounds=2, tokens_per_round=2, cfg_scale=1.0)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a server


def launcher():
    """``app.py`` as a module (the ``app/`` package shadows the name ``app``)."""
    spec = importlib.util.spec_from_file_location("scan_studio_launcher", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def modules(seed: int = 0, num_classes: int = 10):
    """A model and tokenizer that fit each other: VQ-tiny is 16 px, an 8x8 grid of 64 codes."""
    torch.manual_seed(seed)
    tokenizer = VQModel(vq_preset("VQ-tiny")).eval()
    with torch.no_grad():
        for param in tokenizer.parameters():
            param.normal_(0.0, 0.1)
    model = random_model(tiny_config(grid_size=8, num_classes=num_classes), seed=seed)
    return model, tokenizer


def write_pair(folder: Path, seed: int = 0, num_classes: int = 10) -> tuple[Path, Path]:
    model, tokenizer = modules(seed, num_classes)
    model_path = save_checkpoint(folder / "scan.safetensors", model, "model")
    return model_path, save_checkpoint(folder / "vq.safetensors", tokenizer, "tokenizer")


def final_codes(engine: Engine) -> np.ndarray:
    return run_all(engine.generate([1], RUN, seed=3)).codes_at(-1)


# ----------------------------------------------------------------------- checkpoint safety


def test_only_safetensors_are_picked_up_from_the_checkpoints_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "demo_modules", modules)  # the fallback, but small
    model, tokenizer = modules()
    torch.save(model.state_dict(), tmp_path / "scan.pt")
    torch.save(tokenizer.state_dict(), tmp_path / "vq.pt")
    assert DEMO_NOTE in Engine(checkpoint_dir=tmp_path).load().notes  # .pt files are ignored
    write_pair(tmp_path)
    assert DEMO_NOTE not in Engine(checkpoint_dir=tmp_path, device="cpu").load().notes


def test_pickled_objects_load_only_with_trust_pickle(tmp_path):
    model_path, _ = write_pair(tmp_path)
    _, tokenizer = modules()
    sd = {k: v.clone() for k, v in tokenizer.state_dict().items()}
    torch.save({"model": sd, "args": argparse.Namespace(vq_model="VQ-tiny")}, tmp_path / "vq.pt")
    plain = tmp_path / "vq_plain.pt"
    torch.save(sd, plain)  # tensors only: weights_only loads it, no flag needed
    assert Engine(str(model_path), str(plain), "cpu").load().model_id
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        Engine(str(model_path), str(tmp_path / "vq.pt"), "cpu").load()
    bundle = Engine(str(model_path), str(tmp_path / "vq.pt"), "cpu", trust_pickle=True).load()
    assert bundle.tokenizer.config.grid_size == 8
    args = launcher().parse_args
    assert not args([]).trust_pickle and args(["--trust-pickle"]).trust_pickle


def test_the_launcher_binds_this_machine_unless_told(monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    assert launcher().parse_args([]).host == "127.0.0.1" == serving.default_host()
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")  # what Hugging Face Spaces sets
    assert launcher().parse_args([]).host == "0.0.0.0" == serving.default_host()
    text = (ROOT / "app.py").read_text()  # launched only through serving (which refuses share)
    assert "serving.launch(" in text and ".launch(" not in text.replace("serving.launch(", "")


def test_the_launcher_session_lifetime_defaults_to_the_policy_and_is_bounded(capsys):
    args = launcher().parse_args
    assert args([]).session_ttl == serving.SESSION_TTL_S
    assert args(["--session-ttl", "120"]).session_ttl == 120.0
    for bad in ("0", "-5", "1e9"):
        with pytest.raises(SystemExit):
            args(["--session-ttl", bad])
        assert "--session-ttl must be between" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["max_runs", "max_batch"])
def test_the_launcher_scheduler_limits_default_to_the_scheduler_and_are_at_least_one(capsys, flag):
    from app import batching

    option = "--" + flag.replace("_", "-")
    args = launcher().parse_args
    default = getattr(batching, flag.upper())
    assert getattr(args([]), flag) == default and getattr(args([option, "3"]), flag) == 3
    with pytest.raises(SystemExit):
        args([option, "0"])
    assert f"{option} must be at least 1" in capsys.readouterr().err


class Payload:
    """Unpickling this creates a file: the harmless stand-in for code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_malicious_pickle_never_runs_without_the_flag(tmp_path):
    model_path, _ = write_pair(tmp_path)
    marker = tmp_path / "pwned"
    _, tokenizer = modules()
    torch.save({"model": tokenizer.state_dict(), "hook": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="arbitrary Python objects"):
        Engine(str(model_path), str(tmp_path / "evil.pt"), "cpu").load()
    assert not marker.exists()


def test_no_request_can_name_a_checkpoint(tmp_path, monkeypatch):
    """The API has no endpoint about weights, files reach only the upload handlers, and those
    never call the checkpoint loaders, even when the upload is a checkpoint."""
    demo = build_demo(tiny_engine())
    endpoints = demo.get_api_info()["named_endpoints"]
    for name, info in endpoints.items():
        assert not any(word in name for word in ("checkpoint", "weights", "model", "reload"))
        files = [p for p in info["parameters"] if "File" in str(p.get("python_type", {}))]
        assert not files or name in {
            "/score_image",
            "/load_trace",
            "/regenerate_region",
            "/lock",
        }, name

    def forbidden(*_, **__):
        raise AssertionError("a request reached the checkpoint loader")

    monkeypatch.setattr(engine_module, "load_pair", forbidden)
    checkpoint, _ = write_pair(tmp_path)
    engine = tiny_engine()
    out = handlers.score_image(
        engine, SessionState(), str(checkpoint), "class 0", 0, *LOOK, **SETTINGS
    )
    assert "cannot read image" in out[handlers.STATUS_INDEX]
    out = exporting.load_trace(engine, SessionState(), str(checkpoint), *LOOK)
    assert "not a trace JSON file" in out[handlers.STATUS_INDEX]


# ------------------------------------------------------------- files that change underneath


def test_loaded_weights_survive_files_rewritten_truncated_or_deleted(tmp_path):
    """Loaders memory-map the file; the engine copies the weights out, so ``cp new old`` (same
    inode, new bytes) or ``rm`` changes nothing, and a truncated file cannot SIGBUS it. Each
    time a reload refuses the broken file, says why, and the old weights keep serving."""
    paths = write_pair(tmp_path)
    engine = Engine(*map(str, paths), device="cpu")
    before = final_codes(engine)
    for path in paths:  # rewrite in place, as `cp` over an existing file does
        with open(path, "r+b") as handle:
            handle.write(b"\0" * path.stat().st_size)
    np.testing.assert_array_equal(final_codes(engine), before)  # (checked first: weights still
    assert "neither a safetensors file" in reload_failure(engine)  # mapped would SIGBUS below)
    write_pair(tmp_path, seed=1)  # new files (not loaded), then cut short as by a failed copy
    for path in paths:
        os.truncate(path, path.stat().st_size // 2)
    np.testing.assert_array_equal(final_codes(engine), before)
    assert "truncated" in reload_failure(engine)
    for path in paths:
        path.unlink()
    np.testing.assert_array_equal(final_codes(engine), before)
    assert "no checkpoint at" in reload_failure(engine)
    np.testing.assert_array_equal(final_codes(engine), before)


def reload_failure(engine: Engine) -> str:
    """``engine.reload()``'s report, checked to be a refusal that keeps the loaded weights."""
    note = engine.reload()
    assert note.startswith("reload failed (") and "still serving the weights loaded before" in note
    return note


def test_a_run_in_progress_finishes_unchanged_when_its_files_go_bad(tmp_path):
    """Another session's stream, mid-run when the files are truncated, ends as it would have."""
    paths = write_pair(tmp_path)
    engine = Engine(*map(str, paths), device="cpu")
    before = final_codes(engine)
    stream = engine.generate([1], RUN, seed=3)
    next(stream)
    for path in paths:
        os.truncate(path, 0)
    trace = run_all(stream)
    np.testing.assert_array_equal(trace.codes_at(-1), before)
    assert engine.decode(trace.codes_at(-1)).shape[0] == 1  # the tokenizer still decodes


def test_reload_refuses_corrupted_values_and_unreadable_files(tmp_path, monkeypatch):
    """Bytes overwritten inside the data still parse; NaN weights would then fail every run
    ("probability tensor contains nan"), so loading checks them. An unreadable file (EACCES,
    EIO) is a refusal too, not an exception out of reload()."""
    paths = write_pair(tmp_path)
    engine = Engine(*map(str, paths), device="cpu")
    before = final_codes(engine)
    with open(paths[0], "r+b") as handle:  # the last tensor's data: 0xff bytes are NaN floats
        handle.seek(-64, os.SEEK_END)
        handle.write(b"\xff" * 64)
    assert "NaN or infinite" in reload_failure(engine)
    np.testing.assert_array_equal(final_codes(engine), before)
    with pytest.raises(CheckpointError, match="NaN or infinite"):  # and a launch refuses it
        Engine(*map(str, paths), device="cpu").load()

    def unreadable(path, *_, **__):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(engine_module, "load_pair", unreadable)
    assert "Permission denied" in reload_failure(engine)
    np.testing.assert_array_equal(final_codes(engine), before)


def test_reload_takes_replaced_files_but_not_another_model(tmp_path):
    paths = write_pair(tmp_path, seed=0)
    engine = Engine(*map(str, paths), device="cpu")
    before = final_codes(engine)
    write_pair(tmp_path, seed=1)  # new weights, same model (atomic replace)
    assert engine.reload().startswith("reloaded")
    assert not np.array_equal(final_codes(engine), before)
    write_pair(tmp_path, num_classes=5)  # another model: sessions' traces would not fit it
    assert "reload refused" in engine.reload()
    assert engine.bundle.model.config.num_classes == 10
    assert "nothing to reload" in tiny_engine().reload()


# -------------------------------------------------------------------------------- full disk


def test_a_full_disk_during_checkpoint_save_leaves_the_old_file(tmp_path, monkeypatch):
    model, _ = modules()
    target = tmp_path / "scan.safetensors"
    save_checkpoint(target, model, "model")
    old = target.read_bytes()

    def half_then_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io, "save_file", half_then_full)
    for path in (target, tmp_path / "new.safetensors"):
        with pytest.raises(OSError, match="No space left"):
            save_checkpoint(path, modules(seed=1)[0], "model")
    assert target.read_bytes() == old and not (tmp_path / "new.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.safetensors"]  # no .partial


def test_a_full_disk_at_flush_time_fails_the_export_cleanly(tmp_path, monkeypatch):
    """The bytes fit in the page cache, then fsync reports ENOSPC: nothing is offered, nothing
    half-written stays, and the session goes on (export works once there is room again)."""
    engine = tiny_engine()
    monkeypatch.setattr(handlers, "score_plot", lambda *a, **k: np.zeros((4, 4, 3), np.uint8))
    monkeypatch.setattr(exporting, "EXPORT_ROOT", tmp_path)
    outputs = list(handlers.generate(engine, SessionState(), "class 1", 2, 1, *LOOK, **SETTINGS))
    state = outputs[-1][handlers.VIEW_OUTPUTS.index("state")]
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    try:
        *files, message = exporting.export(engine, state, True, 50, 500)
    finally:
        monkeypatch.setattr(os, "fsync", real_fsync)
    assert "disk is full" in message and not any(isinstance(f, str) for f in files)
    assert not list(tmp_path.rglob("*"))
    assert handlers.scrub(engine, state, 1, *LOOK)[handlers.STATUS_INDEX].startswith("step 1/")
    *files, message = exporting.export(engine, state, True, 50, 500)
    assert message.startswith("exported") and all(Path(f).is_file() for f in files)


def test_streamed_images_are_cached_write_once(tmp_path):
    image = Image.fromarray(np.full((8, 8, 3), 7, np.uint8))
    first = serving._save_pil_write_once(image, str(tmp_path), format="png")
    inode = os.stat(first).st_ino
    again = serving._save_pil_write_once(image, str(tmp_path), format="png")
    assert again == first and os.stat(again).st_ino == inode  # not rewritten
    assert not list(tmp_path.rglob("*.partial"))
    assert np.asarray(Image.open(first)).max() == 7
    assert serving.sweep_image_cache(older_than_s=3600) == 0 and os.path.exists(first)
    assert serving.sweep_image_cache(older_than_s=-1) >= 1  # Gradio may lose track; we do not
    assert not os.path.exists(first) and not os.path.exists(os.path.dirname(first))
    again = serving._save_pil_write_once(image, str(tmp_path), format="png")  # handed out again
    assert again == first and np.asarray(Image.open(again)).max() == 7  # after a sweep: rewritten
    assert serving.sweep_image_cache(older_than_s=-1) >= 1 and not os.path.exists(again)


def test_the_cache_sweeper_outlives_a_failed_sweep(monkeypatch):
    stop, calls = threading.Event(), []

    def sweep(older_than_s: float) -> int:
        calls.append(older_than_s)
        if len(calls) == 1:
            raise RuntimeError("a sweep that fails")  # logged; the next sweep still runs
        stop.set()
        return 0

    monkeypatch.setattr(serving, "sweep_image_cache", sweep)
    worker = threading.Thread(target=serving.sweep_every, args=(0.001, 60.0, stop), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive() and calls == [60.0, 60.0]
