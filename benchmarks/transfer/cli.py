"""`dvd bench transfer`: feature tensors between two processes through every transport."""

from __future__ import annotations

import argparse

from dvd.flags import add_flag

COMMAND = "bench-transfer"


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
    add_flag(parser, COMMAND, "--repeats", 5, "timed transfers per shape (best is reported)")
    add_flag(parser, COMMAND, "--quick", False, "fewer shapes and repeats: under two minutes")
    add_flag(parser, COMMAND, "--json", None, "write the report to this file")
    parser.set_defaults(func=run)


def available_transports() -> tuple[list[str], list[str]]:
    """Transports usable on this machine, and notes on those that are not."""
    from dvd.transport import NAMES, receiver_class

    usable, notes = [], []
    for name in NAMES:
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
    from benchmarks.transfer.ceilings import memcpy_gib_per_s, socket_gib_per_s
    from benchmarks.transfer.measure import feature_server, measure_transport
    from benchmarks.transfer.report import CEILING_OF, Row, table, to_json, write_json
    from benchmarks.transfer.shapes import all_shapes
    from dvd.transport import parse_names

    shapes = all_shapes(args.quick)
    repeats = min(args.repeats, 3) if args.quick else args.repeats
    if args.transports == "auto":
        transports, notes = available_transports()
    else:
        transports, notes = list(parse_names(args.transports)), []
    sizes = sorted({shape.bytes for shape in shapes})
    measured = {
        "memcpy": {n: memcpy_gib_per_s(n, repeats) for n in sizes},
        "socket": {n: socket_gib_per_s(n, repeats) for n in sizes},
    }
    rows = []
    with feature_server(transports) as address:
        for name in transports:
            times = measure_transport(address, name, shapes, repeats)
            for shape, seconds in times.best_s.items():
                ceiling = measured[CEILING_OF[name]][shape.bytes]
                rate = shape.bytes / seconds / 2**30
                data = shape.bytes / max(seconds - times.control_s, 1e-9) / 2**30
                rows.append(
                    Row(
                        name,
                        shape.hidden,
                        shape.tiles,
                        shape.bytes,
                        rate,
                        ceiling,
                        rate / ceiling,
                        times.control_s * 1e3,
                        data,
                        data / ceiling,
                    )
                )
    ceilings = {kind: max(by_size.values()) for kind, by_size in measured.items()}
    print(table(ceilings, rows))
    for note in notes:
        print(note)
    if args.json:
        write_json(args.json, to_json(ceilings, rows, notes))
    return 0
