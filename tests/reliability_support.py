"""Shared pieces of the reliability tests: a tiny studio served over HTTP with the real serving
policy, hostile files, and a check that a handler's answer is a result or a clean message."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import gradio as gr
import numpy as np
import pytest
import torch
from gradio import processing_utils
from PIL import Image
from test_app_render import API_LOOK, LOOK, SETTINGS  # noqa: F401 (the reliability tests use them)
from test_images import png_header_only

from app import handlers, serving
from app.state import SessionState
from app.ui import build_demo


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forwards gain nothing from threads; on a busy 2-core box two threads each spin and
    contend, and a run gets 5-30x slower. Modules that import this fixture use it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served(engine, **options):
    """``build_demo(engine)`` launched through ``serving.launch`` on a free local port; yields
    (demo, url). Process-wide settings the launch changes are restored afterwards."""
    saved = Image.MAX_IMAGE_PIXELS, processing_utils.save_pil_to_cache, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: extra threads only contend on a 2-core box
    demo = build_demo(engine)
    port = free_port()
    serving.launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True, **options)
    try:
        yield demo, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        Image.MAX_IMAGE_PIXELS, processing_utils.save_pil_to_cache = saved[:2]
        torch.set_num_threads(saved[2])


def status_of(outputs: tuple) -> object:
    """The status line of a view tuple (VIEW_OUTPUTS, maybe + gallery) or an export tuple."""
    return outputs[3] if len(outputs) == 4 else outputs[handlers.STATUS_INDEX]


def assert_clean(outputs: tuple) -> None:
    """A handler answered with a result or a user-facing message, never a crash report."""
    assert isinstance(outputs, tuple), type(outputs)
    status = status_of(outputs)
    if isinstance(status, str):
        assert "internal error" not in status, status


def drain(result) -> list[tuple]:
    """All yields of a streaming handler, or the one answer of a plain one."""
    return [result] if isinstance(result, tuple) else list(result)


def state_after(outputs: list[tuple], fallback: SessionState) -> SessionState:
    state = outputs[-1][handlers.VIEW_OUTPUTS.index("state")]
    return state if isinstance(state, SessionState) else fallback


def is_skip(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update" or value is gr.skip()


# --------------------------------------------------------------------------- hostile files


def image_bytes(fmt: str, size=(48, 40)) -> bytes:
    import io

    pixels = np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def hostile_files(folder: Path) -> dict[str, Path]:
    """Named hostile uploads: bombs, truncated images, wrong types, odd names."""
    files = {
        "bomb.png": png_header_only(100_000, 100_000),  # 10 G pixels claimed
        "too_many_pixels.png": png_header_only(6_000, 5_000),  # 30 M: over the studio's 24 M
        "truncated.png": image_bytes("PNG")[:200],
        "truncated.gif": image_bytes("GIF")[:60],
        "truncated.jpg": image_bytes("JPEG")[:300],
        "text.png": b"just some text, not an image",
        "image.json": image_bytes("PNG"),  # a PNG where a trace is expected
        "empty.png": b"",
        "trace_nan.json": b'{"format": "scan-trace", "version": 1, "grid_size": NaN}',
        "trace_inf.json": b'{"format": "scan-trace", "version": 1, "grid_size": 1e999}',
        "deep.json": b"[" * 50_000 + b"]" * 50_000,
        "not_utf8.json": b"\xff\xfe\x00garbage",
    }
    paths = {}
    for name, data in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths
