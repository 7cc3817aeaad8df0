"""`dvd bench`: the benchmark tools, one sub-command each."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from benchmarks.compare.cli import register as register_compare
    from benchmarks.overload import register as register_overload
    from benchmarks.pool import register as register_pool
    from benchmarks.serve.cli import register as register_serve
    from benchmarks.transfer.cli import register as register_transfer
    from benchmarks.vir import register as register_vir

    parser = subparsers.add_parser(
        "bench",
        help="benchmarks: load generation, system comparison, feature transfer",
        description="Benchmarks report every figure beside a baseline measured in the same run.",
    )
    tools = parser.add_subparsers(dest="bench_command", metavar="TOOL", required=True)
    register_serve(tools)
    register_transfer(tools)
    register_vir(tools)
    register_compare(tools)
    register_pool(tools)
    register_overload(tools)
