"""How long a chat completion may take: the client's timeout or --request-timeout-s.

The effective timeout becomes the Generate call's gRPC deadline, which the language server
passes on to its Encode calls; whoever is working when it passes stops (dvd.deadline).

Where a client's timeout comes from:
- `X-Request-Timeout: <seconds>`: asked for explicitly; the whole request, streamed or not.
- `X-Stainless-Read-Timeout: <seconds>`: sent by the official openai clients on every
  request (their `timeout=`, 600 s unless set). It is how long the client waits for the
  next bytes, so for a non-streamed request it bounds the whole answer; the deadline ends
  a little before it (CLIENT_MARGIN) so that the client reads our 504 rather than giving up
  first. A streamed request may run longer than it as long as chunks keep coming, so there
  it is not a deadline (a client that gives up waiting disconnects, which stops the request
  all the same).
The effective timeout is the smallest of those given and --request-timeout-s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.errors import ApiError

REQUEST_TIMEOUT_HEADER = "x-request-timeout"
CLIENT_READ_TIMEOUT_HEADER = "x-stainless-read-timeout"
CLIENT_MARGIN_S = 1.0
CLIENT_MARGIN_FRACTION = 0.1
"""The deadline from a client's read timeout ends min(1 s, 10%) before it."""

SERVER = "server"
CLIENT = "client"
SOURCES = (SERVER, CLIENT)
"""Which limit set a request's deadline: --request-timeout-s, or the client's timeout."""


@dataclass(frozen=True)
class RequestDeadline:
    timeout_s: float
    source: str  # one of SOURCES
    reason: str  # what set it, for messages: "--request-timeout-s", a header
    started: float = field(default_factory=time.monotonic)
    """When the request arrived (time.monotonic()): fetching and decoding its media count."""

    def remaining_s(self) -> float:
        """Seconds left of the deadline (0 once it has passed)."""
        return max(self.started + self.timeout_s - time.monotonic(), 0.0)

    def exceeded(self) -> ApiError:
        """The 504 for a request that ran past this deadline."""
        return ApiError(
            504,
            f"the request did not finish within {self.timeout_s:g} s ({self.reason}); it was "
            "stopped",
            code="deadline_exceeded",
        )


def parse_seconds(text: str) -> float | None:
    """A positive, finite number of seconds; None for anything else."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def client_margin(timeout_s: float) -> float:
    return min(CLIENT_MARGIN_S, CLIENT_MARGIN_FRACTION * timeout_s)


def request_deadline(
    headers: Mapping[str, str], server_timeout_s: float, stream: bool
) -> RequestDeadline:
    """The deadline of one chat completion from its headers (names in lower case, as
    Starlette's Headers give them); 400 for an X-Request-Timeout that is not a positive
    number of seconds (an unreadable X-Stainless-Read-Timeout is ignored: no client asked
    for it by hand)."""
    best = RequestDeadline(server_timeout_s, SERVER, f"--request-timeout-s {server_timeout_s:g}")
    explicit = headers.get(REQUEST_TIMEOUT_HEADER)
    if explicit is not None:
        seconds = parse_seconds(explicit)
        if seconds is None:
            raise ApiError(
                400,
                f"X-Request-Timeout must be a positive number of seconds, not {explicit!r}",
                param=REQUEST_TIMEOUT_HEADER,
                code="invalid_request_timeout",
            )
        if seconds < best.timeout_s:
            best = RequestDeadline(seconds, CLIENT, f"X-Request-Timeout {explicit.strip()}")
    read = headers.get(CLIENT_READ_TIMEOUT_HEADER)
    seconds = parse_seconds(read) if read is not None and not stream else None
    if seconds is not None and seconds - client_margin(seconds) < best.timeout_s:
        best = RequestDeadline(
            seconds - client_margin(seconds),
            CLIENT,
            f"the client's timeout of {seconds:g} s, X-Stainless-Read-Timeout",
        )
    return best
