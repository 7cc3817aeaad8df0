"""The gateway's language pool behind a DNS name, with real processes on loopback.

Language servers are tests/fake_language_server.py processes on 127.0.0.2, 127.0.0.3 (and
127.0.0.4), one port for all, as pods behind a headless Service; benchmarks/dns_server.py
answers for the name, and the tests change its records as Kubernetes would. The gateway is
the real app under uvicorn, driven over HTTP.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.dns_server import DnsServer
from dvd.v1 import common_pb2, language_pb2, language_pb2_grpc
from gateway.affinity import conversation_key
from gateway.config import GatewayConfig
from gateway.scrape import merge
from tests.fake_language_server import MODEL
from tests.test_gateway import serve

pytestmark = pytest.mark.timeout(120)

NAME = "language.test"
RESOLVE_S = 0.5


def shared_port(hosts: list[str]) -> int:
    """A port free on every one of `hosts` (loopback addresses)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts:
                with socket.socket() as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {hosts}")


class Servers:
    """Fake language server processes, one per loopback host, on one port."""

    def __init__(self, port: int, delay_s: float) -> None:
        self.port = port
        self.delay_s = delay_s
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def address(self, host: str) -> str:
        return f"{host}:{self.port}"

    def start(self, *hosts: str) -> None:
        for host in hosts:
            argv = [sys.executable, "-m", "tests.fake_language_server", "--host", host]
            argv += ["--port", str(self.port), "--delay-s", str(self.delay_s)]
            self.processes[host] = subprocess.Popen(argv)
        for host in hosts:
            self._wait_serving(host)

    def _wait_serving(self, host: str) -> None:
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(self.address(host)) as channel:
            stub = language_pb2_grpc.LanguageServiceStub(channel)
            while True:
                try:
                    stub.Health(common_pb2.HealthRequest(), timeout=1)
                    return
                except grpc.RpcError:
                    assert self.processes[host].poll() is None, f"{host} exited"
                    assert time.monotonic() < deadline, f"{host} did not start"
                    time.sleep(0.1)

    def kill(self, host: str) -> None:
        self.processes[host].send_signal(signal.SIGKILL)
        self.processes[host].wait()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture
def world() -> Iterator[tuple[DnsServer, Servers]]:
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    servers = Servers(shared_port(hosts), delay_s=0.02)
    with DnsServer() as dns:
        try:
            yield dns, servers
        finally:
            servers.stop()


def gateway_config(dns: DnsServer, port: int, **fields: Any) -> GatewayConfig:
    return GatewayConfig(
        language_addresses=(f"dns:///{NAME}:{port}",),
        dns_server=dns.address,
        language_resolve_s=RESOLVE_S,
        health_timeout_s=1.0,
        **fields,
    )


def chat_body(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": MODEL, "messages": messages, "max_tokens": 4}


async def load(
    url: str, bodies: list[dict[str, Any]], concurrency: int, during: Any = None
) -> list[str]:
    """Posts every body, `concurrency` at a time; returns who served each (in order).
    `during(done)` is called after each reply, to act while the load runs."""
    served: list[str] = [""] * len(bodies)
    queue = list(enumerate(bodies))
    done = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        while queue:
            index, body = queue.pop(0)
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            served[index] = response.json()["choices"][0]["message"]["content"].split()[-1]
            done += 1
            if during is not None:
                during(done)

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return served


def shares(served: list[str]) -> dict[str, float]:
    return {member: count / len(served) for member, count in Counter(served).items()}


def wait_until(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_least_loaded_pool_survives_a_kill_and_finds_a_new_member(
    world: tuple[DnsServer, Servers],
) -> None:
    dns, servers = world
    a, b, c = (servers.address(h) for h in ("127.0.0.2", "127.0.0.3", "127.0.0.4"))
    servers.start("127.0.0.2", "127.0.0.3")
    dns.set(NAME, ["127.0.0.2", "127.0.0.3"])
    body = chat_body([{"role": "user", "content": "hi"}])
    with serve(gateway_config(dns, servers.port)) as url:
        # Two members behind one name share the load.
        served = asyncio.run(load(url, [body] * 80, concurrency=8))
        assert set(served) == {a, b}
        for member, share in shares(served).items():
            assert 0.4 <= share <= 0.6, (member, shares(served))
        ready = httpx.get(f"{url}/ready", timeout=10)
        assert ready.status_code == 200 and ready.json()["serving"] == 2
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'dvd_gateway_healthy_members{tier="language"} 2.0' in metrics
        calls = {
            s.labels["member"]: s.value
            for f in text_string_to_metric_families(metrics)
            if f.name == "dvd_gateway_member_calls"
            for s in f.samples
            if s.name.endswith("_total")
        }
        assert calls == {a: served.count(a), b: served.count(b)}

        # One is killed under load: no call fails (those that had not begun move on).
        def kill_b(done: int) -> None:
            if done == 30:
                servers.kill("127.0.0.3")

        served = asyncio.run(load(url, [body] * 120, concurrency=8, during=kill_b))
        assert served[-20:] == [a] * 20
        ready = httpx.get(f"{url}/ready", timeout=10)
        assert ready.status_code == 200, ready.text
        members = {m["address"]: m for m in ready.json()["members"]}
        assert members[b]["serving"] is False and members[a]["serving"] is True

        # A third appears (and the dead one leaves DNS): it gets calls within one period.
        servers.start("127.0.0.4")
        dns.set(NAME, ["127.0.0.2", "127.0.0.4"])
        time.sleep(RESOLVE_S + 0.2)
        served = asyncio.run(load(url, [body] * 20, concurrency=2))
        assert set(served) == {a, c}, Counter(served)
        wait_until(
            lambda: b not in httpx.get(f"{url}/ready", timeout=10).text,
            5,
            "the vanished member is still listed",
        )


def test_prefix_affine_keeps_conversations_on_one_member(
    world: tuple[DnsServer, Servers],
) -> None:
    dns, servers = world
    servers.delay_s = 0.01
    servers.start("127.0.0.2", "127.0.0.3")
    dns.set(NAME, ["127.0.0.2", "127.0.0.3"])
    system = {"role": "system", "content": "You are terse."}
    first = [[system, {"role": "user", "content": f"question {i}"}] for i in range(300)]
    second = [
        [*turn, {"role": "assistant", "content": "served"}, {"role": "user", "content": "more"}]
        for turn in first
    ]
    config = gateway_config(dns, servers.port, language_routing="prefix-affine")
    with serve(config) as url:
        # One at a time: nothing is loaded, so every key goes to its own member.
        turn1 = asyncio.run(load(url, [chat_body(m) for m in first], concurrency=1))
        turn2 = asyncio.run(load(url, [chat_body(m) for m in second], concurrency=1))
        assert turn1 == turn2, "a conversation's next turn moved"
        for member, share in shares(turn1).items():
            assert 0.4 <= share <= 0.6, (member, shares(turn1))
        # One hot conversation under load: its member may run at most 4 calls ahead of the
        # other (dvd.routing's slack); what is over that goes to the other member.
        served = asyncio.run(load(url, [chat_body(first[0])] * 80, concurrency=8))
        # Without the bound one member would take all 80; with it the other takes the
        # overflow: about a quarter at 8 in flight (6 + 2).
        assert len(shares(served)) == 2
        for member, share in shares(served).items():
            assert 0.1 <= share <= 0.9, (member, shares(served))


def test_ready_is_503_while_the_name_resolves_to_nothing() -> None:
    with DnsServer() as dns, serve(gateway_config(dns, 50061)) as url:
        ready = httpx.get(f"{url}/ready", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["members"] == []
        assert "resolved to no address" in ready.json()["error"]["message"]
        response = httpx.post(f"{url}/v1/chat/completions", json=chat_body([]), timeout=10)
        assert response.status_code == 400  # bad input is still checked first
        hi = chat_body([{"role": "user", "content": "hi"}])
        response = httpx.post(f"{url}/v1/chat/completions", json=hi, timeout=10)
        assert response.status_code == 503
        assert "resolved to no address" in response.json()["error"]["message"]


def message(role: str, *parts: str | bytes) -> language_pb2.ChatMessage:
    content = [
        language_pb2.ContentPart(image=p)
        if isinstance(p, bytes)
        else language_pb2.ContentPart(text=p)
        for p in parts
    ]
    return language_pb2.ChatMessage(role=role, content=content)


def test_conversation_key_is_the_leading_messages() -> None:
    def key(*messages: language_pb2.ChatMessage) -> bytes:
        return conversation_key(language_pb2.GenerateRequest(messages=messages))

    system, question = message("system", "be terse"), message("user", b"\x89PNG", "what?")
    turn1 = key(system, question)
    assert turn1 == key(system, question, message("assistant", "a cat"), message("user", "more"))
    assert turn1 != key(system, message("user", b"\x89PNG!", "what?"))  # another image
    assert turn1 != key(message("system", "be verbose"), question)
    assert turn1 != key(question)
    assert key(message("user", "ab", "c")) != key(message("user", "a", "bc"))


def test_merged_metrics_parse_with_one_family_per_name() -> None:
    from gateway.metrics import GatewayMetrics
    from language_server.metrics import LanguageMetrics
    from vision_server.metrics import VisionMetrics

    gateway = GatewayMetrics()
    sources = [
        ("127.0.0.1:1", VisionMetrics().registry),
        ("127.0.0.1:2", VisionMetrics().registry),  # a second replica: the same families
        ("127.0.0.1:3", LanguageMetrics().registry),
    ]
    from prometheus_client import generate_latest

    texts = [(source, generate_latest(registry).decode()) for source, registry in sources]
    texts.append(("127.0.0.1:4", "not an exposition {"))
    merged = merge(gateway.render(), texts).decode()
    families = list(text_string_to_metric_families(merged))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), "a family appears twice"
    assert {"dvd_gateway_requests", "dvd_vision_requests", "dvd_language_requests"} <= set(names)
    vision = next(f for f in families if f.name == "dvd_vision_requests_in_flight")
    assert {s.labels["source"] for s in vision.samples} == {"127.0.0.1:1", "127.0.0.1:2"}
