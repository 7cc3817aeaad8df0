"""Stopping without dropping: SIGTERM drains the gateway before it exits.

Kubernetes (and `dvd up`) stop a gateway with SIGTERM while clients still send to it: the
pod leaves the Service's endpoints a moment later, not at once. Exiting at once would cut
every stream in flight; going on as if nothing happened would take requests it will not
finish. So the first SIGTERM starts a drain:

- `/ready` answers 503, so load balancers stop sending here;
- a new request gets 503 (`server_shutting_down`, with `Connection: close` and
  `Retry-After`), so the client retries elsewhere at once;
- requests in flight, streams included, go on; the server exits when none is left or after
  `drain_timeout_s`, whichever comes first.

A second SIGTERM, or SIGINT (Ctrl-C), exits at once as uvicorn always does.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import error_body

logger = logging.getLogger("dvd.gateway")

PROBES = frozenset({"/health", "/ready", "/metrics"})
"""Answered as usual while draining (/ready itself says 503)."""


class DrainState:
    """Whether the gateway is draining, and how many requests are still in flight."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.in_flight = 0
        self.deadline: float | None = None

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def start(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.timeout_s
            logger.info(
                "draining: %d requests in flight get %.0f s to finish; new ones get 503",
                self.in_flight,
                self.timeout_s,
            )

    def finished(self) -> bool:
        """Drained: nothing in flight, or out of time."""
        if self.deadline is None:
            return False
        if self.in_flight and time.monotonic() >= self.deadline:
            logger.warning("drain timed out with %d requests in flight", self.in_flight)
        return self.in_flight == 0 or time.monotonic() >= self.deadline


class DrainMiddleware:
    """Counts requests in flight, and turns new ones away while draining."""

    def __init__(self, app: ASGIApp, state: DrainState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            await self.app(scope, receive, send)
            return
        if self.state.draining:
            body = error_body(503, "the gateway is shutting down", code="server_shutting_down")
            headers = {"connection": "close", "retry-after": "1"}
            await JSONResponse(body, status_code=503, headers=headers)(scope, receive, send)
            return
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM drains (DrainState) before it stops."""

    def __init__(self, config: uvicorn.Config, drain: DrainState) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.drain.draining:
            self.drain.start()  # on_tick stops the server once drained
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.finished():
            self.should_exit = True
        return await super().on_tick(counter)
