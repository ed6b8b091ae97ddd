"""LlamaGen VQ tokenizer (method §3): images <-> grids of discrete codes.

State-dict compatible with LlamaGen's ``vq_ds16_c2i.pt`` (keys ``encoder.*``, ``decoder.*``,
``quantize.embedding.weight``, ``quant_conv.*``, ``post_quant_conv.*``). The file's
``quantize.codebook_used`` buffer (a training-time usage log) is deliberately not registered here;
the checkpoint loader drops it by name.

Shapes: images (B, 3, H, W) in [-1, 1]; latents (B, C, h, w) with C = codebook_embed_dim and
h = H / downsample; codes (B, h, w) int64 in raster (row-major) order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scan_core.model.config import VQConfig
from scan_core.tokenizer.blocks import (
    NORM_EPS,
    NORM_GROUPS,
    AttentionBlock,
    ConvLevel,
    Downsample,
    ResnetBlock,
    Upsample,
    group_norm,
    mid_block,
)

# The convolutional building blocks live in vq_blocks; their names stay importable from here.
__all__ = [
    "ENTROPY_TEMPERATURE",
    "NORM_EPS",
    "NORM_GROUPS",
    "SEARCH_CHUNK",
    "AttentionBlock",
    "ConvLevel",
    "Decoder",
    "Downsample",
    "Encoder",
    "ResnetBlock",
    "Upsample",
    "VQModel",
    "VectorQuantizer",
    "entropy_loss",
]

# Rows of z scored against the codebook at once: bounds the distance matrix to
# SEARCH_CHUNK x codebook_size floats (256 MiB for VQ-16) whatever the batch size.
SEARCH_CHUNK = 4096
# Softmax temperature of the entropy loss over negative distances (LlamaGen / MaskGIT value).
ENTROPY_TEMPERATURE = 0.01


class Encoder(nn.Module):
    """Images (B, 3, H, W) -> features (B, z_channels, H/f, W/f) with f = 2^(levels-1)."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        widths = [config.base_channels * mult for mult in config.channel_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(3, config.base_channels, kernel_size=3, padding=1)
        self.conv_blocks = nn.ModuleList(
            ConvLevel(
                in_channels=([config.base_channels] + widths)[level],
                out_channels=widths[level],
                num_blocks=config.num_res_blocks,
                with_attention=level == last,  # attention only at the lowest resolution
                resample="down" if level != last else None,
                dropout=config.dropout,
            )
            for level in range(len(widths))
        )
        self.mid = mid_block(widths[-1], config.dropout)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], config.z_channels, kernel_size=3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(images)
        for level in self.conv_blocks:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features (B, z_channels, h, w) -> images (B, 3, h*f, w*f); levels in reverse order."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        widths = [config.base_channels * mult for mult in reversed(config.channel_mult)]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.z_channels, widths[0], kernel_size=3, padding=1)
        self.mid = mid_block(widths[0], config.dropout)
        self.conv_blocks = nn.ModuleList(
            ConvLevel(
                in_channels=([widths[0]] + widths)[level],
                out_channels=widths[level],
                num_blocks=config.num_res_blocks + 1,
                with_attention=level == 0,  # the first decoder level is the lowest resolution
                resample="up" if level != last else None,
                dropout=config.dropout,
            )
            for level in range(len(widths))
        )
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 3, kernel_size=3, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(features))
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def entropy_loss(affinity: torch.Tensor, temperature: float = ENTROPY_TEMPERATURE) -> torch.Tensor:
    """Per-sample entropy minus codebook-average entropy of softmax(affinity / temperature).

    Low per-sample entropy makes assignments confident; high average entropy spreads usage over
    the codebook. ``affinity`` is (N, K), here the negative squared distances.
    """
    logits = affinity.float() / temperature
    probs = F.softmax(logits, dim=-1)
    sample_entropy = -(probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    average = probs.mean(0)
    average_entropy = -(average * torch.log(average + 1e-5)).sum()
    return sample_entropy - average_entropy


class VectorQuantizer(nn.Module):
    """Nearest-codeword quantizer; with ``l2_norm`` z and the codebook live on the unit sphere.

    Calling it maps z (B, C, h, w) to ``(z_q, codes)``: z_q (B, C, h, w) and codes (B, h, w).
    """

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.codebook_size = config.codebook_size
        self.l2_norm = config.codebook_l2_norm
        self.commit_loss_beta = config.commit_loss_beta
        self.entropy_loss_ratio = config.entropy_loss_ratio
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_embed_dim)
        # Upstream init: tiny uniform values, then projected to the sphere when l2_norm is on.
        nn.init.uniform_(
            self.embedding.weight, -1.0 / config.codebook_size, 1.0 / config.codebook_size
        )
        if self.l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    def codebook(self) -> torch.Tensor:
        """The codewords used for search and lookup, (K, C); L2-normalised when l2_norm is on."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        # (B, C, h, w) -> (B*h*w, C), normalised like the codebook.
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return F.normalize(flat, dim=-1) if self.l2_norm else flat

    @staticmethod
    def _squared_distances(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        # (N, C), (K, C) -> (N, K); ||z||^2 + ||e||^2 - 2 z.e, in float32 so bf16 models agree.
        flat, codebook = flat.float(), codebook.float()
        return flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2.0 * flat @ codebook.T

    @torch.no_grad()
    def nearest_codes(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codeword for each row of ``flat`` (N, C) -> (N,) int64."""
        codebook = self.codebook()
        chunks = [
            self._squared_distances(part, codebook).argmin(dim=1)
            for part in flat.split(SEARCH_CHUNK)
        ]
        return torch.cat(chunks) if chunks else flat.new_zeros(0, dtype=torch.long)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> latents (B, C, h, w) from the (normalised) codebook."""
        return F.embedding(codes, self.codebook()).permute(0, 3, 1, 2).contiguous()

    def quantize_with_losses(
        self, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Quantize z (B, C, h, w) and return ``(z_q, codes, losses)``.

        z_q carries a straight-through gradient to z when z requires grad. Losses (scalars):
        ``codebook`` = mean ||sg[z] - e||^2 (moves the codewords), ``commitment`` =
        beta * mean ||z - sg[e]||^2 (moves the encoder), ``entropy`` = ratio * entropy loss.
        """
        batch, channels, height, width = z.shape
        flat = self._flatten(z)  # (N, C)
        codes = self.nearest_codes(flat)  # (N,)
        chosen = F.embedding(codes, self.codebook())  # (N, C), differentiable w.r.t. the codebook
        losses = {
            "codebook": F.mse_loss(chosen, flat.detach()),
            "commitment": self.commit_loss_beta * F.mse_loss(flat, chosen.detach()),
            "entropy": z.new_zeros(()),
        }
        if self.entropy_loss_ratio > 0:
            affinity = -self._squared_distances(flat, self.codebook())
            losses["entropy"] = self.entropy_loss_ratio * entropy_loss(affinity)
        # Straight-through only when a gradient is wanted: inference then returns the codewords
        # bit-for-bit, so decoding latents and decoding codes give identical images.
        quantized = flat + (chosen - flat).detach() if flat.requires_grad else chosen
        z_q = quantized.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()
        return z_q, codes.reshape(batch, height, width), losses

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, C, h, w) -> (z_q (B, C, h, w), codes (B, h, w))."""
        z_q, codes, _ = self.quantize_with_losses(z)
        return z_q, codes


class VQModel(nn.Module):
    """LlamaGen VQ tokenizer: encoder, quant_conv, quantizer, post_quant_conv, decoder.

    ``model.quantize(z)`` is the :class:`VectorQuantizer` (its module name is fixed by the state
    dict): z (B, C, h, w) -> (z_q, codes).
    """

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(
            config.codebook_embed_dim, config.z_channels, kernel_size=1
        )

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side (16 for VQ-16)."""
        return self.config.downsample

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(
                f"expected float images in [-1, 1], got dtype {images.dtype} "
                "(convert uint8 pixels with scan_core.images.pil_to_tensor)"
            )
        factor = self.downsample_factor
        height, width = images.shape[-2:]
        if height % factor or width % factor or height == 0 or width == 0:
            size = self.config.image_size
            raise ValueError(
                f"image height and width must be positive multiples of {factor} "
                f"(e.g. {size}x{size}), got {height}x{width}"
            )

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if codes.numel() == 0:
            return
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.config.codebook_size:
            raise ValueError(
                f"codes must lie in [0, {self.config.codebook_size}), got values in [{low}, {high}]"
            )

    def encode_to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> unquantized latents (B, C, H/f, W/f)."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, H/f, W/f) int64, raster order.

        Runs without gradient: codes are discrete. Train through :meth:`forward` instead.
        """
        _, codes = self.quantize(self.encode_to_latents(images))
        return codes

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> quantized latents (B, C, h, w), the codewords used for decoding."""
        if codes.ndim != 3:
            raise ValueError(f"expected codes of shape (B, h, w), got {tuple(codes.shape)}")
        self._check_codes(codes)
        return self.quantize.lookup(codes.long())

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Quantized latents (B, C, h, w) -> images (B, 3, h*f, w*f), not clamped."""
        return self.decoder(self.post_quant_conv(latents))

    def decode_codes(
        self, codes: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Codes -> images (B, 3, h*f, w*f), nominally [-1, 1] and NOT clamped.

        Args:
            codes: (B, h, w), or (B, h*w) in raster order.
            grid: (h, w) for flat codes; inferred as square when omitted.
        """
        if codes.ndim == 2:
            length = codes.shape[1]
            if grid is None:
                side = math.isqrt(length)
                if side * side != length:
                    raise ValueError(
                        f"cannot infer a square grid from {length} codes; pass grid=(h, w)"
                    )
                grid = (side, side)
            if grid[0] * grid[1] != length:
                raise ValueError(f"grid {tuple(grid)} does not hold {length} codes")
            codes = codes.reshape(codes.shape[0], grid[0], grid[1])
        elif codes.ndim != 3:
            raise ValueError(
                f"expected codes of shape (B, h, w) or (B, h*w), got {tuple(codes.shape)}"
            )
        return self.decode_latents(self.codes_to_latents(codes))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruct images (B, 3, H, W) through the quantizer with a straight-through gradient.

        Returns ``(reconstruction, losses)``; ``losses`` holds the VQ terms ``codebook``,
        ``commitment`` (beta already applied) and ``entropy`` (0 unless entropy_loss_ratio > 0).
        The reconstruction / perceptual / adversarial terms belong to the trainer.
        """
        z_q, _, losses = self.quantize.quantize_with_losses(self.encode_to_latents(images))
        return self.decode_latents(z_q), losses
