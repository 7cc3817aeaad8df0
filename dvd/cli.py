"""The `dvd` command: one entry point, a subcommand per process or tool.

Subcommand modules import their heavy dependencies (torch, vLLM) only when they run,
so `dvd --help` and `dvd gateway` start quickly.
"""

from __future__ import annotations

import argparse

from dvd import __version__


def build_parser() -> argparse.ArgumentParser:
    from benchmarks import cli as bench_cli
    from dvd import up
    from dvd.checkpoint import cli as checkpoint_cli
    from gateway import cli as gateway_cli
    from language_server import cli as language_cli
    from vision_server import cli as vision_cli

    parser = argparse.ArgumentParser(
        prog="dvd",
        description="dvd-serve: InternVL3.5 with the vision encoder and the LLM on separate "
        "servers (Decoupled Vision-Language Deployment). Every flag also reads an "
        "environment variable, named in its help.",
    )
    parser.add_argument("--version", action="version", version=f"dvd-serve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    up.register(subparsers)
    gateway_cli.register(subparsers)
    language_cli.register(subparsers)
    vision_cli.register(subparsers)
    checkpoint_cli.register(subparsers)
    bench_cli.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:  # configuration errors name the offending field
        raise SystemExit(f"dvd {args.command}: {exc}") from None
