"""Building blocks of the LlamaGen VQ tokenizer (``scan_core.tokenizer.vq``): convolutional levels.

Attribute names are fixed by the upstream state dict (``norm1``, ``nin_shortcut``, ``q``, ``k``,
``v``, ``proj_out``, ``res``, ``attn``, ``downsample``, ``upsample``, ``mid.0``/``1``/``2``).
Shapes: features (B, C, h, w) in and out; resampling halves or doubles h and w.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORM_GROUPS = 32
NORM_EPS = 1e-6


def group_norm(channels: int) -> nn.GroupNorm:
    # The published weights use 32 groups everywhere; we refuse other widths instead of silently
    # changing the group count, so every preset stays the exact upstream architecture.
    if channels % NORM_GROUPS != 0:
        raise ValueError(f"GroupNorm({NORM_GROUPS}) needs channels divisible by 32, got {channels}")
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """Residual block: (GroupNorm, swish, 3x3 conv) x 2; 1x1 ``nin_shortcut`` on width change."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 conv projections and scale c^-0.5."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def tokens(conv: nn.Conv2d) -> torch.Tensor:  # (B, C, h, w) -> (B, 1, h*w, C)
            return conv(h).flatten(2).transpose(1, 2).unsqueeze(1)

        # SDPA's default scale is 1/sqrt(C), exactly the upstream c^-0.5 for a single head.
        out = F.scaled_dot_product_attention(tokens(self.q), tokens(self.k), tokens(self.v))
        out = out.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero padding (0, 1, 0, 1): right/bottom only, as upstream."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsample followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConvLevel(nn.Module):
    """One resolution level: residual blocks, optional attention after each, optional resampling.

    ``resample`` is ``"down"`` (encoder), ``"up"`` (decoder) or ``None`` (the level's module is then
    absent, as in the upstream state dict).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        with_attention: bool,
        resample: str | None,
        dropout: float,
    ) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.res = nn.ModuleList(
            ResnetBlock(widths[j], widths[j + 1], dropout) for j in range(num_blocks)
        )
        self.attn = nn.ModuleList(
            AttentionBlock(out_channels) for _ in range(num_blocks if with_attention else 0)
        )
        self.resample = resample
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)
        elif resample is not None:
            raise ValueError(f"resample must be 'down', 'up' or None, got {resample!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.res):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[index](x)
        if self.resample == "down":
            x = self.downsample(x)
        elif self.resample == "up":
            x = self.upsample(x)
        return x


def mid_block(channels: int, dropout: float) -> nn.Sequential:
    # Sequential so the keys are mid.0 (res), mid.1 (attention), mid.2 (res), as upstream.
    return nn.Sequential(
        ResnetBlock(channels, channels, dropout),
        AttentionBlock(channels),
        ResnetBlock(channels, channels, dropout),
    )
