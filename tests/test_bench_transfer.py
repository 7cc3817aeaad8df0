"""`dvd bench transfer`: the real senders and receivers between two processes, and the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.transfer.ceilings import memcpy_gib_per_s, open_ceiling, socket_gib_per_s
from benchmarks.transfer.measure import feature_server, measure_transport
from benchmarks.transfer.report import CEILING_OF, row, table, to_json, write_json
from benchmarks.transfer.shapes import Shape, all_shapes


def test_quick_shapes_cover_the_issue_s_sizes() -> None:
    quick = all_shapes(quick=True)
    assert {(s.hidden, s.tiles) for s in quick} >= {(4096, 1), (4096, 4), (4096, 13)}
    assert Shape(4096, 1).bytes == 256 * 4096 * 2  # 2 MiB a tile for an 8B model


@pytest.mark.integration
def test_every_transport_moves_features_between_processes_and_reports(tmp_path: Path) -> None:
    shapes = [Shape(64, 1), Shape(64, 4)]
    rows = []
    with feature_server(["grpc", "shm", "tcp"]) as address:
        for name in ("grpc", "shm", "tcp"):
            ceiling = open_ceiling(CEILING_OF[name], max(s.bytes for s in shapes))
            try:
                for in_flight in (1, 3):  # three at once share one session / connection
                    times = measure_transport(address, name, shapes, 1, ceiling, in_flight)
                    assert times.control_s > 0
                    assert all(times.best_s[s] > 0 and times.ceiling_s[s] > 0 for s in shapes)
                    rows += [row(name, shape, times) for shape in shapes]
            finally:
                ceiling.close()
    ceilings = {"memcpy": memcpy_gib_per_s(2**20, 3), "socket": socket_gib_per_s(2**20, 2)}
    assert all(value > 0 for value in ceilings.values())
    write_json(tmp_path / "report.json", to_json(ceilings, rows, []))
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["ceilings"]) == {"memcpy", "socket"}
    keys = {"transport", "hidden", "tiles", "bytes", "gib_per_s", "ceiling", "ratio"}
    assert all(keys <= set(r) for r in report["results"]) and len(report["results"]) == 12
    assert all(r["data_gib_per_s"] is None for r in report["results"] if r["in_flight"] == 3)
    for result in report["results"]:
        assert result["ratio"] == pytest.approx(result["gib_per_s"] / result["ceiling"])
    assert "shm" in table(ceilings, rows)


def test_the_cli_prints_a_table_and_writes_the_json(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dvd",
            "bench",
            "transfer",
            "--transports",
            "shm",
            "--repeats",
            "1",
            "--in-flight",
            "1,2",
            "--quick",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "ceilings: memcpy" in done.stdout
    report = json.loads(out.read_text())
    assert {r["tiles"] for r in report["results"]} == {1, 4, 13}
    assert {r["in_flight"] for r in report["results"]} == {1, 2}
    assert report["ceilings"]["socket"] > 0  # measured on its own: no tcp transport ran
