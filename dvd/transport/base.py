"""The transport interface; see the package docstring for the roles and the state machine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import torch

from dvd.v1 import vision_pb2, vision_pb2_grpc


class StaleConnection(ValueError):
    """A destination names a connection the sender does not know (it restarted since
    attach); the receiver should attach again and retry."""


@dataclass(frozen=True)
class RequestShape:
    """What a receiver must be ready for: the most bytes each image's features can take."""

    request_id: str
    image_capacities: list[int]  # bytes per image: (max tiles + thumbnail) x rows x row bytes
    hidden: int
    dtype: torch.dtype
    connection_id: str = ""  # what attach() returned for the chosen vision server


class Reception(ABC):
    """One request's features arriving at the language server."""

    @property
    @abstractmethod
    def destination(self) -> vision_pb2.FeatureDestination | None:
        """What EncodeRequest.destination must say; None: bytes travel in the stream."""

    @abstractmethod
    def on_plan(self, plan: vision_pb2.ImagePlan) -> None:
        """An image's rows are announced: get ready to receive them."""

    @abstractmethod
    def on_chunk(self, chunk: vision_pb2.FeatureChunk) -> None:
        """Rows arrived (bytes inside the chunk, or a note of where they were written)."""

    async def settle(self, timeout_s: float) -> None:
        """Waits until every byte the stream announced has landed (transports whose bytes
        arrive outside the stream, e.g. over a socket); ValueError after timeout_s."""
        return None

    @abstractmethod
    def features(self) -> list[torch.Tensor]:
        """Each image's [rows, hidden] features; ValueError if any is incomplete.

        The tensors may view transport memory: they are valid until release().
        """

    @abstractmethod
    def release(self) -> None:
        """Frees what open() took. Idempotent; called on success, error and cancellation."""


class FeatureReceiver(ABC):
    """The language server's side of a transport, created once per process."""

    name: str

    @abstractmethod
    def open(self, shape: RequestShape) -> Reception:
        """Prepares one request. `shape.connection_id` names the vision server connection
        (from attach) when the transport has connections."""

    async def attach(self, address: str, stub: vision_pb2_grpc.VisionServiceStub) -> str:
        """Connects to one vision server before its first request (e.g. RDMA queue-pair
        set-up over gRPC) and returns the connection id destinations must name; "" when
        the transport needs no connection. Raises ValueError when it cannot connect."""
        return ""

    def close(self) -> None:  # noqa: B027 (an optional hook, empty by default)
        """Releases process-wide resources (arenas, devices) at shutdown."""


class Emission(ABC):
    """One request's features leaving the vision server."""

    @abstractmethod
    def chunks(
        self, image_index: int, first_row: int, rows: torch.Tensor, max_chunk_bytes: int
    ) -> Iterator[vision_pb2.FeatureChunk]:
        """Sends rows [first_row, first_row + len(rows)) of an image; yields the messages
        that tell the receiver about them, in order."""

    async def achunks(
        self, image_index: int, first_row: int, rows: torch.Tensor, max_chunk_bytes: int
    ) -> AsyncIterator[vision_pb2.FeatureChunk]:
        """`chunks` for the event loop. Backends whose sends block (tcp) override it to send
        from a worker thread, so other requests' streams keep flowing meanwhile."""
        for chunk in self.chunks(image_index, first_row, rows, max_chunk_bytes):
            yield chunk

    def close(self) -> None:  # noqa: B027 (an optional hook, empty by default)
        """Called when the request ends, whatever happened."""


class FeatureSender(ABC):
    """The vision server's side of a transport, created once per process."""

    name: str

    def connect(self, request: vision_pb2.RdmaConnectRequest) -> vision_pb2.RdmaConnectResponse:
        """The vision side of `FeatureReceiver.attach` (RdmaConnect); only rdma has one."""
        raise NotImplementedError(f"the {self.name} transport takes no connections")

    @abstractmethod
    def open(self, request: vision_pb2.EncodeRequest) -> Emission:
        """ValueError when the request's destination is unusable (the caller answers
        INVALID_ARGUMENT)."""

    def close(self) -> None:  # noqa: B027 (an optional hook, empty by default)
        """Releases process-wide resources at shutdown."""
