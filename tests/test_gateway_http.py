"""HTTP hardening and drain of a real `dvd gateway` process (in front of the fake language
server of tests/test_gateway.py, on loopback): idle connections kept past the old 5 s, a
slow body cut off with 408, oversized headers refused with 431, and SIGTERM draining.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.systems import free_port
from gateway.cli import config_from_args
from tests.test_gateway import (
    FakeLanguage,
    chat,
    fake_language,  # noqa: F401  (a fixture)
    wait_healthy,
)

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def gateway(
    fake_language: tuple[str, FakeLanguage],  # noqa: F811
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """A `dvd gateway` process; extra flags come from the test's `gateway_flags` mark."""
    mark = request.node.get_closest_marker("gateway_flags")
    extra = list(mark.args) if mark else []
    port = free_port()
    env = {**os.environ, "DVD_GATEWAY_PORT": str(port)}
    argv = [sys.executable, "-m", "dvd", "gateway", "--language", fake_language[0], *extra]
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url, process, log
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _http_get(sock: socket.socket, path: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode())
    return _read_response(sock)


def _read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_flags_reach_the_config() -> None:
    from dvd.cli import build_parser

    args = build_parser().parse_args(["gateway"])
    config = config_from_args(args)
    assert (config.keep_alive_timeout_s, config.body_read_timeout_s) == (75.0, 30.0)
    assert (config.max_header_bytes, config.drain_timeout_s) == (32 * 1024, 30.0)
    args = build_parser().parse_args(["gateway", "--drain-timeout-s", "0"])
    with pytest.raises(ValueError, match="drain_timeout_s"):
        config_from_args(args)


@pytest.mark.gateway_flags("--keep-alive-timeout-s", "75")
def test_an_idle_connection_outlives_uvicorns_old_five_seconds(
    gateway: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    url, _, _ = gateway
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as sock:
        assert _http_get(sock, "/health").startswith(b"HTTP/1.1 200")
        time.sleep(6)  # past uvicorn's default of 5 s, which closed it under the client
        assert _http_get(sock, "/health").startswith(b"HTTP/1.1 200")


@pytest.mark.gateway_flags("--body-read-timeout-s", "1")
def test_a_body_that_stops_arriving_gets_408(
    gateway: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    url, process, _ = gateway
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=15) as sock:
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"model": "')  # and then nothing more
        response = _read_response(sock)
    assert response.startswith(b"HTTP/1.1 408")
    assert json.loads(response.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    assert process.poll() is None
    assert httpx.post(f"{url}/v1/chat/completions", json=chat("hi"), timeout=10).status_code == 200


@pytest.mark.gateway_flags("--max-header-bytes", "4096")
def test_oversized_headers_get_431(gateway: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    url, _, _ = gateway
    response = httpx.get(f"{url}/v1/models", headers={"x-padding": "a" * 5000}, timeout=10)
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "request_headers_too_large"
    assert httpx.get(f"{url}/v1/models", headers={"x-padding": "a" * 100}).status_code == 200


def test_sigterm_drains_streams_in_flight_and_turns_new_requests_away(
    gateway: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    url, process, log = gateway
    chunks: list[str] = []
    started = threading.Event()

    def stream() -> None:  # ~10 s of tokens from the fake server's "slow" mode
        body = {**chat("slow"), "stream": True, "max_tokens": 1000}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as reply:
            for line in reply.iter_lines():
                started.set()
                chunks.append(line)

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(20)
    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/ready", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "/ready did not turn 503 while draining"
        time.sleep(0.1)
    refused = httpx.post(f"{url}/v1/chat/completions", json=chat("hi"), timeout=10)
    assert refused.status_code == 503
    assert refused.headers["connection"] == "close" and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "server_shutting_down"
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200  # still alive
    reader.join(60)
    # The stream in flight ran to its end: every one of the fake server's 400 tokens (the
    # fake's slow mode then ends without a finish_reason, which the gateway reports).
    tokens = [line for line in chunks if line.startswith("data: {") and '"x"' in line]
    assert len(tokens) == 400, chunks[-3:]
    assert process.wait(30) == 0
    assert "draining" in log.read_text()


@pytest.mark.gateway_flags("--max-concurrent-requests", "2", "--max-queued-requests", "2")
def test_beyond_the_admission_limit_a_429_with_retry_after_and_nothing_lost(
    gateway: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    """Eight slow streams at once against 2 places and 2 queue slots: 4 are served (2 at
    once, 2 after waiting), 4 get 429 at once; no 5xx, nothing hangs."""
    url, process, _ = gateway
    statuses: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        body = {**chat("slow"), "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as reply:
            if reply.status_code == 429:
                assert reply.headers["retry-after"] == "1"
                assert json.loads(reply.read())["error"]["code"] == "rate_limit_exceeded"
            else:
                for _ in reply.iter_lines():
                    pass
            with lock:
                statuses.append(reply.status_code)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(90)
    assert sorted(statuses) == [200] * 4 + [429] * 4, statuses
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert "dvd_gateway_admission_rejected_total 4.0" in metrics
    assert "dvd_gateway_admission_wait_seconds_count 4.0" in metrics
    assert process.poll() is None
