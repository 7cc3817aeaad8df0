"""A call's deadline, carried from hop to hop.

The gateway sets a gRPC deadline on Generate (the smaller of the client's timeout and
--request-timeout-s); the language server reads what is left of it (`of_context`) and gives
its Encode calls no more than that; the vision server stops a call whose deadline has passed
and drops its tiles still queued. gRPC cancels a server's handler when its deadline passes,
so a handler tells an expiry from a caller who left by asking `expired()` as it is
cancelled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

EXPIRY_TOLERANCE_S = 0.01
"""Timers may fire a hair before their instant: a cancellation this close to the deadline
counts as the deadline passing."""


class HasTimeRemaining(Protocol):
    """What a deadline is read from: grpc.aio.ServicerContext."""

    def time_remaining(self) -> float | None: ...


@dataclass(frozen=True)
class Deadline:
    """An instant on time.monotonic()'s clock by which a call must end; None: no deadline."""

    at: float | None = None

    @classmethod
    def after(cls, timeout_s: float | None) -> Deadline:
        """`timeout_s` from now (None or 0 or less: no deadline, as gRPC reads 0 ms)."""
        if timeout_s is None or timeout_s <= 0:
            return cls()
        return cls(time.monotonic() + timeout_s)

    @classmethod
    def of_context(cls, context: HasTimeRemaining) -> Deadline:
        """The deadline of the incoming gRPC call (none when the caller set none)."""
        remaining = context.time_remaining()
        if remaining is None:
            return cls()
        return cls(time.monotonic() + max(remaining, 0.0))

    def remaining(self) -> float | None:
        """Seconds left (0 once passed); None without a deadline."""
        if self.at is None:
            return None
        return max(self.at - time.monotonic(), 0.0)

    def expired(self) -> bool:
        remaining = self.remaining()
        return remaining is not None and remaining <= EXPIRY_TOLERANCE_S

    def cap(self, timeout_s: float) -> float:
        """`timeout_s`, or what is left of the deadline when that is less."""
        remaining = self.remaining()
        return timeout_s if remaining is None else min(timeout_s, remaining)
