"""The shm transport: vision and language server on one host share memory.

The language server owns an arena (shm_arena.Arena) and gives each request one region per
image, sized for the most tiles an image can have. The vision server writes each chunk's
rows straight into the region (one memcpy) and the stream carries only where they went.
The language server reads the features in place, as tensors that view the arena, until
the request releases its regions. When the arena is full, a request falls back to the
grpc transport rather than waiting or failing.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch

from dvd.features import FEATURES_NAME, wire_dtype
from dvd.transport import grpc_stream
from dvd.transport.base import Emission, FeatureReceiver, FeatureSender, Reception, RequestShape
from dvd.transport.regions import ImageRegions, sender_offset
from dvd.transport.shm_arena import Arena, MappedArena
from dvd.v1 import common_pb2, vision_pb2

log = logging.getLogger(__name__)

DEFAULT_ARENA_BYTES = 1024 * 2**20


class ShmReception(Reception):
    def __init__(self, arena: Arena, shape: RequestShape, offsets: list[int]) -> None:
        self.arena = arena
        self.shape = shape
        self.regions = ImageRegions(shape, offsets)
        self._released = False

    @property
    def destination(self) -> vision_pb2.FeatureDestination:
        return vision_pb2.FeatureDestination(
            shm=vision_pb2.ShmDestination(
                arena=self.arena.name,
                arena_bytes=self.arena.size,
                image_offsets=self.regions.offsets,
                image_capacities=self.shape.image_capacities,
            )
        )

    def on_plan(self, plan: vision_pb2.ImagePlan) -> None:
        self.regions.on_plan(plan)

    def on_chunk(self, chunk: vision_pb2.FeatureChunk) -> None:
        place = self.regions.place(chunk)
        self.regions.check_written(chunk, place)
        self.regions.arrived(place)

    def features(self) -> list[torch.Tensor]:
        return self.regions.tensors(self.arena.buffer)

    def release(self) -> None:
        if not self._released:
            self._released = True
            for offset, capacity in zip(
                self.regions.offsets, self.shape.image_capacities, strict=True
            ):
                self.arena.free(offset, capacity)


class Receiver(FeatureReceiver):
    name = "shm"

    def __init__(self, arena_bytes: int = DEFAULT_ARENA_BYTES) -> None:
        self.arena = Arena(arena_bytes)
        self._fallback = grpc_stream.Receiver()

    def open(self, shape: RequestShape) -> Reception:
        offsets = self.arena.allocate_all(shape.image_capacities)
        if offsets is None:
            log.warning(
                "request %s: shared-memory arena full (%d of %d bytes in use); "
                "its features travel over grpc",
                shape.request_id,
                self.arena.allocated,
                self.arena.size,
            )
            return self._fallback.open(shape)
        return ShmReception(self.arena, shape, offsets)

    def close(self) -> None:
        self.arena.close()


class ShmEmission(Emission):
    def __init__(self, arena: MappedArena, destination: vision_pb2.ShmDestination) -> None:
        self.arena = arena
        self.offsets = list(destination.image_offsets)
        self.capacities = list(destination.image_capacities)

    def chunks(
        self, image_index: int, first_row: int, rows: torch.Tensor, max_chunk_bytes: int
    ) -> Iterator[vision_pb2.FeatureChunk]:
        rows = rows.contiguous()
        row_bytes = rows.shape[1] * rows.element_size()
        length = rows.shape[0] * row_bytes
        start = sender_offset(
            self.capacities, image_index, first_row, rows.shape[0], row_bytes, "region"
        )
        offset = self.offsets[image_index] + start
        target = np.frombuffer(self.arena.buffer, dtype=np.uint8, count=length, offset=offset)
        target[:] = rows.reshape(-1).view(torch.uint8).numpy()
        descriptor = common_pb2.TensorDescriptor(
            name=FEATURES_NAME, dtype=wire_dtype(rows.dtype), shape=list(rows.shape)
        )
        yield vision_pb2.FeatureChunk(
            image_index=image_index,
            row_offset=first_row,
            descriptor=descriptor,
            written=vision_pb2.RegionWrite(offset=offset, length=length),
        )


class Sender(FeatureSender):
    """Maps each language server's arena once and keeps a few mapped."""

    name = "shm"
    MAX_MAPPED = 16

    def __init__(self) -> None:
        self._mapped: OrderedDict[str, MappedArena] = OrderedDict()
        self._lock = threading.Lock()

    def _arena(self, name: str, size: int) -> MappedArena:
        with self._lock:
            # Drop mappings of arenas whose owner went away (their files are unlinked).
            for stale in [n for n, a in self._mapped.items() if not a.is_current()]:
                self._mapped.pop(stale).close()
            arena = self._mapped.get(name)
            if arena is None or arena.size != size:
                arena = MappedArena(name, size)
                self._mapped[name] = arena
                while len(self._mapped) > self.MAX_MAPPED:
                    self._mapped.popitem(last=False)[1].close()
            self._mapped.move_to_end(name)
            return arena

    def open(self, request: vision_pb2.EncodeRequest) -> Emission:
        destination = request.destination.shm
        if len(destination.image_offsets) != len(request.images) or len(
            destination.image_capacities
        ) != len(request.images):
            raise ValueError("shm destination must give one region per image")
        arena = self._arena(destination.arena, destination.arena_bytes)
        for offset, capacity in zip(
            destination.image_offsets, destination.image_capacities, strict=True
        ):
            if offset < 0 or capacity < 0 or offset + capacity > arena.size:
                raise ValueError("shm region lies outside the arena")
        return ShmEmission(arena, destination)

    def close(self) -> None:
        with self._lock:
            for arena in self._mapped.values():
                arena.close()
            self._mapped.clear()
