"""Loads Qwen3-VL's vision tower from a checkpoint and turns items into feature rows.

`encode` takes preprocessed items from any number of requests, packs them into forwards of
at most `max_batch_patches` patches (`batching.plan_batches`), runs each forward over the
concatenated patches and hands every item its own rows back, in the order given: one row
per merged token, [main | deepstack_1 | ... | deepstack_k] (config.feature_width wide), on
the CPU in the encoder's dtype, with the item's grid (t, h, w) in patches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dvd.checkpoint.qwen3vl_config import Qwen3VLConfig
from dvd.checkpoint.qwen3vl_verify import (
    VISION_PREFIX,
    stored_vision_tensors,
    verify_qwen3vl_vision,
)
from dvd.checkpoint.weights import CheckpointWeights
from vision_server.encoder import pick_device
from vision_server.qwen3vl.batching import plan_batches
from vision_server.qwen3vl.model import Grid, Qwen3VLVisionTower
from vision_server.qwen3vl.preprocess import VisionInput

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_PATCHES = 16384  # a 2048 x 2048 image; 4096 LLM tokens


@dataclass(frozen=True)
class EncodedItem:
    """The rows of one image or video."""

    features: torch.Tensor  # (t * h * w / merge^2, feature_width), CPU
    grid_thw: Grid


def vision_state_dict(
    weights: CheckpointWeights, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The tower's stored tensors, named as `Qwen3VLVisionTower`'s (prefix removed)."""
    out = {}
    for name, stored in stored_vision_tensors(weights).items():
        tensor = weights.get(stored.stored_names[0])
        out[name[len(VISION_PREFIX) :]] = tensor if dtype is None else tensor.to(dtype)
    return out


class Qwen3VLEncoder:
    """The tower on one device; `encode` is thread-compatible but not re-entrant."""

    def __init__(
        self,
        config: Qwen3VLConfig,
        device: str = "auto",
        dtype: torch.dtype = torch.bfloat16,
        max_batch_patches: int = DEFAULT_MAX_BATCH_PATCHES,
    ) -> None:
        if max_batch_patches < 1:
            raise ValueError(f"max_batch_patches must be at least 1, got {max_batch_patches}")
        self.config = config
        self.device = pick_device(device)
        self.dtype = dtype
        self.max_batch_patches = max_batch_patches
        weights = CheckpointWeights(config)
        verify_qwen3vl_vision(config, weights)
        model = Qwen3VLVisionTower(config.vision)
        # strict: the check above matched every name and shape, so nothing is skipped
        model.load_state_dict(vision_state_dict(weights, torch.float32), strict=True)
        self.model = model.to(device=self.device, dtype=dtype).eval()
        log.info(
            "Qwen3-VL vision tower %s loaded on %s in %s (rows %d wide, %d DeepStack levels)",
            config.name,
            self.device,
            dtype,
            config.feature_width,
            config.vision.deepstack_levels,
        )

    @property
    def feature_width(self) -> int:
        return self.config.feature_width

    def encode(self, items: Sequence[VisionInput]) -> list[EncodedItem]:
        """Every item's rows, in the order given, packed into forwards by total patches."""
        done: dict[int, EncodedItem] = {}
        for batch in plan_batches([item.num_patches for item in items], self.max_batch_patches):
            done.update(zip(batch, self.encode_batch([items[i] for i in batch]), strict=True))
        return [done[index] for index in range(len(items))]

    @torch.inference_mode()
    def encode_batch(self, items: Sequence[VisionInput]) -> list[EncodedItem]:
        """One forward over the items' concatenated patches, split back per item."""
        if not items:
            return []
        patch_dim = self.model.patch_embed.proj.weight[0].numel()
        for item in items:
            if item.pixel_values.shape != (item.num_patches, patch_dim):
                raise ValueError(
                    f"pixel_values {tuple(item.pixel_values.shape)} do not fit grid "
                    f"{item.grid_thw} ({item.num_patches} patches of {patch_dim} values)"
                )
        pixels = torch.cat([item.pixel_values for item in items]).to(
            device=self.device, dtype=self.dtype, non_blocking=True
        )
        grids = [item.grid_thw for item in items]
        rows = self.model(pixels, grids).to("cpu")
        tokens = [self.config.tokens_of_grid(*grid) for grid in grids]
        return [
            EncodedItem(part, grid)
            for part, grid in zip(torch.split(rows, tokens), grids, strict=True)
        ]
