"""Pool members from addresses and DNS names: one member per server process.

A pool (vision servers seen from a language server, language servers seen from a gateway)
is given targets: `10.0.0.5:50051`, `[::1]:50051`, `vision:50051` or `dns:///vision:50051`,
in any mix. An address is one member. A name (a Kubernetes headless Service, say) stands for
every address it resolves to, and each becomes a member of its own, with its own channel,
session and load count: a long-lived stream to "the name" would pin all traffic on
whichever pod the channel happened to reach, and a channel re-resolves only when its
connection breaks, so pods added later would never get work.

`Members` re-resolves every `period_s` and whenever a caller reports a failure
(`refresh_soon`). A new address joins at once. One that vanished stops getting new calls
and is closed when its calls have finished ("draining"). A name that fails to resolve
keeps its last members: a DNS hiccup must not empty the pool.

Resolution goes through the system resolver (getaddrinfo: /etc/hosts, resolv.conf and its
search domains, as every other client in the pod) unless a DNS server is named
(`dns_server="127.0.0.1:5353"`: service-discovery DNS such as Consul's, or a test's server).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

DNS_SCHEME = "dns:///"


@dataclass(frozen=True)
class Target:
    """One `--vision` / `--language` item: a host (address or name) and a port."""

    host: str
    port: int

    @property
    def is_address(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_target(text: str) -> Target:
    """`host:port`, `[v6]:port` or `dns:///host:port`; ValueError naming the item."""
    item = text.strip()
    rest = item[len(DNS_SCHEME) :] if item.startswith(DNS_SCHEME) else item
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
    else:
        host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port, [ipv6]:port or dns:///name:port")
    return Target(host, int(port))


def parse_targets(items: Sequence[str]) -> list[Target]:
    targets = [parse_target(item) for item in items if item.strip()]
    if not targets:
        raise ValueError("no server address or name given")
    return targets


class Resolver(Protocol):
    async def resolve(self, host: str) -> list[str]:
        """The host's IP addresses, in the resolver's order; OSError when it cannot."""
        ...


class SystemResolver:
    """getaddrinfo in the event loop's executor: what the pod's other clients see."""

    async def resolve(self, host: str) -> list[str]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        return _unique(str(info[4][0]) for info in infos)


class DnsServerResolver:
    """A and AAAA queries to one DNS server (dnspython), no search domains."""

    def __init__(self, server: str, timeout_s: float = 2.0) -> None:
        target = parse_target(server)
        if not target.is_address:
            raise ValueError(f"dns_server {server!r} must be an IP address and port")
        import dns.asyncresolver

        self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.nameservers = [target.host]
        self._resolver.port = target.port
        self._resolver.lifetime = timeout_s

    async def resolve(self, host: str) -> list[str]:
        import dns.exception
        import dns.resolver

        found: list[str] = []
        for kind in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(host, kind)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except dns.exception.DNSException as exc:
                raise OSError(f"{host}: {exc}") from None
            found += [record.to_text() for record in answer]
        if not found:
            raise OSError(f"{host}: no A or AAAA record")
        return _unique(found)


def make_resolver(dns_server: str = "") -> Resolver:
    return DnsServerResolver(dns_server) if dns_server else SystemResolver()


def _unique(items: Iterable[str]) -> list[str]:
    """The items without repeats, first occurrence first."""
    return list(dict.fromkeys(items))


M = TypeVar("M")


class Members(Generic[M]):
    """The live members of a pool, kept in step with what the targets resolve to.

    `make(address, name)` builds a member, `name` being the host of the target that gave
    the address (the DNS name, or the address itself): the name a TLS client checks the
    member's certificate against (dvd.tls); `busy(member)` says whether calls are still on it;
    `close(member)` releases it. Create inside the running event loop, `await start()`
    before use, `await stop()` at the end.
    """

    def __init__(
        self,
        targets: Sequence[Target],
        resolver: Resolver,
        make: Callable[[str, str], M],
        busy: Callable[[M], bool],
        close: Callable[[M], Awaitable[None]],
        period_s: float,
        what: str,
    ) -> None:
        if period_s <= 0:
            raise ValueError(f"{what}: the re-resolve period must be positive, not {period_s}")
        self.targets = list(targets)
        self._resolver = resolver
        self._make, self._busy, self._close = make, busy, close
        self.period_s = period_s
        self.what = what
        self.active: dict[str, M] = {}
        """address -> member, in resolution order: the ones new calls may go to."""
        self.draining: dict[str, M] = {}
        """Members whose address vanished; closed once idle."""
        self._last: dict[Target, list[str]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Resolves every target once (a name that does not resolve yet is retried by the
        refresh loop), then keeps re-resolving in the background."""
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name=f"{self.what}-discovery")

    def refresh_soon(self) -> None:
        """Asks for a re-resolve now (a member failed: its pod may be gone or replaced)."""
        self._wake.set()

    async def refresh(self) -> None:
        names: dict[str, str] = {}  # address -> the host of the first target that gave it
        for target in self.targets:
            for address in await self._addresses_of(target):
                names.setdefault(address, target.host)
        self._apply(names)
        await self._close_idle()

    async def _addresses_of(self, target: Target) -> list[str]:
        if target.is_address:
            return [str(target)]
        try:
            ips = await self._resolver.resolve(target.host)
        except OSError as exc:
            kept = self._last.get(target, [])
            log.warning("%s: cannot resolve %s (%s); keeping %s", self.what, target, exc, kept)
            return kept
        # DNS servers rotate their answers; members keep one order whatever it was.
        found = [join_host_port(ip, target.port) for ip in sorted(ips)]
        self._last[target] = found
        return found

    def _apply(self, names: dict[str, str]) -> None:
        """`names`: every address that targets resolve to now, in order -> its name."""
        for address, name in names.items():
            if address in self.active:
                continue
            member = self.draining.pop(address, None)
            if member is None:
                member = self._make(address, name)
                log.info("%s: %s joins", self.what, address)
            else:
                log.info("%s: %s is back", self.what, address)
            self.active[address] = member
        for address in [a for a in self.active if a not in names]:
            log.info("%s: %s is gone from DNS; draining it", self.what, address)
            self.draining[address] = self.active.pop(address)

    async def _close_idle(self) -> None:
        for address, member in list(self.draining.items()):
            if not self._busy(member):
                del self.draining[address]
                log.info("%s: %s has left", self.what, address)
                await self._close(member)

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # the period is up: re-resolve anyway
                await asyncio.wait_for(self._wake.wait(), self.period_s)
            self._wake.clear()
            try:
                await self.refresh()
            except Exception:  # never let discovery die silently: log, try next period
                log.exception("%s: re-resolving failed", self.what)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        members = [*self.active.values(), *self.draining.values()]
        self.active, self.draining = {}, {}
        for member in members:
            await self._close(member)
