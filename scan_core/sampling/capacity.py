"""The cache plan: how many slots an operation reserves before its first step.

The cache never grows, so every operation (``scan_core.sampling.sampler``) sizes it up front as
the sum of what its phases reserve, each phase's count defined beside the code that reserves it
(decoding, full-context judging, refinement rounds). Settings must be resolved
(``ScanSampler.resolve``): the counts depend on the scorer, and "auto" plans as "head".
"""

from __future__ import annotations

from scan_core.sampling.decode import decode_slots
from scan_core.sampling.judge import full_context_slots
from scan_core.sampling.refine import refinement_slots
from scan_core.sampling.settings import SamplerSettings


def cache_capacity(
    settings: SamplerSettings,
    num_tokens: int,
    *,
    prefilled: int,
    decoded: int,
    rounds: int,
    rescoring: bool,
) -> int:
    """Slots an operation reserves before its first step (the cache never grows): the sum of
    what its phases reserve, each phase's count defined beside the code that reserves it.

    Args:
        prefilled: known cells re-encoded in one forward; that phase opens the sequence with
            the class slot (so does the first decoded set when nothing is known: 0 here).
        decoded: cells drawn set by set (generated, finished or forced).
        rounds: refinement rounds to plan for.
        rescoring: whether a full-context judgement of the finished image follows.
    """
    return (
        decode_slots(prefilled, with_class=True)
        + decode_slots(decoded, with_class=False)
        + (full_context_slots(num_tokens, settings.scorer) if rescoring else 0)
        + refinement_slots(settings, rounds)
    )


def generation_capacity(settings: SamplerSettings, num_tokens: int) -> int:
    """Slots of a fresh generation of ``num_tokens`` cells and its refinement rounds."""
    return cache_capacity(
        settings,
        num_tokens,
        prefilled=0,
        decoded=num_tokens,
        rounds=settings.num_rounds,
        rescoring=settings.rescores_decoded,
    )
