"""The rdma transport: the vision server RDMA-writes features into the language server's memory.

The protocol, and who does what:

- The language server (Receiver) registers one receive buffer (remote write access) and gives
  each request one region per image, first fit; when the buffer is full a request travels
  over grpc instead.
- Before a vision server's first request, `Receiver.attach` creates a reliable-connection
  queue pair and calls RdmaConnect with its endpoint (GID, QPN, PSN, LID) under a connection
  id it picks; the vision server (Sender.connect) creates its own queue pair and answers with
  its endpoint; both move INIT -> RTR -> RTS. The receiver keeps receive work requests posted.
- A request's RdmaDestination names the connection, the buffer's address and rkey, and each
  image's region (offset and capacity in the buffer).
- The sender copies each run of rows into a registered staging buffer and RDMA-writes it
  WITH IMMEDIATE, in chunks of at most max_chunk_bytes, to address + region offset +
  first_row * row_bytes. The immediate is the chunk's byte offset in the buffer (hence
  buffers of at most 4 GiB). Once the writes completed, the Encode stream carries one
  FeatureChunk per chunk whose `written` says where its rows went, and no feature bytes.
- The receiver pairs each announced chunk with the receive completion carrying its offset;
  `settle` waits for all of them, and features() then views the buffer in place.
- Failures degrade rather than fail requests: when a queue pair breaks, the sender puts the
  rows into the stream instead (grpc style), the receiver copies them into the region, sends
  the next requests over grpc and sets up a new queue pair in the background (RdmaConnect
  with the same connection id replaces the vision server's side).
- A region released before its request settled may still be written by a late RDMA write,
  so it is held back for QUARANTINE_S before it is handed out again.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import mmap
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from dvd.features import FEATURES_NAME, wire_dtype
from dvd.transport import grpc_stream, verbs
from dvd.transport.base import (
    Emission,
    FeatureReceiver,
    FeatureSender,
    Reception,
    RequestShape,
    StaleConnection,
)
from dvd.transport.first_fit import ALIGNMENT, FirstFit, aligned
from dvd.transport.regions import ImageRegions
from dvd.transport.verbs import (
    DeviceOpener,
    Endpoint,
    MemoryRegion,
    QueuePair,
    VerbsDevice,
    VerbsError,
)
from dvd.v1 import common_pb2, vision_pb2, vision_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_BUFFER_BYTES = 1024 * 2**20
MAX_BUFFER_BYTES = 2**32  # the immediate (32 bits) carries a byte offset in the buffer

RECV_DEPTH = 1024  # receive work requests kept posted per connection
SEND_DEPTH = 64  # RDMA writes in flight per queue pair
CONNECT_TIMEOUT_S = 10.0
RECONNECT_BACKOFF_S = 1.0
WRITE_TIMEOUT_S = 10.0  # longest a sender waits for its writes' completions
QUARANTINE_S = 30.0  # longer than WRITE_TIMEOUT_S: no write can land after it
MAX_CONNECTIONS = 1024
MIN_STAGING_BYTES = 4 * 2**20


def anonymous_buffer(size: int) -> mmap.mmap:
    """Page-aligned memory for registration, not inherited by forked children (a child
    touching registered pages copy-on-write could leave the NIC writing the wrong copy)."""
    buffer = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_DONTFORK"):
        buffer.madvise(mmap.MADV_DONTFORK)
    return buffer


def buffer_address(buffer: mmap.mmap) -> int:
    """Virtual address of an mmap's first byte (valid while the mmap is open)."""
    view = ctypes.c_char.from_buffer(buffer)
    address = ctypes.addressof(view)
    del view  # release the export, or the mmap could never be closed
    return address


def endpoint_to_wire(endpoint: Endpoint) -> vision_pb2.RdmaEndpoint:
    return vision_pb2.RdmaEndpoint(
        gid=endpoint.gid, qpn=endpoint.qpn, psn=endpoint.psn, lid=endpoint.lid
    )


def endpoint_from_wire(message: vision_pb2.RdmaEndpoint) -> Endpoint:
    endpoint = Endpoint(bytes(message.gid), message.qpn, message.psn, message.lid)
    endpoint.check()
    return endpoint


# --- the language server's side --------------------------------------------------------


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


# --- the vision server's side ----------------------------------------------------------


@dataclass(eq=False)
class _Peer:
    """A queue pair towards one language server's receive buffer."""

    id: str
    qp: QueuePair
    broken: str = ""
    sent: int = 0  # bytes written


class _PeerFailed(Exception):
    pass


class UnknownConnection(StaleConnection):
    """The destination names a connection this sender does not have (it restarted since,
    or the id is wrong): the language server must attach again."""


class RdmaEmission(Emission):
    def __init__(
        self, sender: Sender, peer: _Peer, destination: vision_pb2.RdmaDestination
    ) -> None:
        self.sender = sender
        self.peer = peer
        self.remote_addr = destination.remote_addr
        self.rkey = destination.rkey
        self.offsets = list(destination.image_offsets)
        self.capacities = list(destination.image_capacities)

    def chunks(
        self, image_index: int, first_row: int, rows: torch.Tensor, max_chunk_bytes: int
    ) -> Iterator[vision_pb2.FeatureChunk]:
        if not 0 <= image_index < len(self.offsets):
            raise ValueError(f"no region for image {image_index}")
        rows = rows.detach().to("cpu").contiguous()
        count, hidden = rows.shape
        row_bytes = hidden * rows.element_size()
        if first_row < 0 or (first_row + count) * row_bytes > self.capacities[image_index]:
            raise ValueError(f"image {image_index}'s features overflow their region")
        per_chunk = max(1, max_chunk_bytes // row_bytes)
        start = self.offsets[image_index] + first_row * row_bytes  # in the receive buffer
        pieces = [(first, min(per_chunk, count - first)) for first in range(0, count, per_chunk)]
        writes = [
            (first * row_bytes, n * row_bytes, start + first * row_bytes) for first, n in pieces
        ]
        try:
            self.sender.write(self.peer, rows, writes, self.remote_addr, self.rkey)
        except _PeerFailed as exc:
            log.warning("rdma write failed (%s); these rows travel in the stream", exc)
            yield from grpc_stream.StreamEmission().chunks(
                image_index, first_row, rows, max_chunk_bytes
            )
            return
        dtype = wire_dtype(rows.dtype)
        for (first, n), (_, length, offset) in zip(pieces, writes, strict=True):
            yield vision_pb2.FeatureChunk(
                image_index=image_index,
                row_offset=first_row + first,
                descriptor=common_pb2.TensorDescriptor(
                    name=FEATURES_NAME, dtype=dtype, shape=[n, hidden]
                ),
                written=vision_pb2.RegionWrite(offset=offset, length=length),
            )


class Sender(FeatureSender):
    """One queue pair per language-server connection, and one registered staging buffer."""

    name = "rdma"

    def __init__(
        self,
        device: str | None = None,
        gid_index: int = 0,
        open_device: DeviceOpener = verbs.open_device,
    ) -> None:
        self.device: VerbsDevice = open_device(device, gid_index=gid_index)
        self.peers: dict[str, _Peer] = {}
        self._lock = threading.Lock()  # guards the peers, the staging buffer and the posting
        self._staging: mmap.mmap | None = None
        self._staging_region: MemoryRegion | None = None
        self._wr_ids = itertools.count()

    def connect(self, request: vision_pb2.RdmaConnectRequest) -> vision_pb2.RdmaConnectResponse:
        connection_id = request.connection_id
        if not connection_id or len(connection_id) > 128:
            raise ValueError("connection_id must be 1 to 128 characters")
        if not request.HasField("endpoint"):
            raise ValueError("the caller's endpoint is missing")
        remote = endpoint_from_wire(request.endpoint)
        with self._lock:
            if connection_id not in self.peers and len(self.peers) >= MAX_CONNECTIONS:
                raise ValueError(f"too many rdma connections ({MAX_CONNECTIONS})")
            try:
                qp = self.device.create_qp(send_depth=SEND_DEPTH, recv_depth=1)
            except VerbsError as exc:
                raise ValueError(str(exc)) from None
            try:
                qp.connect(remote)
            except VerbsError as exc:
                qp.close()
                raise ValueError(str(exc)) from None
            old = self.peers.pop(connection_id, None)
            self.peers[connection_id] = _Peer(connection_id, qp)
            if old is not None:
                old.qp.close()
        log.info("rdma connection %s: queue pair %d connected", connection_id, qp.endpoint.qpn)
        return vision_pb2.RdmaConnectResponse(endpoint=endpoint_to_wire(qp.endpoint))

    def open(self, request: vision_pb2.EncodeRequest) -> Emission:
        destination = request.destination.rdma
        images = len(request.images)
        if len(destination.image_offsets) != images or len(destination.image_capacities) != images:
            raise ValueError("rdma destination must give one region per image")
        for offset, capacity in zip(
            destination.image_offsets, destination.image_capacities, strict=True
        ):
            if offset < 0 or capacity < 0 or offset + capacity > MAX_BUFFER_BYTES:
                raise ValueError("rdma region lies outside any receive buffer")
        if destination.remote_addr == 0 or destination.remote_addr + MAX_BUFFER_BYTES >= 2**64:
            raise ValueError("rdma destination has no valid buffer address")
        with self._lock:
            peer = self.peers.get(destination.connection_id)
        if peer is None:
            raise UnknownConnection(
                f"unknown rdma connection {destination.connection_id!r} "
                "(this vision server may have restarted): connect again"
            )
        return RdmaEmission(self, peer, destination)

    def write(
        self,
        peer: _Peer,
        rows: torch.Tensor,
        writes: list[tuple[int, int, int]],
        remote_addr: int,
        rkey: int,
    ) -> None:
        """Stages `rows` and RDMA-writes each (staging offset, length, buffer offset) with the
        buffer offset as immediate; returns once all completed. _PeerFailed when the queue
        pair failed (it is then closed: nothing can write from the staging buffer later)."""
        total = rows.numel() * rows.element_size()
        with self._lock:
            if peer.broken or self.peers.get(peer.id) is not peer:
                raise _PeerFailed(peer.broken or "the connection was replaced")
            try:
                staging = self._staging_for(total)
                ctypes.memmove(staging.address, rows.data_ptr(), total)
                self._post_and_wait(peer, staging, writes, remote_addr, rkey)
            except (VerbsError, _PeerFailed) as exc:
                peer.broken = str(exc)
                peer.qp.close()
                raise _PeerFailed(peer.broken) from None
            peer.sent += total

    def _post_and_wait(
        self,
        peer: _Peer,
        staging: MemoryRegion,
        writes: list[tuple[int, int, int]],
        remote_addr: int,
        rkey: int,
    ) -> None:
        deadline = time.monotonic() + WRITE_TIMEOUT_S
        idle_polls = 0
        outstanding: set[int] = set()
        pending = iter(writes)
        next_write = next(pending, None)
        while next_write is not None or outstanding:
            while next_write is not None and len(outstanding) < SEND_DEPTH:
                local_offset, length, offset = next_write
                wr_id = next(self._wr_ids)
                peer.qp.post_write_with_imm(
                    wr_id, staging, local_offset, length, remote_addr + offset, rkey, imm=offset
                )
                outstanding.add(wr_id)
                next_write = next(pending, None)
            completions = peer.qp.poll(SEND_DEPTH)
            for completion in completions:
                outstanding.discard(completion.wr_id)
                if not completion.ok:
                    raise _PeerFailed(completion.describe())
            if completions:
                idle_polls = 0
            else:
                if time.monotonic() > deadline:
                    raise _PeerFailed(f"writes not completed within {WRITE_TIMEOUT_S:.0f} s")
                idle_polls += 1
                # Spin while the NIC works (a 2 MiB write takes ~0.2 ms at 100 Gb/s); back
                # off when it takes long (the receiver has no receive posted, a retry runs).
                time.sleep(0 if idle_polls < 1000 else 5e-5)

    def _staging_for(self, length: int) -> MemoryRegion:
        region = self._staging_region
        if region is not None and region.length >= length:
            return region
        size = aligned(max(MIN_STAGING_BYTES, 1 << (max(length, 1) - 1).bit_length()))
        self._close_staging()
        self._staging = anonymous_buffer(size)
        self._staging_region = self.device.register(buffer_address(self._staging), size, False)
        return self._staging_region

    def _close_staging(self) -> None:
        if self._staging_region is not None:
            self._staging_region.close()
            self._staging_region = None
        if self._staging is not None:
            self._staging.close()
            self._staging = None

    def close(self) -> None:
        with self._lock:
            for peer in self.peers.values():
                peer.qp.close()
            self.peers.clear()
            self._close_staging()
        self.device.close()
