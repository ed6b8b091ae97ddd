"""What a new user meets in a real browser, kept fixed (issue 17): the Brush tab after long
scrubbing, dragging the timeline, several images, exports that follow what is shown, uploads and
examples, messages without server paths, the first load, and a phone-sized screen.

Headless Chromium (Playwright) drives build_demo on a tiny random engine, as in
``test_e2e_browser.py``. Nothing here waits a fixed time: each step waits for a state (a status
line, a counter) and a generous timeout turns a hang into a failure.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from conftest import CHROMIUM
from PIL import Image
from test_app_client import serve
from test_app_render import tiny_engine
from test_e2e_browser import RUN_TIMEOUT_MS, SCRUB_JS, status_of, timeline_of

from app import handlers
from app.serving import STOPS
from app.state import SessionState
from scan_core.sampling.settings import SamplerSettings

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"no Chromium at {CHROMIUM}"),
]
pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

DESKTOP = {"width": 1400, "height": 1100}
PHONE = {"width": 400, "height": 900}
# 8 sets + 1 score step + 24 rounds = a 33-step timeline, as the embedded model's default run.
SETTINGS = SamplerSettings(num_steps=8, num_rounds=24, tokens_per_round=2, cfg_scale=1.0)
STEPS = 33
CLASS, SEED = "class 3", 5
THUMB_PX = 20  # the range thumb's width: the value under the pointer ignores its half at each end
# The status line says the run is over and no event is updating it.
SETTLED_JS = """(pattern) => {
    const text = document.querySelector('#status [data-testid=markdown]').textContent.trim();
    const tracker = document.querySelector('#status [data-testid=status-tracker]');
    return new RegExp(pattern).test(text) && (!tracker || tracker.classList.contains('hide'));
}"""
# Every value the user's own pointer gave the timeline (trusted input events only: a value the
# page sets from a reply fires none).
RECORD_DRAG_JS = """(input) => {
    window.dragged = [];
    input.addEventListener('input', (e) => { if (e.isTrusted) window.dragged.push(+input.value); },
                           true);
}"""


class EditorSends:
    """Counts the brush canvases the server sends the image editor, and keeps the last one."""

    def __init__(self) -> None:
        self.count, self.last = 0, None

    def counting(self, postprocess):
        def counted(component, value):
            if isinstance(value, dict) and value.get("background") is not None:
                self.count += 1
                self.last = np.asarray(value["background"])
            return postprocess(component, value)

        return counted


@pytest.fixture(scope="module")
def engine():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = tiny_engine()
    engine.default_settings = lambda: SETTINGS  # the controls start at these
    try:
        yield engine
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def editor_sends() -> Iterator[EditorSends]:
    sends = EditorSends()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gr.ImageEditor, "postprocess", sends.counting(gr.ImageEditor.postprocess))
        yield sends


@pytest.fixture(scope="module")
def url(engine, editor_sends) -> Iterator[str]:
    with serve(engine) as address:
        yield address


@contextmanager
def studio(browser, url: str, viewport=DESKTOP) -> Iterator:
    """A fresh session: its own browser context, so its own studio state."""
    context = browser.new_context(viewport=viewport, accept_downloads=True)
    try:
        page = context.new_page()
        page.goto(url, wait_until="load")
        page.wait_for_selector("#generate")
        yield page
    finally:
        context.close()


@pytest.fixture
def page(browser, url):
    with studio(browser, url) as page:
        yield page


def settle(page, pattern: str) -> str:
    """Wait until the status line matches ``pattern`` (a regex) and nothing updates it."""
    page.wait_for_function(SETTLED_JS, arg=pattern, timeout=RUN_TIMEOUT_MS)
    return status_of(page)


def generate(page, seed: int = SEED, count: int = 1) -> str:
    page.locator("#class input").click()
    page.get_by_role("option", name=CLASS, exact=True).click()
    page.locator("#seed input").fill(str(seed))
    if count != 1:
        page.locator("#count input[type=number]").fill(str(count))
        page.locator("#count input[type=number]").press("Tab")
    page.locator("#generate").click()
    return settle(page, r"(^| )done · ")


def scrub(page, step: int) -> str:
    page.locator("#timeline input[type=range]").evaluate(SCRUB_JS, step)
    return settle(page, rf"^step {step}/")


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def drop_file(page, selector: str, path: Path) -> None:
    """Choose ``path`` in the file box ``selector``, as a click on it and the file dialog do."""
    clear = page.locator(f"{selector} button[aria-label=Clear]")
    if clear.count():  # a file is there: take it away first, as a user would
        clear.click()
    with page.expect_file_chooser() as chooser:
        page.locator(f"{selector} button.upload-container").click()
    chooser.value.set_files(path)


def expected_brush(engine, step: int, seed: int = SEED) -> np.ndarray:
    """The brush canvas the studio should show at ``step`` of the run ``generate`` makes."""
    look = {"heatmap": True, "opacity": 1.0}
    run = handlers.generate(engine, SessionState(), CLASS, seed, 1, **look)
    state = list(run)[-1][handlers.VIEW_OUTPUTS.index("state")]
    return handlers.brush_value(engine, state.scrubbed(step))["background"]


def wait_until(page, condition, what: str) -> None:
    """Poll a Python-side ``condition`` while the page runs (a hang fails after a minute)."""
    for _ in range(1200):
        if condition():
            return
        page.wait_for_timeout(50)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------------------ broken (1, 2)


def test_brush_opens_on_the_shown_step_however_long_the_scrubbing(page, engine, editor_sends):
    generate(page)
    before = editor_sends.count
    tab(page, "Brush")
    wait_until(page, lambda: editor_sends.count == before + 1, "the brush canvas on opening")
    tab(page, "Canvas")
    opened = editor_sends.count
    steps = [3, 30, 7, 21, 12, 2, 33, 9, 17, 25, 4, 14]
    for step in steps:  # moves on the Canvas tab: the hidden editor must get none of them
        scrub(page, step)
    assert editor_sends.count == opened, "the hidden brush canvas was sent timeline moves"
    tab(page, "Brush")
    wait_until(page, lambda: editor_sends.count == opened + 1, "the brush canvas on opening")
    page.locator("#editor canvas").first.wait_for()
    assert status_of(page).startswith(f"step {steps[-1]}/{STEPS}")
    np.testing.assert_array_equal(editor_sends.last, expected_brush(engine, steps[-1]))
    # While the tab is open, a released drag updates it once.
    released = drag(page, steps[-1], 6)
    wait_until(page, lambda: editor_sends.count == opened + 2, "the brush canvas after a drag")
    np.testing.assert_array_equal(editor_sends.last, expected_brush(engine, released))


def thumb_at(page, step: int) -> tuple[float, float]:
    box = page.locator("#timeline input[type=range]").bounding_box()
    _, top = timeline_of(page)
    x = box["x"] + THUMB_PX / 2 + step / top * (box["width"] - THUMB_PX)
    return x, box["y"] + box["height"] / 2


def drag(page, start: int, end: int, hold=None) -> int:
    """Press the thumb at ``start``, drag it to ``end`` at a normal speed and let go; returns
    the step the pointer left it on. ``hold(page)`` runs half-way, the button still down."""
    slider = page.locator("#timeline input[type=range]")
    slider.evaluate(RECORD_DRAG_JS)
    page.mouse.move(*thumb_at(page, start))
    page.mouse.down()
    middle = (start + end) // 2
    page.mouse.move(*thumb_at(page, middle), steps=12)
    if hold:
        hold(page)
    page.mouse.move(*thumb_at(page, end), steps=12)
    page.mouse.up()
    return page.evaluate("window.dragged.at(-1)")


class Gate:
    """Holds every scrub reply until let through, so replies land while the thumb moves."""

    def __init__(self, monkeypatch) -> None:
        self.permits, self.closed, self.waiting = threading.Semaphore(0), True, threading.Event()
        real = handlers.view

        def view(*args, **kwargs):
            if self.closed and kwargs.get("timeline") is False:  # a scrub's view
                self.waiting.set()
                self.permits.acquire(timeout=60)
            return real(*args, **kwargs)

        monkeypatch.setattr(handlers, "view", view)

    def open(self) -> None:
        self.closed = False
        for _ in range(100):
            self.permits.release()


def test_a_dragged_timeline_lands_where_the_mouse_lets_go(page, monkeypatch):
    generate(page)
    gate = Gate(monkeypatch)
    seen = []

    def reply_mid_drag(page):
        """The first scrub is held; let its reply through while the thumb is elsewhere."""
        wait_until(page, gate.waiting.is_set, "a scrub to reach the server")
        first = page.evaluate("window.dragged[0]")
        gate.permits.release()
        settle(page, rf"^step {first}/")  # the reply for a step the thumb has left
        seen.append(first)

    released = drag(page, STEPS, 3, hold=reply_mid_drag)
    gate.open()
    assert seen and seen[0] != released
    status = settle(page, rf"^step {released}/")
    assert released == 3, released  # the pointer really ended on the target
    assert timeline_of(page) == (released, STEPS)
    assert status.startswith(f"step {released}/{STEPS} · ")
    canvas = page.locator("#canvas img").get_attribute("src")
    scrub(page, 20)  # the same step reached by typing shows the same picture
    scrub(page, released)
    assert page.locator("#canvas img").get_attribute("src") == canvas
    for start, end in [(3, 30), (30, 2), (2, 25), (25, 5)]:
        released = drag(page, start, end)
        settle(page, rf"^step {released}/")
        assert released == end and timeline_of(page) == (end, STEPS)


# ------------------------------------------------------------------------------ confusing (3-10)


def test_first_load_invites_a_click_and_idle_buttons_are_off(page):
    assert "Generate" in status_of(page) and "example" in status_of(page)
    assert page.locator("#canvas img").get_attribute("src")  # a first frame, not an empty box
    assert page.locator("#plot img").get_attribute("src")
    idle = ["refine", "undo", "play"]
    for name in idle:
        assert page.locator(f"#{name}").is_disabled(), name
    tab(page, "Export")
    assert page.locator("#export").is_disabled()
    tab(page, "Canvas")
    generate(page)
    page.wait_for_function("() => !document.querySelector('#refine').disabled")
    assert page.locator("#play").is_enabled()
    assert page.locator("#undo").is_disabled()  # nothing before the first image
    tab(page, "Export")
    assert page.locator("#export").is_enabled()
    generate(page, seed=SEED + 1)
    page.wait_for_function("() => !document.querySelector('#undo').disabled")


def test_a_run_says_how_far_it_is_and_when_it_is_done(page):
    page.evaluate(
        """() => { window.seen = [];
        const text = () => document.querySelector('#status [data-testid=markdown]').textContent;
        new MutationObserver(() => window.seen.push(text().trim()))
            .observe(document.querySelector('#status'),
                     {childList: true, subtree: true, characterData: true}); }"""
    )
    done = generate(page)
    assert done.startswith("done · 8 of 8 sets drawn, 24 of 24 refinement rounds"), done
    assert f"step {STEPS}/{STEPS}" in done
    seen = page.evaluate("window.seen")
    sets = [int(m[1]) for s in seen if (m := re.search(r"drawing set (\d+) of 8", s))]
    rounds = [int(m[1]) for s in seen if (m := re.search(r"refining: round (\d+) of 24", s))]
    assert sets and rounds and sets == sorted(sets) and rounds == sorted(rounds), seen


def test_stop_keeps_what_was_made_with_its_plot_and_status_in_step(page, engine, monkeypatch):
    paused, resume = threading.Event(), threading.Event()
    real = engine.generate

    def generate(class_ids, settings, seed, locked=None, batched=False):  # waits after step 3
        for index, item in enumerate(real(class_ids, settings, seed, locked, batched)):
            yield item
            if index == 2:
                paused.set()
                resume.wait(60)

    monkeypatch.setattr(engine, "generate", generate)
    page.locator("#generate").click()
    wait_until(page, paused.is_set, "the run to reach its third step")
    page.locator("#stop").click()
    wait_until(page, lambda: STOPS.stopping() == 1, "the Stop to reach the run")
    resume.set()
    status = settle(page, r"^stopped · ")
    assert status.startswith("stopped · 4 of 8 sets drawn") and " · step 4/4 · " in status, status
    assert timeline_of(page) == (4, 4)
    plot = page.locator("#plot img").get_attribute("src")
    scrub(page, 1)
    scrub(page, 4)  # the plot of step 4, drawn afresh: the stopped run's is the same picture
    assert page.locator("#plot img").get_attribute("src") == plot
    page.wait_for_function("() => !document.querySelector('#refine').disabled")  # go on from it


def test_several_images_say_which_one_is_shown_and_switch_the_seed(page):
    generate(page, seed=9)  # one image: one tile of the grid, its caption in sight
    tab(page, "Gallery")
    caption = page.locator("#gallery .caption-label")
    caption.first.wait_for()
    assert caption.all_inner_texts() == ["seed 9 · shown"] and caption.first.is_visible()
    tile = page.locator("#gallery button.thumbnail-item").bounding_box()
    assert tile["width"] <= page.locator("#gallery").bounding_box()["width"] / 3, tile
    tab(page, "Canvas")
    page.evaluate(
        """() => { window.seen = [];
        const text = () => document.querySelector('#status [data-testid=markdown]').textContent;
        new MutationObserver(() => window.seen.push(text().trim()))
            .observe(document.querySelector('#status'),
                     {childList: true, subtree: true, characterData: true}); }"""
    )
    done = generate(page, seed=10, count=3)
    assert done.startswith("image 1 of 3 (seed 10) · done"), done
    seen = page.evaluate("window.seen")
    assert any(text.startswith("image 1 of 3 (seed 10) · drawing") for text in seen), seen
    tab(page, "Gallery")
    captions = page.locator("#gallery .caption-label")
    captions.first.wait_for()
    assert captions.all_inner_texts() == ["seed 10 · shown", "seed 11", "seed 12"]
    page.locator("#gallery button.thumbnail-item").nth(2).click()
    settle(page, r"^image 3 of 3 \(seed 12\) · ")
    assert page.locator("#seed input").input_value() == "12"
    page.wait_for_function(
        "() => document.querySelectorAll('#gallery .caption-label')[2].textContent"
        ".includes('shown')"
    )


def test_exports_always_belong_to_the_shown_image(page, tmp_path):
    generate(page)
    generate(page, seed=SEED + 1)
    tab(page, "Export")
    page.locator("#export").click()
    page.wait_for_selector("#gif a[download]", timeout=RUN_TIMEOUT_MS)
    with page.expect_download() as info:
        page.locator("#trace_json a[download]").click()
    info.value.save_as(tmp_path / "trace.json")
    page.locator("#undo").click()
    settle(page, r"^step ")
    for name in ("gif", "png", "trace_json"):
        assert page.locator(f"#{name} a[download]").count() == 0, name
    page.locator("#export").click()  # export again, then load a trace: cleared again
    page.wait_for_selector("#gif a[download]", timeout=RUN_TIMEOUT_MS)
    drop_file(page, "#trace_in", tmp_path / "trace.json")
    settle(page, r"^loaded a trace")
    assert page.locator("#gif a[download]").count() == 0
    assert json.loads((tmp_path / "trace.json").read_text())["seed"] == SEED + 1


def test_upload_shows_its_score_in_place_under_a_chosen_class(page, tmp_path):
    tab(page, "Upload")
    examples = page.locator("#examples button.thumbnail-item")
    examples.last.wait_for()
    assert examples.count() == 6
    examples.nth(1).click()  # the frog
    status = settle(page, r"^scored emoji_frog\.png")
    assert "64×64: transparency filled with white, scaled down to 8×8" in status, status
    assert page.locator("#upload_preview img").get_attribute("src")
    page.locator("#upload_class input").click()
    page.get_by_role("option", name="class 7", exact=True).click()
    settle(page, r"^scored again under class 'class 7'")
    for size, mode, note in [
        ((5, 5), "L", "5×5: grayscale, converted to colour, scaled up to 8×8"),
        ((32, 300), "RGB", "32×300: centre-cropped to a square (its top and bottom cut off)"),
    ]:
        path = tmp_path / f"odd_{size[0]}x{size[1]}.png"
        Image.new(mode, size, 128).save(path)
        drop_file(page, "#upload", path)
        status = settle(page, rf"^scored {path.name}")
        assert note in status and "under class 'class 7'" in status, status


def test_messages_name_the_file_never_a_server_path(page, tmp_path):
    tab(page, "Upload")
    broken = tmp_path / "holiday photo.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    drop_file(page, "#upload", broken)
    status = settle(page, r"^⚠️")
    toast = page.locator(".toast-body").first
    toast.wait_for()
    for text in (status, toast.inner_text()):
        assert "holiday photo.png" in text and "/tmp" not in text and "gradio" not in text, text


def test_a_phone_sees_the_canvas_when_it_generates_and_every_tab(browser, url, tmp_path):
    with studio(browser, url, PHONE) as page:
        for name in ("Canvas", "Brush", "Compare", "Gallery", "Upload", "Export"):
            assert page.get_by_role("tab", name=name).is_visible(), name
        page.locator("#generate").click()
        settle(page, r"(^| )done · ")
        page.wait_for_function(
            """() => { const box = document.querySelector('#canvas').getBoundingClientRect();
                       return box.top >= 0 && box.top < window.innerHeight; }"""
        )
        page.screenshot(path=tmp_path / "phone.png")


# ------------------------------------------------------------------- the README screenshots

DOCS = Path(__file__).resolve().parent.parent / "docs"
DOCS_MAX_BYTES = 500_000


@pytest.mark.skipif(
    not os.environ.get("SCAN_DOCS_SCREENSHOT"),
    reason="set SCAN_DOCS_SCREENSHOT=1 to refresh docs/studio_desktop.png and studio_mobile.png",
)
def test_docs_screenshots(browser):
    """The studio on the embedded default model after one generation, on a desktop and a
    phone."""
    from app.engine import Engine

    model = Engine()
    model.load()
    names = model.bundle.class_names
    with serve(model) as address:
        for name, viewport, full in [("desktop", DESKTOP, False), ("mobile", PHONE, False)]:
            path = DOCS / f"studio_{name}.png"
            with studio(browser, address, viewport) as page:
                page.locator("#class input").click()
                page.get_by_role("option", name=names[min(3, len(names) - 1)], exact=True).click()
                page.locator("#seed input").fill("1")
                page.locator("#seed input").press("Tab")
                page.locator("#generate").click()
                settle(page, r"(^| )done · ")
                page.wait_for_function("() => !document.querySelector('#refine').disabled")
                page.mouse.move(0, 0)  # no hover highlight in the picture
                page.screenshot(path=path, full_page=full)
            if path.stat().st_size > DOCS_MAX_BYTES:  # a palette keeps the UI crisp
                Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
            assert path.stat().st_size <= DOCS_MAX_BYTES
