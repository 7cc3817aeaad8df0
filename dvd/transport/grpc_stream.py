"""The grpc transport: feature bytes travel inside the Encode stream, in chunks of whole rows.

Works everywhere. Each chunk is at most max_chunk_bytes (a few MiB), well below the
receive limit both ends set (dvd/grpc_options.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dvd.features import FeatureAssembler, chunk_rows
from dvd.transport.base import Emission, FeatureReceiver, FeatureSender, Reception, RequestShape
from dvd.v1 import vision_pb2


class StreamReception(Reception):
    def __init__(self, shape: RequestShape) -> None:
        self.shape = shape
        self._images: list[FeatureAssembler | None] = [None] * len(shape.image_capacities)

    @property
    def destination(self) -> vision_pb2.FeatureDestination | None:
        return None

    def on_plan(self, plan: vision_pb2.ImagePlan) -> None:
        if not 0 <= plan.image_index < len(self._images):
            raise ValueError(f"plan for unknown image {plan.image_index}")
        self._images[plan.image_index] = FeatureAssembler(
            sum(plan.tokens_per_tile), plan.hidden_size, self.shape.dtype
        )

    def on_chunk(self, chunk: vision_pb2.FeatureChunk) -> None:
        if not 0 <= chunk.image_index < len(self._images):
            raise ValueError(f"chunk for unknown image {chunk.image_index}")
        assembler = self._images[chunk.image_index]
        if assembler is None:
            raise ValueError(f"chunk for image {chunk.image_index} before its plan")
        assembler.add(chunk.row_offset, chunk.descriptor, chunk.data)

    def features(self) -> list[torch.Tensor]:
        out = []
        for index, assembler in enumerate(self._images):
            if assembler is None or not assembler.complete:
                raise ValueError(f"image {index} is incomplete")
            out.append(assembler.tensor)
        return out

    def release(self) -> None:
        self._images = [None] * len(self._images)


class Receiver(FeatureReceiver):
    name = "grpc"

    def open(self, shape: RequestShape) -> Reception:
        return StreamReception(shape)


class StreamEmission(Emission):
    def chunks(
        self, image_index: int, first_row: int, rows: torch.Tensor, max_chunk_bytes: int
    ) -> Iterator[vision_pb2.FeatureChunk]:
        for chunk in chunk_rows(rows, first_row, max_chunk_bytes):
            yield vision_pb2.FeatureChunk(
                image_index=image_index,
                row_offset=chunk.row_offset,
                descriptor=chunk.descriptor,
                data=chunk.data,
            )


class Sender(FeatureSender):
    name = "grpc"

    def open(self, request: vision_pb2.EncodeRequest) -> Emission:
        return StreamEmission()
