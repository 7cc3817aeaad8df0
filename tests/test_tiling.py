"""InternVL dynamic tiling and image decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dvd.errors import InvalidInput
from tests.images import png_bytes
from vision_server.tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    choose_grid,
    decode_image,
    tile_image,
)


def test_1024x768_becomes_a_4x3_grid_plus_thumbnail() -> None:
    image = decode_image(png_bytes(1024, 768), max_pixels=10**8)
    tiled = tile_image(image, 448, 1, 12, use_thumbnail=True)
    assert (tiled.grid_cols, tiled.grid_rows) == (4, 3)
    assert tiled.pixel_values.shape == (13, 3, 448, 448)


def test_a_single_tile_gets_no_thumbnail() -> None:
    image = decode_image(png_bytes(448, 448), max_pixels=10**8)
    tiled = tile_image(image, 448, 1, 12, use_thumbnail=True)
    assert tiled.num_tiles == 1


@pytest.mark.parametrize(
    "size",
    [
        (1, 1),
        (448, 448),
        (1024, 768),
        (768, 1024),
        (2000, 300),
        (300, 2000),
        (900, 600),
        (600, 900),
        (1344, 1008),
        (50, 400),
        (1000, 1000),
        (4000, 1000),
        (447, 449),
    ],
)
@pytest.mark.parametrize("max_tiles", [1, 6, 12])
def test_grid_matches_transformers_internvl_processor(
    size: tuple[int, int], max_tiles: int
) -> None:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        get_optimal_tiled_canvas,
    )

    width, height = size
    expected = get_optimal_tiled_canvas((height, width), (448, 448), 1, max_tiles)
    assert choose_grid(width, height, 448, 1, max_tiles) == tuple(expected)


def test_pixels_are_imagenet_normalised_in_row_major_tile_order() -> None:
    image = decode_image(png_bytes(896, 448, seed=3), max_pixels=10**8)
    tiled = tile_image(image, 448, 1, 12, use_thumbnail=False)
    assert (tiled.grid_cols, tiled.grid_rows) == (2, 1)
    right = np.asarray(image.crop((448, 0, 896, 448)), dtype=np.float32) / 255.0
    expected = (right - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(
        IMAGENET_STD, dtype=np.float32
    )
    torch.testing.assert_close(tiled.pixel_values[1], torch.from_numpy(expected).permute(2, 0, 1))


def test_undecodable_inputs_are_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="cannot decode"):
        decode_image(b"definitely not an image", max_pixels=10**8)
    truncated = png_bytes(256, 256)[:300]
    with pytest.raises(InvalidInput, match="cannot decode"):
        decode_image(truncated, max_pixels=10**8)
    with pytest.raises(InvalidInput, match="over the limit"):
        decode_image(png_bytes(100, 100), max_pixels=9_999)


def test_grayscale_and_alpha_images_become_rgb() -> None:
    for mode in ("L", "RGBA", "P"):
        buffer = io.BytesIO()
        Image.new(mode, (64, 32)).save(buffer, format="PNG")
        assert decode_image(buffer.getvalue(), max_pixels=10**8).mode == "RGB"
