"""Features of a run of tiles, and how a resolution mode turns them into feature rows.

A ViT batch produces, per tile, the usual 1/4-resolution features (256 tokens, mlp1) and,
when ViR is in play, the 1/16 features (64 tokens, mlp2) and the router's probability of
compressing. Which of the two each tile sends is decided per request (`select_rows`), so
a request's routing never depends on which other requests shared its ViT batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvd.checkpoint import FlashConfig
from dvd.vir_mode import VirMode
from vision_server.vir import route


@dataclass(frozen=True)
class TileFeatures:
    quarter: torch.Tensor  # [tiles, 256, hidden]
    sixteenth: torch.Tensor | None = None  # [tiles, 64, hidden]
    compress_probability: torch.Tensor | None = None  # [tiles]

    @property
    def num_tiles(self) -> int:
        return int(self.quarter.shape[0])

    def __getitem__(self, tiles: slice) -> TileFeatures:
        return TileFeatures(
            self.quarter[tiles],
            None if self.sixteenth is None else self.sixteenth[tiles],
            None if self.compress_probability is None else self.compress_probability[tiles],
        )

    @staticmethod
    def cat(parts: list[TileFeatures]) -> TileFeatures:
        def join(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if any(t is None for t in tensors) else torch.cat(tensors)  # type: ignore[arg-type]

        return TileFeatures(
            torch.cat([p.quarter for p in parts]),
            join([p.sixteenth for p in parts]),
            join([p.compress_probability for p in parts]),
        )

    def rows(self, compress: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Feature rows [sum(tokens), hidden] of the tiles in order, and tokens per tile."""
        per_tile = []
        for tile, small in enumerate(compress.tolist()):
            if small:
                if self.sixteenth is None:
                    raise ValueError("1/16 features were not computed")
                per_tile.append(self.sixteenth[tile])
            else:
                per_tile.append(self.quarter[tile])
        return torch.cat(per_tile), [int(t.shape[0]) for t in per_tile]


def fixed_compression(mode: VirMode, tiles: int) -> torch.Tensor:
    """The compress mask of a mode that does not look at the image."""
    if mode is VirMode.ROUTER:
        raise ValueError("the router's choice depends on the request's tiles")
    return torch.full((tiles,), mode is VirMode.SIXTEENTH, dtype=torch.bool)


def select_rows(
    mode: VirMode, images: list[TileFeatures], flash: FlashConfig | None
) -> list[tuple[torch.Tensor, list[int]]]:
    """Per image: (feature rows, tokens per tile) under `mode`.

    The router's relative threshold is a quantile over all tiles of the request (every
    image, thumbnails included), as in InternVL3.5-Flash's own generate path.
    """
    if mode is VirMode.ROUTER:
        if flash is None:
            raise ValueError("this checkpoint has no ViR router")
        probabilities = [image.compress_probability for image in images]
        if any(p is None for p in probabilities):
            raise ValueError("router probabilities were not computed")
        compress = route(torch.cat(probabilities), flash)  # type: ignore[arg-type]
        masks = list(compress.split([image.num_tiles for image in images]))
    else:
        masks = [fixed_compression(mode, image.num_tiles) for image in images]
    return [image.rows(mask) for image, mask in zip(images, masks, strict=True)]
