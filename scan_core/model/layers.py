"""Building blocks of the Llama-style transformer: RMSNorm, SwiGLU, 2D RoPE, attention.

Names follow the LlamaGen / RandAR / SCAN state dicts so published weights load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scan_core.model.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm in float32, cast back (as the published weights expect)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.ffn_dim
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.dropout = nn.Dropout(config.ffn_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def rope_2d_table(grid_size: int, head_dim: int, base: float = 10000.0) -> Tensor:
    """Rotation angles for every grid cell, shape (grid_size**2, head_dim // 2), raster order.

    The first half of each head's rotation pairs turns with the row index, the second half with
    the column index; frequency f_k = base^(-2k / (head_dim / 2)) for k < head_dim / 4 (method §2).
    """
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) * 2 / (head_dim // 2))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows = coords[:, None, None] * freqs  # (h, 1, quarter)
    cols = coords[None, :, None] * freqs  # (1, w, quarter)
    angles = torch.cat(
        [rows.expand(grid_size, grid_size, quarter), cols.expand(grid_size, grid_size, quarter)],
        dim=-1,
    )
    return angles.reshape(grid_size * grid_size, head_dim // 2).float()


def rope_cos_sin(angles: Tensor, cells: Tensor) -> tuple[Tensor, Tensor]:
    """Cos and sin for each slot; cells < 0 (the class token) get all-zero rows.

    Shapes: angles (N, hd/2); cells (B, L) long -> cos, sin (B, L, hd/2).
    The zero rows make the class token's q and k exactly zero, as in the published training.
    """
    picked = angles[cells.clamp(min=0)]
    valid = (cells >= 0).unsqueeze(-1).to(picked.dtype)
    return torch.cos(picked) * valid, torch.sin(picked) * valid


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (2m, 2m+1) of every head (LLaMA style, not rotate-half).

    Shapes: x (B, L, H, hd); cos, sin (B, L, hd/2).
    """
    x32 = x.float().reshape(*x.shape[:-1], -1, 2)
    real, imag = x32[..., 0], x32[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    out = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return out.flatten(-2).type_as(x)


@dataclass
class Packed:
    """One chunk of a packed forward (``Transformer.forward_chunks``): its batch and length,
    its mask, and its cache (a ``KVCache``) with the slots to write."""

    shape: tuple[int, int]  # (B, L)
    mask: Tensor | None
    cache: object | None
    cache_positions: Tensor | None

    @property
    def rows(self) -> int:
        return self.shape[0] * self.shape[1]

    def context(self, layer: int) -> tuple:
        """``Attention.attend``'s arguments after q, k, v, for block ``layer``."""
        cache = None if self.cache is None else self.cache.layer(layer)
        return self.mask, cache, self.cache_positions


class Attention(nn.Module):
    """Multi-head attention with a fused qkv projection and an optional external KV cache."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.wqkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: tuple[Tensor, Tensor] | None = None,
        cache_positions: Tensor | None = None,
    ) -> Tensor:
        """Shapes: x (B, L, D); mask bool (B or 1, L, Lk), True = may attend.

        With a cache (k, v each (B, H, Lmax, hd)), the new keys and values are written at
        ``cache_positions`` (L,) and the queries attend the first Lk slots through ``mask``
        (Lk <= Lmax; every written position must lie below Lk).
        """
        q, k, v = self.rotated_qkv(x, cos, sin)
        return self.resid_dropout(self.wo(self.attend(q, k, v, mask, cache, cache_positions)))

    def rotated_qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries and keys (rotated) and values, each (B, L, H, hd), of x (B, L, D)."""
        *lead, dim = x.shape
        q, k, v = self.wqkv(x).split(dim, dim=-1)
        shape = (*lead, self.n_head, self.head_dim)
        return (
            apply_rope(q.view(shape), cos, sin),
            apply_rope(k.view(shape), cos, sin),
            v.view(shape),
        )

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        cache: tuple[Tensor, Tensor] | None = None,
        cache_positions: Tensor | None = None,
    ) -> Tensor:
        """The attention between the two projections: q, k, v (B, L, H, hd) -> (B, L, D)."""
        batch, length = q.shape[:2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, hd)
        if cache is not None:
            cache_k, cache_v = cache
            cache_k[:, :, cache_positions] = k.to(cache_k.dtype)
            cache_v[:, :, cache_positions] = v.to(cache_v.dtype)
            # Attend only the prefix the mask covers: slots past it are unwritten, and on a CPU
            # the attention over a mostly empty cache costs 20-25% of an early step.
            width = cache_k.shape[2] if mask is None else mask.shape[-1]
            k, v = cache_k[:, :, :width], cache_v[:, :, :width]
        attn_mask = None if mask is None else mask.unsqueeze(1)  # (B, 1, L, Lk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return out.transpose(1, 2).reshape(batch, length, self.n_head * self.head_dim)


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, cache_positions=None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, cache_positions)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_packed(self, x: Tensor, cos: Tensor, sin: Tensor, parts: list[Packed], layer: int):
        """Independent chunks whose slots are packed as rows of ``x`` (T, D), part after part,
        with their rotations ``cos``, ``sin`` (T, hd/2) (rows past the last part are padding):
        the projections, rotations and feed-forward take every row at once, attention runs per
        part against its own mask and cache (this is block ``layer`` of the network)."""
        attention = self.attention
        q, k, v = attention.rotated_qkv(self.attention_norm(x)[None], cos[None], sin[None])
        outs, start = [], 0
        for part in parts:
            rows = slice(start, start + part.rows)
            shape = (*part.shape, attention.n_head, attention.head_dim)
            pieces = (t[0, rows].view(shape) for t in (q, k, v))
            outs.append(attention.attend(*pieces, *part.context(layer)).flatten(0, 1))
            start += part.rows
        if start < x.shape[0]:  # padding
            outs.append(x.new_zeros(x.shape[0] - start, x.shape[1]))
        h = x + attention.resid_dropout(attention.wo(torch.cat(outs)))
        return h + self.feed_forward(self.ffn_norm(h))
