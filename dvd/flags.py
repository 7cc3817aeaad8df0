"""argparse helpers: flags whose defaults come from the environment, named once."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from dvd.env import env_name, from_env, list_from_env, optional_bool_from_env

if TYPE_CHECKING:
    from dvd.tls import TlsConfig


def add_flag(
    parser: argparse.ArgumentParser,
    command: str,
    flag: str,
    default: Any,
    help: str,
    **kwargs: Any,
) -> None:
    """Adds `flag` with its default read from `DVD_<COMMAND>_<FLAG>`; shows both in --help.

    Boolean flags become `--flag/--no-flag`. A default of None means "optional", a string
    unless `type=` says otherwise.
    """
    var = env_name(command, flag)
    if isinstance(default, bool):
        parser.add_argument(
            flag,
            action=argparse.BooleanOptionalAction,
            default=from_env(var, default),
            help=f"{help} [env {var}; default {default}]",
            **kwargs,
        )
        return
    value = from_env(var, default) if default is not None else _optional(var)
    kind = kwargs.pop("type", None) or (type(default) if default is not None else str)
    parser.add_argument(
        flag, type=kind, default=value, help=f"{help} [env {var}; default {default}]", **kwargs
    )


def _optional(var: str) -> str | None:
    from os import environ

    return environ.get(var)


def add_switch(
    parser: argparse.ArgumentParser, command: str, flag: str, help: str, unset: str
) -> None:
    """A `--flag/--no-flag` whose default is None when neither it nor `DVD_<COMMAND>_<FLAG>`
    is given, so that whoever consumes it (vLLM) keeps its own default; `unset` says what
    that default is in --help."""
    var = env_name(command, flag)
    parser.add_argument(
        flag,
        action=argparse.BooleanOptionalAction,
        default=optional_bool_from_env(var),
        help=f"{help} [env {var}; default: {unset}]",
    )


def add_repeated_flag(
    parser: argparse.ArgumentParser, command: str, flag: str, help: str, metavar: str
) -> None:
    """A flag given any number of times; `DVD_<COMMAND>_<FLAG>` holds items split like a
    shell line. Items from the command line come after the environment's, so a consumer that
    lets later items win lets the command line win."""
    var = env_name(command, flag)
    parser.add_argument(
        flag,
        action="append",
        default=list_from_env(var),
        metavar=metavar,
        help=f"{help} [env {var}, items separated by spaces; default none]",
    )


def add_tls_flags(parser: argparse.ArgumentParser, command: str, calls: str) -> None:
    """--tls-cert, --tls-key, --tls-ca and --tls-server-name: one identity for a process's
    listening side and for its calls to `calls` (dvd.tls)."""
    add_flag(
        parser,
        command,
        "--tls-cert",
        "",
        "PEM certificate (chain) this process presents, as a server and as a client; with "
        "--tls-key, its listeners take TLS only; empty: plaintext",
    )
    add_flag(parser, command, "--tls-key", "", "PEM private key of --tls-cert")
    add_flag(
        parser,
        command,
        "--tls-ca",
        "",
        f"PEM CA certificate(s) that {calls} must be signed by; a listener given one also "
        "requires client certificates it signed (mutual TLS)",
    )
    add_flag(
        parser,
        command,
        "--tls-server-name",
        "",
        f"name the certificates of {calls} must carry; empty: the name or address each was "
        "dialled by",
    )


def tls_from_args(args: argparse.Namespace) -> TlsConfig:
    """The TlsConfig of add_tls_flags' flags (ValueError for a certificate without key)."""
    from dvd.tls import TlsConfig

    return TlsConfig(
        cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca, server_name=args.tls_server_name
    )
