"""``build_demo(engine)``: the studio's layout and wiring, nothing else.

Handlers live in ``app/handlers.py`` and ``app/exporting.py`` as plain functions of
(engine, state, widget values); here they are bound to the engine and to components. Every event
that runs the network shares one concurrency group, so the model serves one job at a time;
scrubbing and re-rendering use a separate, wider group and never wait behind a long run, and
Stop has a group of its own, so it reaches a run at once.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from app import exporting, handlers
from app.engine import ROOT, STUDIO_SETTINGS, Engine
from app.handlers import MAX_SEED
from app.serving import CACHE_SWEEP, STOPS, session_runs
from app.state import MAX_GALLERY, SessionState
from scan_core.sampling.settings import FIELDS, SettingField, model_sizes, resolve

MODEL_GROUP = "model"  # concurrency_id of every event that runs the transformer
VIEW_GROUP = "view"  # decoding + drawing only
STOP_GROUP = "stop"  # Stop must never wait behind the run it stops
VIEW_CONCURRENCY = 4
QUEUE_SIZE = 32
STREAM = {"show_progress": "minimal", "concurrency_id": MODEL_GROUP, "concurrency_limit": 1}
QUICK = {
    "show_progress": "hidden",
    "concurrency_id": VIEW_GROUP,
    "concurrency_limit": VIEW_CONCURRENCY,
}
PRIVATE = {"api_visibility": "private"}
STREAMED = ("generate", "refine", "regenerate_region")  # the runs Stop can stop
READY = (
    "Nothing made yet: pick a class and a seed, then **Generate**, or score one of the example "
    "images on the **Upload** tab."
)
IMAGE_HEIGHT = 448  # the canvas box; images are scaled up to fill it (NEAREST, see CSS)
PLOT_HEIGHT = 270
PREVIEW_HEIGHT = 320
EXAMPLES_DIR = ROOT / "assets" / "examples"
# The example images and the category each belongs to (assets/examples/ATTRIBUTION.md).
EXAMPLES = (
    ("emoji_hot_face.png", "Smileys & Emotion"),
    ("emoji_frog.png", "Animals & Nature"),
    ("emoji_sushi.png", "Food & Drink"),
    ("emoji_taxi.png", "Travel & Places"),
    ("emoji_balloon.png", "Activities"),
    ("emoji_gem_stone.png", "Objects"),
)
NARROW_PX = 720  # below this width the page is one column (phones)
CSS = f"""
#canvas img, #plot img, #gif_preview img, #upload_preview img {{
    width: 100%; height: 100%; object-fit: contain; }}
#canvas img, #upload_preview img {{ image-rendering: pixelated; }}
#status {{ padding: 6px 12px; border-left: 4px solid var(--color-accent);
          background: var(--block-background-fill); border-radius: 4px; font-size: 1.05em; }}
#studio-css {{ display: none; }}
@media (max-width: {NARROW_PX}px) {{
    /* one column: the run buttons, then what they make, then the rest of the controls */
    #main {{ flex-direction: column; }}
    #controls {{ display: contents; }}
    #run {{ order: 1; }}
    #view {{ order: 2; }}
    #more {{ order: 3; }}
}}
"""
# On a phone the canvas is below the controls: bring it into view when a run starts.
SHOW_CANVAS_JS = f"""() => {{
    if (window.innerWidth <= {NARROW_PX}) {{
        document.querySelector('#status')?.scrollIntoView({{behavior: 'smooth', block: 'start'}});
    }}
}}"""
CLEAR_EXPORTS_JS = "() => [null, null, null, null]"
HELP = (
    "**Generate** watches SCAN paint the grid set by set, then refine it. Boxes mark what the "
    "shown step did: **blue** the set of patches it just drew, **red** the patches a refinement "
    "round looked at, **green** the ones it replaced, **orange** a region you had redrawn, and "
    "**violet** the patches you locked. Drag the **timeline** to any step; Refine / Regenerate "
    "/ Lock continue from the step shown (a branch), and **Undo** goes back."
)


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


def example_class(names: list[str], category: str, fallback: str) -> str:
    """The class an example image belongs to: the Noto class of its category when the model
    has one (the examples are Noto emoji), else any class of that category, else ``fallback``."""
    matches = [name for name in names if name.endswith(category)]
    noto = [name for name in matches if name.startswith("Noto")]
    return (noto or matches or [fallback])[0]


def example_images() -> list[tuple[np.ndarray, str]]:
    """The example images (as pixels, so they are served from Gradio's cache wherever the
    studio was started) with their names."""
    items = []
    for name, _ in EXAMPLES:
        with Image.open(EXAMPLES_DIR / name) as image:
            items.append(
                (np.asarray(image.convert("RGBA")), Path(name).stem.removeprefix("emoji_"))
            )
    return items


def _feedback() -> dict:
    """Status line, replay and timeline, above the tabs: every action reports here, whichever
    tab the user is on (Brush, Export, ...)."""
    with gr.Row(equal_height=True):
        status = gr.Markdown(READY, label="status", elem_id="status")
        play = gr.Button(
            "▶ Replay", size="sm", scale=0, min_width=110, interactive=False, elem_id="play"
        )
    timeline = gr.Slider(
        0, 1, value=0, step=1, label="timeline (step)", buttons=[], elem_id="timeline"
    )
    return {"status": status, "timeline": timeline, "play": play}


def _canvas_tab(engine: Engine) -> dict:
    with gr.Tab("Canvas", id="canvas") as tab:
        first, plot_value = handlers.first_frame(engine)
        image = gr.Image(
            first,
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
            plot_value,
            label="quality score per step",
            show_label=False,
            buttons=[],
            format="png",
            interactive=False,
            height=PLOT_HEIGHT,
            elem_id="plot",
        )
    return {"canvas_tab": tab, "image": image, "heatmap": heatmap, "opacity": opacity, "plot": plot}


def _brush_tab() -> dict:
    with gr.Tab("Brush", id="brush", elem_id="brush_tab") as tab:
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
            regenerate = gr.Button(
                "Regenerate region", variant="primary", interactive=False, elem_id="regenerate"
            )
            lock = gr.Button("Lock region", interactive=False, elem_id="lock")
            unlock = gr.Button("Unlock all", interactive=False, elem_id="unlock")
    return {
        "brush_tab": tab,
        "editor": editor,
        "refine_inside": refine_inside,
        "regenerate": regenerate,
        "lock": lock,
        "unlock": unlock,
    }


def _view_tabs() -> dict:
    with gr.Tab("Compare", id="compare") as compare_tab:
        compare = gr.ImageSlider(
            label="first full image | shown step",
            format="png",
            interactive=False,
            height=IMAGE_HEIGHT,
            elem_id="compare",
        )
    with gr.Tab("Gallery", id="gallery") as gallery_tab:
        gallery = gr.Gallery(
            label="every image of the last run: click one to continue with it",
            format="png",
            columns=4,
            height=300,
            object_fit="contain",
            allow_preview=False,
            elem_id="gallery",
        )
    return {
        "compare_tab": compare_tab,
        "compare": compare,
        "gallery_tab": gallery_tab,
        "gallery": gallery,
    }


def _upload_tab(engine: Engine) -> dict:
    names = engine.bundle.class_names
    with gr.Tab("Upload", id="upload_tab") as tab:
        gr.Markdown(
            f"Drop any image, or click an example: it is fitted to the model's "
            f"{engine.image_size}×{engine.image_size} input, tokenized and scored. Refine then "
            "improves it **under the class chosen here**."
        )
        with gr.Row():
            # gr.File, not gr.Image: gr.Image decodes the upload itself (no pixel limit, and a
            # broken file fails before our handler); load_image checks the size from the header.
            upload = gr.File(
                label="your image",
                file_types=["image"],
                type="filepath",
                height=140,
                elem_id="upload",
            )
            with gr.Column():
                upload_class = gr.Dropdown(
                    names,
                    value=names[0],
                    label="score and refine it under this class",
                    elem_id="upload_class",
                )
                score = gr.Button("Score this image", variant="primary", elem_id="score")
        examples = gr.Gallery(
            example_images(),
            label="examples: click one to score it",
            format="png",
            columns=len(EXAMPLES),
            height=150,
            object_fit="contain",
            allow_preview=False,
            buttons=[],
            elem_id="examples",
        )
        preview = gr.Image(
            label="scored: image · quality heatmap",
            format="png",
            interactive=False,
            height=PREVIEW_HEIGHT,
            elem_id="upload_preview",
        )
    return {
        "upload_tab": tab,
        "upload": upload,
        "upload_class": upload_class,
        "score": score,
        "examples": examples,
        "preview": preview,
    }


def _export_tab() -> dict:
    with gr.Tab("Export", id="export_tab") as tab:
        with gr.Row():
            heat_side = gr.Checkbox(True, label="heatmap side by side")
            duration = gr.Slider(20, 1000, value=120, step=10, label="ms per frame")
            hold = gr.Slider(0, 5000, value=1500, step=100, label="hold last frame (ms)")
        export = gr.Button(
            "Export GIF + PNG + trace", variant="primary", interactive=False, elem_id="export"
        )
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
            label="load a trace JSON to replay",
            file_types=[".json"],
            type="filepath",
            height=120,
            elem_id="trace_in",
        )
    return {
        "export_tab": tab,
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


def _run_controls(engine: Engine) -> dict:
    """What to generate and the run buttons: first on every screen."""
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
    return {
        "class_name": class_name,
        "seed": seed,
        "dice": dice,
        "generate": generate,
        "stop": stop,
    }


def _more_controls(engine: Engine) -> dict:
    """Continue, undo, how many images, and the sampler settings (folded)."""
    refine = gr.Button("Refine more (from the shown step)", interactive=False, elem_id="refine")
    undo = gr.Button("Undo", interactive=False, elem_id="undo")
    count = gr.Slider(
        1, MAX_GALLERY, value=1, step=1, label="images (seeds seed, seed+1, …)", elem_id="count"
    )
    with gr.Accordion("sampler settings", open=False):
        settings = _sampler_controls(engine)
    return {"refine": refine, "undo": undo, "count": count, "settings": settings}


def build_demo(engine: Engine, gpu: Callable = _identity) -> gr.Blocks:
    """The studio for ``engine``; ``gpu`` wraps model-running handlers (e.g. ``spaces.GPU``)."""
    with gr.Blocks(title="SCAN Studio", delete_cache=CACHE_SWEEP) as demo:
        # Gradio 6 takes page CSS only in launch(), which the launcher and tests own; a style
        # element keeps the layout's own CSS with the layout.
        gr.HTML(f"<style>{CSS}</style>", js_on_load=None, padding=False, elem_id="studio-css")
        state = gr.State(SessionState())
        brush_open = gr.State(False)
        gr.Markdown(_header(engine), elem_id="header")
        with gr.Row(elem_id="main"):
            with gr.Column(scale=1, min_width=280, elem_id="controls"):
                with gr.Column(elem_id="run"):
                    ui = _run_controls(engine)
                with gr.Column(elem_id="more"):
                    ui |= _more_controls(engine)
            with gr.Column(scale=3, elem_id="view"):
                ui |= _feedback()
                # "wrap": on a phone every tab stays in sight (the default hides some in "…")
                with gr.Tabs(overflow_behavior="wrap", elem_id="tabs"):
                    ui |= _canvas_tab(engine) | _brush_tab() | _view_tabs()
                    ui |= _upload_tab(engine) | _export_tab()
        ui |= {"state": state, "brush_open": brush_open}
        _wire(engine, gpu, ui, demo)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return demo


def _wire(engine: Engine, gpu: Callable, ui: dict, demo: gr.Blocks) -> None:
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


def _wire_runs(engine: Engine, gpu: Callable, ui: dict, demo: gr.Blocks) -> list:
    """The events that run the model; returns those that change what is shown."""
    state, seed = ui["state"], ui["seed"]
    view = [ui[name] for name in handlers.VIEW_OUTPUTS]
    # Settings travel by name (the handlers' **setting_values); heatmap and opacity follow them,
    # so an API call's positional order is: the endpoint's inputs, the settings, the look.
    named = ui["settings"] | {"heatmap": ui["heatmap"], "opacity": ui["opacity"]}
    model = lambda fn: bind(fn, engine, gpu)  # noqa: E731 (short local alias)
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
            [state, ui["upload"], ui["upload_class"], seed],
            scored,
            inputs_kwargs=named,
            api_name="score_image",
            **STREAM,
        ),
    ]

    def score_example(state_value, fallback, seed_value, event: gr.SelectData, **values):
        name, category = EXAMPLES[event.index]
        chosen = example_class(engine.bundle.class_names, category, fallback)
        outputs = handlers.score_image(
            engine, state_value, EXAMPLES_DIR / name, chosen, seed_value, **values
        )
        return (*outputs, chosen)

    runs.append(
        ui["examples"].select(
            gpu(score_example),
            [state, ui["upload_class"], seed],
            [*scored, ui["upload_class"]],
            inputs_kwargs=named,
            **PRIVATE,
            **STREAM,
        )
    )
    runs.append(
        ui["upload_class"].input(
            model(handlers.rescore),
            [state, ui["upload_class"], seed],
            scored,
            inputs_kwargs=named,
            **PRIVATE,
            **STREAM,
        )
    )

    def stop(request: gr.Request):
        """Stop this session's run after its current step (it ends normally, with what it made)."""
        session = getattr(request, "session_hash", None)
        STOPS.stop(session, expected=session_runs(demo, session, STREAMED) > 0)

    ui["stop"].click(
        stop,
        None,
        None,
        api_name="stop",
        concurrency_id=STOP_GROUP,
        concurrency_limit=None,
        show_progress="hidden",
    )
    export = ui["export"].click(
        model(exporting.export),
        [state, ui["heat_side"], ui["duration"], ui["hold"]],
        [ui["gif"], ui["png"], ui["trace_json"], ui["status"]],
        api_name="export",
        **STREAM,
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
