"""Fetching remote image and video URLs without letting clients aim the gateway at internal hosts.

A client that sends `http://169.254.169.254/...` or `http://10.0.0.7:8080/admin` as an image
URL would otherwise make the gateway fetch from inside the network it runs in (SSRF). The
rule, judged on every hop (the URL the client sent and each redirect, at most
`max_image_redirects`):

1. The scheme is http or https, and when `--allowed-media-domains` is set the host is one of
   those names (exactly, case-insensitive; an IP literal may be listed too).
2. The host is resolved once, and each address is classified (`classify`). The first
   address that passes is the one connected to: the request goes to that IP with the
   original `Host` header and TLS server name, so a second DNS answer cannot swap in
   another address between the check and the connection (DNS rebinding).
3. Loopback, private (RFC 1918, IPv6 unique-local), link-local and shared (100.64/10)
   addresses pass only with `--allow-private-media-addresses`, and then only for the host
   the client named or a host in `--allowed-media-domains`: a redirect from an allowed
   server to some other private address is refused, so a trusted image server cannot
   steer the gateway further inward. Cloud-metadata, unspecified, multicast and other
   reserved (not globally routable) addresses never pass.

IPv4 addresses carried inside IPv6 (`::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, the old
`::a.b.c.d`, 6to4) are judged by the IPv4 address they carry. Environment proxies are not
used: a proxy would connect on the gateway's behalf to an address never checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import httpx

from gateway.config import GatewayConfig
from gateway.errors import ApiError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""(host, port) -> the addresses it resolves to, as text; tests pass their own."""

METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.123",  # AWS time sync
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (legacy)
        "fd00:ec2::254",  # AWS over IPv6
        "fd00:ec2::23",  # AWS time sync over IPv6
    )
)
SHARED = ipaddress.ip_network("100.64.0.0/10")
"""Carrier-grade NAT space: not private by RFC 1918, but inside some provider's network."""
NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
PRIVATE_KINDS = frozenset({"loopback", "private", "link-local", "shared"})
"""What --allow-private-media-addresses lets through; every other kind stays refused."""
REDIRECTS = frozenset({301, 302, 303, 307, 308})


def classify(ip: IPAddress) -> str | None:
    """None for a public address; else what it is: cloud metadata, unspecified, loopback,
    multicast, link-local, shared, private or reserved (anything else not global)."""
    if ip in METADATA:
        return "cloud metadata"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = embedded_ipv4(ip)
        if embedded is not None:
            return classify(embedded)
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_multicast:
        return "multicast"
    if ip.is_link_local:
        return "link-local"
    if ip in SHARED:
        return "shared"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "reserved"
    return None


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, where it stands for one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if any(ip in net for net in NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if int(ip) >> 32 == 0 and int(ip) > 1:  # ::a.b.c.d (deprecated IPv4-compatible)
        return ipaddress.IPv4Address(int(ip))
    return None


async def system_resolve(host: str, port: int) -> list[str]:
    """The system resolver's addresses for `host`, in its order of preference."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class MediaKind:
    """What a fetch is for: the content types accepted, the size cap, the time limit."""

    name: str
    """"image" or "video"; names the thing in errors."""
    max_bytes: int
    timeout_s: float
    content_types: tuple[str, ...]
    """Accepted Content-Type values; one ending in "/" accepts every subtype."""

    def accepts(self, content_type: str) -> bool:
        return any(
            content_type.startswith(t) if t.endswith("/") else content_type == t
            for t in self.content_types
        )


def image_kind(config: GatewayConfig) -> MediaKind:
    return MediaKind("image", config.max_image_bytes, config.remote_image_timeout_s, ("image/",))


def video_kind(config: GatewayConfig) -> MediaKind:
    """Videos: video/* or application/octet-stream (object stores often send that; the
    decoder checks what the bytes are)."""
    return MediaKind(
        "video",
        config.max_video_bytes,
        config.remote_video_timeout_s,
        ("video/", "application/octet-stream"),
    )


class MediaFetcher:
    """Fetches image and video URLs under the guard and the config's caps; owned by the
    app's state."""

    def __init__(
        self,
        config: GatewayConfig,
        resolve: Resolver = system_resolve,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.resolve = resolve
        self.allowed = frozenset(_norm(h) for h in config.allowed_media_domains)
        # Redirects are followed here, hop by hop, so each target is checked before use. No
        # connection is kept: the pool is keyed by IP, so a TLS connection whose certificate
        # was checked for one name could otherwise carry a request for another name there.
        self.client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            transport=transport,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        self.slots = asyncio.Semaphore(config.max_concurrent_image_fetches)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def fetch(self, url: str, param: str, kind: MediaKind | None = None) -> bytes:
        """The bytes at `url` (an image unless `kind` says otherwise); every refusal and cap
        is a 400 naming `param`. The time limit covers waiting for a fetch slot, resolving,
        every hop and the body."""
        kind = kind or image_kind(self.config)
        timeout_s = kind.timeout_s
        try:
            return await asyncio.wait_for(self._fetch(url, param, kind), timeout_s)
        except (TimeoutError, httpx.TimeoutException):
            raise _error(
                param, f"fetching the {kind.name} timed out after {timeout_s:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise _error(param, f"the {kind.name} could not be fetched: {exc}") from None

    async def _fetch(self, url: str, param: str, kind: MediaKind) -> bytes:
        async with self.slots:
            target = _parse(url, param)
            named = _norm(target.host)
            for _ in range(self.config.max_image_redirects + 1):
                trusted = named == _norm(target.host) or _norm(target.host) in self.allowed
                ip = await self.pick_address(target, param, private_ok=trusted)
                response = await self.client.send(_pinned(target, ip, kind), stream=True)
                try:
                    location = response.headers.get("location")
                    if response.status_code in REDIRECTS and location:
                        target = _parse(location, param, base=target)
                        continue
                    return await self._body(response, param, kind)
                finally:
                    await response.aclose()
        raise _error(
            param,
            f"more than {self.config.max_image_redirects} redirects",
            code="too_many_redirects",
        )

    async def pick_address(self, target: httpx.URL, param: str, private_ok: bool) -> IPAddress:
        """The address to connect to for `target`: the first of its host's addresses the
        rules allow. Refused when the host is not on the allow-list or none passes."""
        host = _norm(target.host)
        if self.allowed and host not in self.allowed:
            raise _error(
                param, f"host {host!r} is not in --allowed-media-domains", code="media_refused"
            )
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                found = await self.resolve(host, target.port or _default_port(target))
            except OSError as exc:
                raise _error(param, f"host {host!r} does not resolve: {exc}") from None
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in found]
        private_ok = private_ok and self.config.allow_private_media_addresses
        refused = []
        for ip in addresses:
            kind = classify(ip)
            if kind is None or (private_ok and kind in PRIVATE_KINDS):
                return ip
            refused.append(f"{ip} ({kind})")
        hint = "" if private_ok else "; see --allow-private-media-addresses"
        raise _error(
            param,
            f"host {host!r} resolves to no address the gateway may fetch from: "
            f"{', '.join(refused) or 'none'}{hint}",
            code="media_refused",
        )

    async def _body(self, response: httpx.Response, param: str, kind: MediaKind) -> bytes:
        """The body of a final answer: HTTP 200, a content type `kind` accepts, at most
        its max_bytes."""
        if response.status_code != 200:
            raise _error(param, f"fetching the {kind.name} returned HTTP {response.status_code}")
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if not kind.accepts(content_type):
            raise _error(
                param,
                f"the URL's content type is {content_type or 'missing'!r}, not "
                f"{' or '.join(t + '*' if t.endswith('/') else t for t in kind.content_types)}",
                code=f"invalid_{kind.name}_content_type",
            )
        max_bytes = kind.max_bytes
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_bytes:
            raise too_big(param, max_bytes, kind.name)
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > max_bytes:
                raise too_big(param, max_bytes, kind.name)
        return bytes(body)


def _pinned(target: httpx.URL, ip: IPAddress, kind: MediaKind) -> httpx.Request:
    """A GET of `target` that connects to the checked `ip`, with the name kept in the Host
    header and (https) in the TLS server name, so certificates are checked against it."""
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    accept = ", ".join(t + "*" if t.endswith("/") else t for t in kind.content_types)
    headers = {"host": target.netloc.decode("ascii"), "accept": accept}
    return httpx.Request(
        "GET", target.copy_with(host=str(ip)), headers=headers, extensions=extensions
    )


def _parse(url: str, param: str, base: httpx.URL | None = None) -> httpx.URL:
    """`url` (joined to `base`, the URL that redirected) when it is http(s) with a host."""
    try:
        target = base.join(url) if base is not None else httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise _error(param, f"the image URL is invalid: {exc}") from None
    if target.scheme not in ("http", "https") or not target.host:
        raise _error(param, f"the image URL {url[:64]!r} is not http(s) with a host")
    return target


def _norm(host: str) -> str:
    return host.lower().rstrip(".").strip("[]")


def _default_port(target: httpx.URL) -> int:
    return 443 if target.scheme == "https" else 80


def _error(param: str, reason: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {reason}", param=param, code=code)


def too_big(param: str, max_bytes: int, kind: str = "image") -> ApiError:
    return _error(param, f"the {kind} is larger than the limit of {max_bytes} bytes")
