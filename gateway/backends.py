"""The language servers the gateway calls: a pool of gRPC channels.

Routing: the backend with the fewest outstanding Generate calls; ties go round robin. A
backend that just answered UNAVAILABLE sits out for COOLDOWN_S unless every backend does.
Retries: a Generate call that fails with UNAVAILABLE before its first message is tried on a
backend not yet tried (each backend once). Once a message has arrived, nothing is retried:
the client may already have seen tokens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from dvd.grpc_options import CHANNEL_OPTIONS
from dvd.v1 import common_pb2, language_pb2, language_pb2_grpc
from gateway.errors import ApiError

logger = logging.getLogger("dvd.gateway")

INFO_TIMEOUT_S = 5.0
COOLDOWN_S = 5.0
"""How long a backend that answered UNAVAILABLE is passed over when others are available."""


@dataclass
class Backend:
    address: str
    channel: grpc.aio.Channel
    stub: language_pb2_grpc.LanguageServiceStub
    outstanding: int = 0
    unavailable_until: float = 0.0
    """time.monotonic() before which routing avoids this backend."""


@dataclass(frozen=True)
class BackendHealth:
    address: str
    serving: bool
    detail: str = ""


@dataclass
class BackendPool:
    """Channels to every language server; create inside the running event loop."""

    backends: list[Backend]
    _next: int = 0
    _info: language_pb2.LanguageInfo | None = field(default=None, repr=False)

    @classmethod
    def connect(cls, addresses: Sequence[str]) -> BackendPool:
        backends = []
        for address in addresses:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            backends.append(
                Backend(address, channel, language_pb2_grpc.LanguageServiceStub(channel))
            )
        return cls(backends)

    async def close(self) -> None:
        await asyncio.gather(*(backend.channel.close() for backend in self.backends))

    def pick(self, exclude: frozenset[str] | set[str] = frozenset()) -> Backend:
        """Least outstanding calls among backends not in `exclude` and not cooling down;
        ties round robin."""
        count = len(self.backends)
        rotated = [self.backends[(self._next + i) % count] for i in range(count)]
        self._next = (self._next + 1) % count
        candidates = [b for b in rotated if b.address not in exclude] or rotated
        now = time.monotonic()
        candidates = [b for b in candidates if b.unavailable_until <= now] or candidates
        return min(candidates, key=lambda backend: backend.outstanding)

    async def generate(
        self,
        request: language_pb2.GenerateRequest,
        *,
        timeout_s: float,
        metadata: Sequence[tuple[str, str]] = (),
        on_backend: Callable[[str], None] | None = None,
    ) -> AsyncGenerator[language_pb2.GenerateResponse, None]:
        """Messages of one Generate call. Closing the iterator cancels the call."""
        tried: set[str] = set()
        while True:
            backend = self.pick(tried)
            tried.add(backend.address)
            if on_backend is not None:
                on_backend(backend.address)
            backend.outstanding += 1
            call = backend.stub.Generate(request, timeout=timeout_s, metadata=tuple(metadata))
            try:
                try:
                    message = await call.read()
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    backend.unavailable_until = time.monotonic() + COOLDOWN_S
                    if len(tried) < len(self.backends):
                        logger.warning(
                            "request %s: %s unavailable (%s); trying another language server",
                            request.request_id,
                            backend.address,
                            error.details(),
                        )
                        continue
                    raise
                backend.unavailable_until = 0.0
                while message is not grpc.aio.EOF:
                    yield message
                    message = await call.read()
                return
            finally:
                call.cancel()  # a no-op once the call has finished
                backend.outstanding -= 1

    async def info(self) -> language_pb2.LanguageInfo:
        """The served model's Info from the first backend that answers; cached."""
        if self._info is not None:
            return self._info
        problems = []
        for backend in self.backends:
            try:
                self._info = await backend.stub.Info(
                    common_pb2.InfoRequest(), timeout=INFO_TIMEOUT_S
                )
                return self._info
            except grpc.aio.AioRpcError as error:
                problems.append(f"{backend.address}: {error.code().name} {error.details()}")
        raise ApiError(
            503,
            "no language server answered Info: " + "; ".join(problems),
            code="backend_unavailable",
        )

    @property
    def cached_info(self) -> language_pb2.LanguageInfo | None:
        return self._info

    async def health(self, timeout_s: float) -> list[BackendHealth]:
        """Every backend's Health, asked at once."""
        return list(await asyncio.gather(*(_health(b, timeout_s) for b in self.backends)))


async def _health(backend: Backend, timeout_s: float) -> BackendHealth:
    try:
        reply = await backend.stub.Health(common_pb2.HealthRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError as error:
        return BackendHealth(backend.address, False, f"{error.code().name}: {error.details()}")
    serving = reply.status == common_pb2.HealthResponse.STATUS_SERVING
    status_name = common_pb2.HealthResponse.Status.Name(reply.status)
    return BackendHealth(backend.address, serving, reply.detail or status_name)
