"""Remote image URLs: the address classifier on literal IPs of every kind, address choice
with a resolver the test controls (nothing is connected to), and real fetches through a
gateway from HTTP servers on 127.0.0.2 and 127.0.0.3: refused by default (loopback), served
when private addresses are allowed, and every cap and refused redirect a 400 naming the field.

Only loopback is ever contacted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from gateway.config import GatewayConfig
from gateway.errors import ApiError
from gateway.media_guard import MediaFetcher, classify
from tests.test_gateway import (
    FakeLanguage,
    assert_openai_error,
    chat,
    fake_language,  # noqa: F401  (a fixture)
    image_part,
    png,
    serve,
)

pytestmark = pytest.mark.timeout(90)

IMAGE = png(40, 30, "blue")
PARAM = "messages[0].content[0].image_url.url"

KINDS: dict[str | None, list[str]] = {
    None: ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"],
    "loopback": ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1", "::127.0.0.1"],
    "private": [
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "fc00::1",
        "fd12:3456::1",
        "::ffff:10.1.2.3",
        "64:ff9b::a00:1",
        "64:ff9b:1::c0a8:101",
        "2002:c0a8:101::1",
    ],
    "link-local": ["169.254.1.1", "fe80::1", "::ffff:169.254.7.7"],
    "shared": ["100.64.0.1", "100.127.255.254", "::ffff:100.64.0.1", "64:ff9b::6440:1"],
    "cloud metadata": [
        "169.254.169.254",
        "169.254.170.2",
        "100.100.100.200",
        "fd00:ec2::254",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
    ],
    "unspecified": ["0.0.0.0", "::", "::ffff:0.0.0.0"],
    "multicast": ["224.0.0.1", "239.255.255.250", "ff02::1", "::ffff:224.0.0.1"],
    "reserved": ["240.0.0.1", "255.255.255.255", "::ffff:240.0.0.1"],
}


@pytest.mark.parametrize(
    ("address", "kind"), [(a, kind) for kind, addresses in KINDS.items() for a in addresses]
)
def test_classify(address: str, kind: str | None) -> None:
    assert classify(ipaddress.ip_address(address)) == kind


def fetcher(resolved: Sequence[str], **settings: Any) -> MediaFetcher:
    async def resolve(host: str, port: int) -> Sequence[str]:
        return resolved

    return MediaFetcher(GatewayConfig(**settings), resolve=resolve)


def pick(guard: MediaFetcher, url: str, private_ok: bool = True) -> str:
    return str(asyncio.run(guard.pick_address(httpx.URL(url), PARAM, private_ok)))


def test_address_choice_with_a_resolver_we_control() -> None:
    # The first address that passes is the one connected to; none is contacted here.
    assert pick(fetcher(["10.0.0.1", "8.8.4.4"]), "http://images.example/a.png") == "8.8.4.4"
    with pytest.raises(ApiError, match=r"10\.0\.0\.1 \(private\).*allow-private") as info:
        pick(fetcher(["10.0.0.1"]), "http://images.example/a.png")
    assert info.value.param == PARAM and info.value.code == "media_refused"
    opted_in = fetcher(["10.0.0.1"], allow_private_media_addresses=True)
    assert pick(opted_in, "http://images.example/a.png") == "10.0.0.1"
    # ...but not for a redirect target the client did not name (private_ok=False).
    with pytest.raises(ApiError, match="private"):
        pick(opted_in, "http://elsewhere.example/a.png", private_ok=False)
    metadata = fetcher(["169.254.169.254"], allow_private_media_addresses=True)
    with pytest.raises(ApiError, match="cloud metadata"):
        pick(metadata, "http://metadata.google.internal/")
    listed = fetcher(["8.8.4.4"], allowed_media_domains=("images.example",))
    assert pick(listed, "http://IMAGES.example./a.png") == "8.8.4.4"
    with pytest.raises(ApiError, match="not in --allowed-media-domains"):
        pick(listed, "http://other.example/a.png")
    with pytest.raises(ApiError, match="loopback"):
        pick(fetcher([]), "http://[::ffff:127.0.0.1]/a.png")


# ---- real fetches from loopback HTTP servers --------------------------------------------


class ImageHandler(BaseHTTPRequestHandler):
    """/img, /text, /huge (no length), /slow, /missing, /to?u=URL (302), /loop."""

    hosts_seen: list[str] = []  # noqa: RUF012  (shared on purpose: every request's Host)

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        self.hosts_seen.append(self.headers.get("host", ""))
        if path == "/img":
            self._send(200, "image/png", IMAGE)
        elif path == "/text":
            self._send(200, "text/html", b"<html></html>")
        elif path == "/huge":
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"x" * 16384)
        elif path == "/slow":
            time.sleep(1.5)
            self._send(200, "image/png", IMAGE)
        elif path in ("/to", "/loop"):
            self.send_response(302)
            self.send_header("location", query.removeprefix("u=") if path == "/to" else "/loop")
            self.send_header("content-length", "0")
            self.end_headers()
        else:
            self._send(404, "text/plain", b"missing")

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_servers() -> Iterator[tuple[str, str]]:
    """Base URLs of two image servers, on 127.0.0.2 (A) and 127.0.0.3 (B)."""
    servers, urls = [], []
    for host in ("127.0.0.2", "127.0.0.3"):
        server = ThreadingHTTPServer((host, 0), ImageHandler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        urls.append(f"http://{host}:{server.server_address[1]}")
    try:
        yield urls[0], urls[1]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def ask(gateway: str, *urls: str) -> httpx.Response:
    body = chat([image_part(url) for url in urls] + [{"type": "text", "text": "describe"}])
    return httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=30)


def refused(response: httpx.Response, needle: str, param: str = PARAM) -> dict[str, Any]:
    error = assert_openai_error(response, 400)
    assert error["param"] == param and needle in error["message"], error
    assert error["message"].startswith(param)
    return error


def gateway_config(language: str, **settings: Any) -> GatewayConfig:
    return GatewayConfig(language_addresses=(language,), max_image_bytes=100_000, **settings)


def test_loopback_refused_by_default(
    fake_language: tuple[str, FakeLanguage],  # noqa: F811
    image_servers: tuple[str, str],
) -> None:
    a, _ = image_servers
    with serve(gateway_config(fake_language[0])) as gateway:
        error = refused(ask(gateway, f"{a}/img"), "127.0.0.2 (loopback)")
        assert error["code"] == "media_refused"
        refused(ask(gateway, "http://[::1]:9/img"), "::1 (loopback)")
        refused(ask(gateway, "http://169.254.169.254/latest/meta-data/"), "cloud metadata")
    with serve(gateway_config(fake_language[0], remote_images=False)) as gateway:
        error = refused(ask(gateway, f"{a}/img"), "not fetched")
        assert error["code"] == "remote_images_disabled"


def test_served_with_private_addresses_allowed(
    fake_language: tuple[str, FakeLanguage],  # noqa: F811
    image_servers: tuple[str, str],
) -> None:
    a, b = image_servers
    config = gateway_config(fake_language[0], allow_private_media_addresses=True)
    with serve(config) as gateway:
        response = ask(gateway, f"{a}/img", f"{a}/to?u=/img")  # a redirect on the same host
        assert response.status_code == 200, response.text
        parts = fake_language[1].requests[-1].messages[0].content
        assert [p.image for p in parts[:2]] == [IMAGE, IMAGE]
        # A redirect from A to B: B is private and the client did not name it.
        refused(ask(gateway, f"{a}/to?u={b}/img"), "127.0.0.3 (loopback)")
        refused(ask(gateway, f"{a}/to?u=http://169.254.169.254/"), "cloud metadata")
        # Caps: size, content type, redirect count, status, timeout; fetched bytes are
        # checked like inline ones.
        refused(ask(gateway, f"{a}/huge"), "larger than the limit of 100000 bytes")
        error = refused(ask(gateway, f"{a}/text"), "'text/html', not image/*")
        assert error["code"] == "invalid_image_content_type"
        error = refused(ask(gateway, f"{a}/loop"), "more than 3 redirects")
        assert error["code"] == "too_many_redirects"
        refused(ask(gateway, f"{a}/missing"), "HTTP 404")
        second = "messages[0].content[1].image_url.url"
        refused(ask(gateway, f"{a}/img", f"{a}/to?u=ftp://x/y"), "not http(s)", second)


def test_timeouts(
    fake_language: tuple[str, FakeLanguage],  # noqa: F811
    image_servers: tuple[str, str],
) -> None:
    a, _ = image_servers
    config = gateway_config(
        fake_language[0], allow_private_media_addresses=True, remote_image_timeout_s=0.5
    )
    with serve(config) as gateway:
        refused(ask(gateway, f"{a}/slow"), "timed out after 0.5 s")
    one_slot = gateway_config(
        fake_language[0],
        allow_private_media_addresses=True,
        remote_image_timeout_s=1.0,
        max_concurrent_image_fetches=1,
    )
    with serve(one_slot) as gateway:  # the second fetch waits for the first's slot
        started = time.monotonic()
        response = ask(gateway, f"{a}/img", f"{a}/slow")
        assert response.status_code == 400 and "timed out" in response.text
        assert time.monotonic() - started < 5


def test_fetching_counts_against_the_requests_deadline(
    fake_language: tuple[str, FakeLanguage],  # noqa: F811
    image_servers: tuple[str, str],
) -> None:
    """The deadline starts when the request arrives: a fetch that outlasts it ends the
    request with a 504 naming the deadline, whatever time the fetch itself was allowed."""
    a, _ = image_servers
    config = gateway_config(
        fake_language[0], allow_private_media_addresses=True, remote_image_timeout_s=10.0
    )
    with serve(config) as gateway:
        body = chat([image_part(f"{a}/slow"), {"type": "text", "text": "describe"}])
        response = httpx.post(
            f"{gateway}/v1/chat/completions",
            json=body,
            headers={"X-Request-Timeout": "0.5"},
            timeout=30,
        )
        assert response.status_code == 504, response.text
        assert "did not finish within 0.5 s (X-Request-Timeout 0.5)" in response.text
        assert ask(gateway, f"{a}/img").status_code == 200  # and the gateway still serves


def test_host_header_reaches_the_server(image_servers: tuple[str, str]) -> None:
    a, _ = image_servers
    port = a.rsplit(":", 1)[1]
    guard = fetcher(["127.0.0.2"], allow_private_media_addresses=True)

    async def fetch() -> bytes:
        try:
            return await guard.fetch(f"http://pictures.test:{port}/img", PARAM)
        finally:
            await guard.aclose()

    assert asyncio.run(fetch()) == IMAGE  # connected to 127.0.0.2, the name kept in Host
    assert f"pictures.test:{port}" in ImageHandler.hosts_seen


def test_allow_list(
    fake_language: tuple[str, FakeLanguage],  # noqa: F811
    image_servers: tuple[str, str],
) -> None:
    a, b = image_servers
    only_b = gateway_config(fake_language[0], allowed_media_domains=("127.0.0.3",))
    with serve(only_b) as gateway:
        refused(ask(gateway, f"{a}/img"), "not in --allowed-media-domains")
        refused(ask(gateway, f"{b}/img"), "loopback")  # listed, but still not private-ok
    both = gateway_config(
        fake_language[0],
        allowed_media_domains=("127.0.0.2", "127.0.0.3"),
        allow_private_media_addresses=True,
    )
    with serve(both) as gateway:
        assert ask(gateway, f"{a}/to?u={b}/img").status_code == 200  # B is listed
        refused(ask(gateway, f"{a}/to?u=http://127.0.0.4:9/img"), "not in --allowed")


def test_config_and_flags() -> None:
    import argparse

    from gateway.cli import config_from_args, register

    for bad in ({"allowed_media_domains": ("http://x/",)}, {"max_image_redirects": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GatewayConfig(**bad)
    with pytest.raises(ValueError, match="max_concurrent_image_fetches"):
        GatewayConfig(max_concurrent_image_fetches=0)
    assert GatewayConfig(allowed_media_domains="a.example, ::1").allowed_media_domains == (  # type: ignore[arg-type]
        "a.example",
        "::1",
    )
    parser = argparse.ArgumentParser(prog="dvd")
    register(parser.add_subparsers())

    def config(*argv: str) -> GatewayConfig:
        return config_from_args(parser.parse_args(["gateway", *argv]))

    assert config().remote_images and not config().allow_private_media_addresses
    assert not config("--remote-images", "off").remote_images
    assert config("--remote-images", "off", "--allow-remote-images").remote_images  # old flag
    assert not config("--no-allow-remote-images").remote_images
    listed = config("--allowed-media-domains", "a.example,b.example", "--max-image-redirects", "1")
    assert listed.allowed_media_domains == ("a.example", "b.example")
    assert listed.max_image_redirects == 1
