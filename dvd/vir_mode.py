"""ViR resolution modes, by name and on the wire.

Users name them "router", "always-1/4" and "always-1/16" (flags, the chat API); the
contracts carry `dvd.v1.VirMode`. This is the one mapping between the two.
"""

from __future__ import annotations

from enum import Enum

from dvd.v1 import common_pb2


class VirMode(str, Enum):
    """How tiles are compressed: ViR's choice per tile, or one resolution for all."""

    ROUTER = "router"
    QUARTER = "always-1/4"
    SIXTEENTH = "always-1/16"


_TO_WIRE: dict[VirMode, common_pb2.VirMode] = {
    VirMode.ROUTER: common_pb2.VIR_MODE_ROUTER,
    VirMode.QUARTER: common_pb2.VIR_MODE_ALWAYS_QUARTER,
    VirMode.SIXTEENTH: common_pb2.VIR_MODE_ALWAYS_SIXTEENTH,
}
_FROM_WIRE = {wire: mode for mode, wire in _TO_WIRE.items()}
NAMES = tuple(mode.value for mode in VirMode)


def parse(name: str) -> VirMode:
    try:
        return VirMode(name)
    except ValueError:
        raise ValueError(
            f"unknown resolution mode {name!r}; choose from {', '.join(NAMES)}"
        ) from None


def to_wire(mode: VirMode | None) -> common_pb2.VirMode:
    return common_pb2.VIR_MODE_UNSPECIFIED if mode is None else _TO_WIRE[mode]


def from_wire(wire: int) -> VirMode | None:
    """None for UNSPECIFIED (the server's default applies)."""
    if wire == common_pb2.VIR_MODE_UNSPECIFIED:
        return None
    try:
        return _FROM_WIRE[wire]  # type: ignore[index]
    except KeyError:
        raise ValueError(f"unknown vir_mode {wire}") from None
