"""Checkpoints: the project's own self-describing format and strict loaders for published weights.

Own format: one safetensors file whose metadata holds ``format`` ("scan-studio"), ``version``,
``kind`` ("model" | "tokenizer"), ``config`` (JSON of the dataclass), ``preset`` and optional
free-form JSON such as ``card``. Foreign layouts are recognised by their keys (SPEC §2, §3): SCAN
and RandAR safetensors, LlamaGen GPT and LlamaGen VQ ``torch.save`` files. Whatever the source, the
module is built on the ``meta`` device and filled with ``load_state_dict(strict=True,
assign=True)``, so no memory goes to a throw-away init, and every key the loader adds, drops or
renames is listed in the returned :class:`LoadReport`. The command line is in ``checkpoint_cli``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from scan_core.config import MODEL_PRESETS, VQ_PRESETS, ModelConfig, VQConfig
from scan_core.model import Transformer
from scan_core.tokenizer import VQModel

FORMAT_NAME = "scan-studio"
FORMAT_VERSION = "1"
_RESERVED_METADATA = ("format", "version", "kind", "config", "preset")
_GET_WEIGHTS = {
    "model": "hf://ziqipang/RandAR/randar_0.3b_llamagen_360k_bs_1024_lr_0.0004.safetensors "
    "or hf://FoundationVision/LlamaGen/c2i_L_256.pt",
    "tokenizer": "hf://FoundationVision/LlamaGen/vq_ds16_c2i.pt",
}
# Entries some files carry that are not part of our modules: dropped by name, always reported.
_DERIVED_KEYS = {
    "freqs_cis": "derived RoPE table, recomputed from the config",
    "quantize.codebook_used": "training-time codebook usage log, not used for inference",
}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_QUALITY_HEAD = ("dis_norm.weight", "dis_output.weight")
_LAYOUTS = {"scan": "SCAN", "randar": "RandAR", "llamagen": "LlamaGen GPT"}
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message is one line and says why."""


@dataclass(frozen=True)
class KeyChange:
    """Keys the loader added, dropped or renamed, with the reason."""

    keys: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        return f"{_few(list(self.keys))} ({self.reason})"


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
            f"config:     {_summary(self.config)}",
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


def _few(keys: list[str], limit: int = 4) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _summary(config: ModelConfig | VQConfig | None) -> str:
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


# ---------------------------------------------------------------------------------------- paths


def resolve_path(spec: str | os.PathLike, kind: str | None = None) -> Path:
    """A local checkpoint path, or ``hf://owner/repo/filename`` fetched with huggingface_hub.

    Raises CheckpointError when the file is missing, huggingface_hub is not installed or the
    download fails (offline); the message says how to get the weights by hand.
    """
    text = os.fspath(spec)
    if text.startswith("hf://"):
        return _hub_download(text)
    path = Path(text).expanduser()
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file inside it")
    if not path.is_file():
        hint = _GET_WEIGHTS.get(kind or "", " or ".join(_GET_WEIGHTS.values()))
        raise CheckpointError(f"no checkpoint at {path}; get weights (e.g. {hint}) or fix the path")
    return path


def _hub_download(spec: str) -> Path:
    parts = spec[len("hf://") :].split("/")
    if len(parts) < 3 or not all(parts):
        raise CheckpointError(f"hub paths look like hf://owner/repo/filename, got {spec!r}")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    manual = f"download {filename} from https://huggingface.co/{repo_id} and pass the local path"
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CheckpointError(
            f"{spec} needs the huggingface_hub package (pip install huggingface_hub); or {manual}"
        ) from None
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as error:  # the hub raises many types: HTTP, offline, missing entry
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"could not fetch {spec} (offline? {reason}); {manual}") from None


# -------------------------------------------------------------------------------------- reading


@dataclass
class _RawCheckpoint:
    """A file's tensors and metadata before any interpretation."""

    path: Path
    container: str
    tensors: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _read(path: Path, *, header_only: bool, trust_pickle: bool) -> _RawCheckpoint:
    """Read a file; with ``header_only`` the tensors are meta (shapes and dtypes only)."""
    with path.open("rb") as handle:
        head = handle.read(9)  # the extension is not trusted: sniff the container
    # safetensors first: its first byte (the header length's low byte) can be anything, while a
    # zip has its compression method at byte 8 and a torch pickle its magic number.
    if len(head) == 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
        return _read_safetensors(path, header_only)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save zip / legacy pickle
        raw = _read_torch(path, trust_pickle, mmap=head[:2] == b"PK")
        if header_only:
            raw.tensors = {k: _meta_like(v) for k, v in raw.tensors.items()}
        return raw
    if len(head) < 9:
        raise CheckpointError(f"{path} is truncated or empty ({len(head)} bytes); re-download it")
    raise CheckpointError(f"{path} is neither a safetensors file nor a torch.save archive")


def _meta_like(tensor: Tensor) -> Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


def _read_safetensors(path: Path, header_only: bool) -> _RawCheckpoint:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {}
            for key in handle.keys():  # noqa: SIM118 (not a dict)
                if header_only:  # shapes only: the data is never read
                    shape = handle.get_slice(key).get_shape()
                    tensors[key] = torch.empty(shape, device="meta")
                else:
                    tensors[key] = handle.get_tensor(key)
    except SafetensorError as error:
        raise CheckpointError(
            f"{path} is truncated or corrupted ({error}); re-download it"
        ) from None
    return _RawCheckpoint(path, "safetensors", tensors, metadata)


def _read_torch(path: Path, trust_pickle: bool, mmap: bool) -> _RawCheckpoint:
    # torch >= 2.13 routes "*.safetensors" names to safetensors: a misnamed archive goes in as a
    # handle (no mmap then). weights_only refuses arbitrary objects; mmap maps instead of reading.
    misnamed = path.suffix == ".safetensors"
    try:
        with path.open("rb") if misnamed else contextlib.nullcontext(path) as source:
            obj = torch.load(
                source,
                map_location="cpu",
                weights_only=not trust_pickle,
                mmap=mmap and not misnamed,
            )
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise CheckpointError(f"{path} is corrupted (unpickling failed: {error})") from None
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path} holds arbitrary Python objects{what} besides tensors and unpickling them can "
            "run code: if you trust its source, load it with trust_pickle=True / --trust-pickle"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        detail = (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"{path} is truncated or corrupted ({detail}); re-download it"
        ) from None
    tensors = _find_state_dict(path, obj)
    raw = _RawCheckpoint(path, "torch", tensors)
    if trust_pickle:
        raw.notes.append("loaded with trust_pickle=True: the file's pickled objects were executed")
    others = (
        sorted(str(k) for k, v in obj.items() if v is not tensors) if obj is not tensors else []
    )
    if others:
        raw.notes.append(f"ignored file entries besides the weights: {', '.join(others)}")
    return raw


def _find_state_dict(path: Path, obj: object) -> dict[str, Tensor]:
    """The state dict inside a torch.save file: the dict itself or its "model" (etc.) entry."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj  # a raw state dict (LlamaGen XXL / 3B)
    # LlamaGen: {"model", "optimizer", "steps", "args", maybe "ema"}; DeepSpeed uses "module".
    for entry in ("model", "ema", "module", "state_dict"):
        found = obj.get(entry)
        if isinstance(found, dict) and found and all(isinstance(v, Tensor) for v in found.values()):
            return found
    raise CheckpointError(f"{path} holds no state dict (entries: {_few(sorted(map(str, obj)))})")


# ------------------------------------------------------------------------------ interpretation


def _normalise_keys(tensors: Mapping[str, Tensor], report: LoadReport) -> dict[str, Tensor]:
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


def _kind_of(raw: _RawCheckpoint) -> str:
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
        f"quantize.embedding.weight; keys: {_few(sorted(raw.tensors))})"
    )


def _check_kind(raw: _RawCheckpoint, wanted: str) -> None:
    found = _kind_of(raw)
    if found == wanted:
        return
    if found == "tokenizer":
        raise CheckpointError(f"{raw.path} is a VQ tokenizer checkpoint; pass it as --tokenizer")
    raise CheckpointError(f"{raw.path} is a transformer checkpoint; pass it as --model")


def _file_arch(sd: Mapping[str, Tensor]) -> str:
    if any(key in sd for key in _QUALITY_HEAD):
        return "scan"
    return "randar" if "pos_instruct_embeddings" in sd else "llamagen"


def _adapt_quality_head(
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


def _infer_model_config(
    sd: Mapping[str, Tensor], arch: str, grid_size: int | None, n_head: int | None, notes: list
) -> ModelConfig:
    """Sizes from tensor shapes; n_head and grid_size are not in the weights (notes say so)."""
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
    if grid_size is None:
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


def _infer_vq_config(sd: Mapping[str, Tensor], image_size: int | None, notes: list) -> VQConfig:
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


def _fit_hint(sd: Mapping[str, Tensor], kind: str) -> str:
    """Which preset the file's own tensors fit (for errors about a stated config)."""
    try:
        if kind == "model":
            config = _infer_model_config(sd, _file_arch(sd), None, None, [])
            name = model_preset_name(config)
        else:
            config = _infer_vq_config(sd, None, [])
            name = vq_preset_name(config)
    except CheckpointError:
        return "no known preset fits the file's tensors"
    return f"the file's tensors fit {name or _summary(config)}"


# ------------------------------------------------------------------------------------- building


def _own_config(raw: _RawCheckpoint, kind: str) -> ModelConfig | VQConfig | None:
    """The config stored in an own-format file, or None for a foreign file."""
    if raw.metadata.get("format") != FORMAT_NAME:
        return None  # the version was checked with the kind
    cls = ModelConfig if kind == "model" else VQConfig
    try:
        return cls.from_dict(json.loads(raw.metadata["config"]))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{raw.path} has an invalid config in its metadata: {error}"
        ) from None


def _override(config, report: LoadReport, **changes):
    """Apply the caller's overrides to a stored config, noting each one."""
    changes = {k: v for k, v in changes.items() if v is not None and getattr(config, k) != v}
    for name, value in changes.items():
        report.notes.append(f"{name} overridden: {getattr(config, name)} in the file -> {value}")
    try:
        return config.replace(**changes)
    except ValueError as error:
        raise CheckpointError(f"invalid override {changes}: {error}") from None


def _check_state_dict(module: nn.Module, sd: Mapping[str, Tensor], source: str, kind: str) -> None:
    """One-line errors for everything load_state_dict(strict=True) would reject."""
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    stated = source != "tensor shapes"  # a stated config can disagree with the tensors
    hint = _fit_hint(sd, kind) if stated else "the file's tensors disagree with each other"
    unknown, missing = sorted(set(sd) - set(expected)), sorted(set(expected) - set(sd))
    if unknown:
        raise CheckpointError(f"unknown keys {_few(unknown)}: not a supported layout ({hint})")
    if missing:
        raise CheckpointError(f"missing keys {_few(missing)} for the config from {source} ({hint})")
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise CheckpointError(
                f"shape mismatch at {key}: expected {shape} (config from {source}), found "
                f"{tuple(sd[key].shape)}; {hint}"
            )


def _materialise(
    cls: type[nn.Module],
    config: ModelConfig | VQConfig,
    sd: dict[str, Tensor],
    source: str,
    device: str | torch.device,
    dtype: torch.dtype | None,
) -> nn.Module:
    """Build on meta (no allocation), validate, assign the file's tensors; return eval mode."""
    try:
        with torch.device("meta"):
            module = cls(config)
    except ValueError as error:
        raise CheckpointError(
            f"cannot build {cls.__name__} ({_summary(config)}): {error}"
        ) from None
    _check_state_dict(module, sd, source, "model" if cls is Transformer else "tokenizer")
    placed = {key: _place(value, device, dtype) for key, value in sd.items()}
    module.load_state_dict(placed, strict=True, assign=True)
    # Derived state is not in the state dict: Transformer builds its RoPE table lazily on the
    # weights' device and VQModel has none; a future non-persistent buffer would stay on meta.
    if torch.device(device).type != "meta":
        tensors = [*module.named_parameters(), *module.named_buffers()]
        stray = [name for name, tensor in tensors if tensor.is_meta]
        if stray:
            raise RuntimeError(f"{cls.__name__} left {_few(stray)} on meta: rebuild it on load")
    return module.eval()


def _place(tensor: Tensor, device: str | torch.device, dtype: torch.dtype | None) -> Tensor:
    if tensor.is_meta:
        return tensor
    if dtype is not None and tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


def _new_report(raw: _RawCheckpoint, kind: str) -> LoadReport:
    card = raw.metadata.get("card")
    report = LoadReport(str(raw.path), kind, raw.container, notes=list(raw.notes))
    with contextlib.suppress(ValueError):
        report.card = json.loads(card) if card else None
    return report


def _assemble_model(
    raw: _RawCheckpoint,
    grid_size: int | None,
    n_head: int | None,
    want_quality_head: bool | None,
    device: str | torch.device,
    dtype: torch.dtype | None,
) -> tuple[Transformer, LoadReport]:
    _check_kind(raw, "model")
    report = _new_report(raw, "model")
    sd = _normalise_keys(raw.tensors, report)
    config = _own_config(raw, "model")
    if config is None:
        report.layout, source = _LAYOUTS[_file_arch(sd)], "tensor shapes"
        config = _infer_model_config(sd, _file_arch(sd), grid_size, n_head, report.notes)
    else:
        report.layout, source = FORMAT_NAME, "the file's metadata"
        config = _override(config, report, grid_size=grid_size, n_head=n_head)
    arch = _adapt_quality_head(sd, config.arch, want_quality_head, report)
    config = config.replace(arch=arch)
    model = _materialise(Transformer, config, sd, source, device, dtype)
    report.config, report.preset = config, model_preset_name(config)
    report.num_parameters = model.num_parameters()
    return model, report


def _assemble_tokenizer(
    raw: _RawCheckpoint,
    image_size: int | None,
    device: str | torch.device,
    dtype: torch.dtype | None = None,
) -> tuple[VQModel, LoadReport]:
    _check_kind(raw, "tokenizer")
    report = _new_report(raw, "tokenizer")
    sd = _normalise_keys(raw.tensors, report)
    config = _own_config(raw, "tokenizer")
    if config is None:
        report.layout, source = "LlamaGen VQ", "tensor shapes"
        config = _infer_vq_config(sd, image_size, report.notes)
    else:
        report.layout, source = FORMAT_NAME, "the file's metadata"
        config = _override(config, report, image_size=image_size)
    tokenizer = _materialise(VQModel, config, sd, source, device, dtype)
    report.config, report.preset = config, vq_preset_name(config)
    report.num_parameters = sum(p.numel() for p in tokenizer.parameters())
    return tokenizer, report


# ---------------------------------------------------------------------------------- public API


def load_model(
    path: str | os.PathLike,
    *,
    grid_size: int | None = None,
    n_head: int | None = None,
    want_quality_head: bool | None = None,
    trust_pickle: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Transformer, LoadReport]:
    """Load a SCAN / RandAR / LlamaGen GPT transformer (own format or upstream), in eval mode.

    Args:
        grid_size, n_head: not stored in upstream weights; default 16 and dim // 64 (or the
            matching preset's values). Override a stored own-format value with a note.
        want_quality_head: None keeps the file's arch; True builds SCAN (a RandAR file gets a
            fresh, untrained quality head); False builds RandAR (a SCAN head is dropped).
        trust_pickle: allow a .pt file holding arbitrary Python objects (runs their code).
        dtype: cast floating tensors; None keeps the file's dtype.
    """
    raw = _read(resolve_path(path, "model"), header_only=False, trust_pickle=trust_pickle)
    return _assemble_model(raw, grid_size, n_head, want_quality_head, device, dtype)


def load_tokenizer(
    path: str | os.PathLike,
    *,
    image_size: int | None = None,
    trust_pickle: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[VQModel, LoadReport]:
    """Load a LlamaGen VQ tokenizer (own format or upstream ``.pt``), in eval mode."""
    raw = _read(resolve_path(path, "tokenizer"), header_only=False, trust_pickle=trust_pickle)
    return _assemble_tokenizer(raw, image_size, device)


def inspect(
    path: str | os.PathLike,
    *,
    grid_size: int | None = None,
    n_head: int | None = None,
    image_size: int | None = None,
    want_quality_head: bool | None = None,
    trust_pickle: bool = False,
) -> LoadReport:
    """Validate a checkpoint of either kind on the meta device and report what it is.

    safetensors files are read header-only; torch files are memory-mapped (legacy non-zip
    pickles are read in full). Raises CheckpointError exactly where loading would.
    """
    raw = _read(resolve_path(path), header_only=True, trust_pickle=trust_pickle)
    if _kind_of(raw) == "tokenizer":
        return _assemble_tokenizer(raw, image_size, "meta")[1]
    return _assemble_model(raw, grid_size, n_head, want_quality_head, "meta", None)[1]


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    grid_size: int | None = None,
    n_head: int | None = None,
    image_size: int | None = None,
    want_quality_head: bool | None = None,
    trust_pickle: bool = False,
    dtype: torch.dtype | None = None,
    card: dict | None = None,
) -> LoadReport:
    """Load any supported checkpoint and write it in the own format; returns the load report.

    The output's metadata records the source file and every key added, dropped or renamed.
    """
    raw = _read(resolve_path(src), header_only=False, trust_pickle=trust_pickle)
    kind = _kind_of(raw)
    if kind == "tokenizer":
        module, report = _assemble_tokenizer(raw, image_size, "cpu", dtype)
    else:
        module, report = _assemble_model(raw, grid_size, n_head, want_quality_head, "cpu", dtype)
    changes = {name: [str(c) for c in getattr(report, name)] for name in ("added", "dropped")}
    renamed = [str(c) for c in report.renamed]
    source = {"file": raw.path.name, "layout": report.layout, **changes, "renamed": renamed}
    extra = {"source": source} | ({"card": card} if card else {})
    save_checkpoint(out, module, kind, extra_metadata=extra)
    return report


def save_checkpoint(
    path: str | os.PathLike,
    module: nn.Module,
    kind: str,
    extra_metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write ``module`` in the own format, atomically: a crash never leaves a partial file.

    Args:
        kind: "model" (a Transformer) or "tokenizer" (a VQModel); checked against module.config.
        extra_metadata: extra entries such as ``card``; non-strings are stored as JSON.
    """
    module = getattr(module, "_orig_mod", module)  # torch.compile wrapper: save the plain keys
    config_cls = {"model": ModelConfig, "tokenizer": VQConfig}.get(kind)
    config = getattr(module, "config", None)
    if config_cls is None or not isinstance(config, config_cls):
        raise ValueError(f"kind {kind!r} does not match a module with config {type(config)}")
    preset = model_preset_name(config) if kind == "model" else vq_preset_name(config)
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": kind,
        "config": json.dumps(config.to_dict()),
        "preset": preset or "",
    }
    for key, value in (extra_metadata or {}).items():
        if key in _RESERVED_METADATA:
            raise ValueError(f"extra_metadata may not set the reserved entry {key!r}")
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    path = Path(path)
    _atomic_write(path, _tensors_for_saving(module), metadata)
    return path


def _tensors_for_saving(module: nn.Module) -> dict[str, Tensor]:
    """Contiguous CPU tensors, each with storage of its own (safetensors refuses sharing)."""
    tensors, seen = {}, set()
    for key, tensor in module.state_dict().items():
        if tensor.is_meta:
            raise ValueError(f"{key} is on the meta device (weights never loaded); nothing to save")
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage()
        shared = storage.data_ptr() in seen or storage.nbytes() != tensor.nbytes
        if shared and tensor.numel() > 0:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    return tensors


def _atomic_write(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temp, metadata=metadata)
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temp, mode)  # mkstemp creates 0600
        os.replace(temp, path)  # atomic on POSIX and Windows
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # persist the rename; not every platform allows this
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


if __name__ == "__main__":  # python -m scan_core.checkpoint inspect|convert ...
    from scan_core.checkpoint_cli import main

    raise SystemExit(main())
