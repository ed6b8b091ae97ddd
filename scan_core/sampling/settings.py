"""Sampler settings: one table of fields, the settings dataclass and its validation.

``SETTING_FIELDS`` is the single description of every setting (name, type, range, label, help,
control kind). The studio builds its controls from it, the command lines their flags
(``scan_core.sampling.setting_inputs``), and ``SamplerSettings.validate`` its range checks, so a
setting has one name and one range everywhere.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

CONTEXTS = ("cached", "exact")
ORDERS = ("random", "raster")
SCORERS = ("head", "confidence")  # what judges a cell (scan_core.sampling.judge)

# Names that files written before the rename still carry (traces, model cards' "sampler",
# checkpoints/evaluation.json, run manifests, saved training configs): old -> today's.
RENAMED_FIELDS = {"refine_rounds": "num_rounds", "refine_size": "tokens_per_round"}


def with_current_names(data: dict) -> dict:
    """``data`` with old field names replaced by today's (a today's name present wins)."""
    renamed = {RENAMED_FIELDS.get(key, key): value for key, value in data.items()}
    return renamed | {key: value for key, value in data.items() if key not in RENAMED_FIELDS}


Bound = float | str | None  # a number, a model size by name ("N", "N/2", "V"), or unbounded


@dataclass(frozen=True)
class SettingField:
    """One sampler setting as every front end shows it.

    ``low``/``high`` is the valid range (``validate`` enforces it; ``low_open`` excludes
    ``low``). A bound may name a size of the model: "N" cells per image, "N/2", "V" codes in the
    vocabulary. ``ui_high`` ends the studio's slider where ``high`` leaves the range open.
    ``control`` is the kind of studio control: "slider", "number", "checkbox" or "radio".
    """

    name: str
    kind: type  # int, float, str or bool
    label: str
    help: str
    control: str
    low: Bound = None
    high: Bound = None
    low_open: bool = False
    ui_high: Bound = None
    step: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def title(self) -> str:
        """How messages name the setting: the code name and the label a user sees."""
        return f"{self.name} ({self.label})"


SETTING_FIELDS = (
    SettingField(
        "num_steps",
        int,
        "steps K",
        "K: the sets an image is generated in (method §4)",
        "slider",
        low=1,
        high="N",
        step=1,
    ),
    SettingField(
        "num_rounds",
        int,
        "refinement rounds T",
        "T: refinement rounds after generation",
        "slider",
        low=0,
        ui_high=100,
        step=1,
    ),
    SettingField(
        "tokens_per_round",
        int,
        "tokens per round c",
        "c: the cells a round resamples",
        "slider",
        low=1,
        ui_high="N/2",
        step=1,
    ),
    SettingField(
        "cfg_scale",
        float,
        "CFG scale",
        "classifier-free guidance scale (1 = none; method §7)",
        "slider",
        low=0,
        ui_high=10,
        step=0.25,
    ),
    SettingField(
        "cfg_start",
        float,
        "CFG scale at the start",
        "guidance rises from this to the CFG scale during generation",
        "slider",
        low=0,
        ui_high=10,
        step=0.25,
    ),
    SettingField(
        "temperature",
        float,
        "temperature",
        "softmax temperature (0 = greedy)",
        "slider",
        low=0,
        ui_high=2,
        step=0.05,
    ),
    SettingField(
        "top_k",
        int,
        "top-k",
        "sample among the k likeliest codes (0 = all)",
        "slider",
        low=0,
        ui_high="V",
        step=1,
    ),
    SettingField(
        "top_p",
        float,
        "top-p",
        "sample within this probability mass (1 = all)",
        "slider",
        low=0,
        high=1,
        low_open=True,
        step=0.01,
    ),
    SettingField(
        "order",
        str,
        "generation order",
        "the order sets are generated in",
        "radio",
        choices=ORDERS,
    ),
    SettingField(
        "context",
        str,
        "refinement context",
        "cached: the KV cache with superseded slots masked; exact: rebuilt after each round",
        "radio",
        choices=CONTEXTS,
    ),
    SettingField(
        "lookahead",
        bool,
        "lookahead",
        "judge a round's candidates in the next round's forward (one forward per round; "
        "cached context only)",
        "checkbox",
    ),
    SettingField(
        "rescore",
        bool,
        "rescore in full context",
        "judge every cell of a generated image again in full context before refining "
        "(scoring a grid always does)",
        "checkbox",
    ),
    SettingField(
        "scorer",
        str,
        "scorer",
        "what judges a cell: head = the learned quality head; confidence = the token head's "
        "probability of the cell's code with its group hidden; auto = head when the model has "
        "a trained one, else confidence",
        "radio",
        choices=("auto", *SCORERS),
    ),
    SettingField(
        "patience",
        int,
        "patience",
        "stop after this many rounds in a row that accept nothing (0 = never)",
        "number",
        low=0,
        step=1,
    ),
    SettingField(
        "score_threshold",
        float,
        "score threshold",
        "stop when every quality score exceeds this (1 = never)",
        "slider",
        low=0,
        high=1,
        step=0.01,
    ),
)
FIELDS = {field.name: field for field in SETTING_FIELDS}


def resolve(bound: Bound, sizes: Mapping[str, int]) -> float | None:
    """A bound as a number: named sizes looked up in ``sizes`` ("N", "N/2", "V"); a size
    missing there (a command line, before the model is loaded) leaves the range open."""
    return sizes.get(bound) if isinstance(bound, str) else bound


def model_sizes(num_tokens: int, vocab_size: int | None = None) -> dict[str, int]:
    """The sizes a bound may name, for a model of ``num_tokens`` cells and ``vocab_size`` codes."""
    sizes = {"N": num_tokens, "N/2": max(1, num_tokens // 2)}
    return sizes if vocab_size is None else sizes | {"V": vocab_size}


def range_problem(field: SettingField, value, sizes: Mapping[str, int], high: Bound = None):
    """What is wrong with ``value`` for ``field`` (its range, its choices), or None.

    ``high`` adds an upper limit where the field's own range is open (the studio's request
    limits).
    """
    if field.choices:
        return None if value in field.choices else f"must be one of {field.choices}"
    if field.kind is bool or field.low is None:
        return None
    low, top = (
        resolve(field.low, sizes),
        resolve(field.high if field.high is not None else high, sizes),
    )
    above = value > low if field.low_open else value >= low
    if above and (top is None or value <= top):
        return None
    opening = "(" if field.low_open else "["
    wanted = f">= {low}" if top is None else f"in {opening}{low}, {top}]"
    return f"must be {wanted}, got {short_repr(value)}"


def short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


@dataclass(frozen=True)
class SamplerSettings:
    """How to generate and refine. Defaults follow the paper for a 16x16 grid (method §6, §7).

    ``context`` chooses how refinement sees the current image: "cached" keeps the KV cache and
    hides superseded/rejected slots with the mask; "exact" rebuilds the cache for the current
    image after every round that accepted something (slower: docs/results.md, "Refinement
    context and lookahead").
    ``lookahead`` evaluates round t's candidates in the forward that regenerates round t+1
    (one forward per round instead of two; cached context only).
    ``rescore`` judges every cell of a finished image again in full context (one forward, see
    ``judge.rescore``) after generation and forced regeneration, so refinement starts
    from, and compares against, scores that saw the whole image. Off by default: on the shipped
    emoji model it detects flaws better but refines less well (docs/results.md, "Full-context
    scores after generation"). Scoring a grid on its own (``ScanSampler.score``) always judges
    in full context.
    ``scorer`` chooses what judges a cell (``scan_core.sampling.judge``): "head", the quality
    head; "confidence", the token head's probability of the cell's code, which needs no quality
    head and has no scores in the generation layout, so it always judges the finished image in
    full context; "auto", which the sampler resolves per model (``ScanSampler.resolve``).
    """

    num_steps: int = 64
    num_rounds: int = 30
    tokens_per_round: int = 4
    cfg_scale: float = 4.0
    cfg_start: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    order: str = "random"
    context: str = "cached"
    lookahead: bool = False
    rescore: bool = False
    scorer: str = "auto"
    patience: int = 0  # stop after this many rounds in a row without an acceptance (0: never)
    score_threshold: float = 1.0  # stop when every score exceeds it (1.0: never)

    def replace(self, **changes) -> SamplerSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SamplerSettings:
        """Settings from a dict; unknown keys are ignored, old names read (``RENAMED_FIELDS``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in with_current_names(data).items() if k in known})

    def validate(self, num_tokens: int) -> SamplerSettings:
        """Raise ValueError naming the first bad setting and its valid range; return self."""
        sizes = model_sizes(num_tokens)
        checks = [
            (problem is None, f"{field.title} {problem}")
            for field in SETTING_FIELDS
            for problem in [range_problem(field, getattr(self, field.name), sizes)]
        ]
        checks.append(
            (not (self.lookahead and self.context == "exact"), "lookahead needs context='cached'")
        )
        checks += self._round_size_checks(num_tokens)
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid sampler setting: {message}")
        if self.temperature == 0:
            warnings.warn("temperature 0: greedy decoding (argmax), no randomness", stacklevel=2)
        return self

    def _round_size_checks(self, num_tokens: int) -> list[tuple[bool, str]]:
        """A round resamples c distinct cells, so c <= N, checked here because otherwise only the
        first round fails, after the whole generation. Lookahead picks round t+1's cells outside
        round t's, so with two or more rounds it needs 2c <= N. Without rounds c is unused."""
        c, rounds = self.tokens_per_round, self.num_rounds
        return [
            (
                rounds == 0 or c <= num_tokens,
                f"tokens_per_round (c) = {c} exceeds the {num_tokens} cells of an image (N); "
                "lower c or set num_rounds (T) to 0",
            ),
            (
                not (self.lookahead and rounds >= 2) or 2 * c <= num_tokens,
                f"tokens_per_round (c) = {c} exceeds {num_tokens // 2}, half the {num_tokens} "
                "cells of an image (N): with lookahead each round resamples other cells than the "
                "round before; lower c or turn lookahead off",
            ),
        ]

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0 or self.cfg_start != 1.0

    @property
    def rescores_decoded(self) -> bool:
        """Whether a decoded image is judged again in full context: when asked (``rescore``), and
        always under the confidence scorer, which gives no scores in the generation layout."""
        return self.rescore or self.scorer == "confidence"


def grid_defaults(num_tokens: int) -> SamplerSettings:
    """The paper's schedule (K 64, T 30, c 4 on 256 cells) scaled to ``num_tokens`` cells:
    K/N = 1/4 and T·c/N ~ 0.5, with c = 2 below 16x16 so rounds stay fine-grained."""
    return SamplerSettings(
        num_steps=max(1, num_tokens // 4),
        num_rounds=min(30, max(1, num_tokens // 4)),
        tokens_per_round=4 if num_tokens > 64 else 2,
    )


def recommended_settings(card: dict | None, num_tokens: int) -> SamplerSettings:
    """A model card's measured ``sampler`` settings, else ``grid_defaults``.

    Cards record the settings their evaluation chose (e.g. T = 0 when refinement did not help
    that model), so every front end starts from the evidence rather than from the paper.
    """
    chosen = (card or {}).get("sampler")
    if not isinstance(chosen, dict):
        return grid_defaults(num_tokens)
    return SamplerSettings.from_dict(chosen).validate(num_tokens)
