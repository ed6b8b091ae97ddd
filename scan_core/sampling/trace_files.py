"""Strict parsing of Trace JSON: files come from users and remote API calls, so trust nothing."""

from __future__ import annotations

import json
import math

import numpy as np

from scan_core.sampling.settings import SCORERS, with_current_names
from scan_core.sampling.trace import (
    MAX_TRACE_STEPS,
    STEP_KINDS,
    TRACE_FORMAT,
    TRACE_VERSION,
    Step,
    Trace,
    TraceError,
)

MAX_TRACE_BYTES = 64 * 1024 * 1024
MAX_GRID = 64
MAX_BATCH = 256
MAX_CLASS_ID = 2**31 - 1
MAX_MODEL_ID = 1000  # characters


def _array(value, name: str, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """``value`` as an array of ``kind`` ("int", "bool" or "float") and exactly ``shape``.

    Integers must be JSON integers (3, not 3.0 or true) and booleans JSON booleans: numpy would
    silently truncate 3.7 to 3 or read "no" as True.
    """
    if kind == "float":
        value = _floats(value, name)
    try:
        array = np.asarray(value, dtype=np.float64 if kind == "float" else None)
    except (TypeError, ValueError, OverflowError) as error:
        raise TraceError(f"trace field {name!r} is not a numeric array: {error}") from None
    if array.shape != shape:
        raise TraceError(f"trace field {name!r} has shape {array.shape}, expected {shape}")
    expected = {"int": "iu", "bool": "b", "float": "f"}[kind]
    if array.size and array.dtype.kind not in expected:
        raise TraceError(f"trace field {name!r} must hold {kind}s (found {array.dtype})")
    return array.astype({"int": np.int64, "bool": bool, "float": np.float64}[kind])


def _floats(value, name: str):
    """Scores may be null (unknown -> NaN) but never NaN/inf literals or out of [0, 1]."""
    if not isinstance(value, list):
        raise TraceError(f"trace field {name!r} must be a list")
    rows = []
    for row in value:
        if not isinstance(row, list):
            raise TraceError(f"trace field {name!r} must be a list of lists")
        out = []
        for v in row:
            if v is None:
                out.append(math.nan)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0:
                out.append(float(v))
            else:
                raise TraceError(f"trace field {name!r} holds {v!r}; expected null or 0..1")
        rows.append(out)
    return rows


def _codes(value, name: str, shape, vocab_size: int, allow_empty: bool) -> np.ndarray:
    array = _array(value, name, "int", shape)
    low = -1 if allow_empty else 0
    if array.size and (array.min() < low or array.max() >= vocab_size):
        raise TraceError(f"trace field {name!r} has codes outside [{low}, {vocab_size})")
    return array


def _int(payload: dict, name: str, low: int, high: int) -> int:
    value = payload.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise TraceError(f"trace field {name!r} must be an integer in [{low}, {high}]")
    return value


def _step(raw, index: int, batch: int, num_tokens: int, vocab: int) -> Step:
    if not isinstance(raw, dict):
        raise TraceError(f"step {index} is not an object")
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in STEP_KINDS:
        raise TraceError(f"step {index} has kind {str(kind)[:40]!r}; expected one of {STEP_KINDS}")
    rows = raw.get("positions")
    if not (isinstance(rows, list) and len(rows) == batch and isinstance(rows[0], list)):
        raise TraceError(f"step {index} positions must be a {batch} x S list")
    shape, where = (batch, len(rows[0])), f"step {index}"
    positions = _codes(rows, f"{where} positions", shape, num_tokens, False)
    codes = _codes(raw.get("codes"), f"{where} codes", shape, vocab, False)
    probs = _array(raw.get("probs"), f"{where} probs", "float", shape)
    accepted = _array(raw.get("accepted"), f"{where} accepted", "bool", shape)
    scores = _array(raw.get("scores"), f"{where} scores", "float", (batch, num_tokens))
    scorer = raw.get("scorer", "head")  # traces from before scorers: the quality head's
    if not isinstance(scorer, str) or scorer not in SCORERS:
        raise TraceError(f"step {index} has scorer {str(scorer)[:40]!r}; expected one of {SCORERS}")
    return Step(kind, positions, codes, probs, accepted, scores, scorer)


def parse_trace(text: str | bytes) -> Trace:
    """Parse a trace exported by ``Trace.to_json``; raise ``TraceError`` on anything off."""
    payload = _read_json(text)
    grid = _int(payload, "grid_size", 1, MAX_GRID)
    vocab = _int(payload, "vocab_size", 1, 2**20)
    seed = _int(payload, "seed", -(2**63), 2**63 - 1)
    num_tokens = grid * grid
    class_ids = payload.get("class_ids")
    if not isinstance(class_ids, list) or not 1 <= len(class_ids) <= MAX_BATCH:
        raise TraceError(f"trace field 'class_ids' must be a list of 1..{MAX_BATCH} integers")
    if not all(type(c) is int and 0 <= c <= MAX_CLASS_ID for c in class_ids):
        raise TraceError(f"trace field 'class_ids' must hold integers in [0, {MAX_CLASS_ID}]")
    batch = len(class_ids)
    shape = (batch, num_tokens)
    start_codes = _codes(payload.get("start_codes"), "start_codes", shape, vocab, True)
    start_scores = _array(payload.get("start_scores"), "start_scores", "float", shape)
    order = payload.get("order")
    if order is not None:
        order = _codes(order, "order", shape, num_tokens, False)
        if any(len(set(row)) != num_tokens for row in order.tolist()):
            raise TraceError("trace field 'order' must be a permutation of the cells per image")
    steps = payload.get("steps")
    if not isinstance(steps, list) or len(steps) > MAX_TRACE_STEPS:
        raise TraceError(f"trace field 'steps' must be a list of at most {MAX_TRACE_STEPS}")
    settings = payload.get("settings")
    if not isinstance(settings, dict):
        raise TraceError("trace field 'settings' must be an object")
    settings = with_current_names(settings)  # traces written before the settings' rename
    ops = settings.get("ops", [])
    if not isinstance(ops, list) or not all(isinstance(op, dict) for op in ops):
        raise TraceError("trace field 'settings.ops' must be a list of objects")
    model_id = payload.get("model_id")
    if not isinstance(model_id, str) or len(model_id) > MAX_MODEL_ID:
        raise TraceError(f"trace field 'model_id' must be a string of at most {MAX_MODEL_ID}")
    parsed = [_step(raw, i, batch, num_tokens, vocab) for i, raw in enumerate(steps)]
    first, seeds = _image_seeds(payload, seed, batch)
    return Trace(
        settings=settings,
        seed=first,
        model_id=model_id,
        class_ids=class_ids,
        grid_size=grid,
        vocab_size=vocab,
        start_codes=start_codes,
        start_scores=start_scores,
        order=order,
        steps=parsed,
        image_seeds=seeds,
    )


def _image_seeds(payload: dict, seed: int, batch: int) -> tuple[int, list[int] | None]:
    """The first seed and the per-image seeds (None when consecutive from ``seed``; traces
    written before per-image seeds have none)."""
    listed = payload.get("image_seeds")
    if listed is None:
        return seed, None
    if (
        not isinstance(listed, list)
        or len(listed) != batch
        or not all(type(s) is int and -(2**63) <= s < 2**63 for s in listed)
        or listed[0] != seed
    ):
        raise TraceError(
            f"trace field 'image_seeds' must list {batch} integer seeds, the first equal to 'seed'"
        )
    consecutive = all(s == seed + b for b, s in enumerate(listed))
    return seed, None if consecutive else listed


def _read_json(text: str | bytes) -> dict:
    """The JSON object of a trace file, checked to be one of ours, of the version we read."""
    if len(text) > MAX_TRACE_BYTES:
        raise TraceError(f"trace is larger than {MAX_TRACE_BYTES // 2**20} MiB")
    try:
        payload = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except TraceError:  # NaN, Infinity, 1e999
        raise
    except RecursionError:
        raise TraceError("not a trace JSON file: nested too deeply") from None
    except ValueError as error:  # JSON syntax, UTF-8, a 5,000-digit integer
        raise TraceError(f"not a trace JSON file: {str(error)[:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != TRACE_FORMAT:
        raise TraceError(f"not a trace file (missing format {TRACE_FORMAT!r})")
    if payload.get("version") != TRACE_VERSION:
        raise TraceError(f"unsupported trace version {payload.get('version')!r}")
    return payload


def _reject_constant(name: str):
    raise TraceError(f"trace holds {name}, which is not a valid number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf without passing through parse_constant
        raise TraceError(f"trace holds {text[:20]}, which is out of range")
    return value
