"""The SCAN transformer: one network, two heads (method §2).

The model is a pure network. A sequence is a list of *slots*; each slot is one of
- the class token (``SLOT_CLASS``, value = class id, cell = -1),
- a position instruction p_n (``SLOT_POSITION``, cell = n), which asks "what code goes at n?",
- a code x_n (``SLOT_CODE``, value = code, cell = n).
The sampler and the trainer build slots and attention masks (``model.sequence``); the model
only embeds, attends and projects. The same forward serves LlamaGen raster GPTs (code slots only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scan_core.model.config import ModelConfig
from scan_core.model.kv_cache import KVCache
from scan_core.model.layers import (
    Packed,
    RMSNorm,
    TransformerBlock,
    apply_rope,
    rope_2d_table,
    rope_cos_sin,
)

SLOT_CLASS, SLOT_POSITION, SLOT_CODE = 0, 1, 2


def bucket_rows(rows: int) -> int:
    """``rows`` rounded up to a number with three significant bits (..., 16, 20, 24, 28, 32,
    40, 48, ...): four shapes per doubling, at most 25% more rows."""
    step = 1 << max(0, rows.bit_length() - 3)
    return -(-rows // step) * step


@dataclass
class Chunk:
    """One forward's arguments (``Transformer.forward``), for ``forward_chunks``."""

    kinds: Tensor
    values: Tensor
    cells: Tensor
    mask: Tensor | None = None
    cache: KVCache | None = None
    cache_positions: Tensor | None = None


class ClassEmbedding(nn.Module):
    """Class table with one extra row (index num_classes) for the null class used by CFG."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class Transformer(nn.Module):
    """Llama-style decoder with position-instruction tokens, a token head and a quality head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        if config.has_pos_instruct:
            self.pos_instruct_embeddings = nn.Parameter(torch.zeros(1, dim))
        self.cls_embedding = ClassEmbedding(config.num_classes, dim)
        self.tok_embeddings = nn.Embedding(config.vocab_size, dim)
        self.tok_dropout = nn.Dropout(config.token_dropout)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(dim, config.norm_eps)
        self.output = nn.Linear(dim, config.vocab_size, bias=False)
        if config.has_quality_head:
            self.dis_norm = RMSNorm(dim, config.norm_eps)
            self.dis_output = nn.Linear(dim, 2, bias=False)
        # Whether the quality head can judge; a loader that adds the head untrained sets False
        # (scan_core.sampling.judge then scores by confidence). Not saved: state dicts stay as is.
        self.quality_head_trained = config.has_quality_head
        # The RoPE table is derived, never saved (the published state dicts lack it).
        self._rope_angles: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Initialise weights (LlamaGen: normal(0, 0.02), zero output heads). No-op on meta."""
        if self.tok_embeddings.weight.is_meta:
            return
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.zeros_(self.output.weight)
        if self.config.has_pos_instruct:
            nn.init.normal_(self.pos_instruct_embeddings, std=std)
        if self.config.has_quality_head:
            nn.init.zeros_(self.dis_output.weight)

    def rope_angles(self) -> Tensor:
        """Per-cell rotation angles (N, head_dim/2) on the weights' device, built once."""
        device = self.tok_embeddings.weight.device
        if self._rope_angles is None or self._rope_angles.device != device:
            table = rope_2d_table(
                self.config.grid_size, self.config.head_dim, self.config.rope_base
            )
            self._rope_angles = table.to(device)
        return self._rope_angles

    def embed(self, kinds: Tensor, values: Tensor, cells: Tensor, cos: Tensor, sin: Tensor):
        """Input embeddings for every slot. Shapes: kinds, values, cells (B, L) -> (B, L, D)."""
        cfg = self.config
        class_vec = self.cls_embedding(values.clamp(0, cfg.num_classes))
        code_vec = self.tok_dropout(self.tok_embeddings(values.clamp(0, cfg.vocab_size - 1)))
        out = torch.where((kinds == SLOT_CLASS).unsqueeze(-1), class_vec, code_vec)
        if cfg.has_pos_instruct:
            batch, length = kinds.shape
            # The instruction vector is rotated by its cell's RoPE here, and rotated again inside
            # attention like every slot of that cell ("double rotation", as trained upstream).
            base = self.pos_instruct_embeddings.view(1, 1, cfg.n_head, cfg.head_dim)
            position_vec = apply_rope(base.expand(batch, length, -1, -1), cos, sin)
            position_vec = position_vec.reshape(batch, length, cfg.dim).to(out.dtype)
            out = torch.where((kinds == SLOT_POSITION).unsqueeze(-1), position_vec, out)
        return out

    def forward(
        self,
        kinds: Tensor,
        values: Tensor,
        cells: Tensor,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        cache_positions: Tensor | None = None,
    ) -> Tensor:
        """Run the blocks over a chunk of slots and return final hidden states (B, L, D).

        Args:
            kinds, values, cells: (B, L) long slot descriptions (see module docstring).
            mask: bool (B or 1, L, Lk), True where a query may attend a key. Lk = L without a
                cache, else the cache's capacity. ``None`` means full attention (no cache only).
            cache: preallocated keys/values written at ``cache_positions`` (L,) long.
        Apply ``token_logits`` / ``quality_logits`` to the rows you need.
        """
        if (cache is None) != (cache_positions is None):
            raise ValueError("pass cache and cache_positions together")
        cos, sin = rope_cos_sin(self.rope_angles(), cells)
        x = self.embed(kinds, values, cells, cos, sin)
        for index, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layer(index)
            x = layer(x, cos, sin, mask, layer_cache, cache_positions)
        return x

    def forward_chunks(self, chunks: list[Chunk], bucket: bool = False) -> list[Tensor]:
        """Independent forwards (each its own batch, slots, mask and cache) in one pass; the
        hidden states (B, L, D) of each, equal to its own ``forward``'s to float rounding.

        Their slots are packed as the rows of one matrix, so every linear layer reads its
        weights once for all of them; attention runs per chunk. With ``bucket`` the rows are
        padded up to ``bucket_rows``: kernel libraries may keep state per matrix shape (oneDNN
        in bfloat16 keeps about 13 MB per batch size), and packing makes row counts vary.
        """
        if any((c.cache is None) != (c.cache_positions is None) for c in chunks):
            raise ValueError("pass cache and cache_positions together")
        parts, embedded, rotations = [], [], []
        for chunk in chunks:
            cos, sin = rope_cos_sin(self.rope_angles(), chunk.cells)
            x = self.embed(chunk.kinds, chunk.values, chunk.cells, cos, sin)
            embedded.append(x.flatten(0, 1))
            rotations.append((cos.flatten(0, 1), sin.flatten(0, 1)))
            parts.append(
                Packed((x.shape[0], x.shape[1]), chunk.mask, chunk.cache, chunk.cache_positions)
            )
        rows = sum(p.rows for p in parts)
        padding = bucket_rows(rows) - rows if bucket else 0
        if padding:  # zero rows: zero rotations, and they stay zero through every norm
            embedded.append(embedded[0].new_zeros(padding, self.config.dim))
            rotations.append((rotations[0][0].new_zeros(padding, rotations[0][0].shape[1]),) * 2)
        x = torch.cat(embedded)
        cos, sin = (torch.cat(r) for r in zip(*rotations, strict=True))
        for index, layer in enumerate(self.layers):
            x = layer.forward_packed(x, cos, sin, parts, index)
        pieces = x[:rows].split([p.rows for p in parts])
        return [piece.view(*p.shape, -1) for piece, p in zip(pieces, parts, strict=True)]

    def token_logits(self, hidden: Tensor) -> Tensor:
        """Gen head: (..., D) -> (..., V) float32 logits over codes."""
        return self.output(self.norm(hidden)).float()

    def quality_logits(self, hidden: Tensor) -> Tensor:
        """Eva head: (..., D) -> (..., 2) float32 logits; class 1 means "this code is good"."""
        if not self.config.has_quality_head:
            raise RuntimeError(
                f"this {self.config.arch} model has no quality head; load or fine-tune a SCAN model"
            )
        return self.dis_output(self.dis_norm(hidden)).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
