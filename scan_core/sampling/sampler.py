"""The public SCAN sampler: generate, refine, regenerate a region, score a grid; all as Traces.

Every operation streams ``Step`` records (an iterator) and appends them to a ``Trace``. An
operation on an existing trace first re-encodes its current image (an exact prefill), so a run
can continue or branch from any step. The sampler owns the cache, the RNG and the schedule;
the model is any object with the network's forward contract (see ``scan_core.model.network``).
Image b of a batch draws from its own random stream, seeded ``seed + b`` or, when ``seed`` is
a list, ``seed[b]``: an image gets the same codes whichever batch it runs in.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from scan_core.sampling.canvas import Canvas
from scan_core.sampling.capacity import cache_capacity, generation_capacity
from scan_core.sampling.decode import decode_sets, hide_cells, prefill
from scan_core.sampling.judge import judge_in_full_context, resolve_scorer
from scan_core.sampling.refine import refine_rounds, select_worst
from scan_core.sampling.schedule import cosine_set_sizes, generation_order
from scan_core.sampling.settings import SamplerSettings
from scan_core.sampling.trace import Step, Trace, image_masks, image_seeds

Seeds = int | Sequence[int]  # image b draws from seed + b, or from seed[b]


@dataclass
class _Run:
    """One running operation: the trace it records into, the canvas it draws on, how and with
    which random streams it draws, and where refinement may look."""

    trace: Trace
    canvas: Canvas
    settings: SamplerSettings
    generator: list[torch.Generator]
    order: Tensor  # (B, M): the image's cells in generation order, the exact rebuild's layout
    locked: np.ndarray | None = None
    region: np.ndarray | None = None
    # Judge the image in full context once decoded (refining a trace: before the first round);
    # the capacity was planned for it.
    rejudge: bool = False


class ScanSampler:
    """Runs SCAN operations for one model. Holds no per-run state, so one instance (and one
    model) can serve many sessions; each call allocates its own cache."""

    def __init__(self, model, model_id: str = "", device: torch.device | str | None = None):
        self.model = model
        self.model_id = model_id
        self.config = model.config
        self.device = torch.device(device) if device else _model_device(model)

    def with_model(self, model) -> ScanSampler:
        """This sampler running ``model`` in place of its own (the same network, wrapped:
        ``Together.model``)."""
        other = copy.copy(self)
        other.model = model
        return other

    def resolve(self, settings: SamplerSettings) -> SamplerSettings:
        """``settings`` as this model runs them: validated, scorer "auto" resolved ("head" with
        a trained quality head, else "confidence"). ValueError names the first problem, and
        scorer "head" on a model without a quality head."""
        validated = settings.validate(self.config.num_tokens)
        return resolve_scorer(validated, self.model, self.model_id)

    def check_generate(
        self,
        class_ids: list[int],
        settings: SamplerSettings,
        seed: Seeds = 0,
        locked: np.ndarray | None = None,
    ) -> SamplerSettings:
        """The checks ``generate`` makes before its first forward; the settings resolved.

        ValueError names the first problem: a setting, a class id, the seeds (one per image
        when listed), the lock mask's shape, or locks that leave a refinement round fewer
        than c cells to resample (found here rather than after the whole generation).
        """
        settings = self.resolve(settings)
        self._classes(class_ids)
        image_seeds(seed, len(class_ids))
        if locked is not None:
            allowed = self._allowed(len(class_ids), locked, None)
            if settings.num_rounds:  # the first round's own check, made before any forward
                select_worst(torch.zeros(allowed.shape), allowed.cpu(), settings.tokens_per_round)
        return settings

    # -- public operations -------------------------------------------------------------------

    @torch.inference_mode()  # re-entered at every step: a stream may hop threads
    def generate(
        self,
        class_ids: list[int],
        settings: SamplerSettings,
        seed: Seeds = 0,
        locked: np.ndarray | None = None,
    ) -> Iterator[tuple[Trace, Step]]:
        """Generate an image per class id, then refine it; yields (trace, step) per step."""
        settings = self.check_generate(class_ids, settings, seed, locked)
        classes = self._classes(class_ids)
        batch, n = len(class_ids), self.config.num_tokens
        generator = self._generators(seed, batch)
        order = generation_order(batch, n, generator, settings.order == "raster")
        start = np.full((batch, n), -1)
        trace = self._new_trace("generate", settings, seed, class_ids, start, order.numpy().copy())
        capacity = generation_capacity(settings, n)
        canvas = Canvas(self.model, classes, capacity, settings.uses_cfg, scorer=settings.scorer)
        run = _Run(trace, canvas, settings, generator, order.to(self.device), locked)
        run.rejudge = settings.rescores_decoded
        yield from self._decode_then_refine(run, run.order, "generate", refine=True)

    @torch.inference_mode()  # re-entered at every step: a stream may hop threads
    def refine(
        self,
        trace: Trace,
        settings: SamplerSettings,
        seed: Seeds = 0,
        locked: np.ndarray | None = None,
        region: np.ndarray | None = None,
    ) -> Iterator[tuple[Trace, Step]]:
        """Continue refining the trace's last image (only inside ``region`` when given).

        The input trace is not modified: the stream yields a new one that extends it.
        """
        settings = self.resolve(settings)
        trace = trace.copy()
        generator = self._generators(seed, trace.batch_size)
        trace.add_op("refine", seed)
        run = self._resume(trace, settings, generator, settings.num_rounds)
        run.locked, run.region = locked, region
        if run.rejudge:  # the recorded scores are another scorer's, or missing
            yield run.trace, self._rescore(run)
        yield from self._refine(run)

    @torch.inference_mode()  # re-entered at every step: a stream may hop threads
    def regenerate_region(
        self,
        trace: Trace,
        region: np.ndarray,
        settings: SamplerSettings,
        seed: Seeds = 0,
        locked: np.ndarray | None = None,
        refine_inside: bool = False,
    ) -> Iterator[tuple[Trace, Step]]:
        """Force new codes in ``region`` (B, N) bool, in sets; accept them; score; optionally
        keep refining inside the region."""
        settings = self.resolve(settings)
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
        trace.add_op("regenerate", seed)
        rounds = settings.num_rounds if refine_inside else 0
        run = self._resume(trace, settings, generator, rounds, forced=int(counts[0]))
        run.locked, run.region = locked, region
        cells = _shuffled_cells(torch.as_tensor(region), generator).to(self.device)
        hide_cells(run.canvas, cells)
        yield from self._decode_then_refine(run, cells, "forced", refine=refine_inside)

    def score(
        self, codes: np.ndarray, class_ids: list[int], settings: SamplerSettings, seed: Seeds = 0
    ) -> Trace:
        """Score an arbitrary code grid (B, N) (e.g. a tokenized upload); one "score" step.

        Every cell is judged in full context by ``settings.scorer``
        (``scan_core.sampling.judge``), whatever ``settings.rescore`` says: the confidence
        scorer has no other scores, and on the shipped emoji model the quality head detects
        corrupted cells better this way than in a prefill's random generation order
        (docs/results.md, "Full-context scores after generation").
        """
        settings = self.resolve(settings)
        codes = self._checked_grid(codes, len(class_ids))
        trace = self._new_trace("score", settings, seed, class_ids, codes.copy())
        with torch.inference_mode():
            generator = self._generators(seed, len(class_ids))
            known = torch.ones(codes.shape, dtype=torch.bool, device=self.device)
            order = self._known_order(trace, known, generator)
            n = self.config.num_tokens
            capacity = cache_capacity(settings, n, prefilled=n, decoded=0, rounds=0, rescoring=True)
            run = self._encode(trace, settings, generator, order, capacity)
            # A grid scored on its own has no generation order to honour, and the layout's
            # scores of early sets saw almost nothing: judge every cell in full context.
            self._rescore(run, cells=order)
        return trace

    # -- the phases of an operation ------------------------------------------------------------

    def _decode_then_refine(
        self, run: _Run, cells: Tensor, kind: str, refine: bool
    ) -> Iterator[tuple[Trace, Step]]:
        """Draw ``cells`` (B, M) in sets and record each; when planned (``run.rejudge``) judge
        the finished image in full context; then, when asked, refine it."""
        yield from self._decode(run, cells, kind)
        if run.rejudge:
            yield run.trace, self._rescore(run)
        if refine:
            yield from self._refine(run)

    def _decode(self, run: _Run, cells: Tensor, kind: str) -> Iterator[tuple[Trace, Step]]:
        """Draw ``cells`` (B, M) in sets (the schedule scaled to their share of the grid)."""
        sizes = self._set_sizes(run.settings, cells.shape[1])
        for event in decode_sets(run.canvas, cells, sizes, run.settings, run.generator, kind):
            yield run.trace, _record(run, event.kind, event.cells, event.codes, event.probs)

    def _rescore(self, run: _Run, cells: Tensor | None = None) -> Step:
        """Judge the whole finished image in full context by the run's scorer; one "score" step
        over ``cells`` (every cell; in cell order unless given)."""
        canvas = run.canvas
        canvas.scores.copy_(judge_in_full_context(canvas, run.settings.tokens_per_round))
        if cells is None:
            cells = torch.arange(self.config.num_tokens, device=self.device)
            cells = cells.expand(run.trace.batch_size, -1)
        nan = torch.full(cells.shape, float("nan"))
        return _record(run, "score", cells, canvas.codes.gather(1, cells), nan)

    def _refine(self, run: _Run) -> Iterator[tuple[Trace, Step]]:
        settings = run.settings
        if settings.num_rounds == 0:
            return
        allowed = self._allowed(run.trace.batch_size, run.locked, run.region)
        rebuild = self._rebuild(run) if settings.context == "exact" else None
        for event in refine_rounds(run.canvas, settings, allowed, run.generator, rebuild):
            step = _record(run, "refine", event.cells, event.codes, event.probs, event.accepted)
            yield run.trace, step

    def _rebuild(self, run: _Run) -> Callable[[], None]:
        """Exact context: re-encode the current image from slot 0 in its generation layout."""
        canvas, order = run.canvas, run.order
        sizes = self._set_sizes(run.settings, order.shape[1])

        def rebuild() -> None:
            canvas.rewind(0)
            prefill(canvas, order, sizes, canvas.codes.clone())

        return rebuild

    def _resume(self, trace, settings, generator, rounds: int, forced: int = 0) -> _Run:
        """The trace's current image on a canvas with its recorded scores (finished first if
        the trace stops mid-generation), with room for ``forced`` cells to be drawn again,
        ``rounds`` refinement rounds and the full-context judgement the operation makes
        (``rejudge``): after forcing cells when the settings ask, and whenever the recorded
        scores cannot be compared under ``settings.scorer``."""
        known = self._known_cells(trace)
        order = self._known_order(trace, known, generator)
        n = self.config.num_tokens
        missing = n - order.shape[1]
        stale = _stale_scores(trace, settings.scorer)
        # Forced cells are judged after they are drawn; refinement judges before its rounds.
        rejudge = (settings.rescores_decoded or stale) if forced else (stale and rounds > 0)
        capacity = cache_capacity(
            settings,
            n,
            prefilled=order.shape[1],
            decoded=missing + forced,
            rounds=rounds,
            rescoring=rejudge,
        )
        run = self._encode(trace, settings, generator, order, capacity)
        run.rejudge = rejudge
        # eq. 6: scores of untouched cells stay as recorded
        run.canvas.scores.copy_(torch.as_tensor(trace.scores_at(-1), device=self.device))
        if missing:  # the exact context's rebuild must encode the finished cells too
            run.order = torch.cat([order, self._finish_image(run, known)], dim=1)
        return run

    def _encode(self, trace, settings, generator, order: Tensor, capacity: int) -> _Run:
        """A run whose canvas holds the trace's current image, re-encoded in one forward in the
        layout of ``order`` (B, M), the known cells in generation order."""
        classes = self._classes(trace.class_ids)
        canvas = Canvas(self.model, classes, capacity, settings.uses_cfg, scorer=settings.scorer)
        codes = torch.as_tensor(trace.codes_at(-1), device=self.device)
        prefill(canvas, order, self._set_sizes(settings, order.shape[1]), codes)
        return _Run(trace, canvas, settings, generator, order)

    def _finish_image(self, run: _Run, known: Tensor) -> Tensor:
        """Branching mid-generation: draw the cells that have no code yet; those cells (B, M)
        in the order drawn. Their steps are recorded, not streamed: the stream starts after."""
        batch, missing = known.shape[0], int((~known[0]).sum())
        cells = torch.nonzero(~known)[:, 1].view(batch, missing)
        for _ in self._decode(run, cells, "generate"):
            pass
        return cells

    # -- checks and small pieces -------------------------------------------------------------

    def _new_trace(self, op, settings, seed, class_ids, start_codes, order=None) -> Trace:
        return Trace.new_run(
            op=op,
            settings=settings.to_dict(),
            seed=seed,
            model_id=self.model_id,
            class_ids=list(class_ids),
            grid_size=self.config.grid_size,
            vocab_size=self.config.vocab_size,
            start_codes=start_codes,
            order=order,
        )

    def _known_cells(self, trace: Trace) -> Tensor:
        """Where the trace's last image (B, N) has codes, checked against the model."""
        if trace.vocab_size != self.config.vocab_size or trace.grid_size != self.config.grid_size:
            raise ValueError("this trace was made for another model (grid or vocabulary differ)")
        known = torch.as_tensor(trace.codes_at(-1) >= 0, device=self.device)
        counts = known.sum(dim=1)
        if int(counts.min()) != int(counts.max()) or int(counts.min()) == 0:
            raise ValueError("cannot continue: images in the trace are at different stages")
        return known

    def _checked_grid(self, codes, batch: int) -> np.ndarray:
        """A code grid to score as (B, N) int64, or a ValueError saying what is wrong with it."""
        codes = np.asarray(codes, dtype=np.int64).reshape(batch, -1)
        config = self.config
        if codes.shape[1] != config.num_tokens:
            raise ValueError(
                f"code grid has {codes.shape[1]} cells; the model expects "
                f"{config.num_tokens} ({config.grid_size}x{config.grid_size})"
            )
        if codes.min() < 0 or codes.max() >= config.vocab_size:
            raise ValueError(f"codes must lie in [0, {config.vocab_size})")
        return codes

    def _set_sizes(self, settings: SamplerSettings, count: int) -> list[int]:
        """Set sizes for ``count`` cells: the schedule's K scaled to the share of the grid."""
        steps = round(settings.num_steps * count / self.config.num_tokens)
        return cosine_set_sizes(count, max(1, min(count, steps)))

    def _allowed(self, batch: int, locked, region) -> Tensor:
        allowed = np.ones((batch, self.config.num_tokens), dtype=bool)
        if locked is not None:
            allowed &= ~self._region(locked, batch, "locked")
        if region is not None:
            allowed &= self._region(region, batch, "region")
        return torch.as_tensor(allowed, device=self.device)

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
        return image_masks(mask, batch, self.config.grid_size, name)

    def _generators(self, seed: Seeds, batch: int) -> list[torch.Generator]:
        """Image b draws from its own stream seeded ``seed + b`` (or ``seed[b]``): batch runs
        equal single runs."""
        return [torch.Generator(device="cpu").manual_seed(s) for s in image_seeds(seed, batch)]


def _record(run: _Run, kind: str, cells, codes, probs, accepted=None) -> Step:
    """Append a step to the run's trace, with the scores of the whole grid after it."""
    if accepted is None:
        accepted = torch.ones_like(cells, dtype=torch.bool)
    # .copy(): CPU tensors share memory with numpy views, and the canvas keeps changing.
    arrays = (cells, codes, probs.float(), accepted, run.canvas.scores.float())
    step = Step(kind, *(a.cpu().numpy().copy() for a in arrays), scorer=run.canvas.scorer)
    run.trace.steps.append(step)
    return step


def _stale_scores(trace: Trace, scorer: str) -> bool:
    """Whether the trace's last scores cannot be compared under ``scorer``: another scorer made
    them, or (confidence, which scores nothing while decoding) some cell has none yet."""
    if trace.steps and trace.steps[-1].scorer != scorer:
        return True
    return scorer == "confidence" and bool(np.isnan(trace.scores_at(-1)).any())


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
