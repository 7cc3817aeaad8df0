"""The feature path from device memory to a second process, through each transport.

A feature server process (benchmarks/transfer's FeatureServer, its rows kept on the device)
copies a request's rows to host memory with `.to("cpu")`, as the vision server's encoder
does, and streams them through the transport's real sender; this process receives them
with the real receiver (benchmarks/transfer/measure.py), timed from the Encode call to
usable features. The ceilings measured in the same run: device-to-host copies (pageable,
as the server does them, and pinned), memcpy, and a loopback socket.
"""

from __future__ import annotations

import time
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


def measure(
    device: str, transports: list[str], shapes: list[Shape], repeats: int
) -> list[dict[str, Any]]:
    """One row per (transport, shape): best GiB/s from device memory to usable features."""
    from benchmarks.transfer.ceilings import open_ceiling
    from benchmarks.transfer.measure import feature_server, measure_transport
    from benchmarks.transfer.report import CEILING_OF

    rows = []
    with feature_server(transports, DeviceFeatureServer, (device,), 120) as address:
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
