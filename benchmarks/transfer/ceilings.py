"""The ceilings each transport is compared with, measured in the same run.

memcpy: copying the same bytes between two preallocated tensors in one process (what shm
cannot beat). socket: the same bytes over a loopback TCP connection between two processes,
received with recv_into a preallocated buffer (what any TCP transport cannot beat).
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import struct
import time

import torch

_HEADER = struct.Struct("<Q")
WARMUP = 2  # untimed rounds first: page faults and TCP slow start are not bandwidth


COLD_BYTES = 512 * 2**20
"""A transfer writes memory the reader has not touched lately: copies rotate through this
many bytes of buffers, well past the last-level cache, so the ceiling is memory bandwidth
and not a cache-resident copy of the same few MiB."""


def memcpy_gib_per_s(nbytes: int, repeats: int) -> float:
    pairs = max(2, min(64, COLD_BYTES // (2 * nbytes)))
    buffers = [
        (
            torch.randint(0, 255, (nbytes,), dtype=torch.uint8),
            torch.empty(nbytes, dtype=torch.uint8),
        )
        for _ in range(pairs)
    ]
    for source, target in buffers:  # touch every page once: faults are not bandwidth
        target.copy_(source)
    # One thread, like the single writer of a transfer; intra-op threads would also just
    # wait on each other on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for i in range(max(repeats, 20)):
            source, target = buffers[i % pairs]
            started = time.perf_counter()
            target.copy_(source)
            best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return nbytes / best / 2**30


def _sink(port_out: mp.connection.Connection, repeats: int, nbytes: int) -> None:
    """The receiving process: recv_into one preallocated buffer, ack each message."""
    listener = socket.create_server(("127.0.0.1", 0))
    port_out.send(listener.getsockname()[1])
    connection, _ = listener.accept()
    buffer = memoryview(bytearray(nbytes))
    for _ in range(repeats):
        header = connection.recv(_HEADER.size, socket.MSG_WAITALL)
        (length,) = _HEADER.unpack(header)
        received = 0
        while received < length:
            received += connection.recv_into(buffer[received:length])
        connection.sendall(b"k")
    connection.close()
    listener.close()


def socket_gib_per_s(nbytes: int, repeats: int) -> float:
    context = mp.get_context("spawn")
    parent, child = context.Pipe()
    rounds = WARMUP + repeats
    process = context.Process(target=_sink, args=(child, rounds, nbytes), daemon=True)
    process.start()
    try:
        port = parent.recv()
        payload = memoryview(bytearray(nbytes))
        best = float("inf")
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for round_ in range(rounds):
                started = time.perf_counter()
                connection.sendall(_HEADER.pack(nbytes))
                connection.sendall(payload)
                connection.recv(1)
                if round_ >= WARMUP:
                    best = min(best, time.perf_counter() - started)
        return nbytes / best / 2**30
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
