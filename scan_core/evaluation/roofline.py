"""Matmul FLOPs of the transformer's calls, from its config and the rows they run, and the
roofline floor they imply.

A call to the network over B x L query slots attending Lk keys costs, per layer,
2 (B L) P_block for the linear layers (P_block their weights: qkv, output, SwiGLU's three) and
4 (B L) Lk D for attention (Q K^T and the weighted sum of V). A head ``nn.Linear`` costs
2 rows x its weights. Only matrix products are counted (norms, RoPE, softmax, SiLU and sampling
are a few FLOPs per element): the count ``torch.utils.flop_counter`` gives, tested against it.
A call must read every streamed weight once and do its FLOPs, so it takes at least
max(weight bytes / bandwidth, FLOPs / matmul peak): the roofline floor. ``NetworkTimer``
records every call's FLOPs (and times the calls) through hooks, from the shapes it really gets.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from scan_core.evaluation.machine import clock
from scan_core.model.config import ModelConfig
from scan_core.model.network import Transformer

FORWARD_SIGNATURE = inspect.signature(Transformer.forward)  # how the hooks read a call's inputs


def block_linear_weights(config: ModelConfig) -> int:
    """Weights of one block's linear layers: fused qkv (3 D^2), output (D^2), SwiGLU (3 D F)."""
    return 4 * config.dim**2 + 3 * config.dim * config.ffn_dim


def network_flops(config: ModelConfig, rows: int, keys: int) -> int:
    """Matmul FLOPs of one ``Transformer.forward`` (heads excluded).

    Args:
        rows: query slots run, B x L: a CFG batch counts twice (conditional and null class).
        keys: key slots each query attends, Lk (the cache prefix the mask covers; L uncached).
    """
    per_layer = 2 * rows * block_linear_weights(config) + 4 * rows * keys * config.dim
    return config.n_layer * per_layer


def linear_flops(rows: int, weights: int) -> int:
    """Matmul FLOPs of an ``nn.Linear`` (a head) applied to ``rows`` rows."""
    return 2 * rows * weights


def attended_keys(length: int, mask: Tensor | None, cache_capacity: int | None) -> int:
    """Lk for a forward over ``length`` slots, as ``Attention.forward`` slices its keys: the mask's
    width with a cache (the whole cache without a mask), else the chunk itself."""
    if cache_capacity is None:
        return length
    return cache_capacity if mask is None else mask.shape[-1]


def roofline_seconds(
    call_flops: list[float], weight_bytes: int, bandwidth: float, peak_flops: float
) -> float:
    """Floor of a sequence of network calls: each streams every weight once and does its FLOPs,
    so each takes at least the larger of the two; the floors add up."""
    return sum(max(weight_bytes / bandwidth, flops / peak_flops) for flops in call_flops)


def ridge_rows(config: ModelConfig, weight_bytes: int, bandwidth: float, peak: float) -> float:
    """Query rows per forward at which compute time equals streaming time (attention and heads
    left out): below it a forward is bandwidth-bound, above it compute-bound."""
    per_row = network_flops(config, 1, 0)
    return weight_bytes * peak / (bandwidth * per_row)


class NetworkTimer:
    """Counts transformer forwards, times them and the output heads, and records each forward's
    matmul FLOPs (heads included), all through hooks.

    The heads run outside ``Transformer.forward`` (the sampler applies them to the rows it
    needs), so they get hooks of their own; what the network does not explain is sampling,
    masks and bookkeeping. FLOPs come from the config and the shapes each call really gets.
    """

    def __init__(self, model: Transformer, device: torch.device) -> None:
        self.device, self.count, self.seconds, self._start = device, 0, 0.0, 0.0
        self.calls: list[int] = []  # matmul FLOPs per forward, its heads added to it
        self._taken = 0
        heads = [m for m in (model.output, getattr(model, "dis_output", None)) if m is not None]
        self._handles = []
        for module in [model, *heads]:
            self._handles.append(module.register_forward_pre_hook(self._begin, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._end))
        self._model = model

    def _begin(self, module, args, kwargs) -> None:
        if module is self._model:
            self.calls.append(_forward_flops(module.config, args, kwargs))
        elif self.calls:  # a head, on the rows of the forward before it
            self.calls[-1] += linear_flops(
                args[0].numel() // module.in_features, module.weight.numel()
            )
        self._start = clock(self.device)

    def _end(self, module, *_) -> None:
        self.count += module is self._model
        self.seconds += clock(self.device) - self._start

    def take(self) -> list[int]:
        """FLOPs of the forwards since the last ``take`` (or ``reset``)."""
        new, self._taken = self.calls[self._taken :], len(self.calls)
        return new

    def reset(self) -> None:
        self.count, self.seconds, self.calls, self._taken = 0, 0.0, [], 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _forward_flops(config: ModelConfig, args: tuple, kwargs: dict) -> int:
    """Matmul FLOPs of ``Transformer.forward(kinds, values, cells, mask, cache, ...)``."""
    named = FORWARD_SIGNATURE.bind(None, *args, **kwargs).arguments
    kinds, mask, cache = named["kinds"], named.get("mask"), named.get("cache")
    keys = attended_keys(kinds.shape[1], mask, None if cache is None else cache.capacity)
    return network_flops(config, kinds.numel(), keys)
