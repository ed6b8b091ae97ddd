"""Image helpers: safe loading, mode conversion, ADM crop, [-1, 1] <-> uint8 mapping."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from scan_core.images import (
    center_crop_adm,
    load_image,
    pil_to_tensor,
    tensor_to_pil,
    tensor_to_uint8,
    to_rgb,
)

RED = (255, 0, 0)
WHITE = (255, 255, 255)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds almost no data (a decompression-bomb stand-in)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def adm_reference(image: Image.Image, size: int) -> np.ndarray:
    """The ADM recipe written with array slicing, as in the guided-diffusion data loader."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = size / min(*image.size)
    image = image.resize(
        tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC
    )
    array = np.array(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


# --- ADM centre crop ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height"), [(640, 480), (257, 513), (1001, 3000), (10, 7), (32, 32), (33, 97)]
)
def test_center_crop_adm_size_and_reference(width: int, height: int) -> None:
    image = noise_image(width, height)
    cropped = center_crop_adm(image, 32)
    assert cropped.size == (32, 32) and cropped.mode == "RGB"
    assert np.array_equal(np.asarray(cropped), adm_reference(image, 32))


def test_center_crop_adm_keeps_the_centre() -> None:
    image = Image.new("RGB", (96, 32), RED)
    image.paste((0, 255, 0), (32, 0, 64, 32))  # a green middle third
    assert np.all(np.asarray(center_crop_adm(image, 32)) == (0, 255, 0))


def test_center_crop_adm_of_an_exact_size_image_is_identity() -> None:
    image = noise_image(32, 32)
    assert np.array_equal(np.asarray(center_crop_adm(image, 32)), np.asarray(image))


# --- mode conversion ---------------------------------------------------------------------------


def test_rgba_is_composited_onto_white() -> None:
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    image.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    pixels = np.asarray(to_rgb(image))
    assert tuple(pixels[0, 0]) == WHITE
    assert tuple(pixels[0, 1]) == RED
    assert np.all(np.abs(pixels[0, 2].astype(int) - 127) <= 1)


def test_palette_transparency_and_la_become_white() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # index 0 (red) is transparent
    assert np.asarray(to_rgb(palette)).tolist() == [[list(WHITE), [0, 0, 255]]]
    gray_alpha = Image.new("LA", (1, 1), (0, 0))
    assert np.asarray(to_rgb(gray_alpha)).tolist() == [[list(WHITE)]]


def test_transparent_png_loads_onto_white(tmp_path) -> None:
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    path = tmp_path / "clear.png"
    path.write_bytes(png_bytes(image))
    assert np.all(np.asarray(load_image(path)) == 255)
    with open(path, "rb") as file:  # file objects work too
        assert load_image(file).mode == "RGB"


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "YCbCr", "P", "RGBX", "PA"])
def test_any_mode_converts_to_rgb(mode: str) -> None:
    image = noise_image(5, 4).convert(mode)
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == (5, 4)


def test_grayscale_keeps_its_value() -> None:
    assert np.asarray(to_rgb(Image.new("L", (1, 1), 77))).tolist() == [[[77, 77, 77]]]


def test_sixteen_bit_gray_is_rescaled_not_clipped() -> None:
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    for image in (
        Image.fromarray(values),
        Image.open(io.BytesIO(png_bytes(Image.fromarray(values)))),
    ):
        pixels = np.asarray(to_rgb(image))[0, :, 0]
        assert pixels.tolist() == [0, 128, 255]


def test_rgb_is_returned_as_is() -> None:
    image = noise_image(3, 3)
    assert to_rgb(image) is image


# --- loading errors ----------------------------------------------------------------------------


def test_pixel_limit_is_checked_before_decoding() -> None:
    # 72M pixels: above the default limit, below Pillow's own bomb threshold.
    with pytest.raises(ValueError, match="max_pixels=67,108,864"):
        load_image(io.BytesIO(png_header_only(9000, 8000)))
    small = png_bytes(noise_image(100, 100))
    with pytest.raises(ValueError, match="100x100 = 10,000 pixels"):
        load_image(io.BytesIO(small), max_pixels=5_000)
    assert load_image(io.BytesIO(small), max_pixels=10_000).size == (100, 100)


def test_pillow_decompression_bomb_becomes_a_value_error() -> None:
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(io.BytesIO(png_header_only(100_000, 100_000)), max_pixels=10**12)


def test_truncated_and_garbage_files_raise_value_error(tmp_path) -> None:
    data = png_bytes(noise_image(64, 64))  # noise does not compress: half the file is half the data
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read image .*truncated.png"):
        load_image(path)
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(io.BytesIO(b"not an image at all"))


def test_missing_file_raises_file_not_found(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "absent.png")


def test_exif_orientation_is_opt_in() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20)).save(buffer, format="JPEG", exif=exif)
    assert load_image(io.BytesIO(buffer.getvalue())).size == (40, 20)
    rotated = load_image(io.BytesIO(buffer.getvalue()), apply_exif_orientation=True)
    assert rotated.size == (20, 40)


# --- tensors -----------------------------------------------------------------------------------


def test_uint8_round_trip_is_within_one_level() -> None:
    images = [noise_image(6, 5, seed) for seed in range(3)]
    tensor = pil_to_tensor(images)
    assert tensor.shape == (3, 3, 5, 6) and tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    back = tensor_to_uint8(tensor)
    original = np.stack([np.asarray(image) for image in images])
    assert back.shape == (3, 5, 6, 3) and back.dtype == np.uint8
    assert np.abs(back.astype(int) - original.astype(int)).max() <= 1
    assert np.array_equal(np.asarray(tensor_to_pil(tensor)[1]), original[1])


def test_extreme_pixel_values_map_to_the_ends() -> None:
    tensor = pil_to_tensor(Image.fromarray(np.array([[[0, 255, 128]]], dtype=np.uint8)))
    assert tensor.flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)


def test_out_of_range_values_saturate() -> None:
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 5).expand(3, 1, 5)
    assert tensor_to_uint8(x)[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    assert tensor_to_uint8(x.to(torch.bfloat16))[0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_tensor_helpers_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="same size"):
        pil_to_tensor([noise_image(4, 4), noise_image(5, 4)])
    with pytest.raises(ValueError, match="at least one"):
        pil_to_tensor([])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tensor_to_uint8(torch.zeros(1, 4, 2, 2))
