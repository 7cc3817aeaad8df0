"""argparse helpers: flags whose defaults come from the environment, named once."""

from __future__ import annotations

import argparse
from typing import Any

from dvd.env import env_name, from_env, list_from_env, optional_bool_from_env


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
