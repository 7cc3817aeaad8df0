"""argparse helpers: flags whose defaults come from the environment, named once."""

from __future__ import annotations

import argparse
from typing import Any

from dvd.env import env_name, from_env


def add_flag(
    parser: argparse.ArgumentParser,
    command: str,
    flag: str,
    default: Any,
    help: str,
    **kwargs: Any,
) -> None:
    """Adds `flag` with its default read from `DVD_<COMMAND>_<FLAG>`; shows both in --help.

    Boolean flags become `--flag/--no-flag`. A default of None means "string, optional".
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
    kind = type(default) if default is not None else str
    parser.add_argument(
        flag, type=kind, default=value, help=f"{help} [env {var}; default {default}]", **kwargs
    )


def _optional(var: str) -> str | None:
    from os import environ

    return environ.get(var)
