"""Per-session studio state: small, deep-copyable, and never mutated in place.

Gradio deep-copies ``gr.State`` per session, so the state keeps codes and scores (inside the
``Trace``), never decoded images. Every change returns a new ``SessionState``.

Timeline positions: 0 is the trace's start grid (empty for a fresh generation, the uploaded image
for a scored upload), and position k shows the grid after step k - 1. So a trace of n steps has
positions 0..n, and the newest image is at position n.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from scan_core import Step, Trace

MAX_UNDO = 20  # traces kept for Undo; older ones are dropped
MAX_GALLERY = 8  # images per multi-seed run


@dataclass(frozen=True)
class SessionState:
    """What one browser session is looking at.

    Attributes:
        trace: the current single-image trace (None before the first run).
        position: timeline position shown (see the module docstring).
        undo: earlier (trace, position) pairs, newest last, at most ``MAX_UNDO``.
        locked: (N,) bool cells that refinement and forced regeneration must leave alone.
        gallery: the batch trace of the last multi-seed run, for picking another image.
        shown: the index in ``gallery`` of the image being worked on.
    """

    trace: Trace | None = None
    position: int = 0
    undo: tuple[tuple[Trace, int], ...] = ()
    locked: np.ndarray | None = None
    gallery: Trace | None = None
    shown: int = 0  # which image of ``gallery`` is the current trace

    @property
    def length(self) -> int:
        """Number of steps in the current trace (its last position)."""
        return 0 if self.trace is None else len(self.trace.steps)

    def with_trace(self, trace: Trace, *, keep_locks: bool = True, **changes) -> SessionState:
        """Show ``trace`` at its end; the current trace goes on the undo stack."""
        undo = self.undo
        if self.trace is not None:
            undo = (*undo, (self.trace, self.position))[-MAX_UNDO:]
        locked = self.locked if keep_locks else None
        return dataclasses.replace(
            self, trace=trace, position=len(trace.steps), undo=undo, locked=locked, **changes
        )

    def scrubbed(self, position: int) -> SessionState:
        """The same trace at another timeline position (clamped to 0..length)."""
        return dataclasses.replace(self, position=int(min(max(position, 0), self.length)))

    def undone(self) -> SessionState:
        """Back to the previous trace and position; raises ValueError when there is none."""
        if not self.undo:
            raise ValueError("nothing to undo")
        trace, position = self.undo[-1]
        return dataclasses.replace(self, trace=trace, position=position, undo=self.undo[:-1])

    def with_locked(self, locked: np.ndarray | None) -> SessionState:
        locked = None if locked is None or not np.any(locked) else np.asarray(locked, dtype=bool)
        return dataclasses.replace(self, locked=locked)

    def require_trace(self) -> Trace:
        if self.trace is None:
            raise ValueError("nothing to work on yet: generate an image or upload one first")
        return self.trace

    def branch_base(self) -> Trace:
        """The trace up to the shown position: later operations continue (branch) from here."""
        trace = self.require_trace()
        if self.position == len(trace.steps):
            return trace
        if self.position == 0:
            if (trace.start_codes < 0).any():
                raise ValueError("step 0 is an empty canvas: move the timeline to a later step")
            return dataclasses.replace(trace, steps=[])
        return trace.truncated(self.position - 1)


def frame_at(trace: Trace, position: int) -> tuple[np.ndarray, np.ndarray, Step | None]:
    """(codes (B, N), scores (B, N), the step that led here or None) at a timeline position."""
    if position <= 0 or not trace.steps:
        return trace.start_codes.copy(), trace.start_scores.copy(), None
    index = min(position, len(trace.steps)) - 1
    return trace.codes_at(index), trace.scores_at(index), trace.steps[index]


def replay(trace: Trace) -> list[np.ndarray]:
    """Codes (B, N) at every position 0..n in one pass (``codes_at`` per step would be O(n^2))."""
    codes = trace.start_codes.copy()
    frames = [codes.copy()]
    rows = np.arange(trace.batch_size)[:, None]
    for step in trace.steps:
        keep = step.accepted
        codes[rows.repeat(keep.shape[1], 1)[keep], step.positions[keep]] = step.codes[keep]
        frames.append(codes.copy())
    return frames


def compare_position(trace: Trace) -> int:
    """The "before" of before/after: the first complete image, i.e. the position just before
    the first refinement or forced step (the end when there is none)."""
    for index, step in enumerate(trace.steps):
        if step.kind in ("refine", "forced"):
            return index
    return len(trace.steps)


def step_summary(trace: Trace, position: int) -> str:
    """One line about the shown step: kind, scores, accepted candidates."""
    total = len(trace.steps)
    _, scores, step = frame_at(trace, position)
    known = scores[0][~np.isnan(scores[0])]
    where = f"step {position}/{total}"
    if step is None:
        return f"{where} · start" + (f" · mean score {known.mean():.3f}" if known.size else "")
    parts = [where, step.kind]
    if known.size:
        parts.append(f"mean score {known.mean():.3f} · min {known.min():.3f}")
    if step.kind == "refine":
        parts.append(f"accepted {int(step.accepted[0].sum())}/{step.accepted.shape[1]}")
    elif step.kind in ("generate", "forced"):
        parts.append(f"{step.positions.shape[1]} new codes")
    return " · ".join(parts)


# ------------------------------------------------------------------------- progress and done


@dataclass(frozen=True)
class Plan:
    """What a run is going to do, so its status can say how far along it is.

    Attributes:
        start: steps the trace had before the run (its new steps come after).
        sets: the sets it draws (K for a generation; the region's share of K when forced).
        rounds: the refinement rounds it may run (T; patience or a score threshold may end
            refinement sooner).
        images: images in the run (a multi-seed generation makes several, shows image 0).
        seed: the shown image's seed.
    """

    start: int = 0
    sets: int = 0
    rounds: int = 0
    images: int = 1
    seed: int = 0


def _counts(trace: Trace, start: int) -> tuple[int, int, int]:
    """(sets drawn, refinement rounds, cells replaced by those rounds) after ``start``."""
    new = trace.steps[start:]
    sets = sum(step.kind in ("generate", "forced") for step in new)
    rounds = [step for step in new if step.kind == "refine"]
    replaced = sum(int(step.accepted[0].sum()) for step in rounds)
    return sets, len(rounds), replaced


def _scores(scores: np.ndarray) -> str:
    known = scores[~np.isnan(scores)]
    return f"mean score {known.mean():.3f} · min {known.min():.3f}" if known.size else ""


def _image_of(plan: Plan) -> str:
    return f"image 1 of {plan.images} (seed {plan.seed}) · " if plan.images > 1 else ""


def progress_line(trace: Trace, plan: Plan) -> str:
    """The status while a run streams: where it is in its plan ("set 5 of 16", "round 3 of 8")."""
    step = trace.steps[-1]
    sets, rounds, _ = _counts(trace, plan.start)
    if step.kind == "generate":
        where = f"drawing set {sets} of {plan.sets}"
    elif step.kind == "forced":
        where = f"redrawing the region: set {sets} of {plan.sets}"
    elif step.kind == "refine":
        accepted = f"accepted {int(step.accepted[0].sum())}/{step.accepted.shape[1]}"
        where = f"refining: round {rounds} of {plan.rounds} · {accepted}"
    else:
        where = "judging the finished image"
    parts = [_image_of(plan) + where, _scores(step.scores[0])]
    return " · ".join(part for part in parts if part)


def done_line(trace: Trace, plan: Plan, stopped: bool = False) -> str:
    """The status once a run ended: "done" (or "stopped"), what it did against its plan, and the
    scores of the image it left."""
    sets, rounds, replaced = _counts(trace, plan.start)
    did = []
    if plan.sets:
        did.append(f"{sets} of {plan.sets} sets drawn")
    if plan.rounds:
        did.append(f"{rounds} of {plan.rounds} refinement rounds ({replaced} cells replaced)")
    elif rounds:
        did.append(f"{rounds} refinement rounds ({replaced} cells replaced)")
    if not stopped and plan.rounds and rounds < plan.rounds and sets == plan.sets:
        did.append("refinement ended early (patience or score threshold)")
    total = len(trace.steps)
    scores = trace.scores_at(-1)[0] if trace.steps else trace.start_scores[0]
    head = "stopped" if stopped else "done"
    parts = [_image_of(plan) + head, ", ".join(did), f"step {total}/{total}", _scores(scores)]
    if plan.images > 1:
        parts.append(f"all {plan.images} images in the Gallery tab")
    return " · ".join(part for part in parts if part)
