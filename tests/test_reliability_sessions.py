"""Sessions under faults, without HTTP: a run stopped mid-stream (the tab closed, Stop clicked),
a second run started on a session while its first one streams, and idle sessions whose state
expires. Handlers run through ``app.ui.bind``, as Gradio calls them; worker threads stand in
for Gradio's, and a wait that outlives its generous timeout fails instead of hanging."""

from __future__ import annotations

import datetime

import gradio as gr
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
    return bind(handlers.generate, engine)(state, class_name, seed, 1, *SETTINGS, *LOOK)


def finished(outputs: list[tuple]) -> SessionState:
    """The last state a run wrote, after checking it ended cleanly and at its last step."""
    status, state = outputs[-1][handlers.STATUS_INDEX], outputs[-1][STATE]
    assert "⚠️" not in status and status.startswith(f"step {RUN_STEPS}/{RUN_STEPS}"), status
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


# ------------------------------------------------------------------------------ idle sessions


def studio_state_holder() -> tuple[StateHolder, gr.State]:
    """Gradio's per-session store for the studio as ``serving.launch`` configures it."""
    demo = build_demo(tiny_engine())
    serving.expire_idle_sessions(demo)
    holder = StateHolder()
    holder.set_blocks(demo)
    (state,) = [block for block in demo.blocks.values() if isinstance(block, gr.State)]
    return holder, state


def test_an_idle_sessions_state_expires_and_the_next_event_starts_afresh():
    holder, block = studio_state_holder()
    assert block.time_to_live == serving.SESSION_TTL_S
    engine = tiny_engine()
    session = holder["idle"]
    session[block._id] = finished(drain(start(engine, SessionState(), seed=3)))  # an event's write
    holder.delete_all_expired_state()  # Gradio runs this every second
    assert session[block._id].trace is not None  # not idle long enough: kept
    ttl, written = session._state_ttl[block._id]  # Gradio's private stamp: (lifetime, written)
    assert ttl == serving.SESSION_TTL_S
    session._state_ttl[block._id] = (ttl, written - datetime.timedelta(seconds=ttl + 1))
    holder.delete_all_expired_state()
    assert block._id not in session.state_data  # the trace, undo stack and gallery are freed
    fresh = session[block._id]  # what the next event of that session gets
    assert fresh.trace is None and fresh.undo == ()
    answer = handlers.refine(engine, fresh, 0, *SETTINGS, *LOOK)
    assert "nothing to work on yet" in next(answer)[handlers.STATUS_INDEX]


def test_expiry_is_set_once_and_never_overrides_a_states_own_lifetime():
    holder, block = studio_state_holder()
    block.time_to_live = 5.0
    serving.expire_idle_sessions(holder.blocks)
    assert block.time_to_live == 5.0
