"""What comes into the studio's handlers, and what goes back when it is wrong.

Widget and API values are checked here (settings by name, seeds, opacity, brush canvases,
uploaded files, with the limits a public server needs), and :func:`guarded` turns any error
into a warning toast plus a status line, the file's own name standing for any server path.
``fit_note`` says in one line what fitting an uploaded image to the model did to it.
No studio state and no drawing here; ``app/handlers.py`` re-exports what other modules use.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from app.batching import BusyError
from app.engine import Engine
from app.render import brush_mask, mask_to_grid
from scan_core import CheckpointError, TraceError
from scan_core.sampling.setting_inputs import number_from, settings_from_values
from scan_core.sampling.settings import SamplerSettings, short_repr

log = logging.getLogger(__name__)

VIEW_OUTPUTS = ("image", "compare", "plot", "timeline", "status", "state", "editor")
STATUS_INDEX = VIEW_OUTPUTS.index("status")
EXPECTED_ERRORS = (ValueError, TraceError, CheckpointError, OSError)
MAX_SEED = 2**31 - 1
# Limits for settings whose own range is open, as they reach the handlers through the API where
# no slider bounds them: wider than the UI's sliders (the UI never trips them), narrow enough that
# one request can neither tie the model up for minutes nor allocate a huge cache.
REQUEST_LIMITS = {"num_rounds": 200, "cfg_scale": 20.0, "temperature": 5.0, "tokens_per_round": "N"}
MIN_TEMPERATURE = 0.01  # except 0 (greedy): logits / T overflows float32 for tiny T
MAX_UPLOAD_BYTES = 20 * 2**20  # also gradio's max_file_size (app/serving.py)
MAX_UPLOAD_PIXELS = 24_000_000  # a 24 MP photo; also Pillow's limit when serving
# An absolute path inside a message (a file name follows the last separator). Not "4/4": the
# first separator must start a word.
PATH_PATTERN = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[/\\](?:[^\s'\"/\\]+[/\\])*([^\s'\"/\\]+)")


# ------------------------------------------------------------------------------ error guard


def _failure(count: int, status_index: int, message: str) -> tuple:
    outputs = [gr.skip()] * count
    outputs[status_index] = f"⚠️ {message}"
    return tuple(outputs)


def without_paths(message: str) -> str:
    """``message`` with every absolute path cut to its file name: users see "frog.png", never
    where the server keeps their upload (or anything else on its disk)."""
    return PATH_PATTERN.sub(r"\1", message)


def _report(error: Exception) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        log.error("disk full: %s", error)
        message = "the server's disk is full: nothing was saved; try again later"
    elif isinstance(error, EXPECTED_ERRORS):
        message = str(error) or type(error).__name__
    else:  # a bug: keep the traceback in the server log, show one line to the user
        log.exception("handler failed")
        message = f"internal error ({type(error).__name__}: {error}); see the server log"
    message = without_paths(message)
    gr.Warning(message)
    return message


def guarded(count: int = len(VIEW_OUTPUTS), status_index: int = STATUS_INDEX):
    """Turn any exception into a warning + status line, for plain and generator handlers."""

    def decorate(fn):
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def stream(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except BusyError as error:  # the scheduler's full queue: Gradio's own refusal
                    raise gr.Error(str(error)) from None
                except Exception as error:  # noqa: BLE001 (reported, never re-raised)
                    yield _failure(count, status_index, _report(error))

            return stream

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as error:  # noqa: BLE001
                return _failure(count, status_index, _report(error))

        return call

    return decorate


# --------------------------------------------------------------------------------- inputs


def _bounded(value, name: str, low, high, kind=float):
    number = number_from(value, name, kind)
    if not low <= number <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {short_repr(number)}")
    return number


def settings_from(engine: Engine, values: Mapping[str, object]) -> SamplerSettings:
    """Widget or API values by setting name -> validated settings, the rest the model card's
    (ValueError names the bad one and its range)."""
    vocab = engine.bundle.model.config.vocab_size
    settings = settings_from_values(
        values, engine.default_settings(), engine.num_tokens, vocab, REQUEST_LIMITS
    )
    if 0 < settings.temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return settings.replace(top_k=min(settings.top_k, vocab))  # k >= V: no filter


def seed_from(seed) -> int:
    return _bounded(seed, "seed", 0, MAX_SEED, int)


def opacity_from(opacity) -> float:
    """Heatmap opacity, clamped to [0, 1]."""
    return min(max(number_from(opacity, "heatmap opacity"), 0.0), 1.0)


def upload_path(path, what: str) -> Path:
    """A file the user sent: a regular file of at most ``MAX_UPLOAD_BYTES``.

    Gradio only hands over files it received (uploads land in its cache under a sanitised
    name); this check keeps handlers safe when called directly (no devices, FIFOs or folders).
    """
    if not path:
        raise ValueError(f"choose {what} first")
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{what} must be a file path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} is missing or not a regular file: {path.name}")
    size = path.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise ValueError(
            f"{what} is {size / 2**20:.1f} MiB; the limit is {MAX_UPLOAD_BYTES // 2**20} MiB"
        )
    return path


def new_seed() -> int:
    """The dice button: a fresh seed (not from the sampler's generators)."""
    return random.randint(0, 999_999)


def brushed_cells(engine: Engine, editor_value) -> np.ndarray:
    """(N,) bool cells painted on the brush canvas (ValueError for a malformed value)."""
    try:
        mask = brush_mask(editor_value)
        if mask is not None and np.ndim(mask) != 2:
            raise ValueError
        cells = mask_to_grid(mask, engine.grid_size)
    except (TypeError, ValueError, IndexError):
        raise ValueError(
            "the brush canvas value is not an image editor value with RGBA layers"
        ) from None
    return cells.reshape(-1)


def image_mode(path: Path) -> str:
    """The file's own colour mode, read from its header ("RGBA", "L", ...); "RGBA" for an image
    with a transparent colour. Unreadable files are left for ``load_image`` to refuse."""
    try:
        with Image.open(path) as opened:
            return "RGBA" if "transparency" in opened.info else opened.mode
    except (OSError, ValueError, Image.DecompressionBombError):
        return "RGB"


def fit_note(size: tuple[int, int], mode: str, side: int) -> str:
    """One line on what fitting an image of ``size`` (W, H) and ``mode`` to the model's
    ``side`` x ``side`` input did: converted, centre-cropped, scaled (or "used as it is")."""
    width, height = size
    changes = []
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        changes.append("transparency filled with white")
    elif mode in ("1", "L", "I", "F") or mode.startswith("I;"):
        changes.append("grayscale, converted to colour")
    elif mode == "P":
        changes.append("palette colours converted to RGB")
    elif mode != "RGB":
        changes.append(f"{mode} colours converted to RGB")
    if width != height:
        cut = "left and right" if width > height else "top and bottom"
        changes.append(f"centre-cropped to a square (its {cut} cut off)")
    short = min(width, height)
    if short != side:
        changes.append(f"scaled {'down' if short > side else 'up'} to {side}×{side}")
    return f"{width}×{height}: " + (", ".join(changes) if changes else "used as it is")
