"""The studio over HTTP under faults and hostile requests, launched with the real serving policy
(``app.serving.launch``): path traversal, oversized and mistyped uploads, a brush-canvas bomb,
absurd numbers through the API, cancelled and doubled runs, a full disk during export, and idle
sessions timing out. In every case the server keeps serving and the session can continue."""

from __future__ import annotations

import datetime
import errno
import json
import threading
import time
from collections.abc import Callable

import gradio.queueing
import httpx
import pytest
from PIL import Image
from reliability_support import API_LOOK, LOOK, SETTINGS, hostile_files, served
from test_app_render import tiny_engine

import scan_core.files as export_module
from app import exporting, handlers, serving
from app.ui import CACHE_SWEEP, QUEUE_SIZE

gradio_client = pytest.importorskip("gradio_client")
RUN_OUTPUTS = 9  # SETTINGS: 4 generation sets + 1 score step + 3 refinement rounds, then the end


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


@pytest.fixture(scope="module")
def server(engine):
    with served(engine) as (demo, url):
        yield demo, url


@pytest.fixture(scope="module")
def url(server) -> str:
    return server[1]


def new_client(url: str):
    return gradio_client.Client(url, verbose=False)


@pytest.fixture
def client(url):
    session = new_client(url)
    yield session
    session.close()


def generate(client, seed: int = 3, settings=SETTINGS):
    job = client.submit("class 1", seed, 1, **settings, **API_LOOK, api_name="/generate")
    job.result(timeout=120)
    assert job.status().success
    return job.outputs()[-1]


def status(outputs) -> str:
    return outputs[handlers.STATUS_INDEX]


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until true; a generous ``timeout`` turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def raw_call(url: str, endpoint: str, data: list) -> str:
    """An API call without gradio_client (which would upload local paths itself)."""
    api = f"{url}gradio_api/call/{endpoint}"
    event = httpx.post(api, json={"data": data}, timeout=30).json()["event_id"]
    return httpx.get(f"{api}/{event}", timeout=60).text


# ------------------------------------------------------------------------------- defaults


def test_launch_applies_the_serving_policy(server):
    demo, _ = server
    assert demo.server_name == "127.0.0.1" and not demo.share
    assert demo.max_file_size == handlers.MAX_UPLOAD_BYTES
    assert demo._queue.max_size == QUEUE_SIZE
    assert demo.state_session_capacity == serving.SESSION_CAPACITY
    states = [b for b in demo.blocks.values() if type(b).__name__ == "State"]
    # Sessions expire through forget_idle_sessions alone: a gr.State lifetime would run out
    # while a session's event waits in the queue, dropping the trace that event needs.
    assert states and all(s.time_to_live == float("inf") for s in states)
    assert serving._served[demo] == serving.SESSION_TTL_S
    assert demo.delete_cache == CACHE_SWEEP  # Gradio's sweep of the files it tracks
    assert serving._sweeper is not None and serving._sweeper.is_alive()  # and of those it loses
    assert serving._trimmer is not None and serving._trimmer.is_alive()  # heap pages go back
    assert Image.MAX_IMAGE_PIXELS * 2 == handlers.MAX_UPLOAD_PIXELS
    with pytest.raises(ValueError, match="share=True is not allowed"):
        serving.launch(demo, share=True)


# -------------------------------------------------------------------------- hostile input


def test_path_traversal_is_refused(url):
    for path in ("/etc/passwd", "../../../../../etc/passwd", "/proc/self/environ"):
        answer = raw_call(
            url, "load_trace", [{"path": path, "meta": {"_type": "gradio.FileData"}}, *LOOK]
        )
        assert "event: error" in answer and "not uploaded by a user" in answer, answer
        assert "root:" not in answer
    for route in ("gradio_api/file=/etc/passwd", "gradio_api/file=../../../etc/passwd"):
        assert httpx.get(url + route).status_code in (403, 404)
    stored = httpx.post(
        f"{url}gradio_api/upload", files={"files": ("../../../../tmp/evil.json", b"{}")}
    ).json()
    assert stored[0].endswith("/evil.json") and stored[0] != "/tmp/evil.json"


def test_oversized_upload_is_refused_with_413(url):
    body = b"\0" * (handlers.MAX_UPLOAD_BYTES + 1)
    answer = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", body)}, timeout=60)
    assert answer.status_code == 413


def test_wrong_file_types_are_refused(client, tmp_path):
    files = hostile_files(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(Exception, match="Invalid file type"):  # gr.File(file_types=["image"])
        client.predict(
            gradio_client.handle_file(str(text)),
            "class 0",
            0,
            **SETTINGS,
            **API_LOOK,
            api_name="/score_image",
        )
    answer = client.predict(
        gradio_client.handle_file(str(files["image.json"])), *LOOK, api_name="/load_trace"
    )
    assert "not a trace JSON file" in status(answer)
    answer = client.predict(
        gradio_client.handle_file(str(files["too_many_pixels.png"])),
        "class 0",
        0,
        **SETTINGS,
        **API_LOOK,
        api_name="/score_image",
    )
    assert "max_pixels" in status(answer)


def test_a_bomb_on_the_brush_canvas_fails_alone(client, tmp_path):
    files = hostile_files(tmp_path)
    bomb = gradio_client.handle_file(str(files["bomb.png"]))
    editor = {"background": bomb, "layers": [bomb], "composite": None}
    job = client.submit(editor, False, 0, **SETTINGS, **API_LOOK, api_name="/regenerate_region")
    with pytest.raises(Exception, match="(?i)decompression bomb|exceeds limit"):
        job.result(timeout=60)
    job = client.submit("class 1", 3, 1, **SETTINGS, **API_LOOK, api_name="/generate")
    job.result(timeout=120)  # the session and the server go on
    assert job.status().success and status(job.outputs()[-1]).startswith("done · ")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("num_rounds", 10**9, "rounds T"),
        ("num_steps", -5, "num_steps"),
        ("temperature", float("nan"), "temperature"),
        ("cfg_scale", float("inf"), "CFG scale"),
        ("tokens_per_round", 10**12, "tokens per round"),
    ],
)
def test_absurd_numbers_through_the_api_get_a_clear_answer(client, name, value, message):
    try:
        outputs = generate(client, settings=SETTINGS | {name: value})
    except Exception as error:  # noqa: BLE001 (Gradio's own range check is a clean refusal too)
        assert "internal error" not in str(error)
    else:
        assert message in status(outputs) and "internal error" not in status(outputs)
    for seed in (2**80, -1):
        outputs = client.submit("class 1", seed, 1, **SETTINGS, **API_LOOK, api_name="/generate")
        try:
            assert "seed" in status(outputs.result(timeout=60))
        except Exception as error:  # noqa: BLE001
            assert "internal error" not in str(error)


# ---------------------------------------------------------------------------------- faults


def pause_after_first_step(
    engine, seed: int, monkeypatch
) -> tuple[threading.Event, threading.Event]:
    """Runs with ``seed`` wait after their first step until ``resume`` is set or Gradio closes
    their iterator (what it does once a Stop cancels the run), so whatever the test does next
    surely lands mid-stream. Returns (paused, resume): ``paused`` is set once a run waits."""
    paused, resume = threading.Event(), threading.Event()
    real_generate, real_close = engine.generate, gradio.queueing.safe_aclose_iterator

    def generate(class_ids, settings, run_seed, locked=None, batched=False):
        stream = real_generate(class_ids, settings, run_seed, locked, batched)
        for index, item in enumerate(stream):
            yield item
            if run_seed == seed and index == 0:
                paused.set()
                resume.wait(60)  # on a worker thread: Gradio retries close() until it returns

    async def close(iterator):
        resume.set()
        await real_close(iterator)

    monkeypatch.setattr(engine, "generate", generate)
    monkeypatch.setattr(gradio.queueing, "safe_aclose_iterator", close)
    return paused, resume


def test_a_run_cancelled_mid_stream_frees_the_model_and_the_session(
    url, client, engine, monkeypatch
):
    paused, _ = pause_after_first_step(engine, seed=4, monkeypatch=monkeypatch)
    job = client.submit("class 1", 4, 1, **SETTINGS, **API_LOOK, api_name="/generate")
    assert paused.wait(60)
    other = new_client(url)
    waiting = other.submit("class 2", 5, 1, **SETTINGS, **API_LOOK, api_name="/generate")
    wait_for(lambda: waiting.status().code.name == "IN_QUEUE", "a run queued behind it")
    assert job.cancel()  # sends the Stop button's event, as the browser does
    waiting.result(timeout=120)  # the other session's run, queued behind it, completes
    assert waiting.status().success and len(waiting.outputs()) == RUN_OUTPUTS
    other.close()
    wait_for(job.done, "the cancelled job to end")
    assert len(job.outputs()) < RUN_OUTPUTS  # it really was cut short
    shown = status(client.predict(1, *LOOK, api_name="/scrub"))
    assert shown.startswith("step 1/1 ")  # the partial trace the stream left behind
    # a new run goes on from there
    job = client.submit(0, **SETTINGS, **API_LOOK, api_name="/refine")
    job.result(timeout=120)
    assert job.status().success and "⚠️" not in status(job.outputs()[-1])


def test_a_client_that_vanishes_mid_run_does_not_stall_others(url):
    leaving = new_client(url)
    job = leaving.submit("class 1", 5, 1, **SETTINGS, **API_LOOK, api_name="/generate")
    wait_for(job.outputs, "a first streamed step")
    leaving.close()  # heartbeat stops: Gradio marks the session closed
    staying = new_client(url)
    assert status(generate(staying, seed=6)).startswith("done · ")
    staying.close()


def test_a_second_click_while_running_queues_behind_the_first(client, engine, monkeypatch):
    paused, resume = pause_after_first_step(engine, seed=7, monkeypatch=monkeypatch)
    first = client.submit("class 1", 7, 1, **SETTINGS, **API_LOOK, api_name="/generate")
    assert paused.wait(60)
    second = client.submit("class 2", 8, 1, **SETTINGS, **API_LOOK, api_name="/generate")
    wait_for(lambda: second.status().code.name == "IN_QUEUE", "the second run to queue")
    resume.set()
    for job in (first, second):
        job.result(timeout=120)
        assert job.status().success and "⚠️" not in status(job.outputs()[-1])
    undone = client.predict(*LOOK, api_name="/undo")  # both runs landed in the session, in order:
    with open(undone[0], "rb") as shown, open(first.outputs()[-1][0], "rb") as first_image:
        assert shown.read() == first_image.read()  # Undo shows the first run's final image


class FullDisk:
    """A file object that takes ``budget`` bytes, then fails like a full disk."""

    def __init__(self, stream, budget: int):
        self.stream, self.budget = stream, budget

    def write(self, data) -> int:
        if len(data) > self.budget:
            self.stream.write(bytes(data[: self.budget]))
            self.budget = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(data)
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def fill_disk_after(monkeypatch, budget: int) -> None:
    """Every atomic write in scan_core.files runs out of space after ``budget`` bytes."""
    real = export_module.atomic_write

    def failing(path, write, durable=True):
        return real(path, lambda stream: write(FullDisk(stream, budget)), durable)

    monkeypatch.setattr(export_module, "atomic_write", failing)


def test_a_full_disk_during_export_offers_no_partial_files(url, client, tmp_path, monkeypatch):
    monkeypatch.setattr(exporting, "EXPORT_ROOT", tmp_path / "exports")
    generate(client)
    fill_disk_after(monkeypatch, 300)
    gif, png, trace_json, message = client.predict(True, 50, 500, api_name="/export")
    assert "disk is full" in message
    assert not any(isinstance(item, str) for item in (gif, png, trace_json))  # no files offered
    assert not list((tmp_path / "exports").rglob("*.*"))  # no GIF, no .partial left behind
    other = new_client(url)
    assert "⚠️" not in status(other.predict(0, *LOOK, api_name="/scrub"))  # others served
    other.close()
    monkeypatch.undo()
    monkeypatch.setattr(exporting, "EXPORT_ROOT", tmp_path / "exports")
    gif, png, trace_json, message = client.predict(True, 50, 500, api_name="/export")
    assert "exported" in message and Image.open(gif).n_frames > 1
    with open(trace_json) as handle:
        assert json.load(handle)["format"] == "scan-trace"


def test_a_session_waiting_in_the_queue_is_not_forgotten(server, url, engine, monkeypatch):
    """Under load an event can wait longer than the session lifetime; its trace must survive."""
    demo, _ = server
    running, waiting = new_client(url), new_client(url)
    gate, original = threading.Event(), engine.generate

    def held(*args, **kwargs):  # the running generation waits here until the test lets it go
        assert gate.wait(60), "the test never released the generation"
        yield from original(*args, **kwargs)

    try:
        generate(waiting)  # a trace to refine later
        monkeypatch.setattr(engine, "generate", held)
        first = running.submit("class 1", 3, 1, **SETTINGS, **API_LOOK, api_name="/generate")
        second = waiting.submit(0, **SETTINGS, **API_LOOK, api_name="/refine")  # queued behind it
        both = {running.session_hash, waiting.session_hash}
        wait_for(lambda: serving.busy_sessions(demo) >= both, "one run and one queued event")
        last_used = demo.state_holder.time_last_used
        for session in both & last_used.keys():
            last_used[session] -= datetime.timedelta(seconds=serving.SESSION_TTL_S + 1)
        serving.tidy_memory()  # what the housekeeping thread runs every TRIM_EVERY_S
        assert both <= demo.state_holder.session_data.keys()
        gate.set()
        first.result(timeout=120)
        second.result(timeout=120)
        assert "nothing to work on yet" not in status(second.outputs()[-1])  # its trace was kept
        assert "⚠️" not in status(second.outputs()[-1])
    finally:
        gate.set()
        running.close()
        waiting.close()


def test_an_idle_sessions_gradio_record_is_forgotten_and_the_session_goes_on(server, url):
    demo, _ = server
    idle, active = new_client(url), new_client(url)
    try:
        generate(idle)
        generate(active)
        records = demo.state_holder.session_data
        assert idle.session_hash in records and active.session_hash in records
        assert serving.forget_idle_sessions(demo, serving.SESSION_TTL_S) == 0  # none idle yet
        last_used = demo.state_holder.time_last_used  # Gradio's own stamp, set on every event
        last_used[idle.session_hash] -= datetime.timedelta(seconds=serving.SESSION_TTL_S + 1)
        serving.tidy_memory()  # what the housekeeping thread runs every TRIM_EVERY_S
        assert idle.session_hash not in records and active.session_hash in records
        job = idle.submit(0, **SETTINGS, **API_LOOK, api_name="/refine")  # the same client, later
        job.result(timeout=60)
        assert "nothing to work on yet" in status(job.outputs()[-1])  # a fresh studio, no error
        assert idle.session_hash in records  # Gradio made a new record for it
        job = active.submit(0, **SETTINGS, **API_LOOK, api_name="/refine")
        job.result(timeout=60)
        assert "nothing to work on yet" not in status(job.outputs()[-1])  # its trace is kept
    finally:
        idle.close()
        active.close()
