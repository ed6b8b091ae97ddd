"""The batch scheduler without a server: who shares a run (window, settings, size, layout),
what each session's stream holds, stop and disconnect, a bad member, a full queue, and that a
request (generation, refinement, region) served in a batch yields the trace it yields alone.

Nothing here waits on the wall clock: arrivals come from a fake clock set past every window
before any stream is read, and reading a stream does the work (no thread of the scheduler's)."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
from conftest import random_model, tiny_config
from test_app_render import tiny_engine
from test_image_seeds import assert_same_run

from app import handlers
from app.batching import BUSY_MESSAGE, BatchScheduler, BatchStream, BusyError
from app.state import Plan, SessionState
from app.ui import build_demo
from scan_core.sampling.sampler import ScanSampler, run_all
from scan_core.sampling.settings import SamplerSettings

SETTINGS = SamplerSettings(num_steps=4, num_rounds=3, tokens_per_round=2, cfg_scale=2.0)
WINDOW = 0.05


class Clock:
    """Seconds that move only when a test moves them."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def sampler() -> ScanSampler:
    return ScanSampler(random_model(tiny_config(), seed=31), model_id="tiny")


def scheduler_for(sampler, **options) -> tuple[BatchScheduler, Clock]:
    clock = Clock()
    return BatchScheduler(sampler, window_s=WINDOW, clock=clock, **options), clock


def solo(sampler, class_ids, settings=SETTINGS, seed=0, locked=None):
    return run_all(sampler.generate(class_ids, settings, seed, locked))


def test_requests_inside_the_window_share_a_run_and_one_outside_does_not(sampler):
    scheduler, clock = scheduler_for(sampler)
    first = scheduler.generate([1], SETTINGS, 4)
    clock.now = 0.9 * WINDOW
    second = scheduler.generate([2], SETTINGS, 9)
    clock.now = 1.5 * WINDOW  # after the first one's window: its run starts now
    assert scheduler.waiting == 2 and first.batch_images is None
    next(first)
    late = scheduler.generate([3], SETTINGS, 2)  # arrives while that run runs
    clock.now = 10.0
    backlog = scheduler.generate([4], SETTINGS, 5)  # long after: waits behind the run too
    clock.now = 11.0  # past every window
    streams = (first, second, late, backlog)
    traces = [run_all(stream) for stream in streams]
    # The first run had room for more, but a request cannot join a run already going. The
    # next run takes every compatible request waiting when it starts, however far apart they
    # arrived: a backlog does not run one by one.
    assert [stream.batch_images for stream in streams] == [2, 2, 2, 2]
    for trace, (class_id, seed) in zip(traces, ((1, 4), (2, 9), (3, 2), (4, 5)), strict=True):
        assert_same_run(trace, solo(sampler, [class_id], seed=seed))
    assert scheduler.waiting == 0 and scheduler.running == 0


# Settings each image obeys on its own: these batch, and must give every image its solo trace.
PER_IMAGE = {
    "cached": SETTINGS,
    "exact context": SETTINGS.replace(context="exact"),
    "lookahead": SETTINGS.replace(lookahead=True),
    "rescore": SETTINGS.replace(rescore=True),
    "confidence": SETTINGS.replace(scorer="confidence"),
    "greedy raster": SETTINGS.replace(temperature=0.0, order="raster", cfg_scale=1.0),
}


@pytest.mark.filterwarnings("ignore:temperature 0")
@pytest.mark.parametrize("settings", PER_IMAGE.values(), ids=PER_IMAGE.keys())
def test_a_batch_of_eight_yields_each_request_its_solo_trace(sampler, settings):
    """Six sessions (one asks for two images, one locks cells) in one run of 8 images: each
    stream holds only its own images, step for step what its request yields alone."""
    locked = np.zeros(16, dtype=bool)
    locked[:6] = True
    requests = [([1], 5, None), ([2, 2], 40, None), ([3], 6, locked), ([4], 0, None)]
    requests += [([5], 123, None), ([6, 7], 5, None)]  # seed 5 again: images need not differ
    scheduler, clock = scheduler_for(sampler, max_batch=8)
    streams = [scheduler.generate(c, settings, s, lock) for c, s, lock in requests]
    clock.now = 1.0
    for stream, (class_ids, seed, lock) in zip(streams, requests, strict=True):
        alone = list(sampler.generate(class_ids, settings, seed, lock))
        shared = []
        for index, (trace, step) in enumerate(stream):
            assert len(trace) == index + 1 and trace.steps[-1] is step
            assert step.codes.shape[0] == len(class_ids) == trace.batch_size
            shared.append(trace.copy())
        assert stream.batch_images == 8 and len(shared) == len(alone)
        assert_same_run(shared[-1], alone[-1][0])
        mid = len(alone) // 2
        np.testing.assert_array_equal(shared[mid].codes_at(-1), alone[-1][0].codes_at(mid))


def test_only_compatible_requests_share_a_run(sampler):
    scheduler, clock = scheduler_for(sampler, max_batch=3)
    streams = {
        "a": scheduler.generate([1], SETTINGS, 1),
        "other rounds": scheduler.generate([1], SETTINGS.replace(num_rounds=2), 1),
        "b": scheduler.generate([2, 3], SETTINGS, 1),
        "patience": scheduler.generate([4], SETTINGS.replace(patience=1), 1),
        "threshold": scheduler.generate([4], SETTINGS.replace(score_threshold=0.5), 1),
        "patience too": scheduler.generate([4], SETTINGS.replace(patience=1), 1),
        "full": scheduler.generate([5], SETTINGS, 1),  # a, b and this make 4 > max_batch
        "too big": scheduler.generate([6] * 4, SETTINGS, 1),  # runs alone, not split
    }
    clock.now = 1.0
    for stream in streams.values():
        run_all(stream)
    sizes = {name: stream.batch_images for name, stream in streams.items()}
    assert sizes == {
        "a": 3,
        "other rounds": 1,
        "b": 3,
        "patience": 1,
        "threshold": 1,
        "patience too": 1,
        "full": 1,
        "too big": 4,
    }


def test_early_stopping_decides_per_batch_so_it_runs_alone(sampler):
    """Why patience never shares a run: a round is idle only when no image of the batch
    accepted anything, so an image can run rounds in a batch that it would skip alone."""
    settings = SETTINGS.replace(num_rounds=12, patience=1)
    together = solo(sampler, list(range(8)), settings, seed=3)
    apart = [solo(sampler, [c], settings, seed=3 + c) for c in range(8)]
    assert any(len(together) != len(alone) for alone in apart)


def test_stop_ends_one_share_and_the_last_one_ends_the_run(sampler):
    scheduler, clock = scheduler_for(sampler)
    kept, stopped = scheduler.generate([1], SETTINGS, 4), scheduler.generate([2], SETTINGS, 9)
    clock.now = 1.0
    next(kept), next(stopped)
    stopped.close()
    assert next(stopped, None) is None
    assert_same_run(run_all(kept), solo(sampler, [1], seed=4))
    assert kept.batch_images == 2
    # Every member stopped: the run ends at once, and the next request runs normally.
    first, second = scheduler.generate([1], SETTINGS, 4), scheduler.generate([2], SETTINGS, 9)
    clock.now = 2.0
    next(first)
    assert scheduler.running == 2
    first.close()
    assert scheduler.running == 2  # one member still listens
    second.close()
    assert scheduler.running == 0 and scheduler.waiting == 0
    after = scheduler.generate([3], SETTINGS, 1)
    clock.now = 3.0
    assert_same_run(run_all(after), solo(sampler, [3], seed=1))


def test_a_request_arriving_mid_run_joins_the_next_step_in_a_run_of_its_own(sampler):
    """Runs step together: the newcomer's first step is made with the older run's next one,
    in merged forwards, and that changes nothing in either trace."""
    scheduler, clock = scheduler_for(sampler)
    first = scheduler.generate([1], SETTINGS, 4)
    clock.now = 1.0
    next(first)
    assert scheduler._together.forwards == 0  # alone: no forward to merge with
    late = scheduler.generate([2], SETTINGS.replace(num_rounds=1), 9)  # incompatible, too
    clock.now = 2.0
    next(late)
    assert late.batch_images == 1 and scheduler.running == 2
    assert first.steps_waiting == 1  # the older run made its step in the same unit of work
    assert scheduler._together.forwards >= 1
    assert_same_run(run_all(late), solo(sampler, [2], SETTINGS.replace(num_rounds=1), 9))
    assert_same_run(run_all(first), solo(sampler, [1], seed=4))


def test_with_one_run_at_a_time_a_newcomer_waits_for_the_whole_run(sampler):
    scheduler, clock = scheduler_for(sampler, max_runs=1)
    first = scheduler.generate([1], SETTINGS, 4)
    clock.now = 1.0
    next(first)
    late = scheduler.generate([2], SETTINGS, 9)
    clock.now = 2.0
    next(late)  # its reader drove the first run to its end before its own could start
    total = len(solo(sampler, [1], seed=4).steps)
    assert first.steps_waiting == total - 1 and late.batch_images == 1
    assert_same_run(run_all(first), solo(sampler, [1], seed=4))
    assert_same_run(run_all(late), solo(sampler, [2], seed=9))


def test_a_third_run_waits_until_one_of_two_ends(sampler):
    scheduler, clock = scheduler_for(sampler, max_runs=2)
    short, long = SETTINGS.replace(num_rounds=1), SETTINGS.replace(num_rounds=8)
    one = scheduler.generate([1], long, 4)
    clock.now = 1.0
    next(one)
    two = scheduler.generate([2], short, 9)
    clock.now = 2.0
    next(two)
    three = scheduler.generate([3], SETTINGS, 1)
    clock.now = 3.0
    next(three)  # room only once the shorter run ended: its reader drove both until then
    assert two.steps_waiting == len(solo(sampler, [2], short, 9).steps) - 1
    assert three.batch_images == 1 and scheduler.running == 2  # the first and the third
    for stream, want in (
        (one, ([1], long, 4)),
        (two, ([2], short, 9)),
        (three, ([3], SETTINGS, 1)),
    ):
        assert_same_run(run_all(stream), solo(sampler, *want))
    assert scheduler.running == 0


def test_stopping_one_of_two_runs_leaves_the_other_running(sampler):
    scheduler, clock = scheduler_for(sampler, max_runs=2)
    kept = scheduler.generate([1], SETTINGS, 4)
    clock.now = 1.0
    next(kept)
    stopped = scheduler.generate([2], SETTINGS.replace(num_rounds=1), 9)
    clock.now = 2.0
    next(stopped)
    assert scheduler.running == 2
    stopped.close()
    assert scheduler.running == 1
    assert_same_run(run_all(kept), solo(sampler, [1], seed=4))


def test_at_least_one_run_must_be_allowed(sampler):
    with pytest.raises(ValueError, match="max_runs must be at least 1"):
        scheduler_for(sampler, max_runs=0)


def test_a_dropped_stream_frees_its_share(sampler):
    """A vanished client: nobody closes its stream, it is just garbage-collected."""
    scheduler, clock = scheduler_for(sampler)
    kept, dropped = scheduler.generate([1], SETTINGS, 4), scheduler.generate([2], SETTINGS, 9)
    never_read = scheduler.generate([3], SETTINGS.replace(num_rounds=1), 0)  # another run
    never_started = scheduler.generate([4], SETTINGS.replace(num_rounds=2), 0)  # no room: waits
    scheduler.max_batch = 3
    clock.now = 1.0
    next(kept), next(dropped)
    share = dropped._request
    assert share.outbox == type(share.outbox)() and scheduler.waiting == 1
    assert scheduler.running == 3 and never_read.steps_waiting == 1
    del dropped, never_read, never_started
    gc.collect()
    assert share.withdrawn and scheduler.waiting == 0
    assert scheduler.running == 2  # the run nobody reads ended; the dropped image rides along
    assert_same_run(run_all(kept), solo(sampler, [1], seed=4))
    assert not share.outbox  # no steps piled up for nobody
    dropped = scheduler.generate([2], SETTINGS, 9)  # alone, in a run of its own
    clock.now = 2.0
    next(dropped)
    del dropped
    gc.collect()
    assert scheduler.running == 0


BAD = {
    "setting": (SETTINGS.replace(tokens_per_round=99), [2], None),
    "class": (SETTINGS, [99], None),
    "locks": (SETTINGS, [2], np.ones(16, dtype=bool)),
    "lock shape": (SETTINGS, [2], np.ones(5, dtype=bool)),
}


@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
def test_a_bad_member_fails_alone_with_the_samplers_message(sampler, bad):
    settings, class_ids, locked = bad
    with pytest.raises(ValueError) as direct:
        next(sampler.generate(class_ids, settings, 0, locked))
    scheduler, clock = scheduler_for(sampler)
    good = scheduler.generate([1], SETTINGS, 4)
    broken = scheduler.generate(class_ids, settings, 0, locked)
    other = scheduler.generate([3], SETTINGS, 2)
    clock.now = 1.0
    with pytest.raises(ValueError) as batched:
        next(broken)
    assert str(batched.value) == str(direct.value)
    assert next(broken, None) is None and scheduler.waiting == 2
    for stream, (class_id, seed) in ((good, (1, 4)), (other, (3, 2))):
        assert_same_run(run_all(stream), solo(sampler, [class_id], seed=seed))
        assert stream.batch_images == 2


def test_an_error_during_a_run_reaches_every_member(sampler):
    class Failing(ScanSampler):
        def generate(self, *args):
            stream = super().generate(*args)
            yield next(stream)
            raise RuntimeError("the device fell over")

    scheduler, clock = scheduler_for(Failing(sampler.model, "tiny"))
    streams = [scheduler.generate([c], SETTINGS, c) for c in (1, 2)]
    clock.now = 1.0
    for stream in streams:
        assert len(next(stream)[0]) == 1
    for stream in streams:
        with pytest.raises(RuntimeError, match="fell over"):
            next(stream)
    assert scheduler.running == 0


def test_a_full_queue_answers_busy(sampler):
    scheduler, clock = scheduler_for(sampler, max_queue=2)
    waiting = [scheduler.generate([c], SETTINGS, c) for c in (1, 2)]
    refused = scheduler.generate([3], SETTINGS, 3)
    with pytest.raises(BusyError, match="Queue is full! Please try again."):
        next(refused)
    assert BUSY_MESSAGE == "Queue is full! Please try again."  # gradio_client's QueueError text
    waiting[1].close()  # a withdrawn request frees its place
    taken = scheduler.generate([3], SETTINGS, 3)
    clock.now = 1.0
    for stream, class_id in ((waiting[0], 1), (taken, 3)):
        assert_same_run(run_all(stream), solo(sampler, [class_id], seed=class_id))
    assert waiting[0].batch_images == 2


def finished(sampler, class_ids, seed, scorer="auto"):
    """A session's finished image(s), scored by ``scorer``: the base of a continuation."""
    settings = SETTINGS.replace(num_rounds=1, scorer=scorer)
    return solo(sampler, class_ids, settings, seed=seed)


def corner(cells) -> np.ndarray:
    mask = np.zeros(16, dtype=bool)
    mask[list(cells)] = True
    return mask


def assert_each_as_alone(streams, direct):
    """Each stream's trace is the one its call makes alone, history included."""
    for stream, stream_alone in zip(streams, direct, strict=True):
        trace, alone = run_all(stream), run_all(stream_alone)
        assert_same_run(trace, alone)
        np.testing.assert_array_equal(trace.start_codes, alone.start_codes)


def test_refinements_of_different_sessions_share_a_run(sampler):
    """Three sessions refine their own images (one of two images, one with locks, one inside a
    region, different seeds) in one run: each gets its own trace, as if it ran alone."""
    bases = [finished(sampler, [1], 4), finished(sampler, [2, 3], 9), finished(sampler, [5], 0)]
    calls = [
        (bases[0], SETTINGS, 3, None, None),
        (bases[1], SETTINGS, 11, corner([0, 1, 4, 5]), None),
        (bases[2], SETTINGS, [7], None, corner(range(8))),
    ]
    scheduler, clock = scheduler_for(sampler)
    streams = [scheduler.refine(*call) for call in calls]
    clock.now = 1.0
    assert_each_as_alone(streams, [sampler.refine(*call) for call in calls])
    assert [stream.batch_images for stream in streams] == [4, 4, 4]
    # The comparison can fail: the same images refined in one plain batch draw other codes.
    together = run_all(sampler.refine(bases[1], SETTINGS, 3))
    assert (together.codes_at(-1)[1] != run_all(sampler.refine(*calls[1])).codes_at(-1)[1]).any()


def test_region_regenerations_share_a_run_when_they_brush_as_many_cells(sampler):
    bases = [finished(sampler, [1], 4), finished(sampler, [2], 9), finished(sampler, [3], 5)]
    scheduler, clock = scheduler_for(sampler)
    calls = [
        (bases[0], corner([0, 1, 4, 5]), SETTINGS, 3, None, True),
        (bases[1], corner([10, 11, 14, 15]), SETTINGS, 8, None, True),
        (bases[2], corner([0, 1, 2, 3, 4]), SETTINGS, 2, corner([4]), True),  # 4 unlocked
        (bases[0], corner([0, 1, 4]), SETTINGS, 3, None, True),  # 3 cells: another layout
        (bases[1], corner([0, 1, 4, 5]), SETTINGS, 3, None, False),  # no rounds: another
    ]
    streams = [scheduler.regenerate_region(*call) for call in calls]
    clock.now = 1.0
    assert_each_as_alone(streams, [sampler.regenerate_region(*call) for call in calls])
    assert [stream.batch_images for stream in streams] == [3, 3, 3, 1, 1]


def test_continuations_whose_layouts_differ_run_alone(sampler):
    base = finished(sampler, [1], 4)
    branch = base.truncated(3)  # mid-generation: finishing it sets its own layout
    confidence = finished(sampler, [2], 9, scorer="confidence")  # its scores are rejudged
    scheduler, clock = scheduler_for(sampler)
    calls = [
        (base, SETTINGS, 1, None, None),
        (branch, SETTINGS, 2, None, None),
        (confidence, SETTINGS, 3, None, None),
        (base, SETTINGS.replace(patience=1), 4, None, None),
        (base, SETTINGS.replace(num_rounds=2), 5, None, None),
        (base, SETTINGS, 6, None, None),  # joins the first
    ]
    streams = [scheduler.refine(*call) for call in calls]
    generation = scheduler.generate([1], SETTINGS, 4)  # never with a continuation
    clock.now = 1.0
    assert_each_as_alone(streams, [sampler.refine(*call) for call in calls])
    assert [stream.batch_images for stream in streams] == [2, 1, 1, 1, 1, 2]
    assert_same_run(run_all(generation), solo(sampler, [1], seed=4))
    assert generation.batch_images == 1


def test_a_bad_continuation_fails_alone_with_the_samplers_message(sampler):
    base = finished(sampler, [1], 4)
    bad = (base, corner([]), SETTINGS, 3, None, True)  # an empty region
    with pytest.raises(ValueError) as direct:
        next(sampler.regenerate_region(*bad))
    scheduler, clock = scheduler_for(sampler)
    good = scheduler.regenerate_region(base, corner([0, 5]), SETTINGS, 3, None, True)
    broken = scheduler.regenerate_region(*bad)
    clock.now = 1.0
    with pytest.raises(ValueError) as batched:
        next(broken)
    assert str(batched.value) == str(direct.value)
    direct_good = sampler.regenerate_region(base, corner([0, 5]), SETTINGS, 3, None, True)
    assert_same_run(run_all(good), run_all(direct_good))


def test_a_session_behind_its_shared_run_draws_only_the_newest_step():
    """Drawing a frame costs more than a model step, so a session whose shared run is ahead
    skips to the newest step; its trace still holds every step."""
    engine = tiny_engine()
    scheduler, clock = scheduler_for(engine.sampler)
    ahead, behind = scheduler.generate([1], SETTINGS, 4), scheduler.generate([2], SETTINGS, 9)
    clock.now = 1.0
    plan = Plan(sets=SETTINGS.num_steps, rounds=SETTINGS.num_rounds)
    steps = len(solo(engine.sampler, [1], seed=4).steps)
    drawn = list(handlers._stream(engine, SessionState(), ahead, True, 0.5, plan))
    assert len(drawn) == steps + 1  # it drove the run: a live frame per step, then the end
    assert behind.steps_waiting == steps
    drawn = list(handlers._stream(engine, SessionState(), behind, True, 0.5, plan))
    assert len(drawn) == 2  # the newest step, then the finished view
    assert_same_run(drawn[0][5].trace, solo(engine.sampler, [2], seed=9))


def test_the_live_plot_is_redrawn_less_often_while_more_runs_stream():
    runs = handlers.LiveRuns()
    every = handlers.LIVE_PLOT_EVERY_S
    assert runs.plot_due(0.0, every) and not runs.plot_due(0.0, 0.9 * every)
    with runs.streaming(), runs.streaming(), runs.streaming():
        assert runs.count == 3
        assert not runs.plot_due(0.0, 2.9 * every) and runs.plot_due(0.0, 3 * every)
    assert runs.count == 0
    # The studio's own counter follows its streams, closed ones included.
    engine = tiny_engine()
    plan = Plan(sets=SETTINGS.num_steps, rounds=SETTINGS.num_rounds)
    stream = handlers._stream(
        engine, SessionState(), engine.generate([1], SETTINGS, 4), True, 0.5, plan
    )
    before = handlers.LIVE_RUNS.count
    next(stream)
    assert handlers.LIVE_RUNS.count == before + 1
    stream.close()
    assert handlers.LIVE_RUNS.count == before


def test_the_engine_routes_batched_runs_through_its_scheduler():
    engine = tiny_engine()
    assert not engine.batching  # opt-in: app.py turns it on
    engine.batching = True
    alone = run_all(engine.generate([1], SETTINGS, 4))
    stream = engine.generate([1], SETTINGS, 4, batched=True)
    assert isinstance(stream, BatchStream)
    assert_same_run(run_all(stream), alone)
    demo = build_demo(engine)  # the studio lets every request the scheduler holds through
    limits = {fn.api_name: fn.concurrency_limit for fn in demo.fns.values()}
    assert limits["generate"] == limits["regenerate_region"] == engine.scheduler.max_queue
    engine.batching = False  # ZeroGPU: one job per call
    assert not isinstance(engine.generate([1], SETTINGS, 4, batched=True), BatchStream)
    assert not isinstance(engine.refine(alone, SETTINGS, 4, batched=True), BatchStream)


def test_sessions_on_their_own_threads_share_a_run():
    """As Gradio serves them: each session reads its stream on a worker thread. The window is
    long and the batch small, so the run starts once both have arrived, whenever that is."""
    engine = tiny_engine()
    engine.batching = True
    engine.scheduler.window_s, engine.scheduler.max_batch = 600.0, 2
    expected = [run_all(engine.generate([c], SETTINGS, seed)) for c, seed in ((1, 4), (2, 9))]
    results, threads = {}, []
    for class_id, seed in ((1, 4), (2, 9)):
        stream = engine.generate([class_id], SETTINGS, seed, batched=True)

        def read(stream=stream, key=class_id):
            results[key] = (run_all(stream), stream.batch_images)

        threads.append(threading.Thread(target=read, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a session never got its run"
    for key, alone in zip((1, 2), expected, strict=True):
        trace, shared = results[key]
        assert shared == 2
        assert_same_run(trace, alone)
