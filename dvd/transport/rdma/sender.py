"""The rdma transport's vision-server side: one queue pair per language-server connection,
and a registered staging buffer the rows are RDMA-written from (see the package docstring)."""

from __future__ import annotations

import ctypes
import itertools
import logging
import mmap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dvd.features import FEATURES_NAME, wire_dtype
from dvd.transport import grpc_stream
from dvd.transport.base import Emission, FeatureSender, StaleConnection
from dvd.transport.first_fit import aligned
from dvd.transport.rdma import verbs
from dvd.transport.rdma.common import (
    MAX_BUFFER_BYTES,
    WRITE_TIMEOUT_S,
    anonymous_buffer,
    buffer_address,
    endpoint_from_wire,
    endpoint_to_wire,
)
from dvd.transport.rdma.verbs import DeviceOpener, MemoryRegion, QueuePair, VerbsDevice, VerbsError
from dvd.transport.regions import sender_offset
from dvd.v1 import common_pb2, vision_pb2

log = logging.getLogger(__name__)

SEND_DEPTH = 64  # RDMA writes in flight per queue pair
MAX_CONNECTIONS = 1024
MIN_STAGING_BYTES = 4 * 2**20


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
        rows = rows.detach().to("cpu").contiguous()
        count, hidden = rows.shape
        row_bytes = hidden * rows.element_size()
        start = sender_offset(self.capacities, image_index, first_row, count, row_bytes, "region")
        start += self.offsets[image_index]  # in the receive buffer
        per_chunk = max(1, max_chunk_bytes // row_bytes)
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
