"""Checkpoint files on disk: sniffing and reading the container, and writing atomically.

Reading recognises the container by its first bytes, never the extension: safetensors (optionally
header-only, so no tensor data is read), ``torch.save`` zip archives (memory-mapped) and legacy
pickles. ``torch.load`` runs with ``weights_only=True`` unless the caller passes ``trust_pickle``.
Writing goes through a temp file, fsync and rename, so a crash never leaves a partial file. What
the tensors mean is decided in ``layouts``; the public API is ``scan_core.checkpoint.loading``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

FORMAT_NAME = "scan-studio"
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message is one line and says why."""


def few_keys(keys: list[str], limit: int = 4) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# -------------------------------------------------------------------------------------- reading


@dataclass
class RawCheckpoint:
    """A file's tensors and metadata before any interpretation."""

    path: Path
    container: str
    tensors: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def read_raw(path: Path, *, header_only: bool, trust_pickle: bool) -> RawCheckpoint:
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


def _read_safetensors(path: Path, header_only: bool) -> RawCheckpoint:
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
    return RawCheckpoint(path, "safetensors", tensors, metadata)


def _read_torch(path: Path, trust_pickle: bool, mmap: bool) -> RawCheckpoint:
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
    raw = RawCheckpoint(path, "torch", tensors)
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
    entries = few_keys(sorted(map(str, obj)))
    raise CheckpointError(f"{path} holds no state dict (entries: {entries})")


# -------------------------------------------------------------------------------------- writing


def tensors_for_saving(module: nn.Module) -> dict[str, Tensor]:
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


def write_atomically(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
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
