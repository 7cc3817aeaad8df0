"""The tcp transport: control over gRPC, feature bytes over a plain TCP socket.

The language server (Receiver) listens on one data port. Per request it takes one
preallocated buffer per image, sized for the most rows an image can have, and registers
them under 16 random bytes, the token. The vision server (Sender) writes the rows of each
`chunks()` call as one frame (tcp_wire: header with token, image, byte offset, length; then
the raw bytes) on a persistent connection, then yields the FeatureChunks, of at most
max_chunk_bytes each, whose `written` says which bytes of the image's buffer hold their
rows. A reader thread per connection checks each header against the token's buffers and
lets the kernel copy the payload straight into the buffer slice (recv_into with
MSG_WAITALL: no intermediate copy). `settle()` then waits, without blocking the event loop,
until every byte range the stream announced has landed; frames may land before or after
the chunks that announce them, and one frame may hold many chunks.

Why a frame per call rather than per chunk: a Python reader takes the GIL twice per frame,
and in a language server whose event loop keeps the GIL busy each take can cost up to the
5 ms switch interval. Measured here (2 shared, noisy cores, loopback, sender in another
process, 4 and 13 tiles of 256 x 4096 bf16, medians of 30 alternating rounds, time from
asking the sender to settle() returning), as a fraction of a plain socket read into a
preallocated buffer: with an idle receiving process 0.63-1.01 (mostly 0.8-0.9) for a frame
per call against 0.65-0.85 for a frame per 2 MiB chunk; with a busy Python thread beside
the receiver 0.8-2.3 (the plain recv_into loop waits for the GIL too) against 0.6-0.93.

Only a connection that presents a live token can write, and only inside that token's
buffers (offsets and lengths are checked, in whole rows). A frame outside the buffers fails
its request and closes the connection; a frame with an unknown token closes the
connection; a frame for a recently released token is read and dropped (late bytes). The
token is a capability, not encryption: run the data port on a trusted network.

Where the sender writes. `Emission.chunks()` is a plain generator that the vision server
iterates inside its grpc.aio event loop, so it cannot await a sending thread: handing the
frame to a thread and waiting blocks the loop just the same, and yielding before the send
completes would announce bytes that may never arrive (a failed send would then surface
only as the receiver's settle timeout, since `done` follows the last chunk). So
`chunks()` sends with blocking `sendmsg` calls (the GIL is released meanwhile) and yields
once the frame is out. That blocks the loop for the frame's bytes: with 13 tiles per call,
a 0.5 ms asyncio ticker beside the sender saw gaps of 10-33 ms (1 ms median, 3 ms max
idle); throughput is unaffected. `achunks()` is the same as an async generator that sends
on a worker thread (gaps 1-3 ms median, 4-11 ms max, same throughput); the vision server
should use it once `Emission` has an async variant. Until then, Sender(max_frame_bytes=)
bounds each stall at the cost of more frames. A receiver that stops reading is bounded by
the send timeout (SO_SNDTIMEO, 10 s).

Failures: a receiver that cannot be reached, or whose connection breaks twice in a row,
makes `chunks()` raise ConnectionError; ValueError is kept for a bad destination or rows
that do not fit, which are the caller's fault.

Received buffers are reused: a released request's buffers go back to a free list (up to
`pool_bytes`) once no reader is writing into them; fresh pages cost a receiver about a
third of its throughput in page faults (1.4-1.6 against 2.2-2.4 GiB/s here).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator

import torch

from dvd.features import FEATURES_NAME, torch_dtype, wire_dtype
from dvd.transport.base import Emission, FeatureReceiver, FeatureSender, Reception, RequestShape
from dvd.transport.tcp_wire import (
    HEADER,
    TOKEN_BYTES,
    ByteRanges,
    ConnectionPool,
    FrameHeader,
    ProtocolError,
    discard,
    join_address,
    parse_address,
    recv_exactly,
)
from dvd.v1 import common_pb2, vision_pb2

log = logging.getLogger(__name__)

DEFAULT_POOL_BYTES = 512 * 2**20
MAX_CONNECTIONS = 64
RELEASED_TOKENS_KEPT = 4096
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class TcpReception(Reception):
    """One request's buffers. on_plan/on_chunk/settle run on the event loop; frames land
    from reader threads; one lock guards what both touch."""

    def __init__(
        self, receiver: Receiver, shape: RequestShape, token: bytes, buffers: list[torch.Tensor]
    ) -> None:
        self._receiver = receiver
        self.shape = shape
        self.token = token
        self.row_bytes = shape.hidden * shape.dtype.itemsize
        self._buffers = buffers
        self._views = [b.numpy().data for b in buffers]
        self._rows: list[int | None] = [None] * len(buffers)
        self._announced: list[list[tuple[int, int]]] = [[] for _ in buffers]  # (first, end)
        self._filled = [0] * len(buffers)
        self._landed = [ByteRanges() for _ in buffers]  # bytes of complete frames
        self._pending: list[set[tuple[int, int]]] = [set() for _ in buffers]  # announced,
        self._waiting = 0  # not landed yet: (start, end) byte ranges, and how many in all
        self._error: str | None = None
        self._writers = 0
        self._released = False
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self._lock = threading.Lock()

    @property
    def destination(self) -> vision_pb2.FeatureDestination:
        return vision_pb2.FeatureDestination(
            tcp=vision_pb2.TcpDestination(
                address=self._receiver.address,
                token=self.token,
                image_capacities=self.shape.image_capacities,
            )
        )

    @property
    def landed_bytes(self) -> list[int]:
        """Bytes received so far per image, announced or not (a frame sent twice counts
        once)."""
        with self._lock:
            return [landed.total for landed in self._landed]

    def on_plan(self, plan: vision_pb2.ImagePlan) -> None:
        index = plan.image_index
        if not 0 <= index < len(self._buffers):
            raise ValueError(f"plan for unknown image {index}")
        if plan.hidden_size != self.shape.hidden:
            raise ValueError(f"plan hidden size {plan.hidden_size} != {self.shape.hidden}")
        rows = sum(plan.tokens_per_tile)
        if rows * self.row_bytes > self.shape.image_capacities[index]:
            raise ValueError(f"image {index} has {rows} rows, more than its buffer holds")
        if self._rows[index] is not None:
            raise ValueError(f"image {index} was planned twice")
        self._rows[index] = rows

    def on_chunk(self, chunk: vision_pb2.FeatureChunk) -> None:
        index = chunk.image_index
        planned = self._rows[index] if 0 <= index < len(self._rows) else None
        if planned is None:
            raise ValueError(f"chunk for image {index} before its plan")
        if torch_dtype(chunk.descriptor.dtype) != self.shape.dtype:
            raise ValueError("chunk dtype differs from the request's")
        shape = list(chunk.descriptor.shape)
        if len(shape) != 2 or shape[1] != self.shape.hidden or shape[0] <= 0:
            raise ValueError(f"chunk shape {shape} does not fit [*, {self.shape.hidden}]")
        first, rows = chunk.row_offset, shape[0]
        if first < 0 or first + rows > planned:
            raise ValueError(
                f"chunk rows {first}..{first + rows} outside image {index}'s {planned}"
            )
        offset, length = first * self.row_bytes, rows * self.row_bytes
        if chunk.written.offset != offset or chunk.written.length != length:
            raise ValueError(f"chunk for image {index} was written outside its rows")
        announced = self._announced[index]
        at = bisect.bisect(announced, (first, first + rows))
        if (at and announced[at - 1][1] > first) or (
            at < len(announced) and announced[at][0] < first + rows
        ):
            raise ValueError(f"chunk rows {first}..{first + rows} of image {index} overlap")
        announced.insert(at, (first, first + rows))
        self._filled[index] += rows
        with self._lock:
            if not self._landed[index].covers(offset, offset + length):
                self._pending[index].add((offset, offset + length))
                self._waiting += 1

    async def settle(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] | None = None
        with self._lock:
            if self._error is None and self._waiting:
                future = loop.create_future()
                self._waiter = (loop, future)
        if future is not None:
            try:
                await asyncio.wait_for(future, timeout_s)
            except asyncio.TimeoutError:
                with self._lock:
                    missing = sum(end - start for p in self._pending for start, end in p)
                raise ValueError(
                    f"request {self.shape.request_id}: {missing} announced bytes did not "
                    f"arrive over tcp within {timeout_s:g} s"
                ) from None
            finally:
                with self._lock:
                    self._waiter = None
        if self._error is not None:
            raise ValueError(f"request {self.shape.request_id}: {self._error}")

    def features(self) -> list[torch.Tensor]:
        with self._lock:
            if self._error is not None:
                raise ValueError(self._error)
            if self._released:
                raise ValueError("the request's buffers were released")
            if self._waiting:
                raise ValueError("announced feature bytes have not all arrived")
        out = []
        for index, rows in enumerate(self._rows):
            if rows is None or self._filled[index] != rows:
                raise ValueError(f"image {index} is incomplete")
            flat = self._buffers[index][: rows * self.row_bytes].view(self.shape.dtype)
            out.append(flat.view(rows, self.shape.hidden))
        return out

    def release(self) -> None:
        if self._released:
            return
        self._receiver._unregister(self)
        with self._lock:
            self._released = True
            idle = self._writers == 0
            self._fail_locked("the request was released")
        if idle:
            self._receiver._recycle(self._buffers)

    # Reader-thread side.

    def fail(self, reason: str) -> None:
        with self._lock:
            self._fail_locked(reason)

    def _fail_locked(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        self._wake_locked()

    def _wake_locked(self) -> None:
        if self._waiter is not None:
            loop, future = self._waiter
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_resolve, future)

    def begin_write(self, header: FrameHeader) -> memoryview | None:
        """The buffer slice a frame fills; None when the request was released (drop the
        bytes); ProtocolError (and the request fails) when the frame lies outside."""
        index, offset, length = header.image, header.offset, header.length
        with self._lock:
            if self._released:
                return None
            reason = None
            if index >= len(self._views):
                reason = f"frame for image {index} of {len(self._views)}"
            elif offset + length > len(self._views[index]):
                reason = f"frame {offset}+{length} outside image {index}'s buffer"
            elif offset % self.row_bytes or length % self.row_bytes:
                reason = f"frame {offset}+{length} is not whole rows of {self.row_bytes} bytes"
            if reason is not None:
                self._fail_locked(f"tcp frame rejected: {reason}")
                raise ProtocolError(reason)
            self._writers += 1
            return self._views[index][offset : offset + length]

    def end_write(self, header: FrameHeader, complete: bool) -> None:
        with self._lock:
            self._writers -= 1
            if complete and not self._released:
                landed = self._landed[header.image]
                landed.add(header.offset, header.offset + header.length)
                pending = self._pending[header.image]
                done = {p for p in pending if landed.covers(*p)}
                if done:
                    pending -= done
                    self._waiting -= len(done)
                    if not self._waiting:
                        self._wake_locked()
            recycle = self._released and self._writers == 0
        if recycle:
            self._receiver._recycle(self._buffers)


class Receiver(FeatureReceiver):
    """Listens for data connections on (host, port) from construction until close().

    `advertise` is the host vision servers dial (default: host, or this machine's name
    when host is a wildcard); `address` is what destinations carry. `pool_bytes` bounds
    the released buffers kept for reuse; `max_connections` the data connections served
    at once (one reader thread each).
    """

    name = "tcp"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise: str | None = None,
        *,
        pool_bytes: int = DEFAULT_POOL_BYTES,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if pool_bytes < 0 or max_connections < 1:
            raise ValueError("pool_bytes must be >= 0 and max_connections >= 1")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=128)
        self.port: int = self._listener.getsockname()[1]
        if advertise is None:
            advertise = socket.gethostname() if host in _WILDCARD_HOSTS else host
        self.address = join_address(advertise, self.port)
        self._pool_bytes = pool_bytes
        self._max_connections = max_connections
        self._lock = threading.Lock()
        self._receptions: dict[bytes, TcpReception] = {}
        self._released: OrderedDict[bytes, list[int]] = OrderedDict()  # token -> capacities
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._free: dict[int, list[torch.Tensor]] = {}
        self._free_bytes = 0
        self._closed = False
        self.connections_accepted = 0
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"dvd-tcp-accept-{self.port}", daemon=True
        )
        self._acceptor.start()

    @property
    def connection_count(self) -> int:
        """Data connections being served now."""
        with self._lock:
            return len(self._connections)

    def open(self, shape: RequestShape) -> Reception:
        if shape.hidden <= 0 or any(c < 0 for c in shape.image_capacities):
            raise ValueError("hidden size must be > 0 and image capacities >= 0")
        buffers = [self._take(capacity) for capacity in shape.image_capacities]
        token = secrets.token_bytes(TOKEN_BYTES)
        reception = TcpReception(self, shape, token, buffers)
        with self._lock:
            if self._closed:
                raise ValueError("the tcp receiver is closed")
            self._receptions[token] = reception
        return reception

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connections = dict(self._connections)
            receptions = list(self._receptions.values())
        for sock in [self._listener, *connections]:
            with contextlib.suppress(OSError):  # wakes the thread blocked in accept/recv
                sock.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(timeout=5)
        self._listener.close()
        for thread in connections.values():
            thread.join(timeout=5)
        for reception in receptions:
            reception.fail("the tcp receiver closed")
        with self._lock:
            self._free.clear()
            self._free_bytes = 0

    # Buffers.

    def _take(self, capacity: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get(capacity)
            if free:
                self._free_bytes -= capacity
                return free.pop()
        return torch.empty(capacity, dtype=torch.uint8)

    def _recycle(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            for buffer in buffers:
                size = buffer.numel()
                if not self._closed and size and self._free_bytes + size <= self._pool_bytes:
                    self._free.setdefault(size, []).append(buffer)
                    self._free_bytes += size

    def _unregister(self, reception: TcpReception) -> None:
        with self._lock:
            if self._receptions.pop(reception.token, None) is not None:
                self._released[reception.token] = list(reception.shape.image_capacities)
                while len(self._released) > RELEASED_TOKENS_KEPT:
                    self._released.popitem(last=False)

    # Connections.

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, peer = self._listener.accept()
            except OSError as exc:
                if self._closed:
                    return  # close() shut the listener down
                log.warning("tcp data listener cannot accept: %s", exc)
                time.sleep(0.1)  # e.g. out of file descriptors: try again shortly
                continue
            with self._lock:
                if self._closed or len(self._connections) >= self._max_connections:
                    log.warning("tcp data connection from %s refused: too many", peer)
                    sock.close()
                    continue
                thread = threading.Thread(
                    target=self._serve,
                    args=(sock, peer),
                    name=f"dvd-tcp-read-{peer}",
                    daemon=True,
                )
                self._connections[sock] = thread
                self.connections_accepted += 1
                thread.start()  # under the lock: close() never joins an unstarted thread

    def _serve(self, sock: socket.socket, peer: object) -> None:
        try:
            sock.settimeout(None)  # blocking, so MSG_WAITALL fills a frame in one call
            self._read_frames(sock)
        except ProtocolError as exc:
            log.warning("tcp data connection from %s closed: %s", peer, exc)
        except OSError as exc:
            log.info("tcp data connection from %s broke: %s", peer, exc)
        except Exception:
            log.exception("tcp data connection from %s failed", peer)
        finally:
            with self._lock:
                self._connections.pop(sock, None)
            sock.close()

    def _read_frames(self, sock: socket.socket) -> None:
        raw = memoryview(bytearray(HEADER.size))
        scratch: memoryview | None = None
        while recv_exactly(sock, raw) == HEADER.size:
            header = FrameHeader.unpack(raw)
            with self._lock:
                reception = self._receptions.get(header.token)
                released = self._released.get(header.token)
            if reception is not None:
                target = reception.begin_write(header)
                if target is not None:
                    complete = False
                    try:
                        complete = recv_exactly(sock, target) == header.length
                    finally:
                        reception.end_write(header, complete)
                    if not complete:
                        return
                    continue
            elif released is None:
                raise ProtocolError("frame with an unknown token")
            elif header.image >= len(released) or (
                header.offset + header.length > released[header.image]
            ):
                raise ProtocolError("frame outside a released request's buffers")
            # Late bytes for a released request: read and drop them, keep the connection.
            scratch = scratch or memoryview(bytearray(2**20))
            if not discard(sock, header.length, scratch):
                return


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
        """chunks() for callers that can await: frames are sent on a worker thread, so the
        event loop runs on while the kernel drains them. Not in the Emission interface
        yet (see the module docstring)."""
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
        if not 0 <= image_index < len(self._capacities):
            raise ValueError(f"no buffer for image {image_index}")
        if rows.dim() != 2 or first_row < 0:
            raise ValueError(f"rows must be [rows, hidden] from row >= 0, got {list(rows.shape)}")
        rows = rows.detach().cpu().contiguous()
        count, hidden = rows.shape
        row_bytes = hidden * rows.element_size()
        start = first_row * row_bytes
        if start + count * row_bytes > self._capacities[image_index]:
            raise ValueError(f"image {image_index}'s features overflow its buffer")
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
    chunks() call into several frames (whole chunks each); 0 sends them as one."""

    name = "tcp"

    def __init__(
        self,
        *,
        connections_per_receiver: int = 4,
        connect_timeout_s: float = 5.0,
        send_timeout_s: float = 10.0,
        max_receivers: int = 64,
        max_frame_bytes: int = 0,
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
                    address, self._per_receiver, self._connect_timeout_s, self._send_timeout_s
                )
                self._pools[address] = pool
            self._pools.move_to_end(address)
            evicted = []
            while len(self._pools) > self._max_receivers:
                evicted.append(self._pools.popitem(last=False)[1])
        for old in evicted:
            old.retire()
        return pool
