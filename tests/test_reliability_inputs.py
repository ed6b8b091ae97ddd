"""Hostile input straight into the handlers (no HTTP, no sliders in the way): settings far out of
range, NaN and inf, wrong types, broken and oversized files, malformed brush values and traces.
Every answer must be a result or a clean message, never an unhandled exception or a crash
report; the property tests fuzz every public handler and the Trace loader with hypothesis."""

from __future__ import annotations

import contextlib
import json
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import (  # noqa: F401 (one_thread: an autouse fixture)
    LOOK,
    SETTINGS,
    assert_clean,
    drain,
    hostile_files,
    one_thread,
    state_after,
)
from test_app_render import tiny_engine

from app import exporting, handlers, inputs, serving
from app.state import SessionState
from scan_core.sampling.settings import SamplerSettings
from scan_core.sampling.trace import Trace, TraceError
from scan_core.sampling.trace_files import parse_trace

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a server


@pytest.fixture(scope="module", autouse=True)
def cheap_plot():
    """The score plot (matplotlib, ~0.1 s) is tested elsewhere; here it would only slow fuzzing."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(handlers, "score_plot", lambda *a, **k: np.zeros((4, 4, 3), np.uint8))
        patch.setattr(exporting, "PLAY_DELAY_S", 0.0)
        yield


ENGINE = tiny_engine()  # module-level: hypothesis tests may not take function-scoped fixtures


def _generated(count: int = 1) -> SessionState:
    run = handlers.generate(ENGINE, SessionState(), "class 2", 5, count, *LOOK, **SETTINGS)
    outputs = list(run)
    return outputs[-1][handlers.VIEW_OUTPUTS.index("state")]


@pytest.fixture(scope="module")
def states(cheap_plot) -> list[SessionState]:
    generated = _generated(count=2)
    everything = np.ones(ENGINE.num_tokens, bool)
    return [SessionState(), generated, generated.scrubbed(0), generated.with_locked(everything)]


@pytest.fixture(scope="module")
def files(tmp_path_factory, states):
    folder = tmp_path_factory.mktemp("hostile")
    paths = hostile_files(folder)
    trace_path = folder / "trace.json"
    trace_path.write_text(states[1].trace.to_json())
    paths["trace.json"] = trace_path
    return paths


# ------------------------------------------------------------------ settings, one at a time

HOSTILE_SETTINGS = [
    ("num_rounds", 10**9, "rounds T"),
    ("num_rounds", -1, "rounds T"),
    ("num_steps", -5, "num_steps"),
    ("num_steps", 10**6, "num_steps"),
    ("tokens_per_round", 0, "tokens per round"),
    ("tokens_per_round", 10**12, "tokens per round"),
    ("temperature", math.nan, "temperature"),
    ("temperature", math.inf, "temperature"),
    ("temperature", 1e-30, "temperature"),
    ("temperature", -1.0, "temperature"),
    ("cfg_scale", 1e9, "CFG scale"),
    ("cfg_scale", -math.inf, "CFG scale"),
    ("top_p", 0.0, "top-p"),
    ("top_p", 1.5, "top-p"),
    ("top_k", -3, "top-k"),
    ("num_steps", 2.5, "whole number"),
    ("num_steps", "many", "must be a number"),
    ("num_rounds", None, "must be a number"),
    ("num_rounds", [1, 2], "must be a number"),
]


@pytest.mark.parametrize(("name", "value", "message"), HOSTILE_SETTINGS)
def test_out_of_range_settings_are_refused_by_name(name, value, message):
    values = SETTINGS | {name: value}
    with pytest.raises(ValueError, match=message):
        handlers.settings_from(ENGINE, values)
    out = drain(handlers.generate(ENGINE, SessionState(), "class 1", 0, 1, *LOOK, **values))
    assert len(out) == 1 and message in out[0][handlers.STATUS_INDEX]
    assert_clean(out[0])


@pytest.mark.parametrize("seed", [2**80, -1, math.nan, math.inf, "1e30", 2**31, "seven"])
def test_seed_outside_its_range_is_refused(seed):
    with pytest.raises(ValueError, match="seed"):
        handlers.seed_from(seed)


def test_values_that_are_fine_but_odd_are_accepted():
    odd = {"cfg_scale": "1.0", "temperature": 0, "top_k": 10**12, "top_p": 1, "num_steps": 4.0}
    settings = handlers.settings_from(ENGINE, odd | {"num_rounds": 0, "tokens_per_round": 2})
    assert settings.top_k == 64 and settings.temperature == 0 and settings.num_steps == 4
    assert handlers.seed_from(True) == 1 and handlers.seed_from(" 7 ") == 7
    assert handlers.opacity_from(-3) == 0.0 and handlers.opacity_from("2") == 1.0


anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(0, 3), max_size=2),
)
plausible = st.one_of(st.integers(-2, 70), st.floats(-1, 25), anything)


@given(st.fixed_dictionaries({}, optional={name: plausible for name in SETTINGS}))
@settings(max_examples=300)
def test_settings_parser_returns_valid_settings_or_a_clear_error(values):
    try:
        parsed = handlers.settings_from(ENGINE, values)
    except ValueError as error:
        assert str(error) and len(str(error)) < 200
    else:
        assert isinstance(parsed, SamplerSettings)
        assert parsed.validate(ENGINE.num_tokens) is parsed
        assert parsed.num_rounds <= handlers.REQUEST_LIMITS["num_rounds"]


# ------------------------------------------------------------------------------ hostile files


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("bomb.png", "decompression bomb|max_pixels"),
        ("too_many_pixels.png", "max_pixels=24,000,000"),
        ("truncated.png", "cannot read image"),
        ("truncated.gif", "cannot read image"),
        ("truncated.jpg", "cannot read image"),
        ("text.png", "cannot read image"),
        ("empty.png", "cannot read image"),
    ],
)
def test_bad_uploads_are_refused_before_decoding(files, name, message):
    out = handlers.score_image(
        ENGINE, SessionState(), str(files[name]), "class 0", 0, *LOOK, **SETTINGS
    )
    assert_clean(out)
    assert re.search(message, out[handlers.STATUS_INDEX]), out[handlers.STATUS_INDEX]


def test_the_studio_pixel_limit_is_also_pillows_while_serving(files):
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    try:
        serving.limit_image_pixels()
        with pytest.raises(Image.DecompressionBombError):  # what Gradio's own decoding hits
            Image.open(files["too_many_pixels.png"])
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("trace_nan.json", "NaN"),
        ("trace_inf.json", "out of range"),
        ("deep.json", "nested too deeply"),
        ("not_utf8.json", "not a trace JSON file"),
        ("image.json", "not a trace JSON file"),
    ],
)
def test_bad_trace_files_are_refused(files, name, message):
    out = exporting.load_trace(ENGINE, SessionState(), str(files[name]), *LOOK)
    assert_clean(out)
    assert message in out[handlers.STATUS_INDEX]


@pytest.mark.parametrize("path", ["/dev/zero", "/", "../../../../etc/passwd", "/nonexistent"])
def test_file_handlers_refuse_what_is_not_a_regular_file(path):
    for out in (
        exporting.load_trace(ENGINE, SessionState(), path, *LOOK),
        handlers.score_image(ENGINE, SessionState(), path, "class 0", 0, *LOOK, **SETTINGS),
    ):
        assert_clean(out)
        assert "not a regular file" in out[handlers.STATUS_INDEX] or "passwd" in path


def test_oversized_files_are_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "MAX_UPLOAD_BYTES", 100)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 101)
    out = exporting.load_trace(ENGINE, SessionState(), str(big), *LOOK)
    assert "the limit is" in out[handlers.STATUS_INDEX]


def test_traces_this_studio_cannot_continue_are_refused(tmp_path, states):
    trace = states[1].trace
    too_many = Trace(
        trace.settings,
        0,
        "x",
        [0] * 9,
        trace.grid_size,
        trace.vocab_size,
        np.zeros((9, 16), int),
        np.full((9, 16), np.nan),
    )
    alien_class = Trace(
        trace.settings,
        0,
        "x",
        [11],
        trace.grid_size,
        trace.vocab_size,
        np.zeros((1, 16), int),
        np.full((1, 16), np.nan),
    )
    for bad, message in ((too_many, "at most 8"), (alien_class, "class 11")):
        path = tmp_path / "bad.json"
        path.write_text(bad.to_json())
        out = exporting.load_trace(ENGINE, SessionState(), str(path), *LOOK)
        assert message in out[handlers.STATUS_INDEX]


# ----------------------------------------------------------------- every handler, fuzzed

layers = st.one_of(
    st.none(),
    st.just("not an image"),
    st.integers(),
    st.builds(
        lambda h, w, c: np.full((h, w, c), 255, np.uint8),
        st.integers(0, 40),
        st.integers(0, 40),
        st.sampled_from([1, 3, 4]),
    ),
    st.builds(lambda n: np.ones(n, np.uint8), st.integers(0, 5)),
    st.just(np.array("text")),
)
editors = st.one_of(
    anything,
    st.fixed_dictionaries({"layers": st.lists(layers, max_size=3)}),
    st.fixed_dictionaries({"background": layers, "layers": anything, "composite": layers}),
)


@given(data=st.data())
@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_handler_answers_hostile_values_cleanly(data, states, files):
    state = data.draw(st.sampled_from(states), label="state")
    value = data.draw(plausible)
    knobs = data.draw(
        st.fixed_dictionaries({}, optional={name: plausible for name in SETTINGS})
        | st.dictionaries(st.text(max_size=4), plausible, max_size=2)  # names nobody knows
        | st.just(SETTINGS)
    )
    look = data.draw(st.tuples(anything, plausible) | st.just(LOOK))
    path = data.draw(st.sampled_from([*map(str, files.values()), None, "", 5, b"x"]))
    calls = {
        "generate": lambda: handlers.generate(
            ENGINE, state, data.draw(anything), value, data.draw(plausible), *look, **knobs
        ),
        "refine": lambda: handlers.refine(ENGINE, state, value, *look, **knobs),
        "regenerate_region": lambda: handlers.regenerate_region(
            ENGINE, state, data.draw(editors), data.draw(anything), value, *look, **knobs
        ),
        "score_image": lambda: handlers.score_image(
            ENGINE, state, path, data.draw(anything), value, *look, **knobs
        ),
        "scrub": lambda: handlers.scrub(ENGINE, state, value, *look),
        "lock": lambda: handlers.lock(ENGINE, state, data.draw(editors), *look),
        "unlock_all": lambda: handlers.unlock_all(ENGINE, state, *look),
        "undo": lambda: handlers.undo(ENGINE, state, *look),
        "pick": lambda: handlers.pick(ENGINE, state, value, *look),
        "export": lambda: exporting.export(
            ENGINE, state, data.draw(anything), value, data.draw(plausible)
        ),
        "load_trace": lambda: exporting.load_trace(ENGINE, state, path, *look),
        "play": lambda: exporting.play(ENGINE, state, *look),
    }
    name = data.draw(st.sampled_from(sorted(calls)), label="handler")
    for outputs in drain(calls[name]()):
        assert_clean(outputs)


# ------------------------------------------------------------------------ the Trace loader


@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
@settings(max_examples=300)
def test_trace_loader_raises_only_trace_errors_on_any_bytes(blob):
    with contextlib.suppress(TraceError):  # anything else fails the test
        parse_trace(blob)


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, node
    if isinstance(node, (dict, list)):
        for key, child in node.items() if isinstance(node, dict) else enumerate(node):
            yield from _paths(child, (*prefix, key))


def _replace(tree, path, value):
    if not path:
        return value
    copy = json.loads(json.dumps(tree))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return copy


HOSTILE_JSON = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    str(2**70),
    "-1",
    "3.5",
    "true",
    "null",
    '"x"',
    "[]",
    "{}",
    "[[]]",
    "[[1, 2], [3]]",
    "[[[0]]]",
    "9" * 5000,
]


@given(data=st.data())
@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_mutated_traces_are_refused_or_fully_usable(data, states, tmp_path_factory):
    """Swap any one node of a real trace for a hostile value: the loader refuses it with a
    TraceError, or the studio can show, scrub, refine and export what it accepted."""
    original = json.loads(states[1].trace.to_json())
    places = list(_paths(original))
    path, _ = data.draw(st.sampled_from(places), label="node")
    hostile = data.draw(st.sampled_from(HOSTILE_JSON), label="value")
    marker = '"__HOSTILE__"'
    text = json.dumps(_replace(original, path, "__HOSTILE__")).replace(marker, hostile, 1)
    try:
        parse_trace(text)
    except TraceError:
        return
    file = tmp_path_factory.mktemp("mutated") / "trace.json"
    file.write_text(text)
    loaded = exporting.load_trace(ENGINE, SessionState(), str(file), *LOOK)
    assert_clean(loaded)
    state = state_after([loaded], SessionState())
    for outputs in (
        handlers.scrub(ENGINE, state, 1, *LOOK),
        *drain(handlers.refine(ENGINE, state, 0, *LOOK, **SETTINGS)),
        exporting.export(ENGINE, state, True, 20, 20),
    ):
        assert_clean(outputs)
