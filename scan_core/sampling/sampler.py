"""The public SCAN sampler: generate, refine, regenerate a region, score a grid; all as Traces.

Every operation streams ``Step`` records (an iterator) and appends them to a ``Trace``. An
operation on an existing trace first re-encodes its current image (an exact prefill), so a run
can continue or branch from any step. The sampler owns the cache, the RNG and the schedule;
the model is any object with the network's forward contract (see ``scan_core.model.network``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from scan_core.sampling.canvas import Canvas, cache_capacity, generation_capacity
from scan_core.sampling.decode import decode_sets, hide_cells, prefill
from scan_core.sampling.refine import refine_rounds, rescore
from scan_core.sampling.schedule import cosine_set_sizes, generation_order
from scan_core.sampling.settings import SamplerSettings
from scan_core.sampling.trace import Step, Trace


class ScanSampler:
    """Runs SCAN operations for one model. Holds no per-run state, so one instance (and one
    model) can serve many sessions; each call allocates its own cache."""

    def __init__(self, model, model_id: str = "", device: torch.device | str | None = None):
        self.model = model
        self.model_id = model_id
        self.config = model.config
        self.device = torch.device(device) if device else _model_device(model)

    # -- public operations -------------------------------------------------------------------

    @torch.inference_mode()  # re-entered at every step: a stream may hop threads
    def generate(
        self,
        class_ids: list[int],
        settings: SamplerSettings,
        seed: int = 0,
        locked: np.ndarray | None = None,
    ) -> Iterator[tuple[Trace, Step]]:
        """Generate an image per class id, then refine it; yields (trace, step) per step."""
        settings = settings.validate(self.config.num_tokens)
        classes = self._classes(class_ids)
        batch, n = len(class_ids), self.config.num_tokens
        generator = self._generators(seed, batch)
        order = generation_order(batch, n, generator, settings.order == "raster")
        trace = Trace(
            settings.to_dict() | {"ops": [{"op": "generate", "seed": seed}]},
            seed,
            self.model_id,
            list(class_ids),
            self.config.grid_size,
            self.config.vocab_size,
            np.full((batch, n), -1),
            np.full((batch, n), np.nan),
            order.numpy().copy(),
        )
        canvas = Canvas(self.model, classes, generation_capacity(settings, n), settings.uses_cfg)
        sizes = cosine_set_sizes(n, settings.num_steps)
        order = order.to(self.device)
        for event in decode_sets(canvas, order, sizes, settings, generator):
            yield trace, _record(trace, canvas, event.kind, event.cells, event.codes, event.probs)
        if settings.rescore:
            yield trace, self._rescore(trace, canvas, settings)
        yield from self._refine(trace, canvas, settings, generator, locked, None, order)

    @torch.inference_mode()  # re-entered at every step: a stream may hop threads
    def refine(
        self,
        trace: Trace,
        settings: SamplerSettings,
        seed: int = 0,
        locked: np.ndarray | None = None,
        region: np.ndarray | None = None,
    ) -> Iterator[tuple[Trace, Step]]:
        """Continue refining the trace's last image (only inside ``region`` when given).

        The input trace is not modified: the stream yields a new one that extends it.
        """
        settings = settings.validate(self.config.num_tokens)
        trace = trace.copy()
        generator = self._generators(seed, trace.batch_size)
        trace.settings.setdefault("ops", []).append({"op": "refine", "seed": seed})
        canvas, order = self._resume(trace, settings, settings.num_rounds, generator)
        yield from self._refine(trace, canvas, settings, generator, locked, region, order)

    @torch.inference_mode()  # re-entered at every step: a stream may hop threads
    def regenerate_region(
        self,
        trace: Trace,
        region: np.ndarray,
        settings: SamplerSettings,
        seed: int = 0,
        locked: np.ndarray | None = None,
        refine_inside: bool = False,
    ) -> Iterator[tuple[Trace, Step]]:
        """Force new codes in ``region`` (B, N) bool, in sets; accept them; score; optionally
        keep refining inside the region."""
        settings = settings.validate(self.config.num_tokens)
        trace = trace.copy()
        region = self._region(region, trace.batch_size, "region")
        if locked is not None:
            region = region & ~self._region(locked, trace.batch_size, "locked")
        counts = region.sum(axis=1)
        if counts.min() < 1 or counts.min() != counts.max():
            raise ValueError(
                "the region must select the same number (>= 1) of unlocked cells in every image"
            )
        generator = self._generators(seed, trace.batch_size)
        trace.settings.setdefault("ops", []).append({"op": "regenerate", "seed": seed})
        count = int(counts[0])
        rounds = settings.num_rounds if refine_inside else 0
        canvas, order = self._resume(trace, settings, rounds, generator, forced=count)
        cells = _shuffled_cells(torch.as_tensor(region), generator).to(self.device)
        hide_cells(canvas, cells)
        steps = max(1, round(settings.num_steps * count / self.config.num_tokens))
        for event in decode_sets(
            canvas, cells, cosine_set_sizes(count, steps), settings, generator, kind="forced"
        ):
            yield trace, _record(trace, canvas, event.kind, event.cells, event.codes, event.probs)
        if settings.rescore:
            yield trace, self._rescore(trace, canvas, settings)
        if refine_inside:
            yield from self._refine(trace, canvas, settings, generator, locked, region, order)

    def score(
        self, codes: np.ndarray, class_ids: list[int], settings: SamplerSettings, seed: int = 0
    ) -> Trace:
        """Score an arbitrary code grid (B, N) (e.g. a tokenized upload); one "score" step.

        Every cell is judged in full context (``scan_core.sampling.refine.rescore``), whatever
        ``settings.rescore`` says: measured on the shipped emoji model, that detects corrupted
        cells better than the scores of a prefill in a random generation order (README).
        """
        settings = settings.validate(self.config.num_tokens)
        codes = np.asarray(codes, dtype=np.int64).reshape(len(class_ids), -1)
        if codes.shape[1] != self.config.num_tokens:
            raise ValueError(
                f"code grid has {codes.shape[1]} cells; the model expects "
                f"{self.config.num_tokens} ({self.config.grid_size}x"
                f"{self.config.grid_size})"
            )
        if codes.min() < 0 or codes.max() >= self.config.vocab_size:
            raise ValueError(f"codes must lie in [0, {self.config.vocab_size})")
        batch, n = codes.shape
        trace = Trace(
            settings.to_dict() | {"ops": [{"op": "score", "seed": seed}]},
            seed,
            self.model_id,
            list(class_ids),
            self.config.grid_size,
            self.config.vocab_size,
            codes.copy(),
            np.full((batch, n), np.nan),
        )
        with torch.inference_mode():
            self._resume(trace, settings, 0, self._generators(seed, batch), record_score=True)
        return trace

    # -- internals ---------------------------------------------------------------------------

    def _rescore(self, trace: Trace, canvas: Canvas, settings: SamplerSettings) -> Step:
        """Judge the whole finished image in full context; one "score" step over every cell."""
        canvas.scores.copy_(rescore(canvas, settings.tokens_per_round))
        cells = torch.arange(self.config.num_tokens, device=self.device)
        cells = cells.expand(trace.batch_size, -1)
        return _record(
            trace,
            canvas,
            "score",
            cells,
            canvas.codes.clone(),
            torch.full(cells.shape, float("nan")),
        )

    def _refine(self, trace, canvas, settings, generator, locked, region, order):
        if settings.num_rounds == 0:
            return
        allowed = self._allowed(trace.batch_size, locked, region)
        sizes = cosine_set_sizes(
            order.shape[1], _scaled_steps(settings, order.shape[1], self.config.num_tokens)
        )
        rebuild = None
        if settings.context == "exact":

            def rebuild() -> None:
                canvas.rewind(0)
                prefill(canvas, order, sizes, canvas.codes.clone())

        for event in refine_rounds(canvas, settings, allowed, generator, rebuild):
            yield (
                trace,
                _record(
                    trace, canvas, "refine", event.cells, event.codes, event.probs, event.accepted
                ),
            )

    def _allowed(self, batch: int, locked, region) -> Tensor:
        allowed = np.ones((batch, self.config.num_tokens), dtype=bool)
        if locked is not None:
            allowed &= ~self._region(locked, batch, "locked")
        if region is not None:
            allowed &= self._region(region, batch, "region")
        return torch.as_tensor(allowed, device=self.device)

    def _resume(self, trace, settings, rounds, generator, forced=0, record_score=False):
        """A canvas holding the trace's current image, re-encoded in one forward, with room for
        ``forced`` cells to be generated again and ``rounds`` refinement rounds."""
        if trace.vocab_size != self.config.vocab_size or trace.grid_size != self.config.grid_size:
            raise ValueError("this trace was made for another model (grid or vocabulary differ)")
        codes = torch.as_tensor(trace.codes_at(-1), device=self.device)
        known = codes >= 0
        counts = known.sum(dim=1)
        if int(counts.min()) != int(counts.max()) or int(counts.min()) == 0:
            raise ValueError("cannot continue: images in the trace are at different stages")
        order = self._known_order(trace, known, generator)
        n_known = order.shape[1]
        missing = self.config.num_tokens - n_known
        planned = settings.replace(rescore=settings.rescore or record_score)
        capacity = cache_capacity(planned, n_known, missing + forced, rounds)
        canvas = Canvas(self.model, self._classes(trace.class_ids), capacity, settings.uses_cfg)
        sizes = cosine_set_sizes(n_known, _scaled_steps(settings, n_known, self.config.num_tokens))
        prefill(canvas, order, sizes, codes)
        if record_score:
            # A grid scored on its own has no generation order to honour, and the layout's
            # scores of early sets saw almost nothing: judge every cell in full context.
            canvas.scores.copy_(rescore(canvas, settings.tokens_per_round))
            _record(
                trace,
                canvas,
                "score",
                order,
                codes.gather(1, order),
                torch.full(order.shape, float("nan")),
            )
        else:  # eq. 6: scores of untouched cells stay as recorded
            canvas.scores.copy_(torch.as_tensor(trace.scores_at(-1), device=self.device))
        if missing:  # branching mid-generation: finish the image first
            cells = torch.nonzero(~known)[:, 1].view(codes.shape[0], missing)
            sizes = cosine_set_sizes(missing, _scaled_steps(settings, missing, len(known[0])))
            for event in decode_sets(canvas, cells, sizes, settings, generator):
                _record(trace, canvas, event.kind, event.cells, event.codes, event.probs)
        return canvas, order

    def _known_order(self, trace, known, generator) -> Tensor:
        if trace.order is not None:
            order = torch.as_tensor(trace.order, device=self.device)
            keep = known.gather(1, order)
            return order[keep].view(order.shape[0], -1)
        batch = known.shape[0]
        order = generation_order(batch, self.config.num_tokens, generator).to(self.device)
        return order[known.gather(1, order)].view(batch, -1)

    def _classes(self, class_ids: list[int]) -> Tensor:
        if not class_ids:
            raise ValueError("give at least one class id")
        for c in class_ids:
            if not 0 <= int(c) <= self.config.num_classes:
                raise ValueError(
                    f"class id {c} out of range [0, {self.config.num_classes - 1}]"
                    f" ({self.config.num_classes} = unconditional)"
                )
        return torch.as_tensor([int(c) for c in class_ids], device=self.device)

    def _region(self, mask, batch: int, name: str) -> np.ndarray:
        mask = np.asarray(mask, dtype=bool)
        n = self.config.num_tokens
        if mask.size == n:
            mask = np.broadcast_to(mask.reshape(1, n), (batch, n))
        if mask.shape != (batch, n):
            raise ValueError(
                f"{name} mask has shape {mask.shape}; expected ({batch}, {n}) or "
                f"a {self.config.grid_size}x{self.config.grid_size} grid"
            )
        return mask.copy()

    def _generators(self, seed: int, batch: int) -> list[torch.Generator]:
        """Image b draws from its own stream seeded ``seed + b``: batch runs equal single runs."""
        return [torch.Generator(device="cpu").manual_seed(int(seed) + b) for b in range(batch)]


def _record(trace, canvas, kind, cells, codes, probs, accepted=None) -> Step:
    if accepted is None:
        accepted = torch.ones_like(cells, dtype=torch.bool)
    # .copy(): CPU tensors share memory with numpy views, and the canvas keeps changing.
    arrays = (cells, codes, probs.float(), accepted, canvas.scores.float())
    step = Step(kind, *(a.cpu().numpy().copy() for a in arrays))
    trace.steps.append(step)
    return step


def _scaled_steps(settings: SamplerSettings, count: int, num_tokens: int) -> int:
    return max(1, min(count, round(settings.num_steps * count / num_tokens)))


def _shuffled_cells(region: Tensor, generator: list[torch.Generator]) -> Tensor:
    """(B, M) cells of a (B, N) region mask in a random order per image."""
    keys = torch.stack([torch.rand(region.shape[1], generator=g) for g in generator])
    keys[~region] = 2.0
    count = int(region[0].sum())
    return keys.argsort(dim=1)[:, :count]


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def run_all(stream: Iterator[tuple[Trace, Step]], callback: Callable | None = None) -> Trace:
    """Drain a stream, calling ``callback(trace, step)`` per step; return the final trace."""
    trace = None
    for trace, step in stream:
        if callback is not None:
            callback(trace, step)
    return trace
