"""``Trace``: the one record of a SCAN run that crosses from the core to the studio.

Every step stores what happened (kind, positions, codes, their probabilities, accept/reject per
candidate), the scores of the whole grid after it and the scorer that made them ("head" or
"confidence": the studio may switch scorer between operations), so any step can be rebuilt,
replayed, exported to JSON and continued from. Reading a trace back (strictly: files come
from users) is ``scan_core.sampling.trace_files.parse_trace``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

STEP_KINDS = ("generate", "score", "refine", "forced")
TRACE_FORMAT = "scan-trace"
TRACE_VERSION = 1
MAX_TRACE_STEPS = 10_000  # far above any real run; bounds what a loaded file can make us build


class TraceError(ValueError):
    """A trace that cannot be used: wrong shapes, codes out of range, NaN, unknown kind."""


@dataclass
class Step:
    """One step for a batch of B images. Shapes: positions, codes, probs, accepted (B, S);
    scores (B, N) after the step (NaN where a cell has no code or no score yet), made by
    ``scorer`` (``sampling.judge``; traces written before scorers existed were all "head")."""

    kind: str
    positions: np.ndarray
    codes: np.ndarray
    probs: np.ndarray
    accepted: np.ndarray
    scores: np.ndarray
    scorer: str = "head"

    def select(self, index: int | Sequence[int]) -> Step:
        """The step of image ``index`` alone (batch of one), or of the images ``index`` lists."""
        pick = slice(index, index + 1) if _is_int(index) else np.asarray(index, dtype=np.int64)
        return Step(self.kind, *(a[pick] for a in self._arrays()), scorer=self.scorer)

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return self.positions, self.codes, self.probs, self.accepted, self.scores


@dataclass
class Trace:
    """A whole run: settings, seed, model id, the start grid and every step.

    ``start_codes`` (B, N) holds the codes before step 0 (-1 where empty: a fresh generation
    starts all -1; an uploaded image or a continuation starts full). ``order`` (B, N) is the
    generation order when there was one. Image b of the first operation drew from
    ``seed + b``, unless ``image_seeds`` lists other seeds (one per image; None when they are
    ``seed, seed + 1, ...``, so traces of consecutive seeds look as they always did); ``seeds``
    gives them either way. Each entry of ``settings["ops"]`` records its seeds the same way:
    ``"seed"``, and ``"seeds"`` when they are not consecutive.
    """

    settings: dict
    seed: int
    model_id: str
    class_ids: list[int]
    grid_size: int
    vocab_size: int
    start_codes: np.ndarray
    start_scores: np.ndarray
    order: np.ndarray | None = None
    steps: list[Step] = field(default_factory=list)
    image_seeds: list[int] | None = None

    @classmethod
    def new_run(
        cls,
        *,
        op: str,
        settings: dict,
        seed: int | Sequence[int],
        model_id: str,
        class_ids: list[int],
        grid_size: int,
        vocab_size: int,
        start_codes: np.ndarray,
        order: np.ndarray | None = None,
    ) -> Trace:
        """The trace of a new run whose first operation is ``op`` (image b drawing from
        ``seed + b``, or from ``seed[b]``), before its first step: no cell has a score yet."""
        seeds = image_seeds(seed, start_codes.shape[0])
        first, listed = _seed_record(seeds)
        return cls(
            settings=settings | {"ops": [_op_record(op, seeds)]},
            seed=first,
            image_seeds=listed,
            model_id=model_id,
            class_ids=list(class_ids),
            grid_size=grid_size,
            vocab_size=vocab_size,
            start_codes=start_codes,
            start_scores=np.full(start_codes.shape, np.nan),
            order=order,
        )

    def add_op(self, op: str, seed: int | Sequence[int]) -> None:
        """Note an operation that continues this trace (image b drawing from ``seed + b``, or
        from ``seed[b]``); its steps follow."""
        record = _op_record(op, image_seeds(seed, self.batch_size))
        self.settings.setdefault("ops", []).append(record)

    @property
    def batch_size(self) -> int:
        return self.start_codes.shape[0]

    @property
    def seeds(self) -> list[int]:
        """The seed each image of the first operation drew from."""
        if self.image_seeds is not None:
            return list(self.image_seeds)
        return [self.seed + b for b in range(self.batch_size)]

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size

    def __len__(self) -> int:
        return len(self.steps)

    def _check_index(self, step: int) -> int:
        if step < 0:
            step += len(self.steps)
        if not 0 <= step < len(self.steps):
            raise IndexError(f"step {step} out of range for a trace of {len(self.steps)} steps")
        return step

    def codes_at(self, step: int = -1) -> np.ndarray:
        """(B, N) codes after ``step`` (negative counts from the end; ``start_codes`` is before)."""
        if not self.steps:
            return self.start_codes.copy()
        step = self._check_index(step)
        codes = self.start_codes.copy()
        rows = np.arange(self.batch_size)[:, None]
        for item in self.steps[: step + 1]:
            keep = item.accepted
            codes[rows.repeat(keep.shape[1], 1)[keep], item.positions[keep]] = item.codes[keep]
        return codes

    def scores_at(self, step: int = -1) -> np.ndarray:
        """(B, N) scores after ``step`` (NaN where unknown), by ``scorer_at(step)``."""
        if not self.steps:
            return self.start_scores.copy()
        return self.steps[self._check_index(step)].scores.copy()

    def scorer_at(self, step: int = -1) -> str | None:
        """The scorer of the scores after ``step`` ("head" or "confidence"); None before the
        first step, when no cell has a score."""
        return self.steps[self._check_index(step)].scorer if self.steps else None

    def copy(self) -> Trace:
        """An independent copy (steps are shared; they are never modified once recorded)."""
        return self.truncated(len(self.steps) - 1) if self.steps else self._with_steps([])

    def truncated(self, step: int) -> Trace:
        """A copy that ends after ``step`` (the base for a branch)."""
        return self._with_steps(self.steps[: self._check_index(step) + 1])

    def _with_steps(self, steps: list[Step]) -> Trace:
        settings = dict(self.settings)
        settings["ops"] = [dict(op) for op in self.settings.get("ops", [])]
        return dataclasses.replace(
            self,
            settings=settings,
            class_ids=list(self.class_ids),
            start_codes=self.start_codes.copy(),
            start_scores=self.start_scores.copy(),
            order=None if self.order is None else self.order.copy(),
            steps=list(steps),
            image_seeds=None if self.image_seeds is None else list(self.image_seeds),
        )

    def select(self, index: int | Sequence[int]) -> Trace:
        """The trace of image ``index`` alone (batch of one), or of the images ``index`` lists
        (in that order), each with its own seeds.

        Every sampler operation draws image b of a batch from its own seed (``seed + b``
        unless the call gave a list), so the selected trace records those seeds, in ``seed`` /
        ``image_seeds`` and in each entry of ``settings["ops"]``: running the same operations
        on these images alone with the recorded seeds reproduces them. Selecting images whose
        seeds are consecutive gives the trace a run of just those images would have made.
        """
        rows = self._rows(index)
        settings = dict(self.settings)
        if "ops" in settings:
            settings["ops"] = [_selected_op(op, rows, self.batch_size) for op in settings["ops"]]
        seeds = self.seeds
        first, listed = _seed_record([seeds[row] for row in rows])
        pick = slice(rows[0], rows[0] + 1) if _is_int(index) else rows
        return dataclasses.replace(
            self,
            settings=settings,
            seed=first,
            image_seeds=listed,
            class_ids=[self.class_ids[row] for row in rows],
            start_codes=self.start_codes[pick].copy(),
            start_scores=self.start_scores[pick].copy(),
            order=None if self.order is None else self.order[pick].copy(),
            steps=[s.select(rows[0] if _is_int(index) else rows) for s in self.steps],
        )

    def _rows(self, index: int | Sequence[int]) -> list[int]:
        """Image indices (negatives counted from the end), checked to be in range."""
        indices = [index] if _is_int(index) else list(index)
        if not indices:
            raise IndexError("select at least one image")
        batch = self.batch_size
        for item in indices:
            if not -batch <= item < batch:
                raise IndexError(f"image {item} out of range for a batch of {batch}")
        # A negative index must not shift the seeds backwards.
        return [int(item) % batch for item in indices]

    def to_json(self) -> str:
        def listed(array: np.ndarray) -> list:
            if array.dtype.kind == "f":
                return [
                    [None if math.isnan(v) else round(float(v), 5) for v in row] for row in array
                ]
            return array.tolist()

        payload = {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "settings": self.settings,
            "seed": self.seed,
            **({} if self.image_seeds is None else {"image_seeds": list(self.image_seeds)}),
            "model_id": self.model_id,
            "class_ids": list(self.class_ids),
            "grid_size": self.grid_size,
            "vocab_size": self.vocab_size,
            "start_codes": listed(self.start_codes),
            "start_scores": listed(self.start_scores),
            "order": None if self.order is None else listed(self.order),
            "steps": [
                {
                    "kind": s.kind,
                    "positions": listed(s.positions),
                    "codes": listed(s.codes),
                    "probs": listed(s.probs),
                    "accepted": listed(s.accepted),
                    "scores": listed(s.scores),
                    "scorer": s.scorer,
                }
                for s in self.steps
            ],
        }
        return json.dumps(payload, separators=(",", ":"), allow_nan=False)


def image_seeds(seed: int | Sequence[int], batch: int) -> list[int]:
    """The seed of each of ``batch`` images: ``seed + b`` for an int, else the listed seeds
    (ValueError unless there is one integer per image)."""
    if isinstance(seed, Sequence) and not isinstance(seed, str):
        seeds = list(seed)
        if len(seeds) != batch or not all(_is_int(s) for s in seeds):
            raise ValueError(f"give one integer seed per image ({batch}), got {seeds!r:.80}")
        return [int(s) for s in seeds]
    if not _is_int(seed):
        raise ValueError(f"a seed must be an integer, got {seed!r:.40}")
    return [int(seed) + b for b in range(batch)]


def image_masks(mask, batch: int, grid_size: int, name: str) -> np.ndarray:
    """A (batch, N) bool copy of ``mask``: one grid of N = grid_size² cells for every image, or
    one per image (ValueError, naming the ``name`` mask, for any other shape)."""
    mask = np.asarray(mask, dtype=bool)
    n = grid_size * grid_size
    if mask.size == n:
        mask = np.broadcast_to(mask.reshape(1, n), (batch, n))
    if mask.shape != (batch, n):
        raise ValueError(
            f"{name} mask has shape {mask.shape}; expected ({batch}, {n}) or "
            f"a {grid_size}x{grid_size} grid"
        )
    return mask.copy()


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _seed_record(seeds: list[int]) -> tuple[int, list[int] | None]:
    """(first seed, the list or None): the list is kept only when the seeds are not the
    consecutive ``seed, seed + 1, ...`` every operation has always recorded as one number."""
    consecutive = all(s == seeds[0] + b for b, s in enumerate(seeds))
    return seeds[0], None if consecutive else list(seeds)


def _op_record(op: str, seeds: list[int]) -> dict:
    first, listed = _seed_record(seeds)
    return {"op": op, "seed": first} | ({} if listed is None else {"seeds": listed})


def _selected_op(op: dict, rows: list[int], batch: int) -> dict:
    """A copy of an op record with the seeds images ``rows`` of its batch drew from. A loaded
    trace may hold any JSON here (even a bool): what is not a seed is copied unchanged."""
    op = dict(op)
    listed = op.pop("seeds", None)
    if isinstance(listed, list) and len(listed) == batch and all(_is_int(s) for s in listed):
        seeds = [listed[row] for row in rows]
    elif _is_int(op.get("seed")):
        seeds = [op["seed"] + row for row in rows]
    else:
        return op if listed is None else op | {"seeds": listed}
    first, kept = _seed_record(seeds)
    return op | {"seed": first} | ({} if kept is None else {"seeds": kept})
