"""Every error the gateway returns, in OpenAI's shape, built in one place.

`{"error": {"message", "type", "param", "code"}}` with the HTTP status that matches it. gRPC
statuses from language servers map to HTTP through `dvd.errors.GRPC_TO_HTTP`, the one table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dvd.errors import http_status, refused_as_busy
from gateway.protocol import ErrorDetail, ErrorResponse

logger = logging.getLogger("dvd.gateway")

REQUEST_ID_HEADER = "x-request-id"
RETRY_AFTER_S = 1
"""What 429s (the gateway's own limit, a busy language server) and 503s while draining tell
clients to wait before retrying; the official openai clients honour it."""


class ApiError(Exception):
    """An error to return to the client as it is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or error_type(status)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(
            self.status, self.message, param=self.param, code=self.code, type=self.type
        )


def error_type(status: int) -> str:
    """OpenAI's `type` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status == 503:
        return "service_unavailable_error"
    if status == 504:
        return "timeout_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    type: str | None = None,
) -> dict[str, Any]:
    """The one builder of OpenAI's error object (also used for SSE error events)."""
    detail = ErrorDetail(message=message, type=type or error_type(status), param=param, code=code)
    return ErrorResponse(error=detail).model_dump()


def error_response(error: ApiError, request_id: str | None = None) -> JSONResponse:
    headers = dict(error.headers)
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def from_grpc(error: grpc.aio.AioRpcError, address: str | None = None) -> ApiError:
    """A language server's gRPC status as an ApiError; the message is the backend's details.
    RESOURCE_EXHAUSTED (every language server tried was busy) is a 429 the client may retry
    after RETRY_AFTER_S, like the gateway's own limit."""
    code = error.code()
    details = error.details() or code.name
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not refused_as_busy(error):
        # gRPC's own: a message over a size limit between the tiers, not a busy server.
        return ApiError(400, f"the request is too large to pass between servers: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ApiError(
            429,
            f"{details}; retry after {RETRY_AFTER_S} s",
            code="rate_limit_exceeded",
            headers={"retry-after": str(RETRY_AFTER_S)},
        )
    where = (
        f"language server {address}: " if address and code == grpc.StatusCode.UNAVAILABLE else ""
    )
    return ApiError(http_status(code), where + details, code=code.name.lower())


def from_validation(errors: Sequence[Any]) -> ApiError:
    """Pydantic / FastAPI validation errors as one 400 naming the first bad field."""
    if not errors:
        return ApiError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error") or first.get("msg", "")
        return ApiError(400, f"request body is not valid JSON: {reason}", code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = _dotted(loc) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ApiError(400, message, param=param)


def _dotted(loc: list[str]) -> str:
    """["messages", "0", "role"] -> "messages[0].role"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def to_api_error(exc: Exception, request_id: str | None = None) -> ApiError:
    """Maps any exception raised while serving a request to what the client sees."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestValidationError | ValidationError):
        return from_validation(exc.errors())
    if isinstance(exc, grpc.aio.AioRpcError):
        return from_grpc(exc)
    if isinstance(exc, StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail))
    logger.error("request %s failed", request_id, exc_info=exc)
    return ApiError(500, f"internal error ({type(exc).__name__}); request id {request_id}")


def install_handlers(app: FastAPI) -> None:
    """Routes every exception the app can raise to an OpenAI-shaped response."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        request_id = request_id_of(request)
        response = error_response(to_api_error(exc, request_id), request_id)
        if isinstance(exc, StarletteHTTPException):
            for name, value in (exc.headers or {}).items():
                response.headers[name] = value
        return response

    for kind in (
        ApiError,
        RequestValidationError,
        ValidationError,
        grpc.aio.AioRpcError,
        StarletteHTTPException,
        Exception,
    ):
        app.add_exception_handler(kind, handle)
