"""The transfer report: JSON for machines, a table for people."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CEILING_OF = {"shm": "memcpy", "grpc": "socket", "tcp": "socket", "rdma": "socket"}
"""Which ceiling each transport is held against (rdma: no line rate is known here)."""


@dataclass(frozen=True)
class Row:
    transport: str
    hidden: int
    tiles: int
    bytes: int
    gib_per_s: float
    ceiling: float
    ratio: float
    control_ms: float  # the fixed cost of one Encode call with this transport
    data_gib_per_s: float  # bytes over (time - control): the data plane alone
    data_ratio: float


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
        f"{'transport':<10}{'hidden':>7}{'tiles':>6}{'MiB':>9}{'GiB/s':>9}{'ceiling':>9}"
        f"{'ratio':>7}{'call ms':>9}{'data GiB/s':>12}{'ratio':>7}",
    ]
    for r in rows:
        lines.append(
            f"{r.transport:<10}{r.hidden:>7}{r.tiles:>6}{r.bytes / 2**20:>9.1f}"
            f"{r.gib_per_s:>9.2f}{r.ceiling:>9.2f}{r.ratio:>7.2f}"
            f"{r.control_ms:>9.2f}{r.data_gib_per_s:>12.2f}{r.data_ratio:>7.2f}"
        )
    return "\n".join(lines)
