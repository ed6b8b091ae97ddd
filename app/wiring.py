"""The studio's events: which handler runs when, with which inputs and outputs, in which queue.

``app/ui.py`` lays the components out and hands them here by name. Every event that runs the
network shares one concurrency group: one job at a time, or with batching on, as many as the
engine's scheduler holds, which steps their runs together (``model_queue``); scrubbing
and re-rendering use a separate, wider group and never wait behind a long run, and Stop has a group
of its own, so it reaches a run at once. After every event that changes what is shown, the
buttons that can act are turned on (the others off) and, when the Brush tab is open, its canvas
follows; a hidden Brush tab is sent nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import gradio as gr

from app import exporting, handlers
from app.engine import Engine
from app.serving import STOPS, session_runs
from app.state import SessionState

MODEL_GROUP = "model"  # concurrency_id of every event that runs the transformer
VIEW_GROUP = "view"  # decoding + drawing only
STOP_GROUP = "stop"  # Stop must never wait behind the run it stops
VIEW_CONCURRENCY = 4
STREAM = {"show_progress": "minimal", "concurrency_id": MODEL_GROUP, "concurrency_limit": 1}
QUICK = {
    "show_progress": "hidden",
    "concurrency_id": VIEW_GROUP,
    "concurrency_limit": VIEW_CONCURRENCY,
}
PRIVATE = {"api_visibility": "private"}
STREAMED = ("generate", "refine", "regenerate_region")  # the runs Stop can stop
NARROW_PX = 720  # below this width the page is one column (phones; see ui.CSS)
# On a phone the canvas is below the controls: bring it into view when a run starts.
SHOW_CANVAS_JS = f"""() => {{
    if (window.innerWidth <= {NARROW_PX}) {{
        document.querySelector('#feedback')?.scrollIntoView({{block: 'start'}});
    }}
}}"""
CLEAR_EXPORTS_JS = "() => [null, null, null, null]"


def _identity(fn: Callable) -> Callable:
    return fn


def _pass_through(value):
    return value


def bind(fn: Callable, engine: Engine, wrap: Callable = _identity) -> Callable:
    """``fn(engine, ...)`` -> ``f(...)``, keeping generator-ness (Gradio streams those).

    A handler with a keyword-only ``stop`` parameter can be stopped: ``f`` also asks Gradio for
    the request, registers the run under its session in ``STOPS`` and passes ``stop``.
    """
    parameters = list(inspect.signature(fn).parameters.values())[1:]
    stoppable = any(p.name == "stop" and p.kind == p.KEYWORD_ONLY for p in parameters)
    if stoppable:

        def bound(*args, **kwargs):
            # Gradio passes the request (or None) first; direct callers (tests) need not.
            request = None
            if args and (args[0] is None or isinstance(args[0], gr.Request)):
                request, args = args[0], args[1:]
            with STOPS.running(getattr(request, "session_hash", None)) as stopped:
                yield from fn(engine, *args, stop=stopped.is_set, **kwargs)

        # Gradio passes the request where the signature asks for it: first.
        request = inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        parameters = [request, *(p for p in parameters if p.name != "stop")]
        bound.__annotations__ = {"request": gr.Request}
    elif inspect.isgeneratorfunction(fn):

        def bound(*args, **kwargs):
            yield from fn(engine, *args, **kwargs)
    else:

        def bound(*args, **kwargs):
            return fn(engine, *args, **kwargs)

    bound.__name__, bound.__doc__ = fn.__name__, fn.__doc__
    # Gradio names an endpoint's API parameters after the function's: show fn's, less engine.
    bound.__signature__ = inspect.Signature(parameters)
    return wrap(bound)


def wire(engine: Engine, ui: dict, demo: gr.Blocks, gpu: Callable | None = None) -> None:
    """Every event of the studio; ``ui`` holds its components by name, ``gpu`` wraps the
    handlers that run the model (e.g. ``spaces.GPU``)."""
    gpu = gpu or _identity
    changes = _wire_runs(engine, gpu, ui, demo) + _wire_views(engine, ui)
    state = ui["state"]
    buttons = [ui[name] for name in ("refine", "undo", "play", "export")]
    buttons += [ui[name] for name in ("regenerate", "lock", "unlock")]
    for change in changes:
        change.then(handlers.button_states, state, buttons, **PRIVATE, **QUICK)
        change.then(
            bind(handlers.brush_view, engine),
            [state, ui["brush_open"]],
            ui["editor"],
            **PRIVATE,
            **QUICK,
        )
    # The Brush tab's canvas is sent when the tab opens, never while it is hidden.
    tabs = ("canvas_tab", "compare_tab", "gallery_tab", "upload_tab", "export_tab")
    for name in tabs:
        ui[name].select(lambda: False, None, ui["brush_open"], **PRIVATE, queue=False)
    ui["brush_tab"].select(lambda: True, None, ui["brush_open"], **PRIVATE, queue=False).then(
        bind(handlers.brush_view, engine),
        [state, ui["brush_open"]],
        ui["editor"],
        **PRIVATE,
        **QUICK,
    )


def model_queue(engine: Engine) -> dict:
    """The model events' queue options. With batching on, every request the engine's
    scheduler can hold is let through at once: they meet in its queue, which starts runs while
    there is room and steps them together, their forwards merged (app.batching). Letting
    only one batch's worth through would keep the scheduler from seeing most of what waits:
    with 16 sessions a limit of 8 gave a p95 first frame of 42.6 s, worse than no batching
    (36.1 s), and 32 gave 22.5 s (docs/results.md, "Sessions sharing batched runs")."""
    limit = engine.scheduler.max_queue if engine.batching else 1
    return STREAM | {"concurrency_limit": limit}


def _wire_runs(engine: Engine, gpu: Callable, ui: dict, demo: gr.Blocks) -> list:
    """The events that run the model; returns those that change what is shown."""
    state, seed = ui["state"], ui["seed"]
    view = [ui[name] for name in handlers.VIEW_OUTPUTS]
    # Settings travel by name (the handlers' **setting_values); heatmap and opacity follow them,
    # so an API call's positional order is: the endpoint's inputs, the settings, the look.
    named = ui["settings"] | {"heatmap": ui["heatmap"], "opacity": ui["opacity"]}
    model = lambda fn: bind(fn, engine, gpu)  # noqa: E731 (short local alias)
    stream = model_queue(engine)
    scored = [*view, ui["preview"]]

    ui["dice"].click(handlers.new_seed, None, seed, **PRIVATE)
    starts = [ui["generate"].click, ui["refine"].click, ui["regenerate"].click]
    # A narrow screen shows the canvas when a run starts; every start drops the old exports,
    # which belonged to the image that was shown.
    gr.on(starts, None, None, js=SHOW_CANVAS_JS, **PRIVATE)
    exports = [ui[name] for name in ("gif", "png", "trace_json", "gif_preview")]
    reloads = [ui["undo"].click, ui["trace_in"].upload, ui["gallery"].select]
    reloads += [ui["score"].click, ui["upload"].upload, ui["examples"].select]
    gr.on(starts + reloads, None, None, js=CLEAR_EXPORTS_JS, outputs=exports, **PRIVATE)
    runs = [
        ui["generate"].click(
            model(handlers.generate),
            [state, ui["class_name"], seed, ui["count"]],
            [*view, ui["gallery"]],
            inputs_kwargs=named,
            api_name="generate",
            **stream,
        ),
        ui["refine"].click(
            model(handlers.refine),
            [state, seed],
            view,
            inputs_kwargs=named,
            api_name="refine",
            **stream,
        ),
        ui["regenerate"].click(
            model(handlers.regenerate_region),
            [state, ui["editor"], ui["refine_inside"], seed],
            view,
            inputs_kwargs=named,
            api_name="regenerate_region",
            **stream,
        ),
        gr.on(
            [ui["score"].click, ui["upload"].upload],
            model(handlers.score_image),
            [state, ui["upload"], ui["upload_class"], seed],
            scored,
            inputs_kwargs=named,
            api_name="score_image",
            **stream,
        ),
    ]

    def score_example(state_value, fallback, seed_value, event: gr.SelectData, **values):
        return handlers.score_example(
            engine, state_value, event.index, fallback, seed_value, **values
        )

    runs.append(
        ui["examples"].select(
            gpu(score_example),
            [state, ui["upload_class"], seed],
            [*scored, ui["upload_class"]],
            inputs_kwargs=named,
            **PRIVATE,
            **stream,
        )
    )
    runs.append(
        ui["upload_class"].input(
            model(handlers.rescore),
            [state, ui["upload_class"], seed],
            scored,
            inputs_kwargs=named,
            **PRIVATE,
            **stream,
        )
    )

    def stop(request: gr.Request):
        """Stop this session's run after its current step (it ends normally, with what it made)."""
        session = getattr(request, "session_hash", None)
        STOPS.stop(session, expected=session_runs(demo, session, STREAMED) > 0)

    # A GPU wrapper (ZeroGPU's spaces.GPU) runs each handler in a forked worker, which this
    # process's stop flags cannot reach: there Stop also cancels the runs, as Gradio does.
    forked = {} if gpu is _identity else {"cancels": runs}
    ui["stop"].click(
        stop,
        None,
        None,
        api_name="stop",
        concurrency_id=STOP_GROUP,
        concurrency_limit=None,
        show_progress="hidden",
        **forked,
    )
    export = ui["export"].click(
        model(exporting.export),
        [state, ui["heat_side"], ui["duration"], ui["hold"], ui["opacity"]],  # as on the canvas
        [ui["gif"], ui["png"], ui["trace_json"], ui["status"]],
        api_name="export",
        **stream,
    )
    export.then(_pass_through, ui["gif"], ui["gif_preview"], **PRIVATE, **QUICK)
    return runs


def _wire_views(engine: Engine, ui: dict) -> list:
    """The events that only draw; returns those that change what is shown."""
    state = ui["state"]
    view = [ui[name] for name in handlers.VIEW_OUTPUTS]
    look = [ui["heatmap"], ui["opacity"]]
    quick = lambda fn: bind(fn, engine)  # noqa: E731
    # Scrubbing: .input fires on user moves only (not on the updates a stream sends), .release
    # when the thumb is let go (or the typed number left). always_last drops stale positions
    # while the user drags, and the handler never writes the slider back (see handlers.scrub).
    gr.on(
        [ui["timeline"].input, ui["timeline"].release],
        quick(handlers.scrub),
        [state, ui["timeline"], *look],
        view,
        api_name="scrub",
        trigger_mode="always_last",
        **QUICK,
    )
    gr.on(
        [ui["heatmap"].input, ui["opacity"].release],
        quick(handlers.scrub),
        [state, ui["timeline"], *look],
        view,
        **PRIVATE,
        **QUICK,
    )
    changes = [
        ui["lock"].click(
            quick(handlers.lock), [state, ui["editor"], *look], view, api_name="lock", **QUICK
        ),
        ui["unlock"].click(
            quick(handlers.unlock_all), [state, *look], view, api_name="unlock_all", **QUICK
        ),
        ui["undo"].click(quick(handlers.undo), [state, *look], view, api_name="undo", **QUICK),
        ui["trace_in"].upload(
            quick(exporting.load_trace),
            [state, ui["trace_in"], *look],
            view,
            api_name="load_trace",
            **QUICK,
        ),
    ]
    ui["play"].click(
        quick(exporting.play),
        [state, *look],
        view,
        api_name="play",
        show_progress="hidden",
        concurrency_limit=VIEW_CONCURRENCY,
    )

    def pick(state_value, heatmap, opacity, event: gr.SelectData):
        """Continue with the clicked image; the seed box shows its seed."""
        outputs = handlers.pick(engine, state_value, event.index, heatmap, opacity)
        new = outputs[handlers.VIEW_OUTPUTS.index("state")]
        if not isinstance(new, SessionState) or new.gallery is None:
            return (*outputs, gr.skip(), gr.skip())
        items = handlers.gallery_items(engine, new.gallery, new.shown)
        return (*outputs, new.gallery.seed + new.shown, items)

    outputs = [*view, ui["seed"], ui["gallery"]]
    changes.append(ui["gallery"].select(pick, [state, *look], outputs, **PRIVATE, **QUICK))
    # While the Brush tab is open its canvas follows the timeline once the thumb is let go.
    ui["timeline"].release(
        quick(handlers.brush_view),
        [state, ui["brush_open"], ui["timeline"]],
        ui["editor"],
        **PRIVATE,
        **QUICK,
    )
    return changes
