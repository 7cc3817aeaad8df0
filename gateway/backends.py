"""The language servers the gateway calls: a pool of members, one per server process.

Members: `--language` names addresses and DNS names (a Kubernetes headless Service). Every
address a name resolves to is a member with its own channel and load count
(dvd.discovery.Members), re-resolved every `resolve_s` and at once when a call to a member
fails, so pods that join get calls within one period and pods that leave are drained. One
channel to "the name" would stay on whichever pod it reached first.

Routing, per call: the member with the fewest outstanding Generate calls (ties round
robin), or with `prefix-affine` the member that the conversation's leading messages hash to
(gateway.affinity), unless it is several calls ahead of the least loaded member
(dvd.routing), so a next turn finds its KV prefix in that server's cache. Members that just answered
UNAVAILABLE (for COOLDOWN_S), or whose last Health was not SERVING, are passed over unless
every member is.

Retries: a Generate call that fails with UNAVAILABLE before its first message is tried on a
member not yet tried (each member once). So is one that a member refuses with
RESOURCE_EXHAUSTED (its waiting requests, or its vision servers' queues, are at their
limits): that member is alive, so it is passed over for BUSY_BACKOFF_S only, not the
cooldown of a member that is gone; when every member has refused, the client gets 429
(gateway.errors.from_grpc). Once a message has arrived, nothing is retried: the client may
already have seen tokens. Every try gets what is left of the request's one deadline.

Health: every `resolve_s` (and on each /ready) the pool asks every member's Health; the
gateway can serve while at least one member is SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass

import grpc

from dvd.discovery import Members, Resolver, Target, make_resolver, parse_targets
from dvd.errors import refused_as_busy
from dvd.grpc_options import CHANNEL_OPTIONS
from dvd.routing import LEAST_LOADED, LeastLoaded, bounded_affinity
from dvd.tls import Tls, describe_client, open_channel
from dvd.v1 import common_pb2, language_pb2, language_pb2_grpc
from gateway.affinity import conversation_key
from gateway.config import PREFIX_AFFINE, GatewayConfig
from gateway.errors import ApiError
from gateway.metrics import GatewayMetrics

logger = logging.getLogger("dvd.gateway")

INFO_TIMEOUT_S = 5.0
COOLDOWN_S = 5.0
"""How long a member that answered UNAVAILABLE is passed over when others are available."""
BUSY_BACKOFF_S = 1.0
"""How long a member that refused a call (RESOURCE_EXHAUSTED) is passed over when others
are available: it is busy, not gone."""
TIER = "language"


@dataclass
class Backend:
    """One language server process: its channel and what routing knows of it."""

    address: str
    channel: grpc.aio.Channel
    stub: language_pb2_grpc.LanguageServiceStub
    outstanding: int = 0
    unavailable_until: float = 0.0
    """time.monotonic() before which routing avoids this member."""
    busy_until: float = 0.0
    """time.monotonic() before which routing avoids this member: it just refused a call."""
    serving: bool | None = None
    """Its last Health answer (None before the first): routing avoids a degraded member."""


@dataclass(frozen=True)
class BackendHealth:
    address: str
    serving: bool
    detail: str = ""
    draining: bool = False
    """Gone from DNS: it finishes its calls and gets no new ones."""


class BackendPool:
    """The language-server members; create inside the running event loop, then `start()`."""

    def __init__(
        self,
        targets: Sequence[Target],
        resolver: Resolver,
        *,
        resolve_s: float = 5.0,
        routing: str = LEAST_LOADED,
        health_timeout_s: float = 2.0,
        metrics: GatewayMetrics | None = None,
        tls: Tls | None = None,
    ) -> None:
        self.targets = list(targets)
        self.routing = routing
        self.health_timeout_s = health_timeout_s
        self._metrics = metrics
        self._least_loaded = LeastLoaded()
        self._members: Members[Backend] = Members(
            targets,
            resolver,
            make=lambda address, name: _connect(address, name, tls),
            busy=lambda backend: backend.outstanding > 0,
            close=self._disconnect,
            period_s=resolve_s,
            what="language pool",
        )
        self._info: language_pb2.LanguageInfo | None = None
        self._watch: asyncio.Task[None] | None = None
        logger.info("language pool: calls language servers over %s", describe_client(tls))

    @classmethod
    def from_config(
        cls, config: GatewayConfig, metrics: GatewayMetrics | None = None, tls: Tls | None = None
    ) -> BackendPool:
        return cls(
            parse_targets(config.language_addresses),
            make_resolver(config.dns_server),
            resolve_s=config.language_resolve_s,
            routing=config.language_routing,
            health_timeout_s=config.health_timeout_s,
            metrics=metrics,
            tls=tls,
        )

    async def start(self) -> None:
        """Resolves the targets, then keeps members and their health up to date."""
        await self._members.start()
        self._watch = asyncio.create_task(self._watch_health(), name="language-health")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        await self._members.stop()

    @property
    def backends(self) -> list[Backend]:
        """The members new calls may go to, in a stable order."""
        return list(self._members.active.values())

    @property
    def draining(self) -> list[Backend]:
        return list(self._members.draining.values())

    def refresh_soon(self) -> None:
        self._members.refresh_soon()

    @property
    def none_found(self) -> str:
        """What to say while the targets resolve to no member (a name with no pods yet)."""
        return ", ".join(map(str, self.targets)) + " resolved to no address"

    def pick(
        self, exclude: frozenset[str] | set[str] = frozenset(), key: bytes | None = None
    ) -> Backend:
        """The member for the next call among those not in `exclude` (all, if every member
        is): by `key`'s affinity bounded by load when given, else the least loaded."""
        members = self.backends
        if not members:
            message = f"no language server: {self.none_found}"
            raise ApiError(503, message, code="backend_unavailable")
        candidates = [b for b in members if b.address not in exclude] or members
        now = time.monotonic()
        candidates = [b for b in candidates if b.unavailable_until <= now] or candidates
        candidates = [b for b in candidates if b.busy_until <= now] or candidates
        candidates = [b for b in candidates if b.serving is not False] or candidates
        if key is not None:
            return bounded_affinity(candidates, key, _address, _load)
        return self._least_loaded.pick(candidates, _load)

    async def generate(
        self,
        request: language_pb2.GenerateRequest,
        *,
        timeout_s: float,
        metadata: Sequence[tuple[str, str]] = (),
        on_backend: Callable[[str], None] | None = None,
    ) -> AsyncGenerator[language_pb2.GenerateResponse, None]:
        """Messages of one Generate call, which ends within `timeout_s` (tries included).
        Closing the iterator cancels the call."""
        key = conversation_key(request) if self.routing == PREFIX_AFFINE else None
        deadline = time.monotonic() + timeout_s
        tried: set[str] = set()
        while True:
            backend = self.pick(tried, key)
            tried.add(backend.address)
            if on_backend is not None:
                on_backend(backend.address)
            self._count(backend, +1)
            remaining = max(deadline - time.monotonic(), 0.0)
            call = backend.stub.Generate(request, timeout=remaining, metadata=tuple(metadata))
            try:
                try:
                    message = await call.read()
                except grpc.aio.AioRpcError as error:
                    busy = refused_as_busy(error)
                    if error.code() != grpc.StatusCode.UNAVAILABLE and not busy:
                        raise
                    self._set_aside(backend, error)
                    if any(b.address not in tried for b in self.backends):
                        logger.warning(
                            "request %s: %s %s (%s); trying another language server",
                            request.request_id,
                            backend.address,
                            "busy" if busy else "unavailable",
                            error.details(),
                        )
                        continue
                    raise
                backend.unavailable_until = backend.busy_until = 0.0
                while message is not grpc.aio.EOF:
                    yield message
                    message = await call.read()
                return
            finally:
                call.cancel()  # a no-op once the call has finished
                self._count(backend, -1)

    def _set_aside(self, backend: Backend, error: grpc.aio.AioRpcError) -> None:
        """Routing passes over a member that failed a call for a while: a busy one briefly,
        one that is unavailable (gone, restarting) for longer."""
        if refused_as_busy(error):
            backend.busy_until = time.monotonic() + BUSY_BACKOFF_S
            if self._metrics is not None:
                self._metrics.member_refusals.labels(backend.address).inc()
            return
        backend.unavailable_until = time.monotonic() + COOLDOWN_S
        self.refresh_soon()  # its pod may be gone or replaced

    def _count(self, backend: Backend, change: int) -> None:
        backend.outstanding += change
        if self._metrics is not None:
            if change > 0:
                self._metrics.member_calls.labels(backend.address).inc()
            self._metrics.member_outstanding.labels(backend.address).set(backend.outstanding)

    async def info(self) -> language_pb2.LanguageInfo:
        """The served model's Info from the first member that answers; cached."""
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
        if not problems:
            problems.append(self.none_found)
        raise ApiError(
            503,
            "no language server answered Info: " + "; ".join(problems),
            code="backend_unavailable",
        )

    @property
    def cached_info(self) -> language_pb2.LanguageInfo | None:
        return self._info

    async def health(self, timeout_s: float | None = None) -> list[BackendHealth]:
        """Every member's Health, asked at once (draining members too, marked so); remembers
        each active member's answer for routing and the healthy-members gauge."""
        timeout = self.health_timeout_s if timeout_s is None else timeout_s
        active, draining = self.backends, self.draining
        results = await asyncio.gather(
            *(_health(b, timeout, False) for b in active),
            *(_health(b, timeout, True) for b in draining),
        )
        for backend, result in zip(active, results[: len(active)], strict=True):
            backend.serving = result.serving
        if self._metrics is not None:
            healthy = sum(1 for b in self.backends if b.serving)
            self._metrics.healthy_members.labels(TIER).set(healthy)
        return list(results)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self._members.period_s)
            try:
                await self.health()
            except Exception:  # never let the watch die silently: log, try next period
                logger.exception("language pool: asking Health failed")

    async def _disconnect(self, backend: Backend) -> None:
        await backend.channel.close()
        if self._metrics is not None:
            self._metrics.member_left(backend.address)


def _connect(address: str, name: str, tls: Tls | None) -> Backend:
    """A member's channel; with TLS its certificate must carry `name` (dvd.tls)."""
    channel = open_channel(address, name, tls, CHANNEL_OPTIONS)
    return Backend(address, channel, language_pb2_grpc.LanguageServiceStub(channel))


def _address(backend: Backend) -> str:
    return backend.address


def _load(backend: Backend) -> int:
    return backend.outstanding


async def _health(backend: Backend, timeout_s: float, draining: bool) -> BackendHealth:
    try:
        reply = await backend.stub.Health(common_pb2.HealthRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError as error:
        detail = f"{error.code().name}: {error.details()}"
        return BackendHealth(backend.address, False, detail, draining)
    serving = reply.status == common_pb2.HealthResponse.STATUS_SERVING
    status_name = common_pb2.HealthResponse.Status.Name(reply.status)
    return BackendHealth(backend.address, serving, reply.detail or status_name, draining)
