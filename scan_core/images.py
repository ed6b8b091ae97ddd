"""Pixels <-> tensors: safe image loading, RGB conversion, ADM centre crop, [-1, 1] mapping.

Shared by the CLI, evaluation and the app (pure PIL / numpy / torch, no model code).
Tensor convention (method §3): float (B, 3, H, W) in [-1, 1], x = p / 127.5 - 1 for a uint8 pixel p,
and back with ``clamp(127.5 x + 128, 0, 255)`` truncated to uint8 (an exact round trip).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

# 8192 x 8192: far above any photo the studio needs, far below what exhausts memory once decoded
# (RGB at this size is 192 MiB). Checked from the header, before any pixel is decoded.
DEFAULT_MAX_PIXELS = 8192 * 8192
WHITE = (255, 255, 255, 255)

# Modes with more than 8 bits per sample; Pillow's own convert() clips them to 255 instead of
# rescaling, which would turn a 16-bit photo almost white.
_HIGH_DEPTH_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Everything a decoder may raise on a corrupt or truncated file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)


class _TooLarge(Exception):
    """Internal signal so the size error is not re-wrapped as a decoding error."""


def _source_name(source: str | os.PathLike | BinaryIO) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "<stream>"))


def load_image(
    source: str | os.PathLike | BinaryIO,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    apply_exif_orientation: bool = False,
) -> Image.Image:
    """Read an image file as RGB, refusing anything above ``max_pixels`` before decoding it.

    Args:
        source: a path or a binary file object.
        max_pixels: upper bound on width * height, checked from the header (decompression bombs).
        apply_exif_orientation: rotate / flip as the EXIF tag says. Off by default so pixels match
            the reference pipelines (torchvision / ADM loaders ignore EXIF); turn it on for photos
            uploaded by people.

    Returns:
        A loaded RGB image; transparency is composited onto white (see :func:`to_rgb`).

    Raises:
        ValueError: the image is over the limit, or cannot be identified / decoded.
        FileNotFoundError: the path does not exist.
    """
    name = _source_name(source)
    try:
        with Image.open(source) as opened:
            width, height = opened.size
            if width * height > max_pixels:
                raise _TooLarge(
                    f"image {name} is {width}x{height} = {width * height:,} pixels, "
                    f"over the limit max_pixels={max_pixels:,}"
                )
            opened.load()
            # Image.close() releases the pixel data, so keep a copy that outlives the file.
            image = opened.copy()
        if apply_exif_orientation:
            image = ImageOps.exif_transpose(image)
    except _TooLarge as error:
        raise ValueError(str(error)) from None
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"cannot read image {name}: Pillow rejects it as a decompression bomb ({error}); "
            f"max_pixels={max_pixels:,}"
        ) from error
    except FileNotFoundError:
        raise
    except _DECODE_ERRORS as error:
        raise ValueError(f"cannot read image {name}: {error}") from error
    return to_rgb(image)


def _high_depth_to_gray(image: Image.Image) -> Image.Image:
    """16/32-bit gray ("I;16", "I", "F") -> 8-bit "L" by rescaling, not clipping."""
    values = np.asarray(image, dtype=np.float64)
    # "I;16*" is 16-bit by definition; "I"/"F" carry no range, so values above 255 are taken to be
    # 16-bit data (what 16-bit PNG/TIFF decode to) and small values to be 8-bit already.
    if image.mode.startswith("I;16") or (values.size and values.max() > 255):
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels are composited onto white.

    Covers alpha modes (RGBA, LA, PA, premultiplied RGBa/La), palette or gray images with a
    ``transparency`` entry, 1-bit, gray, CMYK, YCbCr, LAB, HSV, and 16/32-bit gray (rescaled).
    An image that is already RGB is returned as is (not copied).
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_gray(image).convert("RGB")
    if _has_transparency(image):
        if image.mode == "La":  # Pillow converts premultiplied gray only to LA
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def center_crop_adm(image: Image.Image, size: int) -> Image.Image:
    """ADM / LlamaGen ImageNet preprocessing: a ``size`` x ``size`` RGB centre crop.

    While the short side is at least ``2 * size``, halve the image with a BOX filter (cheap,
    alias-free); then BICUBIC-resize so the short side is exactly ``size``; then crop the centre
    (offsets rounded down). Images that are not RGB are first converted with :func:`to_rgb`.
    """
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    image = to_rgb(image)
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    # Python's round() as in ADM, so the long side matches the reference pipeline exactly.
    image = image.resize(
        tuple(round(side * scale) for side in image.size), resample=Image.Resampling.BICUBIC
    )
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def pil_to_tensor(images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
    """One image or a list of same-size images -> float (B, 3, H, W) in [-1, 1].

    Non-RGB images are converted with :func:`to_rgb`; no resizing happens here.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise ValueError("pil_to_tensor needs at least one image")
    sizes = {image.size for image in images}
    if len(sizes) != 1:
        raise ValueError(f"all images must have the same size, got {sorted(sizes)}")
    pixels = np.stack([np.asarray(to_rgb(image), dtype=np.uint8) for image in images])  # (B,H,W,3)
    return uint8_to_tensor(pixels)


def uint8_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1] (the method §3 convention)."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float()
    return tensor / 127.5 - 1.0


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float (B, 3, H, W) or (3, H, W), nominally [-1, 1] -> uint8 (B, H, W, 3) or (H, W, 3).

    Uses ``clamp(127.5 x + 128, 0, 255)`` then truncation (method §3): exact inverse of
    :func:`pil_to_tensor`, and out-of-range decoder outputs saturate instead of wrapping.
    """
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"expected (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    # float32 first: bf16 cannot represent every 127.5 x + 128 value and numpy lacks bf16.
    scaled = (images.detach().float() * 127.5 + 128.0).clamp(0.0, 255.0).to(torch.uint8)
    return scaled.movedim(-3, -1).cpu().numpy()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float (B, 3, H, W) or (3, H, W) in [-1, 1] -> a list of RGB images (one per batch row)."""
    pixels = tensor_to_uint8(images)
    if pixels.ndim == 3:
        pixels = pixels[None]
    return [Image.fromarray(row) for row in pixels]
