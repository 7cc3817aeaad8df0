"""The tcp transport's vision-server side: frames written on persistent connections, and
the FeatureChunks that announce them (see the package docstring for the protocol)."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator

import torch

from dvd.features import FEATURES_NAME, wire_dtype
from dvd.transport.base import Emission, FeatureSender
from dvd.transport.regions import sender_offset
from dvd.transport.tcp.wire import TOKEN_BYTES, ConnectionPool, FrameHeader, parse_address
from dvd.v1 import common_pb2, vision_pb2


class TcpEmission(Emission):
    def __init__(
        self, pool: ConnectionPool, token: bytes, capacities: list[int], max_frame_bytes: int
    ) -> None:
        self._pool = pool
        self._token = token
        self._capacities = capacities
        self._max_frame_bytes = max_frame_bytes

    def chunks(
        self, image_index: int, first_row: int, rows: torch.Tensor, max_chunk_bytes: int
    ) -> Iterator[vision_pb2.FeatureChunk]:
        """Sends each frame from the calling thread, then yields the chunks that announce
        its rows."""
        for header, payload, chunks in self._frames(image_index, first_row, rows, max_chunk_bytes):
            self._pool.send(header, payload)
            yield from chunks

    async def achunks(
        self, image_index: int, first_row: int, rows: torch.Tensor, max_chunk_bytes: int
    ) -> AsyncIterator[vision_pb2.FeatureChunk]:
        """chunks() for the event loop: frames are sent on a worker thread, so the loop
        runs on while the kernel drains them (see the package docstring)."""
        for header, payload, chunks in self._frames(image_index, first_row, rows, max_chunk_bytes):
            await asyncio.to_thread(self._pool.send, header, payload)
            for chunk in chunks:
                yield chunk

    def _frames(
        self, image_index: int, first_row: int, rows: torch.Tensor, max_chunk_bytes: int
    ) -> list[tuple[bytes, memoryview, list[vision_pb2.FeatureChunk]]]:
        """The rows as frames (header, payload viewing the tensor's bytes), each with the
        chunks of whole rows, at most max_chunk_bytes (at least one row), that announce
        its parts in the stream. One frame unless max_frame_bytes cuts them."""
        if rows.dim() != 2:
            raise ValueError(f"rows must be [rows, hidden], got {list(rows.shape)}")
        rows = rows.detach().cpu().contiguous()
        count, hidden = rows.shape
        row_bytes = hidden * rows.element_size()
        start = sender_offset(self._capacities, image_index, first_row, count, row_bytes, "buffer")
        dtype = wire_dtype(rows.dtype)
        data = rows.reshape(-1).view(torch.uint8).numpy().data  # a view: no copy
        chunk_rows = max(1, max_chunk_bytes // row_bytes)
        frame_rows = count
        if self._max_frame_bytes > 0:  # whole chunks per frame, at least one
            frame_rows = max(1, self._max_frame_bytes // row_bytes // chunk_rows) * chunk_rows
        frames = []
        for frame_first in range(0, count, frame_rows):
            frame_end = min(count, frame_first + frame_rows)
            chunks = [
                vision_pb2.FeatureChunk(
                    image_index=image_index,
                    row_offset=first_row + first,
                    descriptor=common_pb2.TensorDescriptor(
                        name=FEATURES_NAME,
                        dtype=dtype,
                        shape=[min(chunk_rows, frame_end - first), hidden],
                    ),
                    written=vision_pb2.RegionWrite(
                        offset=start + first * row_bytes,
                        length=min(chunk_rows, frame_end - first) * row_bytes,
                    ),
                )
                for first in range(frame_first, frame_end, chunk_rows)
            ]
            offset, length = frame_first * row_bytes, (frame_end - frame_first) * row_bytes
            header = FrameHeader(self._token, image_index, start + offset, length).pack()
            frames.append((header, data[offset : offset + length], chunks))
        return frames


class Sender(FeatureSender):
    """Keeps up to `connections_per_receiver` persistent connections to each of the last
    `max_receivers` receivers it wrote to. `max_frame_bytes` > 0 cuts the rows of one
    chunks() call into several frames (whole chunks each); 0 sends them as one.

    `tls` (dvd.tls.Tls.client_context) makes every connection TLS: the receiver's
    certificate must carry `server_name`, or by default the host of the destination's
    address (what the language server advertises)."""

    name = "tcp"

    def __init__(
        self,
        *,
        connections_per_receiver: int = 4,
        connect_timeout_s: float = 5.0,
        send_timeout_s: float = 10.0,
        max_receivers: int = 64,
        max_frame_bytes: int = 0,
        tls: ssl.SSLContext | None = None,
        server_name: str = "",
    ) -> None:
        if connections_per_receiver < 1 or max_receivers < 1:
            raise ValueError("connections_per_receiver and max_receivers must be >= 1")
        if connect_timeout_s <= 0 or send_timeout_s <= 0:
            raise ValueError("connect_timeout_s and send_timeout_s must be > 0")
        self._per_receiver = connections_per_receiver
        self._connect_timeout_s = connect_timeout_s
        self._send_timeout_s = send_timeout_s
        self._max_receivers = max_receivers
        self._max_frame_bytes = max_frame_bytes
        self._tls = tls
        self._server_name = server_name
        self._pools: OrderedDict[str, ConnectionPool] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, request: vision_pb2.EncodeRequest) -> Emission:
        if request.destination.WhichOneof("kind") != "tcp":
            raise ValueError("the request has no tcp destination")
        destination = request.destination.tcp
        parse_address(destination.address)
        if len(destination.token) != TOKEN_BYTES:
            raise ValueError(f"tcp token must be {TOKEN_BYTES} bytes")
        capacities = list(destination.image_capacities)
        if len(capacities) != len(request.images):
            raise ValueError("tcp destination must give one capacity per image")
        if any(c < 0 for c in capacities):
            raise ValueError("tcp image capacities must be >= 0")
        pool = self._pool(destination.address)
        return TcpEmission(pool, destination.token, capacities, self._max_frame_bytes)

    def close(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            pool.retire()

    def _pool(self, address: str) -> ConnectionPool:
        with self._lock:
            pool = self._pools.get(address)
            if pool is None:
                pool = ConnectionPool(
                    address,
                    self._per_receiver,
                    self._connect_timeout_s,
                    self._send_timeout_s,
                    self._tls,
                    self._server_name,
                )
                self._pools[address] = pool
            self._pools.move_to_end(address)
            evicted = []
            while len(self._pools) > self._max_receivers:
                evicted.append(self._pools.popitem(last=False)[1])
        for old in evicted:
            old.retire()
        return pool
