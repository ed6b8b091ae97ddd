"""Sampler settings and their validation (the sampler's rules, shared with the CLI and the app)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

CONTEXTS = ("cached", "exact")
ORDERS = ("random", "raster")

# Names that files written before the rename still carry (traces, model cards' "sampler",
# checkpoints/evaluation.json, run manifests, saved training configs): old -> today's.
RENAMED_FIELDS = {"refine_rounds": "num_rounds", "refine_size": "tokens_per_round"}


def with_current_names(data: dict) -> dict:
    """``data`` with old field names replaced by today's (a today's name present wins)."""
    renamed = {RENAMED_FIELDS.get(key, key): value for key, value in data.items()}
    return renamed | {key: value for key, value in data.items() if key not in RENAMED_FIELDS}


@dataclass(frozen=True)
class SamplerSettings:
    """How to generate and refine. Defaults follow the paper for a 16x16 grid (method §6, §7).

    ``context`` chooses how refinement sees the current image: "cached" keeps the KV cache and
    hides superseded/rejected slots with the mask; "exact" rebuilds the cache for the current
    image after every round that accepted something (slower, see the README's measurements).
    ``lookahead`` evaluates round t's candidates in the forward that regenerates round t+1
    (one forward per round instead of two; cached context only).
    ``rescore`` judges every cell of a finished image again in full context (one forward, see
    ``refine.rescore``) after generation and forced regeneration, so refinement starts
    from, and compares against, scores that saw the whole image. Off by default: on the shipped
    emoji model it detects flaws better but refines less well (README). Scoring a grid on its
    own (``ScanSampler.score``) always judges in full context.
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
        checks = [
            (1 <= self.num_steps <= num_tokens, f"num_steps (K) must be in [1, {num_tokens}]"),
            (self.num_rounds >= 0, "num_rounds (T) must be >= 0"),
            (self.tokens_per_round >= 1, "tokens_per_round (c) must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0 (0 means greedy)"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.cfg_scale >= 0 and self.cfg_start >= 0, "cfg scales must be >= 0"),
            (self.order in ORDERS, f"order must be one of {ORDERS}"),
            (self.context in CONTEXTS, f"context must be one of {CONTEXTS}"),
            (self.patience >= 0, "patience must be >= 0 (0 disables early stopping)"),
            (0 <= self.score_threshold <= 1, "score_threshold must be in [0, 1]"),
            (not (self.lookahead and self.context == "exact"), "lookahead needs context='cached'"),
        ]
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
