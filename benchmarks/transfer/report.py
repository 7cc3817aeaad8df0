"""The transfer report: JSON for machines, a table for people."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.transfer.measure import TransportTimes
from benchmarks.transfer.shapes import Shape

CEILING_OF = {"shm": "memcpy", "grpc": "socket", "tcp": "socket", "rdma": "socket"}
"""Which ceiling each transport is held against (rdma: no line rate is known here)."""


@dataclass(frozen=True)
class Row:
    transport: str
    in_flight: int  # transfers at once: 1 is one request's latency, more a steady stream
    hidden: int
    tiles: int
    bytes: int
    gib_per_s: float
    ceiling: float
    ratio: float
    control_ms: float  # the fixed cost of one Encode call with this transport
    # Bytes over (time - control): the data plane alone; None where the fixed cost is
    # most of the time and the difference would be noise.
    data_gib_per_s: float | None
    data_ratio: float | None


def row(transport: str, shape: Shape, times: TransportTimes) -> Row:
    seconds = times.best_s[shape]
    rate = shape.bytes / seconds / 2**30
    ceiling = shape.bytes / times.ceiling_s[shape] / 2**30
    data_s = seconds - times.control_s
    # Only for lone transfers: in a stream the fixed costs overlap and cannot be taken out.
    data = shape.bytes / data_s / 2**30 if times.in_flight == 1 and data_s > seconds / 4 else None
    return Row(
        transport,
        times.in_flight,
        shape.hidden,
        shape.tiles,
        shape.bytes,
        rate,
        ceiling,
        rate / ceiling,
        times.control_s * 1e3,
        data,
        None if data is None else data / ceiling,
    )


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def to_json(ceilings: dict[str, float], rows: list[Row], notes: list[str]) -> dict[str, Any]:
    return {
        "machine": machine(),
        "ceilings": ceilings,
        "results": [asdict(row) for row in rows],
        "notes": notes,
    }


def write_json(path: str | Path, report: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def table(ceilings: dict[str, float], rows: list[Row]) -> str:
    lines = [
        "ceilings: " + ", ".join(f"{k} {v:.2f} GiB/s" for k, v in ceilings.items()),
        f"{'transport':<10}{'inflight':>9}{'hidden':>7}{'tiles':>6}{'MiB':>9}{'GiB/s':>9}"
        f"{'ceiling':>9}"
        f"{'ratio':>7}{'call ms':>9}{'data GiB/s':>12}{'ratio':>7}",
    ]
    for r in rows:
        lines.append(
            f"{r.transport:<10}{r.in_flight:>9}{r.hidden:>7}{r.tiles:>6}{r.bytes / 2**20:>9.1f}"
            f"{r.gib_per_s:>9.2f}{r.ceiling:>9.2f}{r.ratio:>7.2f}"
            f"{r.control_ms:>9.2f}{_number(r.data_gib_per_s, 12)}{_number(r.data_ratio, 7)}"
        )
    return "\n".join(lines)


def _number(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.2f}"
