"""The studio over HTTP (no browser): launch build_demo on a free local port with a tiny random
engine and drive the named API endpoints with gradio_client, as a remote user would."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image
from reliability_support import free_port
from test_app_render import API_LOOK, LOOK, SETTINGS, tiny_engine

from app.engine import STUDIO_SETTINGS, Engine
from app.ui import build_demo

gradio_client = pytest.importorskip("gradio_client")

# 4 generation sets + 1 score step + 3 refinement rounds = 8 steps; one live update per step
# and one final update with the brush canvas, compare view and gallery.
GENERATE_STEPS = 8


@contextmanager
def serve(engine: Engine) -> Iterator[str]:
    """The studio on a free 127.0.0.1 port, in this process; yields its URL."""
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
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: extra threads only contend on a busy CI box
    try:
        with serve(tiny_engine()) as url:
            yield gradio_client.Client(url, verbose=False)
    finally:
        torch.set_num_threads(threads)


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
    assert f"step {GENERATE_STEPS}/{GENERATE_STEPS}" in status
    assert Image.open(image).size[1] == 256  # 8x8 pixels shown 32x larger (NEAREST)
    assert len(gallery) == 2  # seeds 3 and 4
    assert editor["background"] and len(compare) == 2
    assert "generate" in outputs[0][4]  # the first update is the first set


def test_scrub_shows_an_earlier_step(client, generated):
    image, _, _, timeline, status, *_ = client.predict(2, *LOOK, api_name="/scrub")
    assert timeline["value"] == 2 and status.startswith("step 2/") and os.path.exists(image)


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
    assert status.startswith(f"step {GENERATE_STEPS + 2}/{GENERATE_STEPS + 2}"), status


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
    assert job.outputs()[-1][4].startswith("step 1/1 · score")


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
    assert by_name[4] == by_position[4] and by_name[4].startswith(f"step {steps}/{steps}")
    pixels = [np.asarray(Image.open(outputs[0])) for outputs in (by_name, by_position)]
    np.testing.assert_array_equal(*pixels)


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
