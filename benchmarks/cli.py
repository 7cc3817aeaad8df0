"""`dvd bench`: the benchmark tools, one sub-command each."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from benchmarks.serve import cli as serve_cli

    parser = subparsers.add_parser(
        "bench",
        help="benchmarks: load generation, system comparison, feature transfer",
        description="Benchmarks report every figure beside a baseline measured in the same run.",
    )
    tools = parser.add_subparsers(dest="bench_command", metavar="TOOL", required=True)
    serve_cli.register(tools)
