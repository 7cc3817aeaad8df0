"""The tcp transport's language-server side: the data listener, one reader thread per
connection, and each request's buffers (see the package docstring for the protocol)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import secrets
import socket
import ssl
import threading
import time
from collections import OrderedDict

import torch

from dvd.features import torch_dtype
from dvd.transport.base import FeatureReceiver, Reception, RequestShape
from dvd.transport.regions import planned_rows
from dvd.transport.tcp.wire import (
    ACCEPTED,
    HEADER,
    TOKEN_BYTES,
    ByteRanges,
    FrameHeader,
    ProtocolError,
    discard,
    join_address,
    recv_exactly,
)
from dvd.v1 import vision_pb2

log = logging.getLogger(__name__)

DEFAULT_POOL_BYTES = 512 * 2**20
MAX_CONNECTIONS = 64
RELEASED_TOKENS_KEPT = 4096
HANDSHAKE_TIMEOUT_S = 10.0
"""How long a data connection may take over its TLS handshake."""
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
        rows = planned_rows(plan, self.shape, "buffer")
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

    `tls` (dvd.tls.Tls.server_context) makes the listener take TLS connections only (and
    only senders with a certificate its CA signed, when the context requires one): a
    plaintext sender, or one it refuses, is logged and closed after its handshake fails
    (at most HANDSHAKE_TIMEOUT_S).
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
        tls: ssl.SSLContext | None = None,
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
        self._tls = tls
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
        if tls is None:
            security = "plaintext"
        elif tls.verify_mode == ssl.CERT_REQUIRED:
            security = "mTLS: senders need a certificate the CA signed"
        else:
            security = "TLS"
        log.info("tcp data port listening on %s (%s)", self.address, security)

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
                # socket.socket's own shutdown: a TLS socket's would drop its TLS state
                # under the reader thread.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
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
            if self._tls is not None:
                sock = self._wrap(sock, self._tls)
                self._handshake(sock, peer)
            sock.settimeout(None)  # blocking, so MSG_WAITALL fills a frame in one call
            self._read_frames(sock)
        except _Refused:
            pass
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

    def _wrap(self, raw: socket.socket, tls: ssl.SSLContext) -> ssl.SSLSocket:
        """The connection as a TLS socket (no I/O yet), registered in raw's place so that
        close() shuts it down."""
        with self._lock:
            if self._closed:  # close() has already shut the raw socket down, or will not see it
                raise _Refused()
            sock = tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            self._connections[sock] = self._connections.pop(raw)
        return sock

    def _handshake(self, sock: ssl.SSLSocket, peer: object) -> None:
        """The TLS handshake, then ACCEPTED (wire.py); _Refused, logged, when it fails."""
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            sock.do_handshake()
            sock.sendall(ACCEPTED)
            return
        except TimeoutError:
            reason = f"no TLS handshake within {HANDSHAKE_TIMEOUT_S:g} s"
        except ssl.SSLError as exc:
            reason = _handshake_failure(exc)
        except OSError as exc:
            reason = f"the TLS handshake broke off ({exc})"
        if not self._closed:
            log.warning("tcp data connection from %s refused: %s", peer, reason)
        raise _Refused()

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


class _Refused(Exception):
    """A data connection failed its TLS handshake (already logged)."""


def _handshake_failure(exc: ssl.SSLError) -> str:
    """What a failed handshake on the data port most likely means, for the log."""
    reason = str(exc.reason or exc)
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"):
        return f"not TLS, a plaintext sender? ({reason})"
    if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
        return f"the sender presented no certificate ({reason})"
    if reason == "UNEXPECTED_EOF_WHILE_READING":
        return f"the sender hung up during the handshake ({reason})"
    if reason == "CERTIFICATE_VERIFY_FAILED":
        return f"the sender's certificate is not one our --tls-ca signed ({reason})"
    if "ALERT" in reason:
        return (
            f"the sender refused our certificate: check its --tls-ca and --tls-server-name "
            f"({reason})"
        )
    return f"TLS handshake failed ({reason})"
