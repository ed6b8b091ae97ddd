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

    def select(self, index: int) -> Step:
        pick = slice(index, index + 1)
        return Step(self.kind, *(a[pick] for a in self._arrays()), scorer=self.scorer)

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return self.positions, self.codes, self.probs, self.accepted, self.scores


@dataclass
class Trace:
    """A whole run: settings, seed, model id, the start grid and every step.

    ``start_codes`` (B, N) holds the codes before step 0 (-1 where empty: a fresh generation
    starts all -1; an uploaded image or a continuation starts full). ``order`` (B, N) is the
    generation order when there was one.
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

    @classmethod
    def new_run(
        cls,
        *,
        op: str,
        settings: dict,
        seed: int,
        model_id: str,
        class_ids: list[int],
        grid_size: int,
        vocab_size: int,
        start_codes: np.ndarray,
        order: np.ndarray | None = None,
    ) -> Trace:
        """The trace of a new run whose first operation is ``op`` (drawing from ``seed``),
        before its first step: no cell has a score yet."""
        return cls(
            settings=settings | {"ops": [{"op": op, "seed": seed}]},
            seed=seed,
            model_id=model_id,
            class_ids=list(class_ids),
            grid_size=grid_size,
            vocab_size=vocab_size,
            start_codes=start_codes,
            start_scores=np.full(start_codes.shape, np.nan),
            order=order,
        )

    def add_op(self, op: str, seed: int) -> None:
        """Note an operation that continues this trace; its steps follow."""
        self.settings.setdefault("ops", []).append({"op": op, "seed": seed})

    @property
    def batch_size(self) -> int:
        return self.start_codes.shape[0]

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
        )

    def select(self, index: int) -> Trace:
        """The trace of image ``index`` alone (batch of one), with that image's own seeds.

        Every sampler operation draws image b of a batch from ``seed + b``, so the selected
        trace records ``seed + index``, and so does each entry of ``settings["ops"]``: running
        the same operations on this image alone with the recorded seeds reproduces it.
        """
        if not -len(self.class_ids) <= index < len(self.class_ids):
            raise IndexError(f"image {index} out of range for a batch of {self.batch_size}")
        index %= len(self.class_ids)  # a negative index must not shift the seeds backwards
        pick = slice(index, index + 1)
        settings = dict(self.settings)
        if "ops" in settings:
            settings["ops"] = [_shifted_seed(op, index) for op in settings["ops"]]
        return dataclasses.replace(
            self,
            settings=settings,
            seed=self.seed + index,
            class_ids=[self.class_ids[index]],
            start_codes=self.start_codes[pick].copy(),
            start_scores=self.start_scores[pick].copy(),
            order=None if self.order is None else self.order[pick],
            steps=[s.select(index) for s in self.steps],
        )

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


def _shifted_seed(op: dict, index: int) -> dict:
    """A copy of an op record with the seed image ``index`` of its batch drew from."""
    op = dict(op)
    if type(op.get("seed")) is int:  # a loaded trace may hold any JSON here (even a bool)
        op["seed"] += index
    return op
