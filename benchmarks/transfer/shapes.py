"""Feature tensors of real models' shapes: tiles x 256 rows x the LLM hidden size, bf16."""

from __future__ import annotations

from dataclasses import dataclass

ROWS_PER_TILE = 256
HIDDEN_SIZES = (1024, 4096, 5120)  # e.g. InternVL3.5-1B, -8B, -14B/38B-class LLMs
TILE_COUNTS = (1, 4, 13)  # one tile, a 2x2 grid with no thumbnail, a 4x3 grid + thumbnail
ITEMSIZE = 2  # bf16


@dataclass(frozen=True)
class Shape:
    hidden: int
    tiles: int

    @property
    def rows(self) -> int:
        return self.tiles * ROWS_PER_TILE

    @property
    def bytes(self) -> int:
        return self.rows * self.hidden * ITEMSIZE


def all_shapes(quick: bool) -> list[Shape]:
    hiddens = (1024, 4096) if quick else HIDDEN_SIZES
    return [Shape(h, t) for h in hiddens for t in TILE_COUNTS]
