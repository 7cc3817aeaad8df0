"""Loads the vision half of a checkpoint and turns tiles into features.

Shared by the vision server and by the language server's coupled mode, so both produce
the same features from the same tiles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dvd.checkpoint import CheckpointWeights, InternVLConfig
from dvd.checkpoint.verify import compare, stored_vision_tensors
from dvd.errors import InvalidInput
from dvd.vir_mode import VirMode
from vision_server.model import InternVLVision
from vision_server.tile_features import TileFeatures
from vision_server.tiling import TiledImage, decode_image, tile_count, tile_image

log = logging.getLogger(__name__)


def verify_vision(config: InternVLConfig, weights: CheckpointWeights) -> None:
    """The ViT, projector (and on -Flash, router) tensors are stored with config.json's
    shapes, and nothing under their prefixes is left over; CheckpointMismatch if not."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in InternVLVision(config).state_dict().items()}
    stored = stored_vision_tensors(weights)
    compare(config.path, "vision", expected, stored, extra_is_error=True)


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
        weights = CheckpointWeights(config)
        verify_vision(config, weights)
        model = InternVLVision(config)
        # strict: verify_vision has matched every name and shape, so this cannot skip one
        model.load_state_dict(weights.vision_state_dict(dtype=torch.float32), strict=True)
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

    def tile_count(self, data: bytes, limits: TilingLimits) -> int:
        """The tiles `preprocess` will make of `data`, read from its header only."""
        return tile_count(
            data, self.config.image_size, limits.min_tiles, limits.max_tiles, limits.use_thumbnail
        )

    def preprocess(self, data: bytes, limits: TilingLimits) -> TiledImage:
        image = decode_image(data, limits.max_pixels)
        return tile_image(
            image, self.config.image_size, limits.min_tiles, limits.max_tiles, limits.use_thumbnail
        )

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, with_vir: bool = False) -> TileFeatures:
        """Tiles [n, 3, S, S] -> their features on the CPU, in self.dtype.

        with_vir adds the 1/16 features and the router's probabilities (-Flash only).
        """
        pixels = pixel_values.to(device=self.device, dtype=self.dtype, non_blocking=True)
        out = self.model.encode_tiles(pixels, with_vir)
        return TileFeatures(
            out.quarter.to("cpu"),
            None if out.sixteenth is None else out.sixteenth.to("cpu"),
            None if out.compress_probability is None else out.compress_probability.to("cpu"),
        )

    def default_mode(self) -> VirMode:
        """ViR's router on -Flash checkpoints whose config turns it on, else 1/4 for all."""
        flash = self.config.flash
        return VirMode.ROUTER if flash is not None and flash.enabled else VirMode.QUARTER

    def check_mode(self, mode: VirMode) -> None:
        if mode is not VirMode.QUARTER and not self.config.has_router:
            raise InvalidInput(
                f"resolution mode {mode.value} needs an InternVL3.5-Flash "
                f"checkpoint; {self.config.name} has no ViR"
            )
