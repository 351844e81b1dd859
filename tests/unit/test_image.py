import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vita.errors import InvalidInputError
from vita.model.config import VisionConfig
from vita.processing.image import dynamic_tiles, find_grid, load_image, preprocess_image, to_pixel_values

CONFIG = VisionConfig()
TILE = CONFIG.image_size


def internvl_grid(width, height, min_num=1, max_num=12, image_size=448):
    """InternVL's `dynamic_preprocess` grid choice, transcribed as published (set, then sort by tile count)."""
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if min_num <= i * j <= max_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    aspect_ratio = width / height
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    """Non-uniform content, so resizes and crops are visible in the pixels."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack(np.broadcast_arrays(x + 0 * y, y + 0 * x, (x + y) / 2), axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header is rewritten to claim another size (how decompression bombs look)."""
    data = bytearray(encode(Image.new("RGB", (4, 4))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def tokens(source, config: VisionConfig = CONFIG) -> int:
    return preprocess_image(source, config).shape[0] * config.tokens_per_tile


@pytest.mark.parametrize(
    ("size", "grid", "n_tiles"),
    [
        ((448, 448), (1, 1), 1),  # square: one tile, no thumbnail
        ((896, 896), (2, 2), 5),  # 2x2 + thumbnail
        ((1792, 448), (4, 1), 5),  # wide
        ((448, 1344), (1, 3), 4),  # tall
        ((1, 1), (1, 1), 1),  # tiny
        ((8000, 6000), (4, 3), 13),  # huge: capped at 12 tiles + thumbnail
    ],
)
def test_grid_and_tile_count(size, grid, n_tiles):
    assert find_grid(*size, CONFIG) == grid
    tiles = dynamic_tiles(Image.new("RGB", size), CONFIG)
    assert len(tiles) == n_tiles
    assert all(t.size == (TILE, TILE) for t in tiles)


def test_token_counts():
    assert CONFIG.tokens_per_tile == 256
    assert tokens(encode(gradient(448, 448))) == 256
    assert tokens(encode(gradient(896, 896))) == 1280


@pytest.mark.parametrize(("side", "grid"), [(600, (1, 1)), (700, (2, 2)), (900, (2, 2)), (1000, (3, 3))])
def test_tie_goes_to_larger_grid_only_when_image_fills_half_of_it(side, grid):
    # Square images tie between 1x1, 2x2 and 3x3. 2x2 wins when side^2 > 0.5 * 4 * 448^2 (side > 633.6);
    # 3x3 then wins when side^2 > 0.5 * 9 * 448^2 (side > 950.3).
    assert find_grid(side, side, CONFIG) == grid == internvl_grid(side, side)


def test_max_tiles_is_configurable():
    assert find_grid(8000, 6000, VisionConfig(max_tiles=6)) == (3, 2)
    assert len(dynamic_tiles(Image.new("RGB", (4000, 1000)), VisionConfig(max_tiles=4))) == 5
    assert find_grid(4000, 1000, VisionConfig(max_tiles=1)) == (1, 1)
    assert find_grid(448, 448, VisionConfig(min_tiles=2, max_tiles=4)) == (2, 2)
    assert find_grid(448, 448, VisionConfig(min_tiles=2, max_tiles=3)) == internvl_grid(448, 448, 2, 3) == (1, 2)


@pytest.mark.parametrize("max_tiles", [12, 6, 16])
def test_find_grid_matches_internvl_on_a_sweep(max_tiles):
    config = VisionConfig(max_tiles=max_tiles)
    sizes = [(w, h) for w in range(1, 3000, 23) for h in range(1, 3000, 29)]
    sizes += [(448 * i + d, 448 * j) for i in range(1, 7) for j in range(1, 7) for d in (-1, 0, 1)]
    mismatches = [(w, h) for w, h in sizes if find_grid(w, h, config) != internvl_grid(w, h, max_num=max_tiles)]
    assert mismatches == []


def test_tiles_are_row_major_crops_of_the_resized_image_then_thumbnail():
    image = gradient(1000, 500)
    cols, rows = find_grid(*image.size, CONFIG)
    resized = np.asarray(image.resize((cols * TILE, rows * TILE), Image.Resampling.BICUBIC))
    tiles = dynamic_tiles(image, CONFIG)
    assert (cols, rows) == (2, 1) and len(tiles) == 3
    assert np.array_equal(np.asarray(tiles[1]), resized[:TILE, TILE : 2 * TILE])
    assert np.array_equal(np.asarray(tiles[2]), np.asarray(image.resize((TILE, TILE), Image.Resampling.BICUBIC)))
    assert len(dynamic_tiles(image, VisionConfig(use_thumbnail=False))) == 2


def test_pixel_values_are_imagenet_normalised():
    pixels = to_pixel_values([Image.new("RGB", (TILE, TILE), (255, 0, 128)), Image.new("RGB", (10, 20))], CONFIG)
    assert pixels.shape == (2, 3, TILE, TILE) and pixels.dtype == torch.float32
    mean, std = torch.tensor(CONFIG.image_mean), torch.tensor(CONFIG.image_std)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - mean) / std
    torch.testing.assert_close(pixels[0, :, 5, 7], expected)
    torch.testing.assert_close(pixels[1, :, 0, 0], -mean / std)


def test_formats_and_modes_become_rgb():
    rgb = Image.new("RGB", (30, 20), (200, 100, 50))
    for data in (encode(rgb, "JPEG", quality=95), encode(rgb.convert("P")), encode(rgb.convert("L")),
                 encode(rgb, "WEBP", lossless=True), encode(rgb.convert("CMYK"), "JPEG")):
        image = load_image(data)
        assert image.mode == "RGB" and image.size == (30, 20)


def test_sixteen_bit_greyscale_is_rescaled_not_clipped():
    deep = Image.fromarray(np.full((4, 4), 40_000, dtype=np.uint16))
    assert load_image(encode(deep)).getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    image = load_image(encode(rgba))
    assert image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((5, 5)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 20, 30])
    palette.putpixel((1, 1), 1)
    assert load_image(encode(palette, transparency=0)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(encode(palette, transparency=0)).getpixel((1, 1)) == (10, 20, 30)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # red block at the top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after rotating 90 degrees clockwise
    path = tmp_path / "photo.jpg"
    image.save(path, exif=exif, quality=95)
    upright = load_image(path)
    assert upright.size == (20, 40)
    r, g, b = upright.getpixel((15, 5))  # the block is now at the top-right
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (b"", "empty"),
        (b"definitely not an image", "not in a supported image format"),
        (encode(gradient(64, 64))[:200], "corrupt"),
        (png_claiming_size(100_000, 100_000), "pixels"),
        (png_claiming_size(8_500, 8_500), "more than the limit"),
        (Image.new("RGB", (0, 5)), "zero size"),
        (12345, "must be bytes"),
        ("/nonexistent/picture.png", "not found"),
    ],
)
def test_bad_input_raises_invalid_input(source, message):
    with pytest.raises(InvalidInputError, match=message):
        load_image(source)


def test_max_pixels_is_configurable():
    data = encode(gradient(100, 100))
    assert load_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(InvalidInputError, match="more than the limit of 9999"):
        load_image(data, max_pixels=9_999)
