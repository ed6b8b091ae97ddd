"""Atomic file writers for generated samples: PNG, GIF, JSON, NPZ and "done" markers.

Every writer goes through :func:`atomic_write`: the bytes land in a temporary file in the target
directory, are flushed to disk, and are renamed over the target with ``os.replace``. A reader (a
resumed run, an FID script, the studio) therefore sees either the old file or the complete new
one, never a partial file, even if the writer is killed mid-way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

ImageLike = np.ndarray | Image.Image


def atomic_write(
    path: str | os.PathLike, write: Callable[[BinaryIO], None], durable: bool = True
) -> Path:
    """Call ``write(handle)`` on a temporary file, fsync it, then rename it over ``path``.

    On any error (including KeyboardInterrupt, or a full disk while writing or flushing) the
    temporary file is removed and ``path`` keeps its previous content (or stays absent). Parent
    directories are created. ``durable=False`` skips the fsync: still atomic for readers, but a
    power cut may lose the file (fine for caches, which are rebuilt).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        os.chmod(temp, 0o644)  # mkstemp creates 0600; samples are meant to be shared
        os.replace(temp, path)  # atomic on POSIX and Windows
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return path


def _to_pil(image: ImageLike) -> Image.Image:
    """uint8 (H, W, 3) / (H, W) arrays or PIL images -> an RGB or L PIL image."""
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def write_png(image: ImageLike, path: str | os.PathLike) -> Path:
    """Write one image (uint8 (H, W, 3) array or PIL image) as PNG."""
    picture = _to_pil(image)
    return atomic_write(path, lambda stream: picture.save(stream, format="PNG"))


def write_gif(
    frames: Sequence[ImageLike],
    path: str | os.PathLike,
    duration_ms: int = 80,
    hold_last_ms: int = 1500,
    loop: int = 0,
) -> Path:
    """Write an animated GIF: every frame shown ``duration_ms``, the last one ``hold_last_ms``.

    Note: PIL merges a frame identical to the one before it into that frame (adding the
    durations), so callers that need one frame per step must make the frames differ.
    """
    if not frames:
        raise ValueError("write_gif needs at least one frame")
    pictures = [_to_pil(frame).convert("RGB") for frame in frames]
    durations = [int(duration_ms)] * (len(pictures) - 1) + [int(hold_last_ms)]

    def write(stream: BinaryIO) -> None:
        pictures[0].save(
            stream,
            format="GIF",
            save_all=True,
            append_images=pictures[1:],
            duration=durations,
            loop=loop,
            disposal=1,  # keep the previous frame: only changed regions are stored
        )

    return atomic_write(path, write)


def write_json(data: object, path: str | os.PathLike) -> Path:
    """Write ``data`` as JSON; a ``str`` is taken as already-encoded JSON and written as is."""
    text = data if isinstance(data, str) else json.dumps(data, indent=1, sort_keys=True)
    return atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def write_npy(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write one array as ``.npy`` (readable lazily with ``np.load(path, mmap_mode="r")``)."""
    return atomic_write(path, lambda stream: np.save(stream, np.asarray(array)))


def write_npz(
    path: str | os.PathLike, arrays: Mapping[str, np.ndarray | Sequence[np.ndarray]]
) -> Path:
    """Write an uncompressed ``.npz`` readable by ``np.load`` (e.g. ADM's ``arr_0`` layout).

    Args:
        arrays: name -> array, or name -> a sequence of arrays concatenated along axis 0. The
            pieces of a sequence are streamed one at a time (memory-mapped ``.npy`` shards are
            read lazily), so merging 50k samples never holds them all in memory.
    """

    def write(stream: BinaryIO) -> None:
        # ZIP_STORED + zip64, as np.savez does: plain .npy members, any size.
        with zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, value in arrays.items():
                pieces = [value] if isinstance(value, np.ndarray) else list(value)
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    _write_npy_pieces(member, pieces, name)

    return atomic_write(path, write)


def _write_npy_pieces(stream: BinaryIO, pieces: list[np.ndarray], name: str) -> None:
    """One .npy stream for the concatenation of ``pieces`` along axis 0, piece by piece."""
    if not pieces:
        raise ValueError(f"npz entry {name!r} has no data")
    first = pieces[0]
    if any(p.dtype != first.dtype or p.shape[1:] != first.shape[1:] for p in pieces):
        raise ValueError(f"npz entry {name!r}: pieces differ in dtype or trailing shape")
    shape = (sum(p.shape[0] for p in pieces), *first.shape[1:]) if first.ndim else first.shape
    header = {
        "descr": np.lib.format.dtype_to_descr(first.dtype),
        "fortran_order": False,
        "shape": shape,
    }
    np.lib.format.write_array_header_2_0(stream, header)
    for piece in pieces:
        stream.write(np.ascontiguousarray(piece).tobytes())


def step_frames(
    images: np.ndarray, known: np.ndarray, scale: int = 0, min_width: int = 256
) -> list[np.ndarray]:
    """Frames of a run, one per step: cells without a code yet are grey, a strip shows progress.

    Args:
        images: uint8 (S, H, W, 3), the image decoded after each step.
        known: bool (S, h, w), which grid cells had a code after each step.
        scale: nearest-neighbour upscale factor; 0 picks the smallest reaching ``min_width``.
    The progress strip grows with every step, so consecutive frames differ even when a
    refinement round changed nothing (GIF writers would merge identical frames).
    """
    steps, height, width, _ = images.shape
    factor = height // known.shape[1]
    cells = known.repeat(factor, axis=1).repeat(factor, axis=2)  # (S, H, W)
    images = np.where(cells[..., None], images, np.uint8(128))
    scale = scale or max(1, -(-min_width // width))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    strip = np.full((steps, max(2, images.shape[2] // 64), images.shape[2], 3), 32, np.uint8)
    for index in range(steps):
        strip[index, :, : round(images.shape[2] * (index + 1) / steps)] = (255, 176, 64)
    return list(np.concatenate([images, strip], axis=1))


def write_done(path: str | os.PathLike, record: Mapping[str, object]) -> Path:
    """Mark a unit of work finished. Written last, so its presence means every output exists."""
    return write_json(dict(record), path)


def read_json(path: str | os.PathLike) -> dict | None:
    """A JSON file's content (e.g. a "done" record), or None when absent or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def atomic_torch_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` through ``atomic_write``: never a partial file under ``path``."""
    import torch  # only the trainers need it; the export helpers stay importable without

    return atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read in chunks (checkpoints and datasets can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
