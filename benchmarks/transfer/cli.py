"""`dvd bench transfer`: feature tensors between two processes through every transport."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dvd.flags import add_flag

if TYPE_CHECKING:
    from benchmarks.transfer.report import Row

COMMAND = "bench-transfer"
QUICK_REPEATS = 10
"""Best-of-10 is still steady on a busy 2-core machine; best-of-3 moved ratios by 0.2."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "transfer",
        help="move feature tensors between two processes through each transport",
        description="Moves bf16 feature tensors of real models' shapes (hidden 1024/4096/5120; "
        "1, 4 and 13 tiles of 256 rows) from a server process to this one through every "
        "transport available here, and measures in the same run the ceilings they are "
        "held against: memcpy (for shm) and a raw socket into a preallocated buffer (for "
        "TCP transports). Prints a table; --json writes the report.",
    )
    add_flag(
        parser,
        COMMAND,
        "--transports",
        "auto",
        "comma-separated transports, or auto: every one that works on this machine",
    )
    add_flag(
        parser,
        COMMAND,
        "--repeats",
        20,
        f"timed transfers per shape (the best is reported; --quick: at most {QUICK_REPEATS})",
    )
    add_flag(
        parser,
        COMMAND,
        "--in-flight",
        "1,4",
        "comma-separated transfers kept in flight at once: 1 measures one request's latency, "
        "more the steady stream of a busy language server (fixed costs overlap the bytes)",
    )
    add_flag(parser, COMMAND, "--quick", False, "fewer shapes and repeats: under two minutes")
    add_flag(parser, COMMAND, "--json", None, "write the report to this file")
    parser.set_defaults(func=run)


def available_transports(wanted: list[str] | None = None) -> tuple[list[str], list[str]]:
    """The `wanted` transports (all of them by default) usable on this machine, and notes
    on those that are not."""
    from dvd.transport import NAMES, receiver_class

    usable, notes = [], []
    for name in NAMES if wanted is None else wanted:
        try:
            if name == "rdma":
                receiver_class(name)().close()  # needs a device: fails fast without one
            else:
                receiver_class(name)
            usable.append(name)
        except Exception as exc:  # each backend says why it cannot run here
            notes.append(f"{name}: not measured ({exc})")
    return usable, notes


def run(args: argparse.Namespace) -> int:
    from benchmarks.transfer.ceilings import open_ceiling
    from benchmarks.transfer.measure import feature_server, measure_transport
    from benchmarks.transfer.report import CEILING_OF, row, table, to_json, write_json
    from benchmarks.transfer.shapes import all_shapes
    from dvd.transport import parse_names

    shapes = all_shapes(args.quick)
    repeats = min(args.repeats, QUICK_REPEATS) if args.quick else args.repeats
    if args.transports == "auto":
        transports, notes = available_transports()
    else:
        transports, notes = list(parse_names(args.transports)), []
    in_flights = parse_in_flight(args.in_flight)
    largest = max(shape.bytes for shape in shapes)
    ceilings = {kind: open_ceiling(kind, largest) for kind in ("memcpy", "socket")}
    rows = []
    try:
        with feature_server(transports) as address:
            for name in transports:
                ceiling = ceilings[CEILING_OF[name]]
                for in_flight in in_flights:
                    times = measure_transport(address, name, shapes, repeats, ceiling, in_flight)
                    rows += [row(name, shape, times) for shape in shapes]
    finally:
        for ceiling in ceilings.values():
            ceiling.close()
    best = {kind: best_ceiling(kind, rows, largest, repeats) for kind in ceilings}
    print(table(best, rows))
    for note in notes:
        print(note)
    if args.json:
        write_json(args.json, to_json(best, rows, notes))
    return 0


def best_ceiling(kind: str, rows: list[Row], largest: int, repeats: int) -> float:
    """The fastest the ceiling went in this run (measured on its own when no transport
    held against it ran)."""
    from benchmarks.transfer.ceilings import memcpy_gib_per_s, socket_gib_per_s
    from benchmarks.transfer.report import CEILING_OF

    measured = [r.ceiling for r in rows if CEILING_OF[r.transport] == kind]
    if measured:
        return max(measured)
    return (memcpy_gib_per_s if kind == "memcpy" else socket_gib_per_s)(largest, repeats)


def parse_in_flight(text: str) -> list[int]:
    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"--in-flight takes comma-separated counts, not {text!r}") from None
    if not values or any(v < 1 or v > 64 for v in values):
        raise SystemExit(f"--in-flight counts must be 1-64, got {text!r}")
    return values
