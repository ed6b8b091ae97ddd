"""The studio on a RandAR file (no quality head), over HTTP: the tokenizer decides the grid,
the page offers no "head" scorer, and generate, refine and regenerate-region all run and record
the confidence scorer."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import random_model, tiny_vq
from PIL import Image
from safetensors.torch import save_file
from test_app_client import serve
from test_app_render import API_LOOK, SETTINGS
from test_checkpoint import plain, small_config

from app.engine import Engine
from scan_core.checkpoint.loading import save_checkpoint

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def randar_engine(tmp_path_factory) -> Engine:
    """RandAR's exact key layout, random weights, paired with VQ-tiny on 8x8 images (4x4, 64)."""
    folder = tmp_path_factory.mktemp("randar")
    model_path = folder / "randar.safetensors"
    save_file(plain(random_model(small_config("randar"))), model_path)
    vq_path = save_checkpoint(folder / "vq.safetensors", tiny_vq(), "tokenizer")
    return Engine(str(model_path), str(vq_path), device="cpu")


@pytest.fixture(scope="module")
def client(randar_engine):
    with serve(randar_engine) as url:
        yield gradio_client.Client(url, verbose=False)


def finished(job) -> tuple:
    job.result(timeout=120)
    assert job.status().success
    return job.outputs()[-1]


def brushed_two_cells(folder: Path) -> dict:
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[:16, :32] = (255, 0, 255, 255)  # cells 0 and 1 of the 4x4 grid (c = 2 fits)
    Image.fromarray(layer).save(folder / "layer.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "bg.png")
    return {
        "background": gradio_client.handle_file(str(folder / "bg.png")),
        "layers": [gradio_client.handle_file(str(folder / "layer.png"))],
        "composite": None,
    }


def test_the_studio_loads_randar_with_the_tokenizers_grid(randar_engine):
    bundle = randar_engine.bundle
    assert bundle.model.config.arch == "randar" and randar_engine.grid_size == 4
    assert any("scored by confidence" in note for note in bundle.notes)


def test_the_head_scorer_is_not_offered(client):
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for endpoint in ("/generate", "/refine", "/regenerate_region"):
        (scorer,) = [p for p in info[endpoint]["parameters"] if p["parameter_name"] == "scorer"]
        offered = json.dumps(scorer)
        assert "'confidence'" in offered and "'auto'" in offered
        assert "'head'" not in offered, offered
    with pytest.raises(Exception, match="head"):  # noqa: B017 (gradio_client's AppError)
        client.predict(
            "class 1", 3, 1, **SETTINGS | {"scorer": "head"}, **API_LOOK, api_name="/generate"
        )


def test_generate_refine_and_regenerate_record_the_confidence_scorer(client, tmp_path):
    generated = finished(
        client.submit("class 1", 3, 1, **SETTINGS, **API_LOOK, api_name="/generate")
    )
    assert generated[4].startswith("done · "), generated[4]
    last = generated[3]["value"]
    refined = finished(client.submit(last, **SETTINGS, **API_LOOK, api_name="/refine"))
    assert refined[4].startswith("done · "), refined[4]
    editor = brushed_two_cells(tmp_path)
    regenerated = finished(
        client.submit(editor, True, 5, **SETTINGS, **API_LOOK, api_name="/regenerate_region")
    )
    assert regenerated[4].startswith("done · 1 of 1 sets drawn"), regenerated[4]

    trace_json = client.predict(True, 50, 500, api_name="/export")[2]
    steps = json.loads(Path(trace_json).read_text(encoding="utf-8"))["steps"]
    kinds = {step["kind"] for step in steps}
    assert {"score", "refine"} <= kinds, kinds
    scorers = {step.get("scorer") for step in steps if step["kind"] in ("score", "refine")}
    assert scorers == {"confidence"}, scorers
    assert all(step.get("scorer") != "head" for step in steps)
