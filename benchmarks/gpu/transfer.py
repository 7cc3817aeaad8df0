"""The feature path from device memory to a second process, through each transport.

A feature server process (benchmarks/transfer's FeatureServer, its rows kept on the device)
copies a request's rows to host memory with `.to("cpu")`, as the vision server's encoder
does, and streams them through the transport's real sender; this process receives them
with the real receiver (benchmarks/transfer/measure.py), timed from the Encode call to
usable features. The ceilings measured in the same run: device-to-host copies (pageable,
as the server does them, and pinned), memcpy, and a loopback socket.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from benchmarks.gpu.vit import synchronize
from benchmarks.transfer.feature_server import FeatureServer
from benchmarks.transfer.shapes import Shape


class DeviceFeatureServer(FeatureServer):
    """FeatureServer whose rows live on `device` and go to host memory on every request."""

    def __init__(self, senders: dict[str, Any], device: str) -> None:
        super().__init__(senders)
        self.device = torch.device(device)
        self._on_device: dict[tuple[int, int], torch.Tensor] = {}

    def _rows(self, tiles: int, hidden: int) -> torch.Tensor:
        key = (tiles, hidden)
        if key not in self._on_device:
            self._on_device[key] = super()._rows(tiles, hidden).to(self.device)
        return self._on_device[key].to("cpu")


async def _serve(transports: str, device: str, ready: Any) -> None:
    from dvd.grpc_server import bind, new_server
    from dvd.transport import parse_names, sender_class
    from dvd.v1 import vision_pb2_grpc

    senders = {name: sender_class(name)() for name in parse_names(transports)}
    server = new_server()
    servicer = DeviceFeatureServer(senders, device)
    vision_pb2_grpc.add_VisionServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = bind(server, "127.0.0.1:0")
    await server.start()
    ready.send(port)
    await server.wait_for_termination()


def serve(transports: str, device: str, ready: Any) -> None:
    """Entry point of the server process; sends its port through `ready`."""
    asyncio.run(_serve(transports, device, ready))


@contextmanager
def device_feature_server(transports: list[str], device: str) -> Iterator[str]:
    context = mp.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=serve, args=(",".join(transports), device, child))
    process.daemon = True
    process.start()
    try:
        if not parent.poll(120):
            raise RuntimeError(f"the feature server on {device} did not start within 120 s")
        yield f"127.0.0.1:{parent.recv()}"
    finally:
        process.terminate()
        process.join(10)
        if process.is_alive():
            process.kill()


def device_to_host_gib_per_s(
    device: torch.device, nbytes: int, pinned: bool, repeats: int
) -> float:
    source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    if pinned and device.type == "cuda":
        target = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    else:
        target = torch.empty(nbytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy warms up
        synchronize(device)
        started = time.perf_counter()
        if pinned:
            target.copy_(source, non_blocking=True)
        else:
            source.to("cpu")
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return nbytes / best / 2**30


def ceilings(device: torch.device, sizes: list[int], repeats: int) -> dict[str, dict[str, float]]:
    """GiB/s per size: device-to-host (pageable, pinned), memcpy, loopback socket."""
    from benchmarks.transfer.ceilings import memcpy_gib_per_s, socket_gib_per_s

    out: dict[str, dict[str, float]] = {
        "d2h_pageable": {},
        "d2h_pinned": {},
        "memcpy": {},
        "socket": {},
    }
    for n in sizes:
        out["d2h_pageable"][str(n)] = device_to_host_gib_per_s(device, n, False, repeats)
        out["d2h_pinned"][str(n)] = device_to_host_gib_per_s(device, n, True, repeats)
        out["memcpy"][str(n)] = memcpy_gib_per_s(n, repeats)
        out["socket"][str(n)] = socket_gib_per_s(n, repeats)
    return out


def transports_here(wanted: list[str]) -> tuple[list[str], list[str]]:
    """The `wanted` transports that work here, and why the others do not."""
    from dvd.transport import receiver_class

    usable, notes = [], []
    for name in wanted:
        try:
            receiver_class(name)
            usable.append(name)
        except Exception as exc:  # each backend says why it cannot run here
            notes.append(f"{name}: not measured ({exc})")
    return usable, notes


def measure(
    device: str, transports: list[str], shapes: list[Shape], repeats: int
) -> list[dict[str, Any]]:
    """One row per (transport, shape): best GiB/s from device memory to usable features."""
    from benchmarks.transfer.ceilings import open_ceiling
    from benchmarks.transfer.measure import measure_transport
    from benchmarks.transfer.report import CEILING_OF

    rows = []
    with device_feature_server(transports, device) as address:
        for name in transports:
            ceiling = open_ceiling(CEILING_OF[name], max(shape.bytes for shape in shapes))
            try:
                times = measure_transport(address, name, shapes, repeats, ceiling)
            finally:
                ceiling.close()
            for shape, seconds in times.best_s.items():
                rows.append(
                    {
                        "transport": name,
                        "hidden": shape.hidden,
                        "tiles": shape.tiles,
                        "bytes": shape.bytes,
                        "gib_per_s": shape.bytes / seconds / 2**30,
                        "ms": seconds * 1000.0,
                        "call_ms": times.control_s * 1000.0,
                        # memcpy or socket between host processes, alternating with it
                        "host_ceiling_gib_per_s": shape.bytes / times.ceiling_s[shape] / 2**30,
                    }
                )
    return rows
