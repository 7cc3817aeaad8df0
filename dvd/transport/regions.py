"""Per-image regions of a receiver-owned buffer: what shm and rdma receptions share.

The receiver carves one region per image out of its buffer (an shm arena, an RDMA-registered
buffer). `ImageRegions` checks every plan and chunk against those regions, counts the rows
that arrived, and views the finished images as tensors in place. `planned_rows` and
`sender_offset` are the checks every transport with receiver-owned memory makes (tcp too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvd.features import torch_dtype
from dvd.transport.base import RequestShape
from dvd.v1 import vision_pb2


def planned_rows(plan: vision_pb2.ImagePlan, shape: RequestShape, holder: str) -> int:
    """The rows a receiver's plan announces, checked against the request: a known image,
    the request's hidden size, and no more rows than the image's `holder` (its region or
    buffer) holds."""
    index = plan.image_index
    if not 0 <= index < len(shape.image_capacities):
        raise ValueError(f"plan for unknown image {index}")
    if plan.hidden_size != shape.hidden:
        raise ValueError(f"plan hidden size {plan.hidden_size} != {shape.hidden}")
    rows = sum(plan.tokens_per_tile)
    if rows * shape.hidden * shape.dtype.itemsize > shape.image_capacities[index]:
        raise ValueError(f"image {index} has {rows} rows, more than its {holder} holds")
    return rows


def sender_offset(
    capacities: list[int], image_index: int, first_row: int, count: int, row_bytes: int, holder: str
) -> int:
    """A sender's check that rows [first_row, first_row + count) of an image fit the
    `holder` (region or buffer) the receiver gave it; their byte offset within it."""
    if not 0 <= image_index < len(capacities):
        raise ValueError(f"no {holder} for image {image_index}")
    if first_row < 0 or (first_row + count) * row_bytes > capacities[image_index]:
        raise ValueError(f"image {image_index}'s features overflow their {holder}")
    return first_row * row_bytes


@dataclass(frozen=True)
class ChunkPlace:
    """Where a chunk's rows belong: its image, and its byte range in the buffer."""

    image_index: int
    offset: int
    length: int
    rows: int


class ImageRegions:
    def __init__(self, shape: RequestShape, offsets: list[int]) -> None:
        if len(offsets) != len(shape.image_capacities):
            raise ValueError("one region per image is needed")
        self.shape = shape
        self.offsets = offsets
        self.rows = [0] * len(offsets)
        self.filled = [0] * len(offsets)

    @property
    def row_bytes(self) -> int:
        return self.shape.hidden * self.shape.dtype.itemsize

    def owns(self, offset: int) -> bool:
        return any(
            start <= offset < start + capacity
            for start, capacity in zip(self.offsets, self.shape.image_capacities, strict=True)
        )

    def on_plan(self, plan: vision_pb2.ImagePlan) -> None:
        self.rows[plan.image_index] = planned_rows(plan, self.shape, "region")

    def place(self, chunk: vision_pb2.FeatureChunk) -> ChunkPlace:
        """Checks a chunk against its image's plan and region; where its rows go."""
        index = chunk.image_index
        if not 0 <= index < len(self.offsets) or not self.rows[index]:
            raise ValueError(f"chunk for image {index} before its plan")
        if torch_dtype(chunk.descriptor.dtype) != self.shape.dtype:
            raise ValueError("chunk dtype differs from the request's")
        shape = list(chunk.descriptor.shape)
        if len(shape) != 2 or shape[1] != self.shape.hidden or shape[0] <= 0:
            raise ValueError(f"chunk shape {shape} does not fit [*, {self.shape.hidden}]")
        rows = shape[0]
        if chunk.row_offset < 0 or chunk.row_offset + rows > self.rows[index]:
            raise ValueError(f"chunk rows exceed image {index}'s {self.rows[index]} rows")
        offset = self.offsets[index] + chunk.row_offset * self.row_bytes
        return ChunkPlace(index, offset, rows * self.row_bytes, rows)

    def check_written(self, chunk: vision_pb2.FeatureChunk, place: ChunkPlace) -> None:
        if chunk.written.offset != place.offset or chunk.written.length != place.length:
            raise ValueError(f"chunk for image {place.image_index} was written outside its rows")

    def arrived(self, place: ChunkPlace) -> None:
        self.filled[place.image_index] += place.rows

    def tensors(self, buffer: object) -> list[torch.Tensor]:
        """Every image's rows as [rows, hidden] views of `buffer`; ValueError if incomplete."""
        out = []
        for index, offset in enumerate(self.offsets):
            if not self.rows[index] or self.filled[index] != self.rows[index]:
                raise ValueError(f"image {index} is incomplete")
            count = self.rows[index] * self.shape.hidden
            tensor = torch.frombuffer(buffer, dtype=self.shape.dtype, count=count, offset=offset)  # type: ignore[call-overload]
            out.append(tensor.view(self.rows[index], self.shape.hidden))
        return out
