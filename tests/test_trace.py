"""Trace bookkeeping and the strict JSON loader (traces come from users and remote calls)."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scan_core.sampling.trace import Step, Trace, TraceError
from scan_core.sampling.trace_files import parse_trace


def small_trace() -> Trace:
    trace = Trace(
        {"num_steps": 2},
        3,
        "tiny",
        [1],
        2,
        8,
        np.full((1, 4), -1),
        np.full((1, 4), np.nan),
        np.array([[2, 0, 3, 1]]),
    )
    scores = np.full((1, 4), np.nan)
    trace.steps.append(
        Step(
            "generate",
            np.array([[2, 0]]),
            np.array([[5, 6]]),
            np.array([[0.5, 0.25]]),
            np.array([[True, True]]),
            scores.copy(),
        )
    )
    scores[0, [2, 0]] = [0.9, 0.1]
    trace.steps.append(
        Step(
            "generate",
            np.array([[3, 1]]),
            np.array([[7, 1]]),
            np.array([[0.5, 0.5]]),
            np.array([[True, True]]),
            scores.copy(),
        )
    )
    scores[0, [3, 1]] = [0.8, 0.7]
    trace.steps.append(
        Step(
            "refine",
            np.array([[0, 1]]),
            np.array([[4, 2]]),
            np.array([[0.3, 0.3]]),
            np.array([[True, False]]),
            scores.copy(),
        )
    )
    return trace


def test_codes_and_scores_at_every_step():
    trace = small_trace()
    assert trace.codes_at(0).tolist() == [[6, -1, 5, -1]]
    assert trace.codes_at(1).tolist() == [[6, 1, 5, 7]]
    assert trace.codes_at(-1).tolist() == [[4, 1, 5, 7]]  # the rejected candidate is not applied
    assert np.isnan(trace.scores_at(0)).all()
    with pytest.raises(IndexError):
        trace.codes_at(3)


def test_truncate_and_copy_do_not_share_mutable_state():
    trace = small_trace()
    branch = trace.truncated(1)
    branch.steps.append(trace.steps[2])
    branch.settings["num_steps"] = 9
    assert len(trace) == 3 and trace.settings["num_steps"] == 2
    assert len(trace.truncated(0)) == 1


def test_select_gives_the_image_its_own_seeds():
    """Image b of a batch drew from seed + b in every operation (``ScanSampler._generators``)."""
    one = small_trace()
    one.settings["ops"] = [
        {"op": "generate", "seed": 3},
        {"op": "refine", "seed": 9},
        {"op": "score", "seed": "odd"},
    ]
    steps = [Step(s.kind, *(a.repeat(2, 0) for a in s._arrays())) for s in one.steps]
    pair = Trace(
        one.settings,
        3,
        "tiny",
        [1, 2],
        2,
        8,
        one.start_codes.repeat(2, 0),
        one.start_scores.repeat(2, 0),
        one.order.repeat(2, 0),
        steps,
    )
    for index in (1, -1):
        picked = pair.select(index)
        assert picked.seed == 4 and picked.class_ids == [2] and picked.batch_size == 1
        assert [op["seed"] for op in picked.settings["ops"]] == [4, 10, "odd"]
        np.testing.assert_array_equal(picked.codes_at(-1), pair.codes_at(-1)[1:])
    assert pair.select(0).seed == 3 and [op["seed"] for op in pair.settings["ops"]] == [3, 9, "odd"]
    with pytest.raises(IndexError):
        pair.select(2)


def test_json_round_trip_keeps_nan_as_unknown():
    trace = small_trace()
    loaded = parse_trace(trace.to_json())
    np.testing.assert_array_equal(loaded.codes_at(-1), trace.codes_at(-1))
    assert np.isnan(loaded.scores_at(0)).all()


def _payload() -> dict:
    return json.loads(small_trace().to_json())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p.update(format="other"), "not a trace"),
        (lambda p: p.update(version=99), "version"),
        (lambda p: p["steps"][0].update(codes=[[5, 99]]), "codes outside"),
        (lambda p: p["steps"][0].update(positions=[[5, 0]]), "outside"),
        (lambda p: p["steps"][0].update(codes=[[5]]), "shape"),
        (lambda p: p["steps"][0].update(kind="magic"), "kind"),
        (lambda p: p["steps"][1]["scores"][0].__setitem__(0, 7.5), "0..1"),
        (lambda p: p.update(order=[[0, 0, 1, 2]]), "permutation"),
        (lambda p: p.update(grid_size=10**6), "grid_size"),
        (lambda p: p.update(class_ids="1"), "class_ids"),
        (lambda p: p.update(steps={}), "steps"),
    ],
)
def test_bad_traces_are_named(edit, message):
    payload = _payload()
    edit(payload)
    with pytest.raises(TraceError, match=message):
        parse_trace(json.dumps(payload))


@pytest.mark.parametrize("text", ["", "{", "[]", '{"format": "scan-trace"}', "NaN"])
def test_garbage_is_refused(text):
    with pytest.raises(TraceError):
        parse_trace(text)


def test_nan_and_infinity_literals_are_refused():
    text = small_trace().to_json().replace("0.9", "NaN", 1)
    with pytest.raises(TraceError, match="NaN"):
        parse_trace(text)
    with pytest.raises(TraceError, match="Infinity"):
        parse_trace(small_trace().to_json().replace("0.9", "Infinity", 1))


@settings(max_examples=150, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    )
)
def test_fuzzed_json_never_crashes_the_loader(value):
    payload = _payload()
    payload["steps"][0]["probs"] = value
    with contextlib.suppress(TraceError):
        parse_trace(json.dumps(payload))
