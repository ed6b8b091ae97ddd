"""``build_demo(engine)``: the studio's layout and wiring, nothing else.

Handlers live in ``app/handlers.py`` and ``app/exporting.py`` as plain functions of
(engine, state, widget values); here they are bound to the engine and to components. Every event
that runs the network shares one concurrency group, so the model serves one job at a time;
scrubbing and re-rendering use a separate, wider group and never wait behind a long run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import gradio as gr

from app import exporting, handlers
from app.engine import STUDIO_SETTINGS, Engine
from app.handlers import MAX_SEED
from app.serving import CACHE_SWEEP
from app.state import MAX_GALLERY, SessionState
from scan_core.sampling.settings import FIELDS, SettingField, model_sizes, resolve

MODEL_GROUP = "model"  # concurrency_id of every event that runs the transformer
VIEW_GROUP = "view"  # decoding + drawing only
VIEW_CONCURRENCY = 4
QUEUE_SIZE = 32
STREAM = {"show_progress": "minimal", "concurrency_id": MODEL_GROUP, "concurrency_limit": 1}
QUICK = {
    "show_progress": "hidden",
    "concurrency_id": VIEW_GROUP,
    "concurrency_limit": VIEW_CONCURRENCY,
}
READY = "Pick a class and a seed, then **Generate**."
IMAGE_HEIGHT = 448  # the canvas box; images are scaled up to fill it (NEAREST, see CSS)
PLOT_HEIGHT = 270
PREVIEW_HEIGHT = 320
CSS = """
#canvas img, #plot img, #gif_preview img { width: 100%; height: 100%; object-fit: contain; }
#canvas img { image-rendering: pixelated; }
#status { padding: 6px 12px; border-left: 4px solid var(--color-accent);
          background: var(--block-background-fill); border-radius: 4px; font-size: 1.05em; }
#studio-css { display: none; }
"""
HELP = (
    "**Generate** watches SCAN paint the grid set by set, then refine it: red boxes are the "
    "patches a round looked at, green the ones it replaced. Drag the **timeline** to any step; "
    "Refine / Regenerate / Lock continue from the step shown (a branch), and **Undo** goes back."
)


def _identity(fn: Callable) -> Callable:
    return fn


def _pass_through(value):
    return value


def bind(fn: Callable, engine: Engine, wrap: Callable = _identity) -> Callable:
    """``fn(engine, ...)`` -> ``f(...)``, keeping generator-ness (Gradio streams those)."""
    if inspect.isgeneratorfunction(fn):

        def bound(*args, **kwargs):
            yield from fn(engine, *args, **kwargs)
    else:

        def bound(*args, **kwargs):
            return fn(engine, *args, **kwargs)

    bound.__name__, bound.__doc__ = fn.__name__, fn.__doc__
    # Gradio names an endpoint's API parameters after the function's: show fn's, less engine.
    parameters = list(inspect.signature(fn).parameters.values())[1:]
    bound.__signature__ = inspect.Signature(parameters)
    return wrap(bound)


def _header(engine: Engine) -> str:
    bundle, config = engine.bundle, engine.bundle.model.config
    facts = (
        f"model `{bundle.model_id}` · {config.grid_size}×{config.grid_size} codes · "
        f"{engine.image_size}px · {config.num_classes} classes · {engine.device.type}"
    )
    notes = "".join(f"\n\n> ⚠️ **{note}**" for note in bundle.notes)
    return f"# SCAN Studio\n{facts}{card_summary(bundle.card)}{notes}\n\n{HELP}"


def card_summary(card: dict | None) -> str:
    """One line from the model card: its name, what refinement did to FD, where to read more."""
    if not card:
        return ""
    parts = [str(card.get("name", "model card"))]
    scores = card.get("evaluation") or {}
    if scores.get("fd_t0") and scores.get("fd_refined") is not None:
        change = 100 * (scores["fd_refined"] / scores["fd_t0"] - 1)
        parts.append(f"refinement (T={scores.get('refined_T')}) changed FD by {change:+.0f}%")
    if card.get("note"):
        parts.append(str(card["note"]))
    if card.get("card"):
        parts.append(f"model card: `{card['card']}`")
    return "\n\n" + " · ".join(parts)


def setting_control(field: SettingField, value, sizes: dict[str, int]) -> gr.components.Component:
    """The studio's control for one sampler setting, from its row of the settings table."""
    common = {"value": value, "label": field.label, "info": field.help, "elem_id": field.name}
    if field.control == "checkbox":
        return gr.Checkbox(**common)
    if field.control == "radio":
        return gr.Radio(list(field.choices), **common)
    low = resolve(field.low, sizes)
    if field.low_open:  # the slider's end must be a valid value
        low += field.step
    high = resolve(field.high if field.ui_high is None else field.ui_high, sizes)
    if field.control == "number":
        precision = 0 if field.kind is int else None
        return gr.Number(minimum=low, maximum=high, precision=precision, **common)
    return gr.Slider(low, max(high, low + field.step), step=field.step, **common)


def _sampler_controls(engine: Engine) -> dict[str, gr.components.Component]:
    """``STUDIO_SETTINGS``' controls by setting name, set to the model card's values."""
    defaults, vocab = engine.default_settings(), engine.bundle.model.config.vocab_size
    sizes = model_sizes(engine.num_tokens, vocab)
    return {
        name: setting_control(FIELDS[name], getattr(defaults, name), sizes)
        for name in STUDIO_SETTINGS
    }


def _feedback() -> dict:
    """Status line, replay and timeline, above the tabs: every action reports here, whichever
    tab the user is on (Brush, Export, ...)."""
    with gr.Row(equal_height=True):
        status = gr.Markdown(READY, elem_id="status")
        play = gr.Button("▶ Replay", size="sm", scale=0, min_width=110, elem_id="play")
    timeline = gr.Slider(0, 1, value=0, step=1, label="timeline (step)", elem_id="timeline")
    return {"status": status, "timeline": timeline, "play": play}


def _canvas_tab() -> dict:
    with gr.Tab("Canvas"):
        image = gr.Image(
            label="image · quality heatmap",
            format="png",
            interactive=False,
            height=IMAGE_HEIGHT,
            elem_id="canvas",
        )
        with gr.Row():
            heatmap = gr.Checkbox(True, label="quality heatmap beside the image", elem_id="heatmap")
            opacity = gr.Slider(
                0,
                1,
                value=1.0,
                step=0.05,
                elem_id="opacity",
                label="heatmap opacity (lower: see the image through)",
            )
        # The figure has its own title and legend; Gradio's floating label would cover them.
        plot = gr.Image(
            label="quality score per step",
            show_label=False,
            buttons=[],
            format="png",
            interactive=False,
            height=PLOT_HEIGHT,
            elem_id="plot",
        )
    return {"image": image, "heatmap": heatmap, "opacity": opacity, "plot": plot}


def _edit_tabs() -> dict:
    with gr.Tab("Brush"):
        gr.Markdown("Paint patches, then **Regenerate** them (forced) or **Lock** them.")
        editor = gr.ImageEditor(
            type="numpy",
            image_mode="RGBA",
            layers=False,
            transforms=(),
            sources=(),
            format="png",
            height=IMAGE_HEIGHT,
            elem_id="editor",
            brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"),
            eraser=gr.Eraser(),
            label="brush",
        )
        refine_inside = gr.Checkbox(False, label="keep refining inside the region")
        with gr.Row():
            regenerate = gr.Button("Regenerate region", variant="primary", elem_id="regenerate")
            lock = gr.Button("Lock region")
            unlock = gr.Button("Unlock all")
    with gr.Tab("Compare"):
        compare = gr.ImageSlider(
            label="first full image | shown step",
            format="png",
            interactive=False,
            height=IMAGE_HEIGHT,
            elem_id="compare",
        )
    with gr.Tab("Gallery"):
        gallery = gr.Gallery(
            label="click one to continue with it",
            format="png",
            columns=4,
            allow_preview=False,
            elem_id="gallery",
        )
    with gr.Tab("Upload"):
        # gr.File, not gr.Image: gr.Image decodes the upload itself (no pixel limit, and a
        # broken file fails before our handler); load_image checks the size from the header.
        upload = gr.File(
            label="any image: centre-cropped, tokenized, scored",
            file_types=["image"],
            type="filepath",
            elem_id="upload",
        )
        score = gr.Button("Score this image", variant="primary")
    return {
        "editor": editor,
        "refine_inside": refine_inside,
        "regenerate": regenerate,
        "lock": lock,
        "unlock": unlock,
        "compare": compare,
        "gallery": gallery,
        "upload": upload,
        "score": score,
    }


def _export_tab() -> dict:
    with gr.Tab("Export"):
        with gr.Row():
            heat_side = gr.Checkbox(True, label="heatmap side by side")
            duration = gr.Slider(20, 1000, value=120, step=10, label="ms per frame")
            hold = gr.Slider(0, 5000, value=1500, step=100, label="hold last frame (ms)")
        export = gr.Button("Export GIF + PNG + trace", variant="primary", elem_id="export")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                gif = gr.File(label="timeline GIF", elem_id="gif")
                png = gr.File(label="final PNG", elem_id="png")
                trace_json = gr.File(label="trace JSON", elem_id="trace_json")
            gif_preview = gr.Image(
                label="timeline GIF preview",
                interactive=False,
                scale=2,
                height=PREVIEW_HEIGHT,
                elem_id="gif_preview",
            )
        trace_in = gr.File(
            label="load a trace JSON to replay", file_types=[".json"], type="filepath", height=120
        )
    return {
        "heat_side": heat_side,
        "duration": duration,
        "hold": hold,
        "export": export,
        "gif": gif,
        "png": png,
        "trace_json": trace_json,
        "gif_preview": gif_preview,
        "trace_in": trace_in,
    }


def _controls(engine: Engine) -> dict:
    """The left column: what to generate and the run buttons first, sampler settings folded."""
    names = engine.bundle.class_names
    class_name = gr.Dropdown(names, value=names[0], label="class", elem_id="class")
    with gr.Row(equal_height=True):
        seed = gr.Number(
            0,
            precision=0,
            minimum=0,
            maximum=MAX_SEED,
            label="seed",
            elem_id="seed",
            scale=1,
            min_width=100,
        )
        # Text, not only "🎲": headless browsers and CI images often have no emoji font.
        dice = gr.Button("random seed", size="md", scale=1, min_width=120, elem_id="dice")
    with gr.Row():
        generate = gr.Button("Generate", variant="primary", elem_id="generate")
        stop = gr.Button("Stop", variant="stop", scale=0, min_width=80, elem_id="stop")
    refine = gr.Button("Refine more (from the shown step)", elem_id="refine")
    undo = gr.Button("Undo", elem_id="undo")
    count = gr.Slider(1, MAX_GALLERY, value=1, step=1, label="images (seeds seed, seed+1, …)")
    with gr.Accordion("sampler settings", open=False):
        settings = _sampler_controls(engine)
    return {
        "class_name": class_name,
        "seed": seed,
        "dice": dice,
        "count": count,
        "settings": settings,
        "generate": generate,
        "stop": stop,
        "refine": refine,
        "undo": undo,
    }


def build_demo(engine: Engine, gpu: Callable = _identity) -> gr.Blocks:
    """The studio for ``engine``; ``gpu`` wraps model-running handlers (e.g. ``spaces.GPU``)."""
    with gr.Blocks(title="SCAN Studio", delete_cache=CACHE_SWEEP) as demo:
        # Gradio 6 takes page CSS only in launch(), which the launcher and tests own; a style
        # element keeps the layout's own CSS with the layout.
        gr.HTML(f"<style>{CSS}</style>", js_on_load=None, padding=False, elem_id="studio-css")
        state = gr.State(SessionState())
        gr.Markdown(_header(engine), elem_id="header")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                ui = _controls(engine)
            with gr.Column(scale=3):
                ui |= _feedback()
                with gr.Tabs():
                    ui |= _canvas_tab() | _edit_tabs() | _export_tab()
        _wire(engine, gpu, ui | {"state": state})
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return demo


def _wire(engine: Engine, gpu: Callable, ui: dict) -> None:
    state, seed = ui["state"], ui["seed"]
    view = [ui[name] for name in handlers.VIEW_OUTPUTS]
    look = [ui["heatmap"], ui["opacity"]]
    # Settings travel by name (the handlers' **setting_values); heatmap and opacity follow them,
    # so an API call's positional order is: the endpoint's inputs, the settings, the look.
    named = ui["settings"] | {"heatmap": ui["heatmap"], "opacity": ui["opacity"]}
    model = lambda fn: bind(fn, engine, gpu)  # noqa: E731 (short local alias)
    quick = lambda fn: bind(fn, engine)  # noqa: E731

    ui["dice"].click(handlers.new_seed, None, seed, api_visibility="private")
    runs = [
        ui["generate"].click(
            model(handlers.generate),
            [state, ui["class_name"], seed, ui["count"]],
            [*view, ui["gallery"]],
            inputs_kwargs=named,
            api_name="generate",
            **STREAM,
        ),
        ui["refine"].click(
            model(handlers.refine),
            [state, seed],
            view,
            inputs_kwargs=named,
            api_name="refine",
            **STREAM,
        ),
        ui["regenerate"].click(
            model(handlers.regenerate_region),
            [state, ui["editor"], ui["refine_inside"], seed],
            view,
            inputs_kwargs=named,
            api_name="regenerate_region",
            **STREAM,
        ),
        gr.on(
            [ui["score"].click, ui["upload"].upload],
            model(handlers.score_image),
            [state, ui["upload"], ui["class_name"], seed],
            view,
            inputs_kwargs=named,
            api_name="score_image",
            **STREAM,
        ),
    ]
    # A stopped stream keeps what it streamed: the state holds the partial (valid) trace.
    ui["stop"].click(None, None, None, cancels=runs, api_visibility="private")
    ui["export"].click(
        model(exporting.export),
        [state, ui["heat_side"], ui["duration"], ui["hold"]],
        [ui["gif"], ui["png"], ui["trace_json"], ui["status"]],
        api_name="export",
        **STREAM,
    ).then(_pass_through, ui["gif"], ui["gif_preview"], api_visibility="private", **QUICK)
    # Scrubbing: .input fires on user moves only (not on the updates a stream sends), and
    # always_last drops stale positions while the user drags.
    ui["timeline"].input(
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
        api_visibility="private",
        **QUICK,
    )
    ui["lock"].click(
        quick(handlers.lock), [state, ui["editor"], *look], view, api_name="lock", **QUICK
    )
    ui["unlock"].click(
        quick(handlers.unlock_all), [state, *look], view, api_name="unlock_all", **QUICK
    )
    ui["undo"].click(quick(handlers.undo), [state, *look], view, api_name="undo", **QUICK)
    ui["play"].click(
        quick(exporting.play),
        [state, *look],
        view,
        api_name="play",
        show_progress="hidden",
        concurrency_limit=VIEW_CONCURRENCY,
    )
    ui["trace_in"].upload(
        quick(exporting.load_trace),
        [state, ui["trace_in"], *look],
        view,
        api_name="load_trace",
        **QUICK,
    )

    def pick(state_value, heatmap, opacity, event: gr.SelectData):
        return handlers.pick(engine, state_value, event.index, heatmap, opacity)

    ui["gallery"].select(pick, [state, *look], view, api_visibility="private", **QUICK)
