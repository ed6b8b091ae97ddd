"""The studio over HTTP (no browser): launch build_demo on a free local port with a tiny random
engine and drive the named API endpoints with gradio_client, as a remote user would: streams
that say how far they are and when they are done, a Stop that is not a failure, uploads scored
under the class the user chose, named parameters and outputs, and messages without server
paths."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import json
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reliability_support import free_port
from test_app_render import API_LOOK, LOOK, SETTINGS, tiny_engine

from app import handlers
from app.engine import STUDIO_SETTINGS, Engine
from app.ui import build_demo

gradio_client = pytest.importorskip("gradio_client")

# 4 generation sets + 1 score step + 3 refinement rounds = 8 steps; one live update per step
# and one final update with the brush canvas, compare view and gallery.
GENERATE_STEPS = 8


@contextmanager
def serve_demo(engine: Engine) -> Iterator[tuple]:
    """The studio on a free 127.0.0.1 port, in this process; yields (demo, URL)."""
    demo = build_demo(engine)
    port = free_port()
    demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        show_error=True,
    )
    try:
        yield demo, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@contextmanager
def serve(engine: Engine) -> Iterator[str]:
    """The studio on a free 127.0.0.1 port, in this process; yields its URL."""
    with serve_demo(engine) as (_, url):
        yield url


@pytest.fixture(scope="module")
def studio():
    """(engine, demo, url) of one studio for the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: extra threads only contend on a busy CI box
    engine = tiny_engine()
    try:
        with serve_demo(engine) as (demo, url):
            yield engine, demo, url
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(studio):
    return gradio_client.Client(studio[2], verbose=False)


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until true; the timeout turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def generated(client):
    job = client.submit("class 1", 3, 2, **SETTINGS, **API_LOOK, api_name="/generate")
    job.result(timeout=120)
    return job


def test_generate_streams_one_update_per_step(generated):
    assert generated.status().success
    outputs = generated.outputs()
    assert len(outputs) == GENERATE_STEPS + 1
    image, compare, plot, timeline, status, editor, gallery = outputs[-1]
    assert timeline["value"] == timeline["maximum"] == GENERATE_STEPS
    # Progress against the plan while it streams, then a "done" line.
    assert outputs[0][4] == "image 1 of 2 (seed 3) · drawing set 1 of 4"
    assert "refining: round 3 of 3" in outputs[-2][4]
    assert status.startswith("image 1 of 2 (seed 3) · done · 4 of 4 sets drawn, 3 of 3 ")
    assert f"step {GENERATE_STEPS}/{GENERATE_STEPS}" in status
    assert "all 2 images in the Gallery tab" in status
    assert Image.open(image).size[1] >= 256  # 8x8 pixels shown 32x larger (NEAREST), + legend
    assert [item["caption"] for item in gallery] == ["seed 3 · shown", "seed 4"]
    assert not editor.get("background") and len(compare) == 2  # the brush is sent on demand


def test_scrub_shows_an_earlier_step_and_leaves_the_slider_alone(client, generated):
    image, _, _, timeline, status, *_ = client.predict(2, *LOOK, api_name="/scrub")
    assert status.startswith("step 2/") and os.path.exists(image)
    assert "value" not in timeline  # never written back: the user is holding it


def test_regenerate_region_from_a_brush_layer(client, generated, tmp_path):
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[:16, :16] = (255, 0, 255, 255)  # cell 0 of the 4x4 grid
    Image.fromarray(layer).save(tmp_path / "layer.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "bg.png")
    editor = {
        "background": gradio_client.handle_file(str(tmp_path / "bg.png")),
        "layers": [gradio_client.handle_file(str(tmp_path / "layer.png"))],
        "composite": None,
    }
    client.predict(GENERATE_STEPS, *LOOK, api_name="/scrub")  # continue from the last step
    job = client.submit(editor, False, 5, **SETTINGS, **API_LOOK, api_name="/regenerate_region")
    job.result(timeout=120)
    assert job.status().success
    status = job.outputs()[-1][4]
    assert status.startswith("done · 1 of 1 sets drawn"), status
    assert f"step {GENERATE_STEPS + 2}/{GENERATE_STEPS + 2}" in status


def test_score_an_uploaded_image(client, tmp_path):
    path = tmp_path / "photo.png"
    pixels = np.random.default_rng(1).integers(0, 255, (40, 70, 3), np.uint8)
    Image.fromarray(pixels).convert("P").save(path)  # palette mode, odd size
    job = client.submit(
        gradio_client.handle_file(str(path)),
        "class 0",
        0,
        **SETTINGS,
        **API_LOOK,
        api_name="/score_image",
    )
    job.result(timeout=120)
    assert job.status().success
    outputs = job.outputs()[-1]
    assert outputs[4].startswith(
        "scored photo.png (70×40: palette colours converted to RGB, centre-cropped to a square "
        "(its left and right cut off), scaled down to 8×8) under class 'class 0'"
    ), outputs[4]
    assert Image.open(outputs[-1]).size == Image.open(outputs[0]).size  # the preview


def test_export_returns_gif_png_and_trace(client, generated):
    gif, png, trace_json, status = client.predict(True, 50, 500, api_name="/export")
    assert "exported" in status
    with Image.open(gif) as image:
        assert image.n_frames >= 2
    assert Image.open(png).format == "PNG"
    loaded = client.predict(gradio_client.handle_file(trace_json), *LOOK, api_name="/load_trace")
    assert loaded[4].startswith("loaded a trace")


def test_bad_input_is_a_message_not_a_traceback(client, generated, tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "bg.png")
    unpainted = {
        "background": gradio_client.handle_file(str(tmp_path / "bg.png")),
        "layers": [],
        "composite": None,
    }
    job = client.submit(unpainted, False, 0, **SETTINGS, **API_LOOK, api_name="/regenerate_region")
    job.result(timeout=60)
    assert job.status().success and "paint the patches" in job.outputs()[-1][4]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    status = client.predict(
        gradio_client.handle_file(str(broken)),
        "class 0",
        0,
        **SETTINGS,
        **API_LOOK,
        api_name="/score_image",
    )[4]
    assert "cannot read image" in status
    # the session still works after both errors
    assert client.predict(1, *LOOK, api_name="/scrub")[4].startswith("step 1/")


def test_api_parameters_carry_the_setting_names(client):
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    names = [p["parameter_name"] for p in info["/generate"]["parameters"]]
    assert names == ["class_name", "seed", "count", *STUDIO_SETTINGS, "heatmap", "opacity"]
    assert [p["parameter_name"] for p in info["/refine"]["parameters"]][1:-2] == [*STUDIO_SETTINGS]


def test_settings_by_name_and_by_position_give_the_same_run(client):
    chosen = SETTINGS | {"num_rounds": 1}
    by_name = client.predict("class 1", 6, 1, **chosen, **API_LOOK, api_name="/generate")
    in_order = [chosen[name] for name in STUDIO_SETTINGS]
    by_position = client.predict("class 1", 6, 1, *in_order, *LOOK, api_name="/generate")
    steps = SETTINGS["num_steps"] + 1 + 1  # K sets, the score step, one round
    assert by_name[4] == by_position[4] and by_name[4].startswith("done · ")
    assert f" · step {steps}/{steps} · " in by_name[4]
    pixels = [np.asarray(Image.open(outputs[0])) for outputs in (by_name, by_position)]
    np.testing.assert_array_equal(*pixels)


def test_every_endpoint_names_its_parameters_and_outputs(client):
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/generate", "/refine", "/score_image", "/stop", "/scrub", "/export"} <= set(info)
    for name, endpoint in info.items():
        for parameter in endpoint["parameters"]:
            assert not re.fullmatch(r"param_\d+", parameter["parameter_name"]), name
        for output in endpoint["returns"]:
            assert output["label"] and not output["label"].startswith("value_"), (name, output)


def test_an_upload_is_refined_under_the_class_it_was_scored_under(client, tmp_path):
    path = tmp_path / "frog.png"
    Image.new("RGBA", (64, 64), (40, 200, 60, 255)).save(path)
    upload = gradio_client.handle_file(str(path))
    scored = client.predict(upload, "class 4", 0, **SETTINGS, **API_LOOK, api_name="/score_image")
    assert "64×64: transparency filled with white, scaled down to 8×8" in scored[4]
    assert "under class 'class 4'" in scored[4]
    job = client.submit(1, **SETTINGS, **API_LOOK, api_name="/refine")
    job.result(timeout=120)
    assert job.status().success and job.outputs()[-1][4].startswith("done · 3 of 3 refinement")
    trace_json = client.predict(True, 50, 500, api_name="/export")[2]
    trace = json.loads(Path(trace_json).read_text(encoding="utf-8"))
    assert trace["class_ids"] == [4] and trace["steps"][0]["kind"] == "score"


def pause_generate(engine, seed: int, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Runs with ``seed`` wait after their first step until ``resume`` is set; returns
    (paused, resume): ``paused`` is set once a run waits."""
    paused, resume = threading.Event(), threading.Event()
    real = engine.generate

    def generate(class_ids, settings, run_seed, locked=None, batched=False):
        for index, item in enumerate(real(class_ids, settings, run_seed, locked, batched)):
            yield item
            if run_seed == seed and index == 0:
                paused.set()
                resume.wait(60)

    monkeypatch.setattr(engine, "generate", generate)
    return paused, resume


def run_outcomes(demo, function: str) -> list[str]:
    """How Gradio recorded each run of an endpoint (its API page's "% successful")."""
    records = list(demo._queue.event_analytics.values())
    return [record["status"] for record in records if record["function"] == function]


def test_stop_ends_a_run_where_it_is_and_is_no_failure(studio, monkeypatch):
    engine, demo, url = studio
    paused, resume = pause_generate(engine, 21, monkeypatch)
    session = gradio_client.Client(url, verbose=False)
    job = session.submit("class 1", 21, 1, **SETTINGS, **API_LOOK, api_name="/generate")
    assert paused.wait(60)
    session.predict(api_name="/stop")  # what the Stop button sends, from the same session
    resume.set()
    job.result(timeout=120)
    assert job.status().success
    outputs = job.outputs()
    assert len(outputs) < GENERATE_STEPS + 1  # it really stopped early
    image, _, plot, timeline, status, *_ = outputs[-1]
    assert status.startswith("stopped · 2 of 4 sets drawn, 0 of 3 refinement rounds"), status
    assert " · step 2/2 · " in status
    assert timeline["value"] == 2 and os.path.exists(plot)  # the plot is drawn for that step
    wait_for(lambda: "processing" not in run_outcomes(demo, "generate"), "the run's record")
    assert "failed" not in run_outcomes(demo, "generate")
    shown = session.predict(1, *LOOK, api_name="/scrub")[4]
    assert shown.startswith("step 1/2 · generate"), shown  # what it made is kept


def test_a_stop_while_queued_stops_that_run_and_a_stray_stop_stops_nothing(studio, monkeypatch):
    engine, demo, url = studio
    paused, resume = pause_generate(engine, 22, monkeypatch)
    first, second = (gradio_client.Client(url, verbose=False) for _ in range(2))
    running = first.submit("class 1", 22, 1, **SETTINGS, **API_LOOK, api_name="/generate")
    assert paused.wait(60)
    waiting = second.submit("class 1", 23, 1, **SETTINGS, **API_LOOK, api_name="/generate")
    wait_for(lambda: waiting.status().code.name == "IN_QUEUE", "the second run to queue")
    second.predict(api_name="/stop")
    resume.set()
    for job in (running, waiting):
        job.result(timeout=120)
        assert job.status().success
    assert running.outputs()[-1][4].startswith("done · ")  # another session's Stop: not this
    assert waiting.outputs()[-1][4] == "stopped before the run started"
    second.predict(api_name="/stop")  # nothing runs: dropped, not kept for the next run
    later = second.submit("class 1", 24, 1, **SETTINGS, **API_LOOK, api_name="/generate")
    later.result(timeout=120)
    assert later.outputs()[-1][4].startswith("done · ")


def test_messages_name_the_file_never_a_server_path(client, tmp_path):
    broken = tmp_path / "holiday photo.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    notes = tmp_path / "holiday notes.json"
    notes.write_text('{"format": "scan-trace", "version": 99}')
    image, trace = (gradio_client.handle_file(str(path)) for path in (broken, notes))
    messages = [
        client.predict(image, "class 0", 0, **SETTINGS, **API_LOOK, api_name="/score_image")[4],
        client.predict(trace, *LOOK, api_name="/load_trace")[4],
    ]
    for message, name in zip(messages, ("holiday photo.png", "version"), strict=True):
        assert message.startswith("⚠️") and name in message, message
        assert tempfile.gettempdir() not in message and not re.search(r"(^|[\s'(])/\w", message)


def test_without_paths_keeps_file_names_and_fractions():
    cases = {
        "cannot identify image file '/tmp/gradio/ab12/holiday photo.png'": (
            "cannot identify image file 'holiday photo.png'"
        ),
        "image /srv/a/b.png is 5x5, /srv/a/b.png again": "image b.png is 5x5, b.png again",
        "C:\\Users\\me\\frog.png is missing": "frog.png is missing",
        "step 4/4 · accepted 1/2 · 24/7": "step 4/4 · accepted 1/2 · 24/7",
    }
    for message, shown in cases.items():
        assert handlers.without_paths(message) == shown


def test_fit_notes_say_what_was_done_to_an_image():
    assert handlers.fit_note((32, 32), "RGB", 32) == "32×32: used as it is"
    assert handlers.fit_note((4000, 4000), "RGB", 32) == "4000×4000: scaled down to 32×32"
    assert handlers.fit_note((5, 5), "L", 32) == (
        "5×5: grayscale, converted to colour, scaled up to 32×32"
    )
    assert handlers.fit_note((32, 300), "RGB", 32) == (
        "32×300: centre-cropped to a square (its top and bottom cut off)"
    )


def test_every_setting_has_a_studio_control_from_its_table_row():
    import gradio as gr

    from app.ui import setting_control
    from scan_core.sampling.settings import FIELDS, SETTING_FIELDS, grid_defaults, model_sizes

    kinds = {"slider": gr.Slider, "number": gr.Number, "checkbox": gr.Checkbox, "radio": gr.Radio}
    defaults, sizes = grid_defaults(16), model_sizes(16, 64)
    for field in SETTING_FIELDS:
        control = setting_control(field, getattr(defaults, field.name), sizes)
        assert isinstance(control, kinds[field.control]) and control.label == field.label
        assert control.value == getattr(defaults, field.name) and control.elem_id == field.name
    top_k = setting_control(FIELDS["top_k"], 0, sizes)
    assert (top_k.minimum, top_k.maximum) == (0, 64)  # "V": the vocabulary


@pytest.fixture
def batched_studio():
    """A studio with batching on, as app.py starts it."""
    engine = tiny_engine()
    engine.batching = True
    with serve_demo(engine) as (demo, url):
        yield engine, demo, url


def test_concurrent_sessions_share_one_run_and_each_gets_its_own_image(batched_studio, monkeypatch):
    engine, _, url = batched_studio
    monkeypatch.setattr(engine.scheduler, "window_s", 3.0)  # wide: three clients surely meet
    sampler, sizes = engine.sampler, []
    real = sampler.generate

    def generate(class_ids, *args, **kwargs):
        sizes.append(len(class_ids))
        return real(class_ids, *args, **kwargs)

    monkeypatch.setattr(sampler, "generate", generate)
    clients = [gradio_client.Client(url, verbose=False) for _ in range(3)]
    jobs = [
        c.submit("class 1", 40 + i, 1, **SETTINGS, **API_LOOK, api_name="/generate")
        for i, c in enumerate(clients)
    ]
    for job in jobs:
        job.result(timeout=120)
        assert job.outputs()[-1][4].startswith("done · ")
    assert max(sizes) >= 2, sizes  # at least two sessions' images ran in one batch
