"""Checkpoint layouts: key cleanup, kind and arch detection, configs inferred from tensor shapes.

Foreign layouts are recognised by their keys (method §2, §3): SCAN and RandAR safetensors, LlamaGen
GPT and LlamaGen VQ. Upstream weights do not store their sizes, so the config is read off tensor
shapes and matched against the published LlamaGen GPT-B/L/XL/XXL/3B and RandAR sizes and the
project's presets. Every key dropped, added or renamed is recorded in the :class:`LoadReport`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from scan_core.checkpoint.files import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CheckpointError,
    RawCheckpoint,
    few_keys,
)
from scan_core.model.config import MODEL_PRESETS, VQ_PRESETS, ModelConfig, VQConfig

# Entries some files carry that are not part of our modules: dropped by name, always reported.
_DERIVED_KEYS = {
    "freqs_cis": "derived RoPE table, recomputed from the config",
    "quantize.codebook_used": "training-time codebook usage log, not used for inference",
}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_QUALITY_HEAD = ("dis_norm.weight", "dis_output.weight")
LAYOUT_NAMES = {"scan": "SCAN", "randar": "RandAR", "llamagen": "LlamaGen GPT"}
# Published sizes (dim, n_layer, n_head); head_dim is 64 except for LlamaGen GPT-3B (100).
_FAMILY = {
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1280, 36, 20),
    "XXL": (1536, 48, 24),
    "3B": (3200, 24, 32),
}
_FAMILY_PREFIX = {"scan": "SCAN-", "randar": "RandAR-", "llamagen": "LlamaGen GPT-"}
_PUBLISHED = {"scan": ("L", "XL", "XXL"), "randar": ("L", "XL", "XXL"), "llamagen": tuple(_FAMILY)}


@dataclass(frozen=True)
class KeyChange:
    """Keys the loader added, dropped or renamed, with the reason."""

    keys: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        return f"{few_keys(list(self.keys))} ({self.reason})"


@dataclass
class LoadReport:
    """What a checkpoint turned out to be and exactly what the loader did to it."""

    path: str
    kind: str  # "model" | "tokenizer"
    container: str  # "safetensors" | "torch"
    layout: str = ""  # "scan-studio", "SCAN", "RandAR", "LlamaGen GPT", "LlamaGen VQ"
    config: ModelConfig | VQConfig | None = None
    preset: str | None = None
    num_parameters: int = 0
    added: list[KeyChange] = field(default_factory=list)
    dropped: list[KeyChange] = field(default_factory=list)
    renamed: list[KeyChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    card: dict | None = None

    def __str__(self) -> str:
        lines = [
            f"file:       {self.path}",
            f"kind:       {self.kind} ({self.layout} layout, {self.container} file)",
            f"preset:     {self.preset or 'none (custom sizes)'}",
            f"config:     {config_summary(self.config)}",
            f"parameters: {self.num_parameters:,}",
        ]
        for label, changes in (("added", self.added), ("dropped", self.dropped)):
            shown = [str(change) for change in changes] or ["none"]
            lines += [f"{label + ':':<11} {text}" for text in shown]
        lines += [f"renamed:    {change}" for change in self.renamed]
        lines += [f"note:       {note}" for note in self.notes]
        if self.card:
            lines.append(f"card:       {json.dumps(self.card, sort_keys=True)}")
        return "\n".join(lines)


def config_summary(config: ModelConfig | VQConfig | None) -> str:
    if isinstance(config, ModelConfig):
        return (
            f"arch={config.arch} dim={config.dim} n_layer={config.n_layer} n_head={config.n_head} "
            f"ffn={config.ffn_dim} vocab={config.vocab_size} classes={config.num_classes} "
            f"grid={config.grid_size}x{config.grid_size}"
        )
    if isinstance(config, VQConfig):
        return (
            f"codebook={config.codebook_size}x{config.codebook_embed_dim} "
            f"channels={config.base_channels} mult={config.channel_mult} "
            f"res_blocks={config.num_res_blocks} z={config.z_channels} "
            f"image={config.image_size} (grid {config.grid_size}x{config.grid_size})"
        )
    return "unknown"


# ------------------------------------------------------------------------------ interpretation


def normalise_keys(tensors: Mapping[str, Tensor], report: LoadReport) -> dict[str, Tensor]:
    """Strip wrapper prefixes and drop derived entries, recording both."""
    sd = dict(tensors)
    for prefix in _WRAPPER_PREFIXES:
        if sd and all(key.startswith(prefix) for key in sd):
            sd = {key[len(prefix) :]: value for key, value in sd.items()}
            report.renamed.append(KeyChange((f"{prefix}* -> *",), "wrapper prefix stripped"))
    for key, reason in _DERIVED_KEYS.items():
        if sd.pop(key, None) is not None:
            report.dropped.append(KeyChange((key,), reason))
    return sd


def kind_of(raw: RawCheckpoint) -> str:
    """ "model" or "tokenizer": from the own format's metadata, else from the keys."""
    meta = raw.metadata
    if meta.get("format") == FORMAT_NAME:
        if meta.get("version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{raw.path} is {FORMAT_NAME} format version {meta.get('version')!r}; this code "
                f"reads version {FORMAT_VERSION} (update SCAN Studio)"
            )
        if meta.get("kind") not in ("model", "tokenizer"):
            raise CheckpointError(f"{raw.path} has an unknown kind {meta.get('kind')!r}")
        return meta["kind"]
    keys = [
        key.split(".", 1)[-1] if key.startswith(_WRAPPER_PREFIXES) else key for key in raw.tensors
    ]
    if "tok_embeddings.weight" in keys:
        return "model"
    if "quantize.embedding.weight" in keys or any(k.startswith("encoder.") for k in keys):
        return "tokenizer"
    raise CheckpointError(
        f"{raw.path} is not a SCAN/RandAR/LlamaGen checkpoint (no tok_embeddings.weight or "
        f"quantize.embedding.weight; keys: {few_keys(sorted(raw.tensors))})"
    )


def check_kind(raw: RawCheckpoint, wanted: str) -> None:
    found = kind_of(raw)
    if found == wanted:
        return
    if found == "tokenizer":
        raise CheckpointError(f"{raw.path} is a VQ tokenizer checkpoint; pass it as --tokenizer")
    raise CheckpointError(f"{raw.path} is a transformer checkpoint; pass it as --model")


def file_arch(sd: Mapping[str, Tensor]) -> str:
    if any(key in sd for key in _QUALITY_HEAD):
        return "scan"
    return "randar" if "pos_instruct_embeddings" in sd else "llamagen"


def adapt_quality_head(
    sd: dict[str, Tensor], file_arch: str, want: bool | None, report: LoadReport
) -> str:
    """Add a fresh quality head (RandAR -> SCAN) or drop it (SCAN -> RandAR); return the arch."""
    if want is None or file_arch == ("scan" if want else "randar") or file_arch == "llamagen":
        if want and file_arch == "llamagen":
            raise CheckpointError(
                "a LlamaGen raster GPT has no position-instruction embedding, so it cannot become "
                "a SCAN model; start SCAN fine-tuning from a RandAR checkpoint instead"
            )
        return file_arch
    if not want:
        for key in _QUALITY_HEAD:
            sd.pop(key, None)
        reason = "quality head removed: loaded as RandAR (want_quality_head=False)"
        report.dropped.append(KeyChange(_QUALITY_HEAD, reason))
        return "randar"
    ref = sd["tok_embeddings.weight"]
    # Same init as Transformer.reset_parameters: unit norm, zero output, so every score is 0.5.
    sd["dis_norm.weight"] = torch.ones(ref.shape[1], dtype=ref.dtype, device=ref.device)
    sd["dis_output.weight"] = torch.zeros(2, ref.shape[1], dtype=ref.dtype, device=ref.device)
    reason = "quality head untrained: fine-tune before trusting scores"
    report.added.append(KeyChange(_QUALITY_HEAD, reason))
    return "scan"


def quality_head_trained(sd: Mapping[str, Tensor], arch: str, report: LoadReport) -> bool:
    """Whether the model's quality head can judge: it has one, the loader did not just add it,
    and its output weights are not all zero (a RandAR file converted to SCAN: every score is 0.5;
    noted). The sampler's scorer "auto" judges by the token head's confidence otherwise."""
    if arch != "scan" or any(change.keys == _QUALITY_HEAD for change in report.added):
        return False
    weight = sd["dis_output.weight"]
    if weight.is_meta or bool(weight.any()):
        return True
    report.notes.append(
        "quality head untrained (its output weights are all zero: every score is 0.5); "
        "the sampler judges cells by confidence unless asked for scorer 'head'"
    )
    return False


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"missing key {key}: not a supported layout")
    return tuple(sd[key].shape)


def _count_indices(sd: Mapping[str, Tensor], prefix: str) -> int:
    """1 + the largest integer right after ``prefix`` (number of layers, levels, blocks)."""
    found = [key[len(prefix) :].split(".", 1)[0] for key in sd if key.startswith(prefix)]
    indices = [int(part) for part in found if part.isdigit()]
    return max(indices) + 1 if indices else 0


def _infer_multiple_of(ffn: int, dim: int) -> int:
    """The ``multiple_of`` that makes find_multiple(int(8 dim / 3), m) == ffn (256 upstream)."""
    base = int(2 * 4 * dim / 3)
    for multiple in (256, 1024, 512, 128, 64, 32, 16, 8, 4, 2, 1):
        if ffn >= base and ffn % multiple == 0 and ffn - base < multiple:
            return multiple
    raise CheckpointError(
        f"FFN width {ffn} for dim {dim} does not follow find_multiple(int(8*dim/3), m) for any "
        "m (an ffn_dim_multiplier model?); unsupported layout"
    )


def _known_model(dim: int, n_layer: int, vocab: int, classes: int) -> ModelConfig | None:
    family = [ModelConfig(dim=d, n_layer=n, n_head=h) for d, n, h in _FAMILY.values()]
    wanted = (dim, n_layer, vocab, classes)
    for config in family + [config for config, _ in MODEL_PRESETS.values()]:
        if (config.dim, config.n_layer, config.vocab_size, config.num_classes) == wanted:
            return config
    return None


def infer_model_config(
    sd: Mapping[str, Tensor],
    arch: str,
    grid_size: int | None,
    n_head: int | None,
    notes: list,
    paired_grid_size: int | None = None,
) -> ModelConfig:
    """Sizes from tensor shapes; n_head and grid_size are not in the weights (notes say so).

    Without ``grid_size`` the grid is the paired tokenizer's (``paired_grid_size``), else the
    matching preset's, else 16 (every published ImageNet model)."""
    vocab, dim = _shape(sd, "tok_embeddings.weight")
    classes = _shape(sd, "cls_embedding.embedding_table.weight")[0] - 1  # last row: null class
    n_layer = _count_indices(sd, "layers.")
    ffn = _shape(sd, "layers.0.feed_forward.w1.weight")[0]
    known = _known_model(dim, n_layer, vocab, classes)
    if n_head is None and known is not None:
        n_head = known.n_head  # the preset's own head count (GPT-3B and SCAN-tiny differ from 64)
    elif n_head is None:
        if dim % 64:
            raise CheckpointError(f"cannot infer n_head: dim {dim} is not a multiple of 64")
        n_head = dim // 64  # head_dim 64, as in every published model but GPT-3B
        notes.append(f"n_head not stored in the weights: using {n_head} (head_dim 64)")
    if grid_size is None and paired_grid_size is not None:
        grid_size = paired_grid_size
        notes.append(f"grid_size not stored in the weights: using {grid_size}, the tokenizer's")
    elif grid_size is None:
        grid_size = known.grid_size if known else 16
        notes.append(f"grid_size not stored in the weights: using {grid_size} (pass grid_size=)")
    try:
        return ModelConfig(
            dim=dim,
            n_layer=n_layer,
            n_head=n_head,
            vocab_size=vocab,
            num_classes=classes,
            grid_size=grid_size,
            multiple_of=_infer_multiple_of(ffn, dim),
            arch=arch,
        )
    except ValueError as error:
        raise CheckpointError(f"the tensors give an invalid config: {error}") from None


def _same_sizes(a: ModelConfig, b: ModelConfig) -> bool:
    fields = ("dim", "n_layer", "n_head", "vocab_size", "num_classes", "ffn_dim")
    return all(getattr(a, name) == getattr(b, name) for name in fields)


def model_preset_name(config: ModelConfig) -> str | None:
    """Published or project preset with these sizes, named for the arch (e.g. "RandAR-XL")."""
    for letter, (dim, n_layer, n_head) in _FAMILY.items():
        family = ModelConfig(dim=dim, n_layer=n_layer, n_head=n_head)
        if letter in _PUBLISHED[config.arch] and _same_sizes(config, family):
            return _FAMILY_PREFIX[config.arch] + letter
    for name, (preset, _) in MODEL_PRESETS.items():
        if _same_sizes(config, preset):
            return name if config.arch == "scan" else f"{name} ({config.arch} arch)"
    return None


def _vq_sizes(config: VQConfig) -> tuple:
    return (
        config.codebook_size,
        config.codebook_embed_dim,
        config.base_channels,
        tuple(config.channel_mult),
        config.num_res_blocks,
        config.z_channels,
    )


def vq_preset_name(config: VQConfig) -> str | None:
    """Tokenizer preset with these sizes (image_size aside), or None."""
    return next((n for n, (c, _) in VQ_PRESETS.items() if _vq_sizes(c) == _vq_sizes(config)), None)


def infer_vq_config(sd: Mapping[str, Tensor], image_size: int | None, notes: list) -> VQConfig:
    """Tokenizer sizes from tensor shapes; image_size is not in the weights."""
    codebook_size, embed_dim = _shape(sd, "quantize.embedding.weight")
    base = _shape(sd, "encoder.conv_in.weight")[0]
    levels = _count_indices(sd, "encoder.conv_blocks.")
    widths = [_shape(sd, f"encoder.conv_blocks.{i}.res.0.conv1.weight")[0] for i in range(levels)]
    if not widths or any(width % base for width in widths):
        raise CheckpointError(f"encoder widths {widths} are not multiples of conv_in's {base}")
    sizes = dict(
        codebook_size=codebook_size,
        codebook_embed_dim=embed_dim,
        base_channels=base,
        channel_mult=tuple(width // base for width in widths),
        num_res_blocks=_count_indices(sd, "encoder.conv_blocks.0.res."),
        z_channels=_shape(sd, "encoder.conv_out.weight")[0],
    )
    if image_size is None:
        known = [c for c, _ in VQ_PRESETS.values() if _vq_sizes(c) == tuple(sizes.values())]
        image_size = known[0].image_size if known else 256
        notes.append(f"image_size not stored in the weights: using {image_size} (pass image_size=)")
    return VQConfig(**sizes, image_size=image_size)


def fit_hint(sd: Mapping[str, Tensor], kind: str) -> str:
    """Which preset the file's own tensors fit (for errors about a stated config)."""
    try:
        if kind == "model":
            config = infer_model_config(sd, file_arch(sd), None, None, [])
            name = model_preset_name(config)
        else:
            config = infer_vq_config(sd, None, [])
            name = vq_preset_name(config)
    except CheckpointError:
        return "no known preset fits the file's tensors"
    return f"the file's tensors fit {name or config_summary(config)}"
