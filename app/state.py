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
    """

    trace: Trace | None = None
    position: int = 0
    undo: tuple[tuple[Trace, int], ...] = ()
    locked: np.ndarray | None = None
    gallery: Trace | None = None

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
