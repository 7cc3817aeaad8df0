"""Loads the vision half of a checkpoint and turns tiles into features.

Shared by the vision server and by the language server's coupled mode, so both produce
the same features from the same tiles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dvd.checkpoint import CheckpointWeights, InternVLConfig
from vision_server.model import InternVLVision
from vision_server.tiling import TiledImage, decode_image, tile_image

log = logging.getLogger(__name__)


def pick_device(requested: str) -> torch.device:
    """ "auto" means CUDA when present, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@dataclass(frozen=True)
class TilingLimits:
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    max_pixels: int


class VisionEncoder:
    """ViT + projector on one device; `encode` is thread-compatible but not re-entrant."""

    def __init__(
        self, config: InternVLConfig, device: str = "auto", dtype: torch.dtype = torch.bfloat16
    ) -> None:
        self.config = config
        self.device = pick_device(device)
        self.dtype = dtype
        model = InternVLVision(config)
        state = CheckpointWeights(config).vision_state_dict(dtype=torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{config.path}: vision weights do not fit the model "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        self.model = model.to(device=self.device, dtype=dtype).eval()
        log.info(
            "vision model %s loaded on %s in %s (%d tokens per tile)",
            config.name,
            self.device,
            dtype,
            config.tokens_per_tile,
        )

    @property
    def tokens_per_tile(self) -> int:
        return self.config.tokens_per_tile

    @property
    def hidden_size(self) -> int:
        return self.config.llm_hidden_size

    def preprocess(self, data: bytes, limits: TilingLimits) -> TiledImage:
        image = decode_image(data, limits.max_pixels)
        return tile_image(
            image, self.config.image_size, limits.min_tiles, limits.max_tiles, limits.use_thumbnail
        )

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, S, S] -> [tiles, tokens_per_tile, hidden] on the CPU, in self.dtype."""
        pixels = pixel_values.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return self.model(pixels).to("cpu")
