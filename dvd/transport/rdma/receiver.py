"""The rdma transport's language-server side: the registered receive buffer, one queue pair
per vision server, and each request's regions (see the package docstring for the protocol)."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import secrets
import time
from dataclasses import dataclass, field

import torch

from dvd.transport import grpc_stream
from dvd.transport.base import FeatureReceiver, Reception, RequestShape
from dvd.transport.first_fit import ALIGNMENT, FirstFit, aligned
from dvd.transport.rdma import verbs
from dvd.transport.rdma.common import (
    MAX_BUFFER_BYTES,
    QUARANTINE_S,
    anonymous_buffer,
    buffer_address,
    endpoint_from_wire,
    endpoint_to_wire,
)
from dvd.transport.rdma.verbs import DeviceOpener, MemoryRegion, QueuePair, VerbsDevice, VerbsError
from dvd.transport.regions import ImageRegions
from dvd.v1 import vision_pb2, vision_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_BUFFER_BYTES = 1024 * 2**20
RECV_DEPTH = 1024  # receive work requests kept posted per connection
CONNECT_TIMEOUT_S = 10.0
RECONNECT_BACKOFF_S = 1.0


@dataclass(eq=False)
class _Link:
    """One queue pair of a connection, and the requests whose writes it carries."""

    qp: QueuePair
    failed: str = ""  # why the queue pair failed (an error completion, a verb that failed)
    users: int = 0  # open requests bound to it


@dataclass(eq=False)
class _Connection:
    """The queue pair towards one vision server, under the id destinations name."""

    id: str
    address: str
    stub: vision_pb2_grpc.VisionServiceStub
    link: _Link
    stale: str = ""  # why `link` must be replaced; requests use grpc until it is
    retired: list[_Link] = field(default_factory=list)  # replaced, still used by requests
    reconnecting: asyncio.Task[None] | None = None
    retry_at: float = 0.0


class RdmaReception(Reception):
    def __init__(
        self,
        receiver: Receiver,
        connection: _Connection,
        shape: RequestShape,
        offsets: list[int],
    ) -> None:
        self.receiver = receiver
        self.connection = connection
        self.link = connection.link
        self.link.users += 1
        self.shape = shape
        self.regions = ImageRegions(shape, offsets)
        self.announced: dict[int, int] = {}  # buffer offset -> bytes: in the stream, not landed
        self.landed: dict[int, int] = {}  # buffer offset -> bytes: landed, not yet in the stream
        self.error = ""
        self.settled = False
        self.released = False

    @property
    def destination(self) -> vision_pb2.FeatureDestination:
        return vision_pb2.FeatureDestination(
            rdma=vision_pb2.RdmaDestination(
                connection_id=self.connection.id,
                remote_addr=self.receiver.base,
                rkey=self.receiver.region.rkey,
                image_offsets=self.regions.offsets,
                image_capacities=self.shape.image_capacities,
            )
        )

    def owns(self, offset: int) -> bool:
        return self.regions.owns(offset)

    def on_plan(self, plan: vision_pb2.ImagePlan) -> None:
        self.regions.on_plan(plan)

    def on_chunk(self, chunk: vision_pb2.FeatureChunk) -> None:
        place = self.regions.place(chunk)
        if chunk.data:
            self._copy_in(place.offset, place.length, chunk.data)
        else:
            self.regions.check_written(chunk, place)
            if place.offset in self.announced:
                raise ValueError(f"chunk at buffer offset {place.offset} announced twice")
            self.announced[place.offset] = place.length
            self._match(place.offset)
        self.regions.arrived(place)
        self.receiver.drain(self.connection, self.link)  # keeps receives posted
        if self.error:
            raise ValueError(self.error)

    def _copy_in(self, offset: int, length: int, data: bytes) -> None:
        """The sender could not RDMA-write: the rows came inside the stream."""
        if len(data) != length:
            raise ValueError(f"chunk has {len(data)} bytes, its descriptor says {length}")
        ctypes.memmove(self.receiver.base + offset, data, length)
        if self.link is self.connection.link:
            self.receiver.mark_stale(self.connection, "the vision server sent rows in the stream")

    def on_landed(self, link: _Link, offset: int, byte_len: int) -> None:
        """A receive completion for one of this request's chunks."""
        if link is not self.link:
            log.warning("rdma write at offset %d came over another queue pair; ignored", offset)
            return
        if offset in self.landed:
            self.error = f"rdma write at buffer offset {offset} landed twice"
        self.landed[offset] = byte_len
        self._match(offset)

    def _match(self, offset: int) -> None:
        if offset in self.announced and offset in self.landed:
            length, byte_len = self.announced.pop(offset), self.landed.pop(offset)
            if byte_len and byte_len != length:
                self.error = f"rdma write at buffer offset {offset}: {byte_len} bytes, not {length}"

    async def settle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        delay = 0.0
        while True:
            self.receiver.drain(self.connection, self.link)
            if self.error:
                raise ValueError(self.error)
            if not self.announced:
                break
            if self.link.failed:
                raise ValueError(
                    f"rdma queue pair of connection {self.connection.id} failed "
                    f"({self.link.failed}) with {len(self.announced)} write(s) of request "
                    f"{self.shape.request_id} missing"
                )
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"{len(self.announced)} rdma write(s) announced for request "
                    f"{self.shape.request_id} did not complete within {timeout_s:.1f} s"
                )
            await asyncio.sleep(delay)
            delay = min(max(2 * delay, 1e-4), 5e-3)
        self.settled = True

    def features(self) -> list[torch.Tensor]:
        if not self.settled:
            raise ValueError("features read before every rdma write completed (settle)")
        return self.regions.tensors(self.receiver.buffer)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.receiver.give_back(self)


class Receiver(FeatureReceiver):
    """Owns the registered receive buffer and one queue pair per vision server."""

    name = "rdma"

    def __init__(
        self,
        device: str | None = None,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        gid_index: int = 0,
        open_device: DeviceOpener = verbs.open_device,
    ) -> None:
        if not ALIGNMENT <= buffer_bytes <= MAX_BUFFER_BYTES:
            raise ValueError(
                f"rdma buffer_bytes={buffer_bytes}: must lie in [{ALIGNMENT}, {MAX_BUFFER_BYTES}]"
            )
        self.size = min(aligned(buffer_bytes), MAX_BUFFER_BYTES)
        self.device: VerbsDevice = open_device(device, gid_index=gid_index)
        try:
            self.buffer = anonymous_buffer(self.size)
            self.base = buffer_address(self.buffer)
            self.region: MemoryRegion = self.device.register(self.base, self.size, True)
        except BaseException:
            self.device.close()
            raise
        self.allocator = FirstFit(self.size)
        self.connections: dict[str, _Connection] = {}
        self.receptions: set[RdmaReception] = set()
        self.quarantine: list[tuple[float, list[tuple[int, int]]]] = []
        self._fallback = grpc_stream.Receiver()
        log.info(
            "rdma receive buffer: %.0f MiB registered on %s", self.size / 2**20, self.device.name
        )

    async def attach(self, address: str, stub: vision_pb2_grpc.VisionServiceStub) -> str:
        for old in [c for c in self.connections.values() if c.address == address]:
            self._drop(old)  # the server restarted or went away: start afresh
        connection_id = secrets.token_hex(8)
        qp = await self._connect(connection_id, address, stub)
        self.connections[connection_id] = _Connection(connection_id, address, stub, _Link(qp))
        log.info("rdma connection %s to %s established", connection_id, address)
        return connection_id

    async def _connect(
        self, connection_id: str, address: str, stub: vision_pb2_grpc.VisionServiceStub
    ) -> QueuePair:
        """A queue pair connected to the vision server at `address`, receives posted."""
        try:
            qp = self.device.create_qp(send_depth=1, recv_depth=RECV_DEPTH)
        except VerbsError as exc:
            raise ValueError(f"rdma to {address}: {exc}") from None
        try:
            request = vision_pb2.RdmaConnectRequest(
                connection_id=connection_id, endpoint=endpoint_to_wire(qp.endpoint)
            )
            reply = await stub.RdmaConnect(request, timeout=CONNECT_TIMEOUT_S)
            qp.connect(endpoint_from_wire(reply.endpoint))
            for wr_id in range(RECV_DEPTH):
                qp.post_receive(wr_id)
        except VerbsError as exc:
            qp.close()
            raise ValueError(f"rdma to {address}: {exc}") from None
        except BaseException:
            qp.close()
            raise
        return qp

    def _drop(self, connection: _Connection) -> None:
        self.connections.pop(connection.id, None)
        if connection.reconnecting is not None:
            connection.reconnecting.cancel()
        for link in [connection.link, *connection.retired]:
            link.failed = link.failed or "connection closed"
            link.qp.close()
        connection.retired.clear()

    def open(self, shape: RequestShape) -> Reception:
        self._end_quarantine()
        connection = self.connections.get(shape.connection_id)
        if connection is None:
            raise ValueError(f"unknown rdma connection {shape.connection_id!r}; attach first")
        self.drain(connection, connection.link)
        if connection.stale:
            self._reconnect_soon(connection)
            log.warning(
                "request %s: rdma connection %s is being re-established (%s); "
                "its features travel over grpc",
                shape.request_id,
                connection.id,
                connection.stale,
            )
            return self._fallback.open(shape)
        offsets = self.allocator.allocate_all(shape.image_capacities)
        if offsets is None:
            log.warning(
                "request %s: rdma buffer full (%d of %d bytes in use); "
                "its features travel over grpc",
                shape.request_id,
                self.allocator.allocated,
                self.allocator.size,
            )
            return self._fallback.open(shape)
        reception = RdmaReception(self, connection, shape, offsets)
        self.receptions.add(reception)
        return reception

    def drain(self, connection: _Connection, link: _Link) -> None:
        """Polls a queue pair's receive completions without blocking: hands each to the
        request whose region it landed in, and posts the receive again."""
        if link.failed:
            return
        try:
            completions = link.qp.poll(RECV_DEPTH)
        except VerbsError as exc:
            self._fail(connection, link, str(exc))
            return
        for completion in completions:
            if not completion.ok:
                self._fail(connection, link, completion.describe())
                continue
            try:
                link.qp.post_receive(completion.wr_id)
            except VerbsError as exc:
                self._fail(connection, link, str(exc))
            if completion.imm is None:
                continue
            owner = next((r for r in self.receptions if r.owns(completion.imm)), None)
            if owner is None:
                log.warning("rdma write at offset %d matches no open request", completion.imm)
            else:
                owner.on_landed(link, completion.imm, completion.byte_len)

    def _fail(self, connection: _Connection, link: _Link, why: str) -> None:
        if not link.failed:
            link.failed = why
            if link is connection.link:
                self.mark_stale(connection, why)

    def mark_stale(self, connection: _Connection, why: str) -> None:
        if not connection.stale:
            connection.stale = why
            log.warning(
                "rdma connection %s to %s: %s; requests use grpc until it is re-established",
                connection.id,
                connection.address,
                why,
            )

    def _reconnect_soon(self, connection: _Connection) -> None:
        if connection.reconnecting is not None or time.monotonic() < connection.retry_at:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        connection.reconnecting = loop.create_task(self._reconnect(connection))

    async def _reconnect(self, connection: _Connection) -> None:
        """A new queue pair under the same connection id: RdmaConnect replaces the vision
        server's side. Requests still bound to the old one finish on it."""
        try:
            qp = await self._connect(connection.id, connection.address, connection.stub)
        except Exception as exc:  # whatever failed, try again after a pause
            connection.retry_at = time.monotonic() + RECONNECT_BACKOFF_S
            log.warning("rdma reconnect to %s failed: %s", connection.address, exc)
            return
        finally:
            connection.reconnecting = None
        if self.connections.get(connection.id) is not connection:
            qp.close()  # dropped meanwhile
            return
        old, connection.link, connection.stale = connection.link, _Link(qp), ""
        self._retire(connection, old)
        log.info("rdma connection %s to %s re-established", connection.id, connection.address)

    def _retire(self, connection: _Connection, link: _Link) -> None:
        if link.users:
            connection.retired.append(link)
        else:
            link.qp.close()

    def give_back(self, reception: RdmaReception) -> None:
        """Frees a released request's regions: now if it settled, else after QUARANTINE_S
        (a write may still be on its way)."""
        self.receptions.discard(reception)
        link, connection = reception.link, reception.connection
        link.users -= 1
        if link in connection.retired and not link.users:
            connection.retired.remove(link)
            link.qp.close()
        regions = list(
            zip(reception.regions.offsets, reception.shape.image_capacities, strict=True)
        )
        if reception.settled:
            for offset, capacity in regions:
                self.allocator.free(offset, capacity)
        else:
            self.quarantine.append((time.monotonic() + QUARANTINE_S, regions))

    def _end_quarantine(self) -> None:
        now = time.monotonic()
        keep = []
        for until, regions in self.quarantine:
            if until <= now:
                for offset, capacity in regions:
                    self.allocator.free(offset, capacity)
            else:
                keep.append((until, regions))
        self.quarantine = keep

    def close(self) -> None:
        for connection in list(self.connections.values()):
            self._drop(connection)
        self.region.close()
        self.device.close()
        try:
            self.buffer.close()
        except BufferError:  # a tensor still views it; the mapping goes with the process
            log.debug("rdma receive buffer still in use at close")
