"""Checkpoints: the project's own self-describing format and strict loaders for published weights.

Own format: one safetensors file whose metadata holds ``format`` ("scan-studio"), ``version``,
``kind`` ("model" | "tokenizer"), ``config`` (JSON of the dataclass), ``preset`` and optional
free-form JSON such as ``card``. Foreign layouts are recognised by their keys (method §2, §3): SCAN
and RandAR safetensors, LlamaGen GPT and LlamaGen VQ ``torch.save`` files. Whatever the source, the
module is built on the ``meta`` device and filled with ``load_state_dict(strict=True,
assign=True)``, so no memory goes to a throw-away init, and every key the loader adds, drops or
renames is listed in the returned :class:`LoadReport`. Reading and atomic writing live in
``files``, key cleanup and config inference in ``layouts``, conversion and averaging in
``convert``; the command line is in ``cli``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from scan_core.checkpoint.files import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CheckpointError,
    RawCheckpoint,
    few_keys,
    read_raw,
    tensors_for_saving,
    write_atomically,
)
from scan_core.checkpoint.layouts import (
    LAYOUT_NAMES,
    KeyChange,
    LoadReport,
    adapt_quality_head,
    check_kind,
    config_summary,
    file_arch,
    fit_hint,
    infer_model_config,
    infer_vq_config,
    kind_of,
    model_preset_name,
    normalise_keys,
    quality_head_trained,
    vq_preset_name,
)
from scan_core.model.config import ModelConfig, VQConfig
from scan_core.model.network import Transformer
from scan_core.tokenizer.vq import VQModel

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "KeyChange",
    "LoadReport",
    "inspect",
    "load_model",
    "load_pair",
    "load_tokenizer",
    "model_preset_name",
    "resolve_path",
    "save_checkpoint",
    "vq_preset_name",
]

_RESERVED_METADATA = ("format", "version", "kind", "config", "preset")
_GET_WEIGHTS = {
    "model": "hf://ziqipang/RandAR/randar_0.3b_llamagen_360k_bs_1024_lr_0.0004.safetensors "
    "or hf://FoundationVision/LlamaGen/c2i_L_256.pt",
    "tokenizer": "hf://FoundationVision/LlamaGen/vq_ds16_c2i.pt",
}


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


# ------------------------------------------------------------------------------------- building


def _own_config(raw: RawCheckpoint, kind: str) -> ModelConfig | VQConfig | None:
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
    hint = fit_hint(sd, kind) if stated else "the file's tensors disagree with each other"
    unknown, missing = sorted(set(sd) - set(expected)), sorted(set(expected) - set(sd))
    if unknown:
        raise CheckpointError(f"unknown keys {few_keys(unknown)}: not a supported layout ({hint})")
    if missing:
        raise CheckpointError(
            f"missing keys {few_keys(missing)} for the config from {source} ({hint})"
        )
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
            f"cannot build {cls.__name__} ({config_summary(config)}): {error}"
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
            raise RuntimeError(f"{cls.__name__} left {few_keys(stray)} on meta: rebuild it on load")
    return module.eval()


def _place(tensor: Tensor, device: str | torch.device, dtype: torch.dtype | None) -> Tensor:
    if tensor.is_meta:
        return tensor
    if dtype is not None and tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


def _new_report(raw: RawCheckpoint, kind: str) -> LoadReport:
    card = raw.metadata.get("card")
    report = LoadReport(str(raw.path), kind, raw.container, notes=list(raw.notes))
    with contextlib.suppress(ValueError):
        report.card = json.loads(card) if card else None
    return report


def _assemble_model(
    raw: RawCheckpoint,
    grid_size: int | None,
    n_head: int | None,
    want_quality_head: bool | None,
    device: str | torch.device,
    dtype: torch.dtype | None,
    paired_grid_size: int | None = None,
) -> tuple[Transformer, LoadReport]:
    check_kind(raw, "model")
    report = _new_report(raw, "model")
    sd = normalise_keys(raw.tensors, report)
    config = _own_config(raw, "model")
    if config is None:
        report.layout, source = LAYOUT_NAMES[file_arch(sd)], "tensor shapes"
        arch = file_arch(sd)
        config = infer_model_config(sd, arch, grid_size, n_head, report.notes, paired_grid_size)
    else:
        report.layout, source = FORMAT_NAME, "the file's metadata"
        config = _override(config, report, grid_size=grid_size, n_head=n_head)
    arch = adapt_quality_head(sd, config.arch, want_quality_head, report)
    config = config.replace(arch=arch)
    model = _materialise(Transformer, config, sd, source, device, dtype)
    model.quality_head_trained = quality_head_trained(sd, arch, report)
    report.config, report.preset = config, model_preset_name(config)
    report.num_parameters = model.num_parameters()
    return model, report


def _assemble_tokenizer(
    raw: RawCheckpoint,
    image_size: int | None,
    device: str | torch.device,
    dtype: torch.dtype | None = None,
) -> tuple[VQModel, LoadReport]:
    check_kind(raw, "tokenizer")
    report = _new_report(raw, "tokenizer")
    sd = normalise_keys(raw.tensors, report)
    config = _own_config(raw, "tokenizer")
    if config is None:
        report.layout, source = "LlamaGen VQ", "tensor shapes"
        config = infer_vq_config(sd, image_size, report.notes)
    else:
        report.layout, source = FORMAT_NAME, "the file's metadata"
        config = _override(config, report, image_size=image_size)
    tokenizer = _materialise(VQModel, config, sd, source, device, dtype)
    report.config, report.preset = config, vq_preset_name(config)
    report.num_parameters = sum(p.numel() for p in tokenizer.parameters())
    return tokenizer, report


def _assemble_either(
    raw: RawCheckpoint,
    device: str | torch.device,
    dtype: torch.dtype | None = None,
    *,
    grid_size: int | None = None,
    n_head: int | None = None,
    image_size: int | None = None,
    want_quality_head: bool | None = None,
) -> tuple[nn.Module, LoadReport]:
    """Build whichever kind ``raw`` holds (a transformer or a tokenizer); ``report.kind`` says."""
    if kind_of(raw) == "tokenizer":
        return _assemble_tokenizer(raw, image_size, device, dtype)
    return _assemble_model(raw, grid_size, n_head, want_quality_head, device, dtype)


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
    paired_grid_size: int | None = None,
) -> tuple[Transformer, LoadReport]:
    """Load a SCAN / RandAR / LlamaGen GPT transformer (own format or upstream), in eval mode.

    Args:
        grid_size, n_head: not stored in upstream weights; default 16 and dim // 64 (or the
            matching preset's values). Override a stored own-format value with a note.
        paired_grid_size: the grid of the tokenizer this model will run with; used (and noted)
            when the file does not store its grid and ``grid_size`` is not given. A file that
            stores a different grid keeps its own, so ``pair_mismatch`` can refuse the pair.
        want_quality_head: None keeps the file's arch; True builds SCAN (a RandAR file gets a
            fresh, untrained quality head); False builds RandAR (a SCAN head is dropped).
            ``model.quality_head_trained`` says whether the head can judge (False for a head
            just added or all zero), which the sampler's scorer "auto" follows.
        trust_pickle: allow a .pt file holding arbitrary Python objects (runs their code).
        dtype: cast floating tensors; None keeps the file's dtype.
    """
    raw = read_raw(resolve_path(path, "model"), header_only=False, trust_pickle=trust_pickle)
    return _assemble_model(
        raw, grid_size, n_head, want_quality_head, device, dtype, paired_grid_size
    )


def load_tokenizer(
    path: str | os.PathLike,
    *,
    image_size: int | None = None,
    trust_pickle: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[VQModel, LoadReport]:
    """Load a LlamaGen VQ tokenizer (own format or upstream ``.pt``), in eval mode."""
    raw = read_raw(resolve_path(path, "tokenizer"), header_only=False, trust_pickle=trust_pickle)
    return _assemble_tokenizer(raw, image_size, device)


def load_pair(
    model_path: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    *,
    want_quality_head: bool | None = None,
    trust_pickle: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Transformer, VQModel, LoadReport]:
    """A model and the tokenizer it runs with; the model's load report.

    The tokenizer loads first, so a model file that does not store its grid (RandAR, SCAN and
    LlamaGen releases) takes the tokenizer's. Raises CheckpointError for a pair that cannot work
    together (a grid or codebook that really differs).
    """
    tokenizer, _ = load_tokenizer(tokenizer_path, trust_pickle=trust_pickle, device=device)
    model, report = load_model(
        model_path,
        want_quality_head=want_quality_head,
        trust_pickle=trust_pickle,
        device=device,
        dtype=dtype,
        paired_grid_size=tokenizer.config.grid_size,
    )
    mismatch = pair_mismatch(model.config, tokenizer.config)
    if mismatch:
        raise CheckpointError(mismatch)
    return model, tokenizer, report


def pair_mismatch(model_config: ModelConfig, vq_config: VQConfig) -> str | None:
    """Why a model and a tokenizer cannot work together (grid or codebook differ), else None."""
    model_side = (model_config.grid_size, model_config.vocab_size)
    if model_side == (vq_config.grid_size, vq_config.codebook_size):
        return None
    return (
        f"model and tokenizer do not match: model grid {model_config.grid_size}, vocabulary "
        f"{model_config.vocab_size}; tokenizer grid {vq_config.grid_size}, codebook "
        f"{vq_config.codebook_size}: load the tokenizer the model was trained with"
    )


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
    raw = read_raw(resolve_path(path), header_only=True, trust_pickle=trust_pickle)
    _, report = _assemble_either(
        raw,
        "meta",
        grid_size=grid_size,
        n_head=n_head,
        image_size=image_size,
        want_quality_head=want_quality_head,
    )
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
    write_atomically(path, tensors_for_saving(module), metadata)
    return path
