"""The studio in a real browser: headless Chromium (Playwright) drives build_demo served on a free
local port with a tiny random engine, the way a person would: pick a class and a seed, Generate and
watch the stream, scrub the timeline, brush a stroke and Regenerate it, export and download the GIF.

Needs ``/usr/bin/chromium`` (Debian package ``chromium``) and ``pip install playwright``; never
``playwright install`` (its browser download is blocked here, and the system Chromium is enough).
Skipped when either is missing. Screenshots of each stage go to pytest's ``tmp_path``.

What a new user met and what keeps it fixed (the Brush tab after scrubbing, drags, uploads,
several images, a phone, the README screenshots) is in ``test_e2e_studio.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import CHROMIUM
from PIL import Image
from test_app_client import serve
from test_app_render import tiny_engine

from app.engine import Engine

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)",
    ),
]
pytest.importorskip(
    "playwright.sync_api",
    reason="playwright is not installed (pip install -r requirements-dev.txt)",
)

VIEWPORT = {"width": 1400, "height": 1100}
CLASS, SEED = "class 3", 7
RUN_TIMEOUT_MS = 60_000

# The status line (its Markdown, not the progress text the tracker overlays), and whether the
# status block's progress tracker is showing (every model/view event has #status as an output).
STATUS_JS = "() => document.querySelector('#status [data-testid=markdown]').textContent.trim()"
IDLE_JS = """(before) => {
    const text = document.querySelector('#status [data-testid=markdown]').textContent.trim();
    const tracker = document.querySelector('#status [data-testid=status-tracker]');
    return text !== before && (!tracker || tracker.classList.contains('hide'));
}"""
# Every text the status line shows, so the test can tell a stream from a single final update.
RECORD_JS = """() => {
    window.seenStatus = [];
    const text = () => document.querySelector('#status [data-testid=markdown]').textContent.trim();
    new MutationObserver(() => window.seenStatus.push(text()))
        .observe(document.querySelector('#status'),
                 {childList: true, subtree: true, characterData: true});
}"""
SCRUB_JS = """(input, value) => {
    input.value = String(value);
    input.dispatchEvent(new Event('input', {bubbles: true}));
    input.dispatchEvent(new Event('change', {bubbles: true}));
}"""


@contextmanager
def open_studio(browser, url: str) -> Iterator:
    """A loaded studio page (downloads allowed)."""
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    try:
        page = context.new_page()
        # "networkidle" never comes: Gradio keeps a stream open.
        page.goto(url, wait_until="load")
        page.wait_for_selector("#generate")
        yield page
    finally:
        context.close()


def status_of(page) -> str:
    return page.evaluate(STATUS_JS)


def click_and_wait(page, selector: str, timeout: int = RUN_TIMEOUT_MS) -> str:
    """Click a button that runs an event; wait until the status changed and the run ended."""
    before = status_of(page)
    page.locator(selector).click()
    page.wait_for_function(IDLE_JS, arg=before, timeout=timeout)
    return status_of(page)


def timeline_of(page) -> tuple[int, int]:
    """(value, maximum) of the timeline slider."""
    slider = page.locator("#timeline input[type=range]")
    return int(slider.input_value()), int(slider.get_attribute("max"))


def step_count(status: str) -> int:
    """N from a status line "done · ... · step N/N · ..." that shows the last step."""
    match = re.search(r"(?:^|· )step (\d+)/(\d+) ", status)
    assert match and match[1] == match[2], status
    return int(match[1])


def download(page, selector: str, path: Path) -> Path:
    with page.expect_download() as info:
        page.locator(selector).click()
    info.value.save_as(path)
    return path


def generate(page, class_name: str, seed: int) -> str:
    page.locator("#class input").click()
    page.get_by_role("option", name=class_name, exact=True).click()
    page.locator("#seed input").fill(str(seed))
    page.locator("#seed input").press("Tab")
    return click_and_wait(page, "#generate")


# ----------------------------------------------------------------------------- the tiny studio


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: extra threads only contend on a busy CI box
    try:
        yield tiny_engine()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def page(engine, browser):
    """One page for the whole flow: each test continues where the previous one stopped."""
    with serve(engine) as url, open_studio(browser, url) as page:
        yield page


@pytest.fixture(scope="module")
def generated_steps(engine) -> int:
    """K generation sets + 1 score step + T refinement rounds, at the UI's default settings."""
    settings = engine.default_settings()
    return settings.num_steps + 1 + settings.num_rounds


def test_run_controls_are_above_the_fold(page):
    """Generate is reachable without scrolling, and the seed button reads without emoji fonts."""
    box = page.locator("#generate").bounding_box()
    assert box["y"] + box["height"] <= VIEWPORT["height"], box
    assert "random" in page.locator("#dice").inner_text()
    seed, dice = page.locator("#seed").bounding_box(), page.locator("#dice").bounding_box()
    assert abs(seed["height"] - dice["height"]) <= 2, (seed, dice)


def test_generate_streams_into_the_timeline(page, generated_steps, tmp_path):
    page.evaluate(RECORD_JS)
    status = generate(page, CLASS, SEED)
    assert status.startswith("done · ") and step_count(status) == generated_steps, status
    assert timeline_of(page) == (generated_steps, generated_steps)
    streamed = {text for text in page.evaluate("window.seenStatus") if " of " in text}
    assert len(streamed) > 2, streamed  # live updates, not only the final one
    assert page.locator("#canvas img").get_attribute("src")
    page.screenshot(path=tmp_path / "generated.png", full_page=True)


def test_scrub_shows_an_earlier_step(page, generated_steps):
    image = page.locator("#canvas img")
    last = image.get_attribute("src")
    slider = page.locator("#timeline input[type=range]")
    before = status_of(page)
    slider.evaluate(SCRUB_JS, 3)
    page.wait_for_function(IDLE_JS, arg=before, timeout=RUN_TIMEOUT_MS)
    assert status_of(page).startswith(f"step 3/{generated_steps} · generate"), status_of(page)
    assert image.get_attribute("src") != last
    before = status_of(page)  # back to the end: Regenerate continues from the shown step
    slider.evaluate(SCRUB_JS, generated_steps)
    page.wait_for_function(IDLE_JS, arg=before, timeout=RUN_TIMEOUT_MS)
    assert timeline_of(page) == (generated_steps, generated_steps)


def test_brush_a_stroke_and_regenerate_it(page, generated_steps, tmp_path):
    page.get_by_role("tab", name="Brush").click()
    canvas = page.locator("#editor canvas").first
    canvas.wait_for()
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2  # the image is centred
    page.mouse.move(x - 30, y - 30)
    page.mouse.down()
    for k in range(1, 5):  # each move costs ~0.25 s of software rendering: keep it short
        page.mouse.move(x - 30 + 10 * k, y - 30 + 10 * k)
    page.mouse.up()
    # Viewport shots: a full-page one costs seconds of WebGL read-back once the editor exists.
    page.screenshot(path=tmp_path / "brushed.png")
    status = click_and_wait(page, "#regenerate")
    page.screenshot(path=tmp_path / "regenerated.png")
    assert page.locator("#status").is_visible()  # above the tabs: seen from the Brush tab
    assert "error" not in status, status
    assert "paint the patches" not in status, "the stroke did not reach the brush layer"
    total = step_count(status)
    assert total > generated_steps and re.match(r"done · (\d+) of \1 sets drawn", status), status
    assert timeline_of(page) == (total, total)


def test_export_downloads_a_gif_and_the_trace(page, tmp_path):
    page.get_by_role("tab", name="Export").click()
    page.locator("#export").click()
    page.wait_for_selector("#gif a[download]", timeout=RUN_TIMEOUT_MS)
    page.wait_for_selector("#gif_preview img", timeout=RUN_TIMEOUT_MS)  # the GIF, previewed
    assert status_of(page).startswith("exported") and page.locator("#status").is_visible()
    gif = download(page, "#gif a[download]", tmp_path / "timeline.gif")
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.n_frames > 1
    trace_path = download(page, "#trace_json a[download]", tmp_path / "trace.json")
    trace = json.loads(trace_path.read_text())
    assert trace["seed"] == SEED and trace["class_ids"] == [int(CLASS.split()[-1])]
    assert trace["steps"][0]["kind"] == "generate"
    page.screenshot(path=tmp_path / "exported.png")
