"""Sessions under faults, without HTTP: a run stopped mid-stream (the tab closed, Stop clicked),
a second run started on a session while its first one streams, and idle sessions whose state
expires. Handlers run through ``app.ui.bind``, as Gradio calls them; worker threads stand in
for Gradio's, and a wait that outlives its generous timeout fails instead of hanging."""

from __future__ import annotations

import datetime

import gradio as gr
import gradio.queueing
import numpy as np
import pytest
from gradio.state_holder import StateHolder
from reliability_support import LOOK, SETTINGS, drain, one_thread  # noqa: F401 (autouse fixture)
from test_app_engine import in_thread
from test_app_render import tiny_engine

from app import handlers, serving
from app.state import SessionState
from app.ui import MODEL_GROUP, bind, build_demo

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a server
STATE = handlers.VIEW_OUTPUTS.index("state")
RUN_STEPS = 8  # SETTINGS: 4 generation sets + 1 score step + 3 refinement rounds


@pytest.fixture(scope="module", autouse=True)
def cheap_plot():
    """The score plot (matplotlib, ~0.1 s a call) is tested elsewhere."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(handlers, "score_plot", lambda *a, **k: np.zeros((4, 4, 3), np.uint8))
        yield


def start(engine, state: SessionState, seed: int, class_name: str = "class 1"):
    """The generate event's handler as Gradio holds it: a generator not started yet."""
    return bind(handlers.generate, engine)(state, class_name, seed, 1, *LOOK, **SETTINGS)


def finished(outputs: list[tuple]) -> SessionState:
    """The last state a run wrote, after checking it ended cleanly and at its last step."""
    status, state = outputs[-1][handlers.STATUS_INDEX], outputs[-1][STATE]
    assert status.startswith("done · ") and f" · step {RUN_STEPS}/{RUN_STEPS} · " in status, status
    assert state.position == state.length == RUN_STEPS
    return state


# ------------------------------------------------------------------------------ cancelled runs


def test_a_run_closed_mid_stream_leaves_every_session_usable():
    engine = tiny_engine()
    run = start(engine, SessionState(), seed=4)
    partial = in_thread(lambda: next(run))[STATE]  # Gradio stores each yielded state
    run.close()  # what Gradio does on Stop or a closed tab: GeneratorExit at the handler's yield
    other = in_thread(lambda: drain(start(engine, SessionState(), 9, "class 2")))
    assert finished(other).trace.class_ids == [2]  # another session runs to its end
    assert partial.length == 1  # the stopped session kept a valid, partial trace ...
    again = finished(in_thread(lambda: drain(start(engine, partial, seed=4))))
    ((undone, position),) = again.undo  # ... and a new run goes on top of it (Undo returns to it)
    assert len(undone.steps) == position == 1
    alone = finished(drain(start(engine, SessionState(), seed=4)))
    np.testing.assert_array_equal(again.trace.codes_at(-1), alone.trace.codes_at(-1))


# ----------------------------------------------------------------------------- second click


def test_model_runs_are_one_at_a_time_and_ignore_clicks_while_pending():
    """The browser drops a second click on a pending run ("once"); over the API a second run
    queues in the one model group and reads the session's state when it starts."""
    demo = build_demo(tiny_engine())
    runs = {fn.api_name: fn for fn in demo.fns.values()}
    for name in ("generate", "refine", "regenerate_region", "score_image", "export"):
        fn = runs[name]
        assert (fn.concurrency_id, fn.concurrency_limit) == (MODEL_GROUP, 1), name
        assert fn.trigger_mode == "once", name


def test_stop_cancels_runs_only_where_they_live_in_another_process():
    """Stop ends a run through its stop flag (a success, with a final view); under a GPU
    wrapper (ZeroGPU forks a worker per run, out of the flag's reach) it cancels instead."""
    for gpu, cancels in ((None, False), (lambda fn: fn, True)):
        demo = build_demo(tiny_engine(), gpu=gpu)
        assert any(fn.is_cancel_function for fn in demo.fns.values()) == cancels


def test_a_second_run_started_while_one_streams_leaves_both_whole():
    """Even two runs of one session at once (nothing in the studio allows it, but state is
    immutable and runs share nothing) each end in a whole state; the last to finish wins."""
    engine = tiny_engine()
    before = SessionState()
    first = start(engine, before, seed=7)
    next(first)
    second = finished(drain(start(engine, before, seed=8, class_name="class 2")))
    first_state = finished([next(first), *first])
    for state, seed, class_name in ((first_state, 7, "class 1"), (second, 8, "class 2")):
        assert state.trace.seed == seed and state.undo == before.undo
        alone = finished(drain(start(engine, before, seed, class_name)))
        np.testing.assert_array_equal(state.trace.codes_at(-1), alone.trace.codes_at(-1))


def test_stop_ends_a_run_after_its_step_and_only_that_sessions():
    """Stop asks the session's running streams to end after their current step; a Stop with
    a run waiting is kept for it, a stray one is dropped (it never stops a later run)."""
    engine, stops = tiny_engine(), serving.RunStops()
    with stops.running("a") as a, stops.running("b") as b:
        run = handlers.generate(engine, SessionState(), "class 1", 3, 1, *LOOK, stop=a.is_set)
        first = next(run)
        assert stops.stop("a") == 1 and a.is_set() and not b.is_set()
        rest = list(run)
    assert len(rest) == 1 and rest[0][handlers.STATUS_INDEX].startswith("stopped · 1 of 4 sets")
    assert rest[0][STATE].length == first[STATE].length == 1  # what it made is kept
    assert stops.stop("c") == 0  # nothing runs, nothing waits: dropped
    with stops.running("c") as c:
        assert not c.is_set()
    stops.stop("c", expected=True)  # a run of "c" waits in the queue: it stops on start
    with stops.running("c") as c:
        assert c.is_set()
        outputs = list(
            handlers.generate(engine, SessionState(), "class 1", 3, 1, *LOOK, stop=c.is_set)
        )
    assert outputs[-1][handlers.STATUS_INDEX] == "stopped before the run started"
    with stops.running("c") as c:  # used up
        assert not c.is_set()


# ------------------------------------------------------------------------------ idle sessions


def studio_state_holder() -> tuple[gr.Blocks, StateHolder, gr.State]:
    """The studio's blocks with Gradio's per-session store attached, as a launch leaves them."""
    demo = build_demo(tiny_engine())
    holder = StateHolder()
    holder.set_blocks(demo)  # sets demo.state_holder, which forget_idle_sessions reads
    (state,) = [
        block
        for block in demo.blocks.values()
        if isinstance(block, gr.State) and isinstance(block.value, SessionState)
    ]
    return demo, holder, state


def age(holder: StateHolder, session: str, seconds: float) -> None:
    """Pretend ``session``'s last event started ``seconds`` earlier (Gradio's own stamp)."""
    holder.time_last_used[session] -= datetime.timedelta(seconds=seconds)


def test_an_idle_session_is_forgotten_whole_and_its_next_event_starts_afresh():
    demo, holder, block = studio_state_holder()
    engine = tiny_engine()
    for session in ("idle", "recent"):
        holder[session][block._id] = finished(drain(start(engine, SessionState(), seed=3)))
    assert serving.forget_idle_sessions(demo, serving.SESSION_TTL_S) == 0  # none idle yet
    age(holder, "idle", serving.SESSION_TTL_S + 1)
    age(holder, "recent", serving.SESSION_TTL_S - 60)
    assert serving.forget_idle_sessions(demo, serving.SESSION_TTL_S) == 1
    assert "idle" not in holder and "idle" not in holder.time_last_used
    assert holder["recent"][block._id].trace is not None  # not idle long enough: kept
    fresh = holder["idle"][block._id]  # what the next event of that session gets
    assert fresh.trace is None and fresh.undo == ()
    answer = handlers.refine(engine, fresh, 0, *LOOK, **SETTINGS)
    assert "nothing to work on yet" in next(answer)[handlers.STATUS_INDEX]


def test_a_session_with_an_event_queued_or_running_is_never_idle(monkeypatch):
    demo, holder, block = studio_state_holder()
    engine = tiny_engine()
    for session in ("waiting", "running", "idle"):
        holder[session][block._id] = finished(drain(start(engine, SessionState(), seed=3)))
        age(holder, session, serving.SESSION_TTL_S + 1)
    queue = demo._queue  # where Gradio keeps queued and running events
    event = type("Event", (), {})  # only the session hash is read
    waiting, running = event(), event()
    waiting.session_hash, running.session_hash = "waiting", "running"
    line = gradio.queueing.EventQueue(MODEL_GROUP, 1)
    line.queue.append(waiting)
    monkeypatch.setitem(queue.event_queue_per_concurrency_id, MODEL_GROUP, line)
    monkeypatch.setattr(queue, "active_jobs", [None, [running]])
    assert serving.busy_sessions(demo) == {"waiting", "running"}
    assert serving.forget_idle_sessions(demo, serving.SESSION_TTL_S) == 1  # only "idle"
    for session in ("waiting", "running"):  # read without holder[...], which stamps a use
        assert holder.session_data[session][block._id].trace is not None
    # A busy session counts as used when the pass saw it, so a run longer than the lifetime
    # does not leave its session looking idle from the moment the run started.
    line.queue.clear()
    monkeypatch.setattr(queue, "active_jobs", [None, None])
    assert serving.forget_idle_sessions(demo, serving.SESSION_TTL_S) == 0
