"""The ceilings each transport is compared with, measured in the same run.

`dvd bench transfer` alternates ceiling rounds with the transport's rounds, shape by shape,
so that a noisy machine slows both alike instead of flattering or damning one of them.

memcpy: copying the same bytes between two preallocated tensors in one process (what shm
cannot beat). socket: the same bytes over a loopback TCP connection between two processes,
received with recv_into(MSG_WAITALL) a preallocated buffer (what any TCP transport cannot
beat).
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import struct
import time

import torch

_HEADER = struct.Struct("<Q")
WARMUP = 2  # untimed rounds first: page faults and TCP slow start are not bandwidth
MIN_REPEATS = 30
"""Ceilings are cheap to measure and a low one flatters every ratio: never fewer rounds."""


COLD_BYTES = 512 * 2**20
"""A transfer writes memory the reader has not touched lately: copies rotate through this
many bytes of buffers, well past the last-level cache, so the ceiling is memory bandwidth
and not a cache-resident copy of the same few MiB."""


class _ColdWindows:
    """Windows of COLD_BYTES (at least two windows' worth) taken in turn, so that each
    round touches memory the cache has not seen lately, whatever its size."""

    def __init__(self, max_bytes: int) -> None:
        self.size = max(COLD_BYTES, 2 * max_bytes)
        self._next = 0

    def take(self, nbytes: int) -> int:
        """Offset of the next window of nbytes (page-aligned)."""
        if self._next + nbytes > self.size:
            self._next = 0
        offset = self._next
        self._next += (nbytes + 4095) // 4096 * 4096
        return offset


class MemcpyCeiling:
    """One timed copy at a time (see `once`), so rounds can alternate with a transport's."""

    def __init__(self, max_bytes: int) -> None:
        self._windows = _ColdWindows(max_bytes)
        self._source = torch.randint(0, 255, (self._windows.size,), dtype=torch.uint8)
        self._target = torch.empty(self._windows.size, dtype=torch.uint8)
        self._target.copy_(self._source)  # touch every page once: faults are not bandwidth

    def once(self, nbytes: int) -> float:
        """Seconds to copy nbytes between two buffers the cache has not seen lately."""
        offset = self._windows.take(nbytes)
        source = self._source[offset : offset + nbytes]
        target = self._target[offset : offset + nbytes]
        # One thread, like the single writer of a transfer; intra-op threads would also
        # just wait on each other on a busy machine.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            started = time.perf_counter()
            target.copy_(source)
            return time.perf_counter() - started
        finally:
            torch.set_num_threads(threads)

    def close(self) -> None:
        del self._source, self._target


def _sink(port_out: mp.connection.Connection, max_bytes: int) -> None:
    """The receiving process: recv_into one preallocated buffer, ack each message; a
    zero-length message ends it."""
    listener = socket.create_server(("127.0.0.1", 0))
    port_out.send(listener.getsockname()[1])
    connection, _ = listener.accept()
    buffer = memoryview(bytearray(max_bytes))
    while True:
        header = connection.recv(_HEADER.size, socket.MSG_WAITALL)
        (length,) = _HEADER.unpack(header)
        if length == 0:
            break
        received = 0
        while received < length:  # MSG_WAITALL: the kernel fills it in one call, as tcp does
            received += connection.recv_into(buffer[received:length], 0, socket.MSG_WAITALL)
        connection.sendall(b"k")
    connection.close()
    listener.close()


class SocketCeiling:
    """A loopback connection to a sink process, kept open; `once` times one message."""

    def __init__(self, max_bytes: int) -> None:
        context = mp.get_context("spawn")
        parent, child = context.Pipe()
        self._process = context.Process(target=_sink, args=(child, max_bytes), daemon=True)
        self._process.start()
        # Payloads move through COLD_BYTES like the memcpy ceiling's buffers and the
        # feature server's features: the sender reads memory the cache has not seen lately.
        self._windows = _ColdWindows(max_bytes)
        self._payload = memoryview(bytearray(b"\x5a" * self._windows.size))
        try:
            if not parent.poll(60):
                raise RuntimeError("the socket sink did not start")
            self._connection = socket.create_connection(("127.0.0.1", parent.recv()))
        except BaseException:
            self._process.kill()
            raise
        self._connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(WARMUP):
            self.once(max_bytes)

    def once(self, nbytes: int) -> float:
        """Seconds from sending nbytes to the receiver's ack that all of it landed."""
        offset = self._windows.take(nbytes)
        started = time.perf_counter()
        self._connection.sendall(_HEADER.pack(nbytes))
        self._connection.sendall(self._payload[offset : offset + nbytes])
        self._connection.recv(1)
        return time.perf_counter() - started

    def close(self) -> None:
        try:
            self._connection.sendall(_HEADER.pack(0))
            self._connection.close()
        finally:
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()


Ceiling = MemcpyCeiling | SocketCeiling


def open_ceiling(kind: str, max_bytes: int) -> Ceiling:
    """ "memcpy" or "socket"."""
    return MemcpyCeiling(max_bytes) if kind == "memcpy" else SocketCeiling(max_bytes)


def _best_gib_per_s(kind: str, nbytes: int, repeats: int) -> float:
    ceiling = open_ceiling(kind, nbytes)
    try:
        best = min(ceiling.once(nbytes) for _ in range(max(repeats, MIN_REPEATS)))
    finally:
        ceiling.close()
    return nbytes / best / 2**30


def memcpy_gib_per_s(nbytes: int, repeats: int) -> float:
    return _best_gib_per_s("memcpy", nbytes, repeats)


def socket_gib_per_s(nbytes: int, repeats: int) -> float:
    return _best_gib_per_s("socket", nbytes, repeats)
