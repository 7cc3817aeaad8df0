"""A bound on Generate calls that wait: admitted, but no token produced yet.

A request waits while its images are encoded, its prompt is assembled, and vLLM holds it in
its queue and runs its prefill; once its first token is out it is decoding and no longer
waits. Without a bound, a language server fed faster than it decodes accepts every call
and lets each wait longer than the last. With one, a call beyond `limit` is refused at once
with RESOURCE_EXHAUSTED, before any work: the gateway tries another language server, or
answers 429 with Retry-After.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge

from dvd.errors import Overloaded

log = logging.getLogger(__name__)


class WaitingRoom:
    """Counts waiting calls; `enter` refuses one more than `limit` (0: no limit)."""

    def __init__(self, limit: int, gauge: Gauge | None = None, refused: Counter | None = None):
        if limit < 0:
            raise ValueError(f"the waiting limit must be 0 or more, not {limit}")
        self.limit = limit
        self.waiting = 0
        self._gauge = gauge
        self._refused = refused

    def enter(self, request_id: str) -> Place:
        """A place for the call, until it produces its first token or ends; Overloaded when
        `limit` calls already wait."""
        if self.limit and self.waiting >= self.limit:
            if self._refused is not None:
                self._refused.inc()
            log.info(
                "request %s refused: %d requests are waiting (--max-waiting-requests %d)",
                request_id,
                self.waiting,
                self.limit,
            )
            raise Overloaded(
                f"the language server is busy: {self.waiting} requests are waiting for image "
                f"features, a place in the LLM's batch or their first token, the limit is "
                f"{self.limit} (--max-waiting-requests)"
            )
        self._change(+1)
        return Place(self)

    def _change(self, change: int) -> None:
        self.waiting += change
        if self._gauge is not None:
            self._gauge.set(self.waiting)


class Place:
    """One call's place in the waiting room; `leave` frees it (idempotent)."""

    def __init__(self, room: WaitingRoom) -> None:
        self._room: WaitingRoom | None = room

    @property
    def waiting(self) -> bool:
        return self._room is not None

    def leave(self) -> None:
        if self._room is not None:
            self._room._change(-1)
            self._room = None
