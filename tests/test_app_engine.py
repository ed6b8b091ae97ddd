"""The studio engine: where weights come from (checkpoints/, hub fallback, demo), class names,
decoding with empty cells, encoding uploads, and streams that interleave safely or stop early."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import random_model, tiny_config
from PIL import Image
from test_app_render import tiny_engine

import app.engine as engine_module
from app.engine import DEMO_NOTE, Engine
from scan_core.checkpoint.loading import CheckpointError, save_checkpoint
from scan_core.sampling.sampler import run_all
from scan_core.sampling.settings import SamplerSettings

SETTINGS = SamplerSettings(num_steps=4, num_rounds=3, tokens_per_round=2, cfg_scale=1.0)


def test_nothing_loads_until_first_use(tmp_path):
    engine = Engine(checkpoint_dir=tmp_path)
    assert engine._bundle is None  # construction reads no weights
    bundle = engine.load()
    assert engine.load() is bundle  # once
    assert DEMO_NOTE in bundle.notes and bundle.class_names[3] == "class 3"
    assert (engine.grid_size, engine.image_size) == (8, 32)


def test_checkpoints_folder_is_used_when_present(tmp_path):
    tiny = tiny_engine().bundle
    save_checkpoint(tmp_path / "scan.safetensors", tiny.model, "model")
    save_checkpoint(tmp_path / "vq.safetensors", tiny.tokenizer, "tokenizer")
    (tmp_path / "notes.safetensors").write_bytes(b"not a checkpoint")  # skipped, not fatal
    bundle = Engine(checkpoint_dir=tmp_path, device="cpu").load()
    assert DEMO_NOTE not in bundle.notes and bundle.model.config.grid_size == 4


def test_hub_ids_fall_back_with_a_note_but_local_paths_fail(tmp_path, monkeypatch):
    def offline(path, *_, **__):
        raise CheckpointError(f"could not fetch {path} (offline)")

    monkeypatch.setattr(engine_module, "load_pair", offline)
    hub = Engine(
        "hf://owner/repo/scan.safetensors", "hf://owner/repo/vq.pt", checkpoint_dir=tmp_path
    )
    notes = hub.load().notes
    assert "could not load the requested weights" in notes[0] and DEMO_NOTE in notes
    with pytest.raises(CheckpointError):
        Engine(str(tmp_path / "missing.safetensors"), "vq.pt", checkpoint_dir=tmp_path).load()


def test_a_1000_class_model_without_card_names_gets_the_imagenet_names(tmp_path):
    tiny = tiny_engine().bundle
    model = random_model(tiny_config(num_classes=1000))
    model_path = save_checkpoint(tmp_path / "scan.safetensors", model, "model")
    vq_path = save_checkpoint(tmp_path / "vq.safetensors", tiny.tokenizer, "tokenizer")
    # The default names file lists the emoji model's 18 classes: it does not fit, ImageNet does.
    for names_file in (engine_module.CLASS_NAMES_FILE, tmp_path / "missing.json"):
        engine = Engine(str(model_path), str(vq_path), class_names_path=names_file)
        bundle = engine.load()
        assert bundle.class_names[:3] == ["tench", "goldfish", "great white shark"]
        assert len(bundle.class_names) == 1000
        assert not any("class names" in note for note in bundle.notes), bundle.notes
        assert engine.class_id("goldfish") == 1
    # Any other class count keeps numbers when the file does not fit.
    names, notes = engine_module.class_names_for(engine_module.CLASS_NAMES_FILE, 10)
    assert names[9] == "class 9" and "does not list 10 class names" in notes[0]


def test_mismatched_tokenizer_is_refused():
    tokenizer = tiny_engine().bundle.tokenizer
    model = random_model(tiny_config(grid_size=8))
    with pytest.raises(CheckpointError, match="do not match"):
        Engine.from_modules(model, tokenizer)


def test_class_id_accepts_names_and_numbers():
    engine = tiny_engine()
    assert engine.class_id("class 4") == 4 and engine.class_id(7) == 7
    with pytest.raises(ValueError, match="unknown class"):
        engine.class_id("zebra")
    with pytest.raises(ValueError, match="out of range"):
        engine.class_id(10)


def test_decode_paints_empty_cells_and_caches():
    engine = tiny_engine()
    codes = np.full((1, 16), 5)
    codes[0, :4] = -1  # first row of cells has no code yet
    image = engine.decode(codes)[0]
    scale = engine.display_scale
    assert image.shape == (8 * scale, 8 * scale, 3)
    top = image[: 2 * scale]  # the empty first row (2 pixels per cell, upscaled)
    assert top.max() < 70  # checkerboard greys only
    again = engine.decode(codes, display=False)[0]
    assert again.shape == (8, 8, 3) and len(engine._frames) == 1


def test_encode_any_image_to_a_grid():
    engine = tiny_engine()
    codes = engine.encode(Image.new("L", (31, 17), 128))
    assert codes.shape == (1, 16) and codes.min() >= 0 and codes.max() < 64


def test_interleaved_streams_equal_sequential_runs():
    """The lock is per step, so two sessions' runs may interleave; neither may notice."""
    engine = tiny_engine()
    alone = [run_all(engine.generate([c], SETTINGS, seed)) for c, seed in ((1, 4), (2, 9))]
    streams = [engine.generate([1], SETTINGS, 4), engine.generate([2], SETTINGS, 9)]
    last, active = [None, None], [0, 1]
    while active:  # one step of each in turn
        for index in list(active):
            item = next(streams[index], None)
            if item is None:
                active.remove(index)
            else:
                last[index] = item[0]
    for together, single in zip(last, alone, strict=True):
        np.testing.assert_array_equal(together.codes_at(-1), single.codes_at(-1))


def in_thread(fn, timeout: float = 60.0):
    """``fn()`` on a fresh thread; a thread still blocked after ``timeout`` s (a deadlock on the
    engine's lock) fails the test instead of hanging it."""
    result, done = {}, threading.Event()

    def target():
        try:
            result["value"] = fn()
        except BaseException as error:  # noqa: BLE001 (re-raised on the test's thread)
            result["error"] = error
        done.set()

    threading.Thread(target=target, daemon=True).start()
    assert done.wait(timeout), "blocked: a stopped stream still holds the engine's lock"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.mark.parametrize("ending", ["closed", "abandoned"])
def test_a_stream_stopped_mid_run_never_blocks_other_sessions(ending):
    """A closed tab or a Stop click closes the handler's generator (GeneratorExit at its yield),
    from the event loop's thread while its steps ran on worker threads; a vanished client may
    just leave it unclosed. Either way the lock is free after every step, so other sessions run
    and the stopped session can start again."""
    engine = tiny_engine()
    expected = [run_all(engine.generate([c], SETTINGS, seed)) for c, seed in ((1, 4), (2, 9))]
    stopped = engine.generate([1], SETTINGS, 4)
    trace, _ = in_thread(lambda: next(stopped))  # one step on a worker thread, as Gradio runs it
    assert len(trace.steps) == 1
    if ending == "closed":
        stopped.close()
    other = in_thread(lambda: run_all(engine.generate([2], SETTINGS, 9)))
    again = in_thread(lambda: run_all(engine.generate([1], SETTINGS, 4)))
    for trace, single in zip((again, other), expected, strict=True):
        np.testing.assert_array_equal(trace.codes_at(-1), single.codes_at(-1))
    assert in_thread(lambda: engine.decode(again.codes_at(-1)).shape[0]) == 1
    if ending == "closed":
        assert next(stopped, None) is None  # and it stays closed
    else:  # it held nothing while it waited: it could even go on
        assert len(next(stopped)[0].steps) == 2


def test_the_header_summarises_the_model_card():
    from app.ui import card_summary

    assert card_summary(None) == ""
    card = {
        "name": "SCAN-S emoji",
        "card": "checkpoints/README.md",
        "evaluation": {"fd_t0": 10.0, "fd_refined": 8.0, "refined_T": 16},
    }
    line = card_summary(card)
    assert "SCAN-S emoji" in line and "T=16" in line and "-20%" in line
    assert "checkpoints/README.md" in line
    assert "T = 0" in card_summary(card | {"note": "default T = 0: refinement did not help"})


def test_studio_timing_counts_every_streamed_frame():
    from test_app_render import tiny_engine

    from tools.timing import time_runs

    engine = tiny_engine()
    d = engine.default_settings()
    result = time_runs(engine, d.replace(num_rounds=2), runs=1)
    # K sets, the score step, T rounds, then the final update that fills the gallery
    assert result["frames"] == d.num_steps + 1 + 2 + 1
    assert 0 < result["first_frame_s"] <= result["full_run_s"]
