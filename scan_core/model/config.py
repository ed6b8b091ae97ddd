"""Frozen configurations and presets for the SCAN transformer and the VQ tokenizer.

Presets differ only in size fields. The parameter count beside each preset is asserted by
tests on the ``meta`` device (no memory is allocated).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def find_multiple(n: int, k: int) -> int:
    """Round ``n`` up to a multiple of ``k`` (LlamaGen's FFN sizing rule)."""
    return n if n % k == 0 else n + k - (n % k)


def strict_from_dict(cls, data: dict):
    """``cls(**data)`` for a dataclass, refusing unknown keys by name (a typo in a stored config
    must not silently fall back to a default)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    return cls(**data)


@dataclass(frozen=True)
class ModelConfig:
    """Size and behaviour of the SCAN / RandAR / LlamaGen transformer (method §2)."""

    dim: int = 1024
    n_layer: int = 24
    n_head: int = 16
    vocab_size: int = 16384
    num_classes: int = 1000
    grid_size: int = 16  # the image is a grid_size x grid_size grid of codes
    multiple_of: int = 256  # FFN hidden size is rounded up to this
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    class_dropout: float = 0.1  # probability of the null class in training (feeds CFG)
    # "scan": position-instruction tokens + quality head; "randar": position-instruction tokens,
    # no quality head; "llamagen": raster-order GPT with neither.
    arch: str = "scan"

    def __post_init__(self) -> None:
        if self.dim % self.n_head != 0:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4 != 0:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        if self.arch not in ("scan", "randar", "llamagen"):
            raise ValueError(f"arch must be 'scan', 'randar' or 'llamagen', got {self.arch!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_dim(self) -> int:
        return find_multiple(int(2 * 4 * self.dim / 3), self.multiple_of)

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def has_quality_head(self) -> bool:
        return self.arch == "scan"

    @property
    def has_pos_instruct(self) -> bool:
        return self.arch != "llamagen"

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return strict_from_dict(cls, data)


# name -> (config, parameter count with the quality head). Counts from method §2 (paper sizes).
MODEL_PRESETS: dict[str, tuple[ModelConfig, int]] = {
    "SCAN-L": (ModelConfig(dim=1024, n_layer=24, n_head=16), 342_915_072),
    "SCAN-XL": (ModelConfig(dim=1280, n_layer=36, n_head=20), 774_704_640),
    "SCAN-XXL": (ModelConfig(dim=1536, n_layer=48, n_head=24), 1_410_978_816),
    # Small presets: tests and the embedded default (8x8 grid).
    "SCAN-tiny": (
        ModelConfig(
            dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, grid_size=4, multiple_of=32
        ),
        115_968,
    ),
    "SCAN-S": (
        ModelConfig(dim=256, n_layer=6, n_head=4, vocab_size=512, num_classes=32, grid_size=8),
        5_386_752,
    ),
}


def model_preset(name: str, **changes) -> ModelConfig:
    """Look up a model preset by name, optionally overriding fields."""
    if name not in MODEL_PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[name][0].replace(**changes) if changes else MODEL_PRESETS[name][0]


@dataclass(frozen=True)
class VQConfig:
    """LlamaGen VQ tokenizer architecture (method §3). Defaults are VQ-16."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # encoder; the decoder uses num_res_blocks + 1
    z_channels: int = 256
    dropout: float = 0.0
    image_size: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    def replace(self, **changes) -> VQConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["channel_mult"] = list(self.channel_mult)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> VQConfig:
        return strict_from_dict(cls, data)


# name -> (config, parameter count without the codebook_used buffer).
VQ_PRESETS: dict[str, tuple[VQConfig, int]] = {
    "VQ-16": (VQConfig(), 71_883_403),
    "VQ-tiny": (
        VQConfig(
            codebook_size=64,
            codebook_embed_dim=4,
            base_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            z_channels=32,
            image_size=16,
        ),
        739_111,
    ),
    "VQ-S": (
        VQConfig(
            codebook_size=512,
            codebook_embed_dim=8,
            base_channels=32,
            channel_mult=(1, 2, 2),
            num_res_blocks=2,
            z_channels=64,
            image_size=32,
        ),
        1_444_075,
    ),
}


def vq_preset(name: str, **changes) -> VQConfig:
    """Look up a tokenizer preset by name, optionally overriding fields."""
    if name not in VQ_PRESETS:
        raise KeyError(f"unknown tokenizer preset {name!r}; choose one of {sorted(VQ_PRESETS)}")
    return VQ_PRESETS[name][0].replace(**changes) if changes else VQ_PRESETS[name][0]
