"""Pure ASGI middleware (streaming- and cancellation-safe, unlike BaseHTTPMiddleware).

`AccessMiddleware` (outermost): request id in and out, in-flight gauge, request metrics and
one log line per request. `HeaderLimitMiddleware`: 431 for oversized request heads.
`BodyLimitMiddleware`: reads the body under the size and time limits before anything
parses it, answering 413 or 408.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import REQUEST_ID_HEADER, error_body
from gateway.metrics import GatewayMetrics, RequestRecord

logger = logging.getLogger("dvd.gateway")

CHAT_PATH = "/v1/chat/completions"
MAX_REQUEST_ID_CHARS = 128
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})
"""Polled endpoints, logged at DEBUG only."""


def new_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def incoming_request_id(scope: Scope) -> str | None:
    """The client's `x-request-id` when it is safe to log and to pass on as gRPC metadata."""
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1").strip()
            if 0 < len(text) <= MAX_REQUEST_ID_CHARS and text.isascii() and text.isprintable():
                return text
    return None


class AccessMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = incoming_request_id(scope) or new_request_id()
        record = RequestRecord(request_id)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["record"] = record
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
            await send(message)

        metrics: GatewayMetrics | None = getattr(scope["app"].state, "metrics", None)
        counted = metrics is not None and scope["path"] == CHAT_PATH
        if counted and metrics is not None:
            metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - record.started
            final = record.status or status
            if counted and metrics is not None:
                metrics.in_flight.dec()
                metrics.finish(record, final, seconds)
            _log(scope, record, final, seconds)


def _log(scope: Scope, record: RequestRecord, status: int, seconds: float) -> None:
    level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
    if not logger.isEnabledFor(level):
        return
    ttft = record.ttft_s()
    logger.log(
        level,
        "%s %s id=%s key=%s status=%d model=%s backend=%s stream=%s prompt_tokens=%d "
        "image_tokens=%d completion_tokens=%d ttft_ms=%s total_ms=%.1f",
        scope["method"],
        scope["path"],
        record.request_id,
        record.key_id or "-",
        status,
        record.model or "-",
        record.backend or "-",
        record.stream,
        record.prompt_tokens,
        record.image_tokens,
        record.completion_tokens,
        "-" if ttft is None else f"{ttft * 1e3:.1f}",
        seconds * 1e3,
    )


class HeaderLimitMiddleware:
    """431 for a request head over the limit: the HTTP parser's own cap is far larger (and
    differs between uvicorn's h11 and httptools), and every header is kept per request."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > self.max_bytes:
                message = f"request headers are larger than the limit of {self.max_bytes} bytes"
                body = error_body(431, message, code="request_headers_too_large")
                await JSONResponse(body, status_code=431)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reads the whole body first, under a size limit (413) and a time limit (408): a
    client that sends slowly, or stops halfway, cannot hold a request open for ever."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _declared_length(scope) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.read_timeout_s):
                body = await self._read(scope, receive, send)
        except TimeoutError:
            message = f"the request body did not arrive within {self.read_timeout_s:g} s"
            response = JSONResponse(
                error_body(408, message, code="request_timeout"),
                status_code=408,
                headers={"connection": "close"},
            )
            await response(scope, receive, send)
            return
        if body is None:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnect notices
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The body; None when the request was answered (413) or the client left."""
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                record = scope.get("state", {}).get("record")
                if record is not None:
                    record.status = 499  # the client left while sending
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body is larger than the limit of {self.max_bytes} bytes"
        response = JSONResponse(error_body(413, message, code="request_too_large"), status_code=413)
        await response(scope, receive, send)


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else 0
    return 0
