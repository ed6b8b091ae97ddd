"""Pre-extracted VQ codes on disk: sharded ``.npz`` files plus a ``manifest.json``.

The transformer never sees pixels (LlamaGen's split): ``extract_codes`` turns images
into codes once, training reads them here. A directory holds

- ``shard_00000.npz`` ...: ``codes`` (n, h, w) uint16 (int32 when the vocabulary exceeds 65536),
  ``labels`` (n,) int64, optional ``codes_flip`` (n, h, w) from horizontally flipped images,
  ``paths`` (n,) and ``bad_paths`` (k,) strings;
- ``manifest.json``: format, version, tokenizer (file sha256, path, config), grid, vocab_size,
  class_names, counts, shard list, bad files, and ``complete`` (false while extraction runs).

Codes are held in memory as stored (2 bytes a code: ImageNet with flips is ~1.3 GB).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from scan_core.model.config import ModelConfig, model_preset

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "scan-codes"
MANIFEST_VERSION = 1


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.npz"


def code_dtype(vocab_size: int) -> np.dtype:
    """The smallest stored dtype for codes of this vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def write_shard(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write one shard atomically: a half-written shard never carries the final name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """Write ``manifest.json`` atomically."""
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_manifest(directory: str | os.PathLike) -> dict:
    """Read and sanity-check a code directory's manifest."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: extract codes first (python -m scan_core extract_codes)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a code manifest (format {manifest.get('format')!r})")
    if not manifest.get("complete", False):
        raise ValueError(
            f"{path} describes an unfinished extraction; rerun extract_codes to resume it"
        )
    return manifest


def describe_tokenizer(manifest: dict) -> str:
    info = manifest.get("tokenizer", {})
    sha = str(info.get("sha256", "?"))[:12]
    grid = "x".join(str(v) for v in manifest.get("grid", []))
    vocab = manifest.get("vocab_size")
    return f"{info.get('path', '?')} (sha256 {sha}..., vocab {vocab}, grid {grid})"


class CodesDataset(Dataset):
    """All shards of a code directory, in memory. Item: (codes (N,) long raster, label long)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        model_config: ModelConfig | None = None,
        tokenizer_sha256: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(directory)
        self.codes, self.codes_flip, self.labels = self._load_shards()
        if model_config is not None or tokenizer_sha256 is not None:
            self.validate(model_config, tokenizer_sha256)

    def _load_shards(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        codes, flips, labels = [], [], []
        for entry in self.manifest["shards"]:
            with np.load(self.directory / entry["file"]) as shard:
                if len(shard["labels"]) != entry["count"]:
                    raise ValueError(
                        f"{entry['file']} holds {len(shard['labels'])} codes, "
                        f"the manifest says {entry['count']}"
                    )
                codes.append(shard["codes"])
                labels.append(shard["labels"].astype(np.int64))
                flips.append(shard["codes_flip"] if "codes_flip" in shard.files else None)
        if not codes or sum(len(c) for c in codes) == 0:
            raise ValueError(f"{self.directory} holds no codes")
        flip = None if any(f is None for f in flips) else np.concatenate(flips)
        return np.concatenate(codes), flip, np.concatenate(labels)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.codes.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.manifest.get("class_names") or []) or int(self.labels.max()) + 1

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.manifest.get("tokenizer", {}).get("sha256")

    def validate(self, config: ModelConfig | None, tokenizer_sha256: str | None = None) -> None:
        """Refuse codes the model cannot read: another grid, vocabulary or tokenizer file."""
        here = describe_tokenizer(self.manifest)
        if tokenizer_sha256 is not None and self.tokenizer_sha256 not in (None, tokenizer_sha256):
            raise ValueError(
                f"codes in {self.directory} were extracted with tokenizer {here}, but this run "
                f"uses a different tokenizer (sha256 {tokenizer_sha256[:12]}...)"
            )
        if config is None:
            return
        expected = (config.grid_size, config.grid_size)
        if self.grid != expected or self.manifest.get("vocab_size") != config.vocab_size:
            raise ValueError(
                f"codes in {self.directory} come from tokenizer {here}; the model expects "
                f"vocab {config.vocab_size}, grid {expected[0]}x{expected[1]}. Re-extract with "
                "the model's tokenizer or pick a matching model preset."
            )
        if self.num_classes > config.num_classes:
            raise ValueError(
                f"codes in {self.directory} have {self.num_classes} classes, the model only "
                f"{config.num_classes}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        codes, labels = self.batch(np.array([index]))
        return codes[0], labels[0]

    def batch(
        self, indices: np.ndarray | list[int], generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Codes (B, N) long and labels (B,) long; with flips stored, each row picks one at
        random (the augmentation LlamaGen trains with)."""
        indices = np.asarray(indices, dtype=np.int64)
        codes = self.codes[indices]
        if self.codes_flip is not None:
            use_flip = torch.rand(len(indices), generator=generator).numpy() < 0.5
            codes = np.where(use_flip[:, None, None], self.codes_flip[indices], codes)
        flat = torch.from_numpy(codes.reshape(len(indices), -1).astype(np.int64))
        return flat, torch.from_numpy(self.labels[indices])


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (seeded shuffle per epoch, one slice per rank) that can start in
    the middle of an epoch, so a resumed run reads exactly the batches it would have read."""

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start_index = 0

    def set_position(self, epoch: int, start_index: int) -> None:
        self.set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start_index, None)

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def synthetic_codes(
    num_images: int,
    config: ModelConfig,
    noise: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Learnable fake data: codes fixed by (class, cell) with a ``noise`` fraction random.

    Returns codes (n, grid, grid) long and labels (n,) long. For CPU smoke runs and tests.
    """
    num_tokens, vocab = config.num_tokens, config.vocab_size
    labels = torch.randint(0, config.num_classes, (num_images,), generator=generator)
    cells = torch.arange(num_tokens)
    codes = (labels[:, None] * 7 + cells[None] * 3 + (cells[None] // config.grid_size)) % vocab
    noisy = torch.rand(num_images, num_tokens, generator=generator) < noise
    random = torch.randint(0, vocab, (num_images, num_tokens), generator=generator)
    codes = torch.where(noisy, random, codes)
    return codes.view(num_images, config.grid_size, config.grid_size), labels


def write_code_directory(
    directory: str | os.PathLike,
    codes: Tensor,
    labels: Tensor,
    vocab_size: int,
    shard_size: int = 1024,
    tokenizer: dict | None = None,
    class_names: list[str] | None = None,
) -> dict:
    """Write in-memory codes (n, h, w) as a complete code directory; returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = code_dtype(vocab_size)
    shards = []
    for index, start in enumerate(range(0, len(labels), shard_size)):
        part = slice(start, start + shard_size)
        arrays = {"codes": codes[part].numpy().astype(dtype), "labels": labels[part].numpy()}
        write_shard(directory / shard_name(index), arrays)
        shards.append({"file": shard_name(index), "count": len(arrays["labels"])})
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "complete": True,
        "tokenizer": tokenizer or {"sha256": None, "path": "synthetic", "config": None},
        "grid": list(codes.shape[1:]),
        "vocab_size": vocab_size,
        "class_names": class_names or [str(i) for i in range(int(labels.max()) + 1)],
        "counts": {"codes": len(labels), "bad": 0},
        "shards": shards,
        "flip": False,
        "bad_files": [],
    }
    write_manifest(directory, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m scan_core data synthetic --out DIR``: fake learnable codes for smoke runs."""
    parser = argparse.ArgumentParser(prog="python -m scan_core data")
    commands = parser.add_subparsers(dest="command", required=True)
    synthetic = commands.add_parser("synthetic", help="write synthetic codes for a preset")
    synthetic.add_argument("--out", required=True)
    synthetic.add_argument("--preset", default="SCAN-tiny")
    synthetic.add_argument("--num-images", type=int, default=4096)
    synthetic.add_argument("--noise", type=float, default=0.1)
    synthetic.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = model_preset(args.preset)
    generator = torch.Generator().manual_seed(args.seed)
    codes, labels = synthetic_codes(args.num_images, config, args.noise, generator)
    write_code_directory(args.out, codes, labels, config.vocab_size)
    side = config.grid_size
    print(f"wrote {args.num_images} synthetic {side}x{side} grids to {args.out}")
    return 0
