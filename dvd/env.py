"""The one place where dvd reads environment variables.

Every command-line flag of every `dvd` command takes its default from an environment
variable named in its help text (`DVD_<COMMAND>_<FLAG>`), so containers can be configured
without rewriting their command lines. Flags given on the command line win.
"""

from __future__ import annotations

import os
import shlex
from typing import TypeVar

T = TypeVar("T", str, int, float, bool)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_name(command: str, flag: str) -> str:
    """`env_name("gateway", "--max-image-bytes")` -> `DVD_GATEWAY_MAX_IMAGE_BYTES`."""
    return "DVD_" + f"{command}_{flag.lstrip('-')}".upper().replace("-", "_")


def from_env(var: str, default: T) -> T:
    """Returns the variable parsed as the type of `default`, or `default` when unset."""
    raw = os.environ.get(var)
    if raw is None:
        return default
    if isinstance(default, bool):
        value = raw.strip().lower()
        if value in _TRUE:
            return True  # type: ignore[return-value]
        if value in _FALSE:
            return False  # type: ignore[return-value]
        raise ValueError(f"{var}={raw!r} is not a boolean (use 1/0, true/false)")
    try:
        return type(default)(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a valid {type(default).__name__}") from None


def optional_bool_from_env(var: str) -> bool | None:
    """A three-way switch: True or False when the variable is set, None ("the engine's
    default") when it is not."""
    if os.environ.get(var) is None:
        return None
    return from_env(var, False)


def list_from_env(var: str) -> list[str]:
    """A repeatable flag's items, split like a shell command line (quote an item that holds
    spaces: `a=1 'b={"x": 1}'`); unset means none."""
    raw = os.environ.get(var, "")
    try:
        return shlex.split(raw)
    except ValueError as exc:
        raise ValueError(f"{var}={raw!r}: {exc}") from None


def cache_dir() -> str:
    """Folder for generated checkpoints and LLM-only views (`DVD_CACHE_DIR`)."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "dvd-serve")
    return os.environ.get("DVD_CACHE_DIR", default)
