"""Tests of the gateway: the real app under real uvicorn on loopback, driven with httpx.

Language servers are either absent (an address with nothing listening) or a small fake gRPC
LanguageService in this process, so these tests need no model, GPU or vision server.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager, redirect_stdout
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
from PIL import Image

from benchmarks.systems import free_port
from dvd.discovery import make_resolver, parse_target
from dvd.v1 import common_pb2, language_pb2, language_pb2_grpc
from gateway.app import create_app
from gateway.backends import BackendPool
from gateway.config import GatewayConfig
from gateway.convert import ModelLimits, to_generate_request
from gateway.errors import ApiError
from gateway.images import check_image, decode_data_url
from gateway.protocol import ChatCompletionRequest

pytestmark = pytest.mark.timeout(60)

MODEL = "test-model"
IMAGE_TOKENS = 256


# ---- helpers ------------------------------------------------------------------------------


def png(width: int = 32, height: int = 24, color: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(content: Any, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


@contextmanager
def serve(config: GatewayConfig) -> Iterator[str]:
    """Runs the gateway under uvicorn in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), log_level="warning", lifespan="on", access_log=False)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("gateway did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def wait_healthy(url: str, process: Any, timeout_s: float = 30) -> None:
    """Waits until a `dvd gateway` process answers /health (it must not exit meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, "dvd gateway exited"
        assert time.monotonic() < deadline, "dvd gateway did not come up"
        time.sleep(0.1)


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


def sse_events(text: str) -> list[Any]:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ---- a fake language server ---------------------------------------------------------------


class FakeLanguage(language_pb2_grpc.LanguageServiceServicer):
    """Answers by the last text part of the request: "fail-before", "fail-after", "slow"."""

    def __init__(self) -> None:
        self.requests: list[language_pb2.GenerateRequest] = []
        self.request_ids: list[str] = []
        self.cancelled = threading.Event()

    def Generate(self, request: Any, context: Any) -> Iterator[language_pb2.GenerateResponse]:
        self.requests.append(request)
        self.request_ids.append(dict(context.invocation_metadata()).get("x-request-id", ""))
        texts = [
            p.text for m in request.messages for p in m.content if p.WhichOneof("kind") == "text"
        ]
        images = sum(p.WhichOneof("kind") == "image" for m in request.messages for p in m.content)
        mode = texts[-1] if texts else ""
        if mode == "fail-before":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image 0: cannot identify image file")
        if mode == "slow":
            context.add_callback(self.cancelled.set)
            for _ in range(400):
                if not context.is_active():
                    return
                yield language_pb2.GenerateResponse(text="x", token_ids=[1])
                time.sleep(0.025)
            return
        yield language_pb2.GenerateResponse(text="Hello", token_ids=[11])
        if mode == "fail-after":
            context.abort(grpc.StatusCode.INTERNAL, "engine died")
        yield language_pb2.GenerateResponse(text=" world", token_ids=[12, 13])
        yield language_pb2.GenerateResponse(
            text="!",
            token_ids=[14],
            finish_reason="length",
            usage=language_pb2.Usage(
                prompt_tokens=10 + IMAGE_TOKENS * images,
                image_tokens=IMAGE_TOKENS * images,
                completion_tokens=4,
            ),
            timings=language_pb2.StageTimings(
                encode_ns=5_000_000 if images else 0, prefill_ns=20_000_000, decode_ns=30_000_000
            ),
        )

    def Info(self, request: Any, context: Any) -> language_pb2.LanguageInfo:
        return language_pb2.LanguageInfo(
            model=MODEL, max_model_len=4096, mode="dvd", accepts_video=True
        )

    def Health(self, request: Any, context: Any) -> common_pb2.HealthResponse:
        return common_pb2.HealthResponse(status=common_pb2.HealthResponse.STATUS_SERVING)


@pytest.fixture(scope="module")
def fake_language() -> Iterator[tuple[str, FakeLanguage]]:
    servicer = FakeLanguage()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    language_pb2_grpc.add_LanguageServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


@pytest.fixture(scope="module")
def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def no_backend(dead_address: str) -> Iterator[str]:
    """A gateway whose only language server has nothing listening."""
    config = GatewayConfig(
        language_addresses=(dead_address,),
        served_model_name=MODEL,
        max_image_pixels=1_000_000,
        max_images_per_request=2,
        max_request_bytes=512 * 1024,
        health_timeout_s=1.0,
        remote_images=False,  # no test may reach beyond loopback (tests/test_media_guard.py)
    )
    with serve(config) as url:
        yield url


@pytest.fixture(scope="module")
def with_backend(fake_language: tuple[str, FakeLanguage], dead_address: str) -> Iterator[str]:
    """A gateway with one dead and one working language server (model name from Info)."""
    config = GatewayConfig(language_addresses=(dead_address, fake_language[0]))
    with serve(config) as url:
        yield url


# ---- bad input: the right 4xx, OpenAI's shape, and still healthy afterwards ------------------

BAD_REQUESTS: list[tuple[str, Any, int, str]] = [
    ("invalid json", b'{"messages": [', 400, "not valid JSON"),
    ("empty body", b"", 400, "not valid JSON"),
    ("no messages", {"model": MODEL, "messages": []}, 400, "messages"),
    ("missing messages", {"model": MODEL}, 400, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("no content", {"messages": [{"role": "user"}]}, 400, "needs content"),
    ("bad part type", chat([{"type": "audio", "audio": "x"}]), 400, "content"),
    ("n=2", chat("hi", n=2), 400, "only n=1"),
    ("temperature", chat("hi", temperature=3), 400, "temperature"),
    ("top_p zero", chat("hi", top_p=0), 400, "top_p"),
    ("five stops", chat("hi", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("max_tokens 0", chat("hi", max_tokens=0), 400, "max_tokens"),
    ("not base64", chat([image_part("data:image/png;base64,@@not*base64@@")]), 400, "base64"),
    ("no base64 marker", chat([image_part("data:image/png,abcd")]), 400, "base64"),
    ("not an image mime", chat([image_part(data_url(b"hello", "text/plain"))]), 400, "MIME"),
    ("not an image", chat([image_part(data_url(b"hello, not an image"))]), 400, "not an image"),
    ("too many pixels", chat([image_part(data_url(png(1200, 1000)))]), 400, "pixels"),
    (
        "too many images",
        chat([image_part(data_url(png())) for _ in range(3)]),
        400,
        "at most 2",
    ),
    ("remote image", chat([image_part("https://example.com/cat.png")]), 400, "data:image"),
    ("file url", chat([image_part("file:///etc/passwd")]), 400, "scheme"),
    ("oversize body", chat("x" * 600_000), 413, "larger than"),
    ("unknown model", {**chat("hi"), "model": "gpt-4o"}, 404, "gpt-4o"),
]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_input_gets_openai_error(no_backend: str, body: Any, status: int, needle: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=no_backend, timeout=10) as client:
        response = client.post(
            "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
        )
        error = assert_openai_error(response, status)
        assert needle in error["message"]
        assert response.headers["x-request-id"]
        if status == 404:
            assert error["code"] == "model_not_found"
        if status < 500:
            assert error["type"] == "invalid_request_error"
        assert client.get("/health").status_code == 200


def test_bad_field_is_named_in_param(no_backend: str) -> None:
    body = chat([{"type": "text", "text": "hi"}, image_part(data_url(b"not an image"))])
    response = httpx.post(f"{no_backend}/v1/chat/completions", json=body, timeout=10)
    error = assert_openai_error(response, 400)
    assert error["param"] == "messages[0].content[1].image_url.url"


def test_unreachable_backend_is_503_before_streaming(no_backend: str, dead_address: str) -> None:
    for stream in (False, True):
        response = httpx.post(
            f"{no_backend}/v1/chat/completions", json=chat("hi", stream=stream), timeout=10
        )
        error = assert_openai_error(response, 503)
        assert dead_address in error["message"]


def test_health_ready_metrics_without_backend(no_backend: str, dead_address: str) -> None:
    with httpx.Client(base_url=no_backend, timeout=10) as client:
        assert client.get("/health").json() == {"status": "ok"}
        ready = client.get("/ready")
        assert ready.status_code == 503
        body = ready.json()
        assert body["ready"] is False
        assert dead_address in body["error"]["message"]
        assert body["members"][0]["address"] == dead_address
        assert body["members"][0]["serving"] is False
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        for name in (
            "dvd_gateway_requests_total",
            "dvd_gateway_requests_in_flight",
            "dvd_gateway_request_seconds",
            "dvd_gateway_ttft_seconds",
            "dvd_gateway_tpot_seconds",
            "dvd_gateway_stage_seconds",
            "dvd_gateway_prompt_tokens_total",
            "dvd_gateway_image_tokens_total",
            "dvd_gateway_completion_tokens_total",
        ):
            assert name in metrics.text
        assert client.get("/nope").status_code == 404
        assert_openai_error(client.get("/nope"), 404)


def test_models_uses_served_name(no_backend: str) -> None:
    body = httpx.get(f"{no_backend}/v1/models", timeout=10).json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in body["data"]] == [
        (MODEL, "model", "dvd-serve")
    ]


# ---- with a (fake) language server ----------------------------------------------------------


def test_models_and_ready_from_backend(with_backend: str, dead_address: str) -> None:
    models = httpx.get(f"{with_backend}/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == MODEL
    assert models["data"][0]["max_model_len"] == 4096
    ready = httpx.get(f"{with_backend}/ready", timeout=10)
    assert ready.status_code == 200, ready.text  # one member serving is enough to serve
    members = {m["address"]: m for m in ready.json()["members"]}
    assert members[dead_address]["serving"] is False  # the dead one is listed, not fatal
    assert "UNAVAILABLE" in members[dead_address]["detail"]
    assert ready.json()["serving"] == 1


def test_non_streaming_completion(
    with_backend: str, fake_language: tuple[str, FakeLanguage]
) -> None:
    body = chat([{"type": "text", "text": "describe"}, image_part(data_url(png()))])
    for _ in range(4):  # the dead backend is skipped every time (retry on UNAVAILABLE)
        response = httpx.post(
            f"{with_backend}/v1/chat/completions",
            json=body,
            headers={"x-request-id": "req-123"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == "req-123"
        completion = response.json()
        assert completion["object"] == "chat.completion"
        assert completion["id"] == "chatcmpl-req-123"
        assert completion["model"] == MODEL
        choice = completion["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": "Hello world!"}
        assert choice["finish_reason"] == "length"
        assert completion["usage"] == {
            "prompt_tokens": 10 + IMAGE_TOKENS,
            "completion_tokens": 4,
            "total_tokens": 14 + IMAGE_TOKENS,
            "dvd_timings": FAKE_TIMINGS,
        }
    assert fake_language[1].requests[-1].request_id == "req-123"
    assert fake_language[1].request_ids[-1] == "req-123"


FAKE_TIMINGS = {"encode_ns": 5_000_000, "prefill_ns": 20_000_000, "decode_ns": 30_000_000}
"""The stage timings the fake language server reports, passed through as usage.dvd_timings."""


def test_streaming_completion(with_backend: str) -> None:
    body = chat("hi", stream=True, stream_options={"include_usage": True})
    response = httpx.post(f"{with_backend}/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello world!"
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "length" and set(finish[:-1]) == {None}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "total_tokens": 14,
        "dvd_timings": {k: v for k, v in FAKE_TIMINGS.items() if k != "encode_ns"},  # no image
    }


def test_streaming_without_usage(with_backend: str) -> None:
    response = httpx.post(
        f"{with_backend}/v1/chat/completions", json=chat("hi", stream=True), timeout=10
    )
    chunks = sse_events(response.text)[:-1]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_backend_error_before_first_message_is_http_error(with_backend: str) -> None:
    for stream in (False, True):
        response = httpx.post(
            f"{with_backend}/v1/chat/completions",
            json=chat("fail-before", stream=stream),
            timeout=10,
        )
        error = assert_openai_error(response, 400)
        assert "cannot identify image file" in error["message"]


def test_backend_error_mid_stream_is_sse_error_event(with_backend: str) -> None:
    response = httpx.post(
        f"{with_backend}/v1/chat/completions", json=chat("fail-after", stream=True), timeout=10
    )
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[-1] != "[DONE]"
    assert events[-1]["error"]["message"] == "engine died"
    assert events[-1]["error"]["type"] == "server_error"
    nonstream = httpx.post(
        f"{with_backend}/v1/chat/completions", json=chat("fail-after"), timeout=10
    )
    assert_openai_error(nonstream, 500)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_generation(
    with_backend: str, fake_language: tuple[str, FakeLanguage], stream: bool
) -> None:
    servicer = fake_language[1]
    servicer.cancelled.clear()
    url = f"{with_backend}/v1/chat/completions"
    if stream:
        with (
            httpx.Client(timeout=10) as client,
            client.stream("POST", url, json=chat("slow", stream=True)) as response,
        ):
            assert response.status_code == 200
            next(response.iter_bytes())
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=chat("slow"), timeout=httpx.Timeout(10, read=0.5))
    assert servicer.cancelled.wait(5), "the Generate call was not cancelled"
    metrics = httpx.get(f"{with_backend}/metrics", timeout=10).text
    assert 'dvd_gateway_requests_total{status="499"}' in metrics


def test_metrics_count_tokens_and_stages(with_backend: str) -> None:
    body = chat([{"type": "text", "text": "describe"}, image_part(data_url(png()))])
    assert httpx.post(f"{with_backend}/v1/chat/completions", json=body, timeout=10).is_success
    text = httpx.get(f"{with_backend}/metrics", timeout=10).text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['dvd_gateway_requests_total{status="200"}'] >= 1
    assert values["dvd_gateway_image_tokens_total"] >= IMAGE_TOKENS
    assert values["dvd_gateway_prompt_tokens_total"] >= 10 + IMAGE_TOKENS
    assert values["dvd_gateway_completion_tokens_total"] >= 4
    assert values['dvd_gateway_stage_seconds_count{stage="encode"}'] >= 1
    assert values['dvd_gateway_stage_seconds_count{stage="decode"}'] >= 1
    assert values["dvd_gateway_ttft_seconds_count"] >= 1
    assert values["dvd_gateway_requests_in_flight"] == 0


# ---- units: images, conversion, routing, config ----------------------------------------------


def test_decode_data_url() -> None:
    image = png()
    assert decode_data_url(data_url(image), 1 << 20, "p") == image
    wrapped = data_url(image).replace("base64,", "base64,\n")
    assert decode_data_url(wrapped, 1 << 20, "p") == image
    for bad in ("data:image/png;base64,%%%", "data:text/plain;base64,aGk=", "data:image/png,x"):
        with pytest.raises(ApiError) as info:
            decode_data_url(bad, 1 << 20, "p")
        assert info.value.status == 400 and info.value.param == "p"
    with pytest.raises(ApiError, match="larger than"):
        decode_data_url(data_url(image), len(image) - 1, "p")


def test_check_image() -> None:
    header = check_image(png(40, 30), 10_000, "p")
    assert (header.format, header.width, header.height) == ("PNG", 40, 30)
    with pytest.raises(ApiError, match="not an image"):
        check_image(b"GIF? no", 10_000, "p")
    with pytest.raises(ApiError, match="pixels"):
        check_image(png(200, 100), 10_000, "p")


def test_conversion_keeps_order_bytes_and_sampling() -> None:
    first, second = png(color="red"), png(8, 8, color="blue")
    request = ChatCompletionRequest.model_validate(
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        image_part(data_url(first)),
                        {"type": "text", "text": "compare with"},
                        {"type": "image_url", "image_url": {"url": data_url(second, "image/jpeg")}},
                    ],
                },
                {"role": "assistant", "content": "ok"},
            ],
            "max_tokens": 50,
            "max_completion_tokens": 64,
            "temperature": 0,
            "top_p": 0.9,
            "seed": 7,
            "stop": "\n\n",
            "ignore_eos": True,
            "logprobs": False,
            "some_future_field": {"x": 1},
        }
    )
    converted = asyncio.run(
        to_generate_request(request, "chatcmpl-1", GatewayConfig(), None, ModelLimits(4096, 4))
    )
    assert converted.request_id == "chatcmpl-1"
    assert [m.role for m in converted.messages] == ["system", "user", "assistant"]
    assert converted.messages[0].content[0].text == "be brief"
    parts = converted.messages[1].content
    assert [p.WhichOneof("kind") for p in parts] == ["image", "text", "image"]
    assert parts[0].image == first and parts[2].image == second
    assert parts[1].text == "compare with"
    sampling = converted.sampling
    assert sampling.max_tokens == 64  # max_completion_tokens wins
    assert sampling.temperature == 0.0
    assert sampling.top_p == pytest.approx(0.9)
    assert (sampling.seed, sampling.has_seed) == (7, True)
    assert list(sampling.stop) == ["\n\n"]
    assert sampling.ignore_eos is True


def test_conversion_defaults_and_token_limits() -> None:
    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}]}
    )
    sampling = asyncio.run(to_generate_request(request, "r", GatewayConfig())).sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p) == (0, 1.0, 1.0)
    assert sampling.has_seed is False and list(sampling.stop) == []
    capped = asyncio.run(to_generate_request(request, "r", GatewayConfig(max_tokens_limit=100)))
    assert capped.sampling.max_tokens == 100
    too_many = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 101}
    )
    with pytest.raises(ApiError, match="limit of 100"):
        asyncio.run(to_generate_request(too_many, "r", GatewayConfig(max_tokens_limit=100)))
    with pytest.raises(ApiError, match="context of 64"):
        asyncio.run(to_generate_request(too_many, "r", GatewayConfig(), None, ModelLimits(64)))


def test_pick_least_outstanding_then_round_robin() -> None:
    async def check() -> None:
        targets = [parse_target(a) for a in ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")]
        pool = BackendPool(targets, make_resolver())
        await pool.start()  # addresses need no DNS; channels connect on first call only
        try:
            a, b, c = (t.port for t in targets)
            backends = pool.backends

            def picked(exclude: frozenset[str] | set[str] = frozenset()) -> int:
                return int(pool.pick(exclude).address.rsplit(":", 1)[1])

            assert [picked() for _ in range(6)] == [a, b, c] * 2
            backends[0].outstanding = 2
            backends[2].outstanding = 1
            assert picked() == b
            backends[1].outstanding = 5
            assert picked() == c
            assert picked(exclude={backends[2].address}) == a
            backends[0].unavailable_until = time.monotonic() + 60  # just answered UNAVAILABLE
            assert picked(exclude={backends[2].address}) == b
            for backend in backends:
                backend.unavailable_until = time.monotonic() + 60
            assert picked() == c  # all cooling down: routing as if none were
            for backend in backends:
                backend.unavailable_until = 0.0
            backends[2].serving = False  # its last Health said NOT_SERVING
            assert picked() == a
        finally:
            await pool.close()

    asyncio.run(check())


def test_config_rejects_bad_values() -> None:
    cases: dict[str, dict[str, Any]] = {
        "language_addresses": {"language_addresses": ("no-port",)},
        "language_routing": {"language_routing": "random"},
        "language_resolve_s": {"language_resolve_s": 0},
        "dns_server": {"dns_server": "dns.example:53"},
        "scrape_metrics": {"scrape_metrics": ("127.0.0.1:9101",)},
        "max_image_bytes": {"max_image_bytes": 0},
        "port": {"port": 70000},
        "request_timeout_s": {"request_timeout_s": 0},
        "log_level": {"log_level": "loud"},
        "served_model_name": {"served_model_name": " "},
    }
    for field, kwargs in cases.items():
        with pytest.raises(ValueError, match=field):
            GatewayConfig(**kwargs)
    assert GatewayConfig(language_addresses="a:1, b:2").language_addresses == ("a:1", "b:2")  # type: ignore[arg-type]
    named = GatewayConfig(language_addresses=("dns:///language:50061", "[::1]:50061"))
    assert named.language_addresses == ("dns:///language:50061", "[::1]:50061")


def test_cli_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from gateway.cli import config_from_args, register

    monkeypatch.setenv("DVD_GATEWAY_MAX_IMAGES_PER_REQUEST", "3")
    parser = argparse.ArgumentParser(prog="dvd")
    register(parser.add_subparsers())
    scrape = "http://127.0.0.1:9101/metrics,http://127.0.0.1:9102/metrics"
    argv = ["gateway", "--language", "h1:1,h2:2", "--language", "h3:3", "--port", "9000"]
    argv += ["--language-routing", "prefix-affine", "--dns-server", "127.0.0.1:5353"]
    args = parser.parse_args([*argv, "--scrape-metrics", scrape])
    config = config_from_args(args)
    assert config.language_addresses == ("h1:1", "h2:2", "h3:3")
    assert (config.language_routing, config.dns_server) == ("prefix-affine", "127.0.0.1:5353")
    assert len(config.scrape_metrics) == 2 and config.language_resolve_s == 5.0
    assert (config.port, config.max_images_per_request) == (9000, 3)
    assert config.max_tokens_limit is None and config.remote_images is True
    default = config_from_args(parser.parse_args(["gateway"]))
    assert default.language_addresses == ("127.0.0.1:50061",)
    assert (default.language_routing, default.dns_server, default.scrape_metrics) == (
        "least-loaded",
        "",
        (),
    )
    out = io.StringIO()
    with pytest.raises(SystemExit), redirect_stdout(out):
        parser.parse_args(["gateway", "--help"])
    help_text = out.getvalue()
    for flag in ("--language", "--served-model-name", "--max-request-bytes", "DVD_GATEWAY_PORT"):
        assert flag in help_text


def test_official_openai_client(with_backend: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{with_backend}/v1", api_key="unused", max_retries=0)
    content = [{"type": "text", "text": "describe"}, image_part(data_url(png()))]
    messages: Any = [{"role": "user", "content": content}]
    completion = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    assert completion.choices[0].message.content == "Hello world!"
    assert completion.usage is not None and completion.usage.prompt_tokens == 10 + IMAGE_TOKENS
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello world!"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 14 + IMAGE_TOKENS
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="other", messages=messages)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.APIError, match="engine died"):
        list(
            client.chat.completions.create(
                model=MODEL, messages=chat("fail-after")["messages"], stream=True
            )
        )


def test_cli_run_serves(tmp_path: Any) -> None:
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "DVD_GATEWAY_PORT": str(port), "DVD_GATEWAY_LOG_LEVEL": "warning"}
    process = subprocess.Popen(
        [sys.executable, "-m", "dvd", "gateway", "--served-model-name", MODEL],
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        assert models["data"][0]["id"] == MODEL
    finally:
        process.terminate()
        # uvicorn shuts down gracefully, then re-raises SIGTERM on itself
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
