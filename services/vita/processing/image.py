"""Image input: decode untrusted bytes safely, then InternVL's dynamic 448-pixel tiling and normalisation.

Every tile becomes `VisionConfig.tokens_per_tile` (256) LLM tokens, so the tiling decides an image's prompt cost.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from vita.errors import InvalidInputError, naming_file
from vita.model.config import VisionConfig

MAX_PIXELS = 8192 * 8192  # decoding more than this (~200 MB as RGB) is refused as a decompression bomb
_WHITE = (255, 255, 255, 255)
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # "I" is how older Pillow opens 16-bit PNGs

ImageSource = bytes | str | Path | Image.Image


def load_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decodes bytes, a path or a PIL image into an upright RGB image; bad input raises InvalidInputError.

    The size is checked from the header before any pixel is decoded, so a small file claiming a huge
    canvas costs nothing. Transparent pixels are composited onto white: their RGB values are arbitrary
    (often black), which would otherwise turn a logo on a transparent background into one on black.
    """
    with naming_file(source):
        return _upright_rgb(_open(source), max_pixels)


def _upright_rgb(image: Image.Image, max_pixels: int) -> Image.Image:
    width, height = image.size
    if width == 0 or height == 0:
        raise InvalidInputError(f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidInputError(
            f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}"
        )
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode in _SIXTEEN_BIT:
            image = _to_8bit(image)
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            background = Image.new("RGBA", image.size, _WHITE)
            background.alpha_composite(image.convert("RGBA"))
            image = background
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # PIL reports truncated or corrupt data with these
        raise InvalidInputError(f"image data is corrupt: {e}") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale (PNG, TIFF): `convert("RGB")` would clip every value above 255 to white."""
    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
    return Image.fromarray(values.astype(np.uint8))


def _open(source: ImageSource) -> Image.Image:
    """Opens lazily (header only); PIL's own, larger decompression-bomb limit still applies here."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, bytes):
        if not source:
            raise InvalidInputError("image data is empty")
        fp: io.BytesIO | Path = io.BytesIO(source)
    elif isinstance(source, str | Path):
        fp = Path(source)
        if not fp.is_file():
            raise InvalidInputError(f"image file not found: {fp}")
    else:
        raise InvalidInputError(f"image must be bytes, a path or a PIL image, not {type(source).__name__}")
    try:
        return Image.open(fp)
    except Image.UnidentifiedImageError:
        raise InvalidInputError("image data is not in a supported image format") from None
    except Image.DecompressionBombError as e:
        raise InvalidInputError(f"image is too large to decode: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InvalidInputError(f"image data is corrupt: {e}") from None


def find_grid(width: int, height: int, config: VisionConfig) -> tuple[int, int]:
    """(cols, rows) of tiles whose aspect ratio is closest to the image's, as InternVL's `find_closest_aspect_ratio`.

    Candidates are visited by ascending tile count, so on a tie the later (larger) grid wins only when the
    image has enough pixels to fill more than half of it; this keeps results identical to InternVL's.
    """
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"image has zero size ({width}x{height})")
    if not 1 <= config.min_tiles <= config.max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {config.min_tiles} and {config.max_tiles}")
    candidates = sorted(
        ((i, j) for i in range(1, config.max_tiles + 1) for j in range(1, config.max_tiles + 1)
         if config.min_tiles <= i * j <= config.max_tiles),
        key=lambda grid: grid[0] * grid[1],
    )
    aspect_ratio = width / height
    area = width * height
    tile_area = config.image_size * config.image_size
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidates:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_area * cols * rows:
            best = (cols, rows)
    return best


def dynamic_tiles(image: Image.Image, config: VisionConfig) -> list[Image.Image]:
    """Row-major 448 tiles of the image resized to its grid, plus a whole-image thumbnail when there are several."""
    size = config.image_size
    cols, rows = find_grid(*image.size, config)
    resized = image.resize((cols * size, rows * size), Image.Resampling.BICUBIC)
    tiles = [resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
             for r in range(rows) for c in range(cols)]
    if config.use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((size, size), Image.Resampling.BICUBIC))
    return tiles


def to_pixel_values(tiles: list[Image.Image], config: VisionConfig) -> torch.Tensor:
    """(N, 3, size, size) float32, ImageNet-normalised as the encoder was trained."""
    if not tiles:
        raise InvalidInputError("no image tiles to encode")
    arrays = [np.asarray(square_rgb(t, config.image_size)) for t in tiles]
    return normalise_pixels(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), config)


def normalise_pixels(pixels: torch.Tensor, config: VisionConfig) -> torch.Tensor:
    """uint8 (N, 3, size, size) -> float32, ImageNet-normalised (`config.image_mean`/`image_std`)."""
    mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std).view(1, 3, 1, 1)
    return (pixels.float().div_(255.0) - mean) / std


def square_rgb(tile: Image.Image, size: int) -> Image.Image:
    """RGB at `size` x `size` (bicubic), as the encoder receives a tile."""
    tile = tile if tile.mode == "RGB" else tile.convert("RGB")
    return tile if tile.size == (size, size) else tile.resize((size, size), Image.Resampling.BICUBIC)


def preprocess_image(source: ImageSource, config: VisionConfig, *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Decoded, tiled and normalised: ready for `VisionTower`, which makes `tokens_per_tile` tokens of each row."""
    return to_pixel_values(dynamic_tiles(load_image(source, max_pixels=max_pixels), config), config)
