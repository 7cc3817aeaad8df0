"""Admission control: a bounded number of chat completions at once, a bounded queue behind
them, and 429 beyond that.

Without it every request is accepted, and under overload all of them wait (a 60 s run at
256 concurrent streams had a p99 of 24.6 s) with nothing telling clients to back off.
Here at most `max_concurrent` chat completions are being served; up to `max_queued` more
wait in arrival order for a place; one more gets 429 `rate_limit_exceeded` with
`Retry-After`, in OpenAI's shape, which the official clients retry with backoff. The wait
is measured (dvd_gateway_admission_wait_seconds) and so are refusals. Other endpoints
are not limited.
"""

from __future__ import annotations

import asyncio
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import RETRY_AFTER_S, error_body
from gateway.metrics import GatewayMetrics


class AdmissionMiddleware:
    """Limits `paths` to `max_concurrent` requests at once (0: no limit) plus `max_queued`
    waiting for a place (0: none wait, a full gateway refuses at once)."""

    def __init__(
        self, app: ASGIApp, paths: frozenset[str], max_concurrent: int, max_queued: int
    ) -> None:
        self.app = app
        self.paths = paths
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self._places = asyncio.Semaphore(max_concurrent) if max_concurrent else None
        self.queued = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        places = self._places
        if places is None or scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        metrics: GatewayMetrics | None = getattr(scope["app"].state, "metrics", None)
        if places.locked() and self.queued >= self.max_queued:
            if metrics is not None:
                metrics.admission_rejected.inc()
            await self._refuse(scope, receive, send)
            return
        waited_from = time.perf_counter()
        self.queued += 1
        try:
            await places.acquire()
        finally:
            self.queued -= 1
        try:
            if metrics is not None:
                metrics.admission_wait.observe(time.perf_counter() - waited_from)
            await self.app(scope, receive, send)
        finally:
            places.release()

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = (
            f"the gateway is at its limit ({self.max_concurrent} requests being served and "
            f"{self.max_queued} waiting); retry after {RETRY_AFTER_S} s"
        )
        response = JSONResponse(
            error_body(429, message, code="rate_limit_exceeded"),
            status_code=429,
            headers={"retry-after": str(RETRY_AFTER_S)},
        )
        await response(scope, receive, send)
