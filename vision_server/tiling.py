"""InternVL dynamic tiling: an image becomes a grid of square tiles plus a thumbnail.

The grid (cols x rows, min_tiles <= cols*rows <= max_tiles) is the one whose aspect ratio is
closest to the image's; on a tie the larger grid wins when the image has more than half
its pixels. The image is resized to the grid, cut into tiles in row-major order and, when
there is more than one tile, a thumbnail of the whole image is appended. This is the
tiling InternVL's own preprocessing performs, so features match the published models.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dvd.errors import InvalidInput

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageLayout:
    """How an image was tiled: what a plan tells the language server."""

    num_tiles: int
    grid_cols: int
    grid_rows: int
    width: int
    height: int


@dataclass(frozen=True)
class TiledImage:
    """Normalised tiles of one image, ready for the ViT."""

    pixel_values: torch.Tensor  # [tiles, 3, size, size], float32
    grid_cols: int
    grid_rows: int
    width: int
    height: int

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def layout(self) -> ImageLayout:
        return ImageLayout(self.num_tiles, self.grid_cols, self.grid_rows, self.width, self.height)


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, fewest tiles first."""
    grids = {
        (cols, rows)
        for n in range(min_tiles, max_tiles + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_tiles <= cols * rows <= max_tiles
    }
    # Sorting a set keeps CPython's (deterministic) order among equal products, as the
    # reference preprocessing does; tie-breaking below depends on that order.
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def choose_grid(
    width: int, height: int, tile_size: int, min_tiles: int, max_tiles: int
) -> tuple[int, int]:
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def tile_count(
    data: bytes, tile_size: int, min_tiles: int, max_tiles: int, use_thumbnail: bool
) -> int:
    """How many tiles `tile_image` cuts the image into, from its header alone (nothing is
    decoded); 1 when the header cannot be read (decoding reports that image later)."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return 1
    if width < 1 or height < 1:
        return 1
    cols, rows = choose_grid(width, height, tile_size, min_tiles, max_tiles)
    return cols * rows + (1 if use_thumbnail and cols * rows > 1 else 0)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decodes image bytes fully into RGB; InvalidInput on anything unusable."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise InvalidInput(
                    f"image is {width}x{height} = {width * height} pixels, "
                    f"over the limit of {max_pixels}"
                )
            probe.load()
            return probe.convert("RGB")
    except InvalidInput:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"cannot decode image: {exc}") from None


def to_pixels(tile: Image.Image) -> torch.Tensor:
    """RGB tile -> normalised float32 [3, H, W]."""
    array = np.asarray(tile, dtype=np.float32) / 255.0
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())


def tile_image(
    image: Image.Image, tile_size: int, min_tiles: int, max_tiles: int, use_thumbnail: bool
) -> TiledImage:
    width, height = image.size
    cols, rows = choose_grid(width, height, tile_size, min_tiles, max_tiles)
    resized = image.resize((cols * tile_size, rows * tile_size), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    pixels = torch.stack([to_pixels(tile) for tile in tiles])
    return TiledImage(pixels, cols, rows, width, height)
