"""``build_demo(engine)``: the studio's layout, nothing else.

Handlers live in ``app/handlers.py`` and ``app/exporting.py`` as plain functions of
(engine, state, widget values); ``app/wiring.py`` binds them to the engine and to the
components laid out here, which it gets by name. On a narrow screen (a phone) the page is one
column: the run buttons, then the status, timeline and canvas, then the other controls; the tabs
wrap instead of hiding behind "…".
"""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from app import handlers
from app.engine import STUDIO_SETTINGS, Engine
from app.handlers import EXAMPLES, MAX_SEED, example_images
from app.render import HEAT_END_NAMES, score_words
from app.serving import CACHE_SWEEP
from app.state import MAX_GALLERY, SessionState
from app.wiring import MODEL_GROUP, NARROW_PX, bind, wire
from scan_core.sampling.settings import FIELDS, SCORERS, SettingField, model_sizes, resolve

__all__ = [
    "MODEL_GROUP",
    "QUEUE_SIZE",
    "bind",
    "build_demo",
    "card_summary",
    "scorer_choices",
    "setting_control",
]

QUEUE_SIZE = 32
READY = (
    "Nothing made yet: pick a class and a seed, then **Generate**, or score one of the example "
    "images on the **Upload** tab."
)
IMAGE_HEIGHT = 448  # the canvas box; images are scaled up to fill it (NEAREST, see CSS)
PLOT_HEIGHT = 270
PREVIEW_HEIGHT = 320
CSS = f"""
#canvas img, #plot img, #gif_preview img, #upload_preview img {{
    width: 100%; height: 100%; object-fit: contain; }}
#canvas img, #upload_preview img {{ image-rendering: pixelated; }}
#status {{ padding: 6px 12px; border-left: 4px solid var(--color-accent);
          background: var(--block-background-fill); border-radius: 4px; font-size: 1.05em; }}
#studio-css {{ display: none; }}
/* actions that cannot act now fade, so the live ones stand out */
button:disabled {{ opacity: 0.4 !important; cursor: not-allowed; }}
@media (max-width: {NARROW_PX}px) {{
    /* one column: the run buttons, then what they make, then the rest of the controls */
    #main {{ flex-direction: column; }}
    #controls {{ display: contents; }}
    #run {{ order: 1; }}
    #view {{ order: 2; }}
    #more {{ order: 3; }}
    /* the status grows while a run streams: keep it in place, not the canvas below it */
    html, body {{ overflow-anchor: none; }}
    /* boxes as tall as their picture, not the desktop's fixed height */
    #canvas, #plot, #upload_preview {{ height: auto !important; }}
    #canvas img, #plot img, #upload_preview img {{ height: auto; }}
}}
"""
HELP = (
    "**Generate** watches SCAN paint the grid set by set, then refine it. Boxes mark what the "
    "shown step did: **blue** the set of patches it just drew, **red** the patches a refinement "
    "round looked at, **green** the ones it replaced, **orange** a region you had redrawn, and "
    "**violet** the patches you locked. Drag the **timeline** to any step; Refine / Regenerate "
    "/ Lock continue from the step shown (a branch), and **Undo** goes back."
)


def _header(engine: Engine) -> str:
    bundle, config = engine.bundle, engine.bundle.model.config
    facts = (
        f"model `{bundle.model_id}` · {config.grid_size}×{config.grid_size} codes · "
        f"{engine.image_size}px · {config.num_classes} classes · {engine.device.type}, "
        f"{str(engine.dtype).removeprefix('torch.')}"
    )
    notes = "".join(f"\n\n> ⚠️ **{note}**" for note in bundle.notes)
    summary = card_summary(bundle.card)
    return f"# SCAN Studio\n{facts}{summary}{notes}\n\n{scorer_line(engine)}\n\n{HELP}"


def scorer_choices(engine: Engine) -> list[tuple[str, str]]:
    """The scorer control's (label, value) choices: "auto" labelled with what it means here,
    and "head" only for a model whose quality head is trained (RandAR files have none)."""
    auto = engine.auto_scorer
    offered = [name for name in SCORERS if name != "head" or auto == "head"]
    return [(f"auto ({auto})", "auto"), *((name, name) for name in offered)]


def scorer_line(engine: Engine) -> str:
    """Which scorer colours the heatmap by default, and what its colours mean."""
    scorer = engine.auto_scorer
    words, (dark, bright) = score_words(scorer), HEAT_END_NAMES
    why = "" if scorer == "head" else " (this model has no trained quality head)"
    return (
        f"Heatmap scores: **{words.source}**{why}; **{dark}** = {words.high}, "
        f"**{bright}** = {words.low}, grey hatch = not scored. The **scorer** sampler setting "
        "chooses it; the legend under each image names the scorer that made its scores."
    )


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


def setting_control(
    field: SettingField, value, sizes: dict[str, int], choices: list | None = None
) -> gr.components.Component:
    """The studio's control for one sampler setting, from its row of the settings table;
    ``choices`` (values or (label, value) pairs) narrows a radio's to what the model offers."""
    common = {"value": value, "label": field.label, "info": field.help, "elem_id": field.name}
    if field.control == "checkbox":
        return gr.Checkbox(**common)
    if field.control == "radio":
        return gr.Radio(list(field.choices if choices is None else choices), **common)
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
    controls = {}
    for name in STUDIO_SETTINGS:
        value, choices = getattr(defaults, name), None
        if name == "scorer":
            choices = scorer_choices(engine)
            value = value if value in [v for _, v in choices] else "auto"
        controls[name] = setting_control(FIELDS[name], value, sizes, choices)
    return controls


def _feedback() -> dict:
    """Status line, replay and timeline, above the tabs: every action reports here, whichever
    tab the user is on (Brush, Export, ...)."""
    with gr.Row(elem_id="feedback"):
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
        # No floating label: it covered the image's corner (the API still names the output).
        image = gr.Image(
            first,
            label="image · quality heatmap",
            show_label=False,
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
            fit_columns=False,  # one image is one small tile, not a cropped full-width one
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


def build_demo(engine: Engine, gpu: Callable | None = None) -> gr.Blocks:
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
        wire(engine, ui, demo, gpu)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return demo
