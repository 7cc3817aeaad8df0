"""Errors shared across processes and the single gRPC-status -> HTTP-status table."""

from __future__ import annotations

import grpc


class DvdError(Exception):
    """An error with a gRPC status code, raised inside servers and mapped at the edges."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidInput(DvdError):
    """The caller sent something unusable (bad image, prompt too long, bad option)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(DvdError):
    """A dependency (vision server, engine) cannot be reached or is not ready."""

    code = grpc.StatusCode.UNAVAILABLE


class Overloaded(DvdError):
    """A queue or limit is full; the caller may retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


BUSY_METADATA = ("dvd-busy", "1")
"""Trailing metadata of a call refused by our own bounds (Overloaded). gRPC gives
RESOURCE_EXHAUSTED for its message-size limits too; only a call that carries this is a busy
server worth trying elsewhere or again."""


def trailing_metadata(exc: DvdError) -> tuple[tuple[str, str], ...]:
    """What a server's abort for `exc` carries besides code and message."""
    return (BUSY_METADATA,) if isinstance(exc, Overloaded) else ()


def refused_as_busy(error: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call was a server's own "busy, try again" (Overloaded), not another
    RESOURCE_EXHAUSTED such as a message over gRPC's size limit."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    return any(tuple(item) == BUSY_METADATA for item in error.trailing_metadata() or ())


GRPC_TO_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.DATA_LOSS: 500,
}
"""How a gRPC status from a backend becomes an HTTP status at the gateway."""


def http_status(code: grpc.StatusCode) -> int:
    return GRPC_TO_HTTP.get(code, 500)
