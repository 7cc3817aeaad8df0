"""`dvd bench transfer`: the real senders and receivers between two processes, and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.transfer.ceilings import memcpy_gib_per_s, socket_gib_per_s
from benchmarks.transfer.measure import feature_server, measure_transport
from benchmarks.transfer.report import Row, table, to_json, write_json
from benchmarks.transfer.shapes import Shape, all_shapes


def test_quick_shapes_cover_the_issue_s_sizes() -> None:
    quick = all_shapes(quick=True)
    assert {(s.hidden, s.tiles) for s in quick} >= {(4096, 1), (4096, 4), (4096, 13)}
    assert Shape(4096, 1).bytes == 256 * 4096 * 2  # 2 MiB a tile for an 8B model


@pytest.mark.integration
def test_every_transport_moves_features_between_processes_and_reports(tmp_path: Path) -> None:
    shapes = [Shape(64, 1), Shape(64, 4)]
    with feature_server(["grpc", "shm", "tcp"]) as address:
        measured = {
            name: measure_transport(address, name, shapes, repeats=1)
            for name in ("grpc", "shm", "tcp")
        }
    rows = []
    for name, times in measured.items():
        assert times.control_s > 0
        for shape, seconds in times.best_s.items():
            assert seconds > 0
            rate = shape.bytes / seconds / 2**30
            rows.append(
                Row(
                    name,
                    shape.hidden,
                    shape.tiles,
                    shape.bytes,
                    rate,
                    1.0,
                    rate,
                    times.control_s * 1e3,
                    rate,
                    rate,
                )
            )
    ceilings = {"memcpy": memcpy_gib_per_s(2**20, 3), "socket": socket_gib_per_s(2**20, 2)}
    assert all(value > 0 for value in ceilings.values())
    write_json(tmp_path / "report.json", to_json(ceilings, rows, []))
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["ceilings"]) == {"memcpy", "socket"}
    keys = {"transport", "hidden", "tiles", "bytes", "gib_per_s", "ceiling", "ratio"}
    assert all(keys <= set(row) for row in report["results"]) and len(report["results"]) == 6
    assert "shm" in table(ceilings, rows)
