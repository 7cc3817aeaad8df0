"""Overload bounds and deadlines at every hop, with real processes on loopback.

Queues are filled on purpose, not by racing: the vision server here batches 8 tiles and
waits up to a minute for a batch to fill (--max-batch-tiles 8 --max-wait-ms 60000), so a
call of fewer than 8 tiles stays queued ("parked") until enough other tiles arrive, its
deadline passes or it is cancelled. Its queue holds 10 tiles (--max-queued-tiles 10), and
the images are sized for exact tile counts (tiny checkpoint, no encoder cache): 448x448 is
1 tile, 896x448 is 3, 1344x896 is 7, 1024x768 is 13. So a parked 3-tile call plus an 8-tile
call is over the bound, two parked 3-tile calls and a 2-tile call fill a batch, and a
16-tile call on an idle server is larger than the bound and runs all the same.

The gateway's own behaviour is checked against tests/fake_language_server.py processes
(busy members, calls that hang, calls that report their deadline); one real language server
(vLLM) and the gateway in front of it take the whole path: client timeout, 429s for each
bound, 504s, and the LLM request aborted when its deadline passes while decoding.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.systems import Running, free_port
from dvd.checkpoint import load_config
from dvd.encode_session import CallFailed, EncodeSession
from dvd.errors import DvdError
from dvd.grpc_options import CHANNEL_OPTIONS
from dvd.transport import receiver_class
from dvd.v1 import common_pb2, language_pb2_grpc, vision_pb2, vision_pb2_grpc
from gateway.config import GatewayConfig
from language_server.metrics import LanguageMetrics
from language_server.vision_client import VisionPool
from tests.fake_language_server import MODEL as FAKE_MODEL
from tests.images import data_url, png_bytes
from tests.test_gateway import serve
from tests.test_scale_out import _start, _wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BATCH_TILES = 8
QUEUE_TILES = 10
START_TIMEOUT_S = 240.0


def park_image(variant: int = 0) -> bytes:
    """3 tiles: fewer than a batch, so a call with it alone waits in the queue."""
    return png_bytes(896, 448, variant=variant)


def eight_tiles(variant: int = 0) -> list[bytes]:
    """7 + 1 tiles: one full batch."""
    return [png_bytes(1344, 896, variant=variant), png_bytes(448, 448, variant=variant)]


def vision_argv(model: Path, port: int, metrics_port: int) -> list[str]:
    argv = [sys.executable, "-m", "dvd", "vision", "--model", str(model)]
    argv += ["--port", str(port), "--metrics-port", str(metrics_port), "--transport", "grpc"]
    argv += ["--max-batch-tiles", str(BATCH_TILES), "--max-queued-tiles", str(QUEUE_TILES)]
    argv += ["--max-wait-ms", "60000", "--encoder-cache-mib", "0"]
    return argv


class Vision:
    """A vision server process whose queue parks calls, and its metrics."""

    def __init__(self, model: Path, workdir: Path, name: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.running = _start(name, vision_argv(model, self.port, self.metrics_port), workdir)
        _wait_serving(
            self.running, self.address, vision_pb2_grpc.VisionServiceStub, START_TIMEOUT_S
        )

    def metric(self, name: str, **labels: str) -> float:
        return metric(f"http://127.0.0.1:{self.metrics_port}/metrics", name, **labels)

    def stop(self) -> None:
        self.running.stop()


def metric(url: str, name: str, **labels: str) -> float:
    """One sample's value from a /metrics page (0 when the series does not exist yet)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Polls `check` (a bound against hangs, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def encode_request(request_id: str, images: list[bytes]) -> vision_pb2.EncodeRequest:
    return vision_pb2.EncodeRequest(
        request_id=request_id, images=[vision_pb2.ImageInput(data=d) for d in images]
    )


async def park(stub: vision_pb2_grpc.VisionServiceStub, request_id: str, variant: int) -> Any:
    """An Encode call of 3 tiles, returned once its plan came back: its tiles are queued."""
    call = stub.Encode(encode_request(request_id, [park_image(variant)]))
    first = await call.read()
    assert first.plan.num_tiles == 3
    return call


async def finish(call: Any) -> vision_pb2.EncodeDone:
    """The rest of an Encode call's stream; its `done`."""
    last = None
    while (message := await call.read()) is not grpc.aio.EOF:
        last = message
    assert last is not None and last.HasField("done")
    return last.done  # type: ignore[no-any-return]


async def serving(stub: vision_pb2_grpc.VisionServiceStub) -> bool:
    reply = await stub.Health(common_pb2.HealthRequest(), timeout=5)
    return bool(reply.status == common_pb2.HealthResponse.STATUS_SERVING)


@pytest.fixture(scope="module")
def vision(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vision]:
    server = Vision(tiny_checkpoint, tmp_path_factory.mktemp("overload-vision"), "vision-a")
    yield server
    server.stop()


# ---- the vision server alone ---------------------------------------------------------------


def test_vision_server_refuses_an_over_bound_call_and_serves_the_rest(vision: Vision) -> None:
    refused_before = vision.metric("dvd_vision_queue_full_total")

    async def main() -> None:
        async with grpc.aio.insecure_channel(vision.address, options=CHANNEL_OPTIONS) as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            first = await park(stub, "parked-1", 0)
            second = await park(stub, "parked-2", 1)  # 6 queued: within the bound
            # 6 + 8 tiles would be over 10: refused at once, on an RPC and on a session
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await finish(stub.Encode(encode_request("over", eight_tiles())))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = refused.value.details() or ""
            assert "6 tiles wait for the ViT, this call has 8 more" in details, details
            assert "the limit is 10 (--max-queued-tiles)" in details
            session = EncodeSession(stub)
            call = await session.start(encode_request("over-session", eight_tiles(1)))
            with pytest.raises(CallFailed) as refused_on_session:
                _ = [response async for response in call]
            assert refused_on_session.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            await session.close()
            # A call that fits is served: its 2 tiles fill the batch, so the parked ones go too
            filler = [png_bytes(448, 448, variant=v) for v in (5, 6)]
            done = await finish(stub.Encode(encode_request("filler", filler)))
            assert done.num_tiles == 2
            assert (await finish(first)).num_tiles == 3
            assert (await finish(second)).num_tiles == 3
            # Alone, a call larger than the bound runs: 13 + 3 tiles, two full batches
            alone = [png_bytes(1024, 768), park_image(7)]
            assert (await finish(stub.Encode(encode_request("alone", alone)))).num_tiles == 16
            assert await serving(stub)

    asyncio.run(main())
    assert vision.metric("dvd_vision_queue_full_total") == refused_before + 2
    assert vision.metric("dvd_vision_queued_tiles") == 0


def test_vision_server_drops_the_queued_tiles_of_a_call_whose_deadline_passed(
    vision: Vision,
) -> None:
    encoded_before = vision.metric("dvd_vision_tiles_total")
    dropped_before = vision.metric("dvd_vision_tiles_dropped_total")
    expired_before = vision.metric("dvd_vision_expired_total")

    async def main() -> None:
        async with grpc.aio.insecure_channel(vision.address, options=CHANNEL_OPTIONS) as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            session = EncodeSession(stub)

            async def on_rpc() -> grpc.StatusCode:
                call = stub.Encode(encode_request("late-rpc", [park_image(2)]), timeout=1.0)
                try:
                    await finish(call)
                except grpc.aio.AioRpcError as error:
                    return error.code()
                return grpc.StatusCode.OK

            async def on_session() -> grpc.StatusCode:
                call = await session.start(
                    encode_request("late-session", [park_image(3)]), timeout_s=1.0
                )
                try:
                    _ = [response async for response in call]
                except CallFailed as failure:
                    return failure.code
                return grpc.StatusCode.OK

            codes = await asyncio.gather(on_rpc(), on_session())
            assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
            await session.close()
            assert await serving(stub)

    asyncio.run(main())
    wait_until(lambda: vision.metric("dvd_vision_expired_total") == expired_before + 2, "expiry")
    assert vision.metric("dvd_vision_tiles_dropped_total") == dropped_before + 6
    assert vision.metric("dvd_vision_tiles_total") == encoded_before  # none was encoded
    assert vision.metric("dvd_vision_queued_tiles") == 0
    assert vision.metric("dvd_vision_requests_total", status="deadline_exceeded") >= 2


# ---- the language server's vision pool over two vision servers -----------------------------


def test_vision_pool_moves_a_request_off_a_busy_member_and_refuses_when_all_are_busy(
    vision: Vision, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    other = Vision(tiny_checkpoint, tmp_path, "vision-b")
    checkpoint = load_config(tiny_checkpoint)
    metrics = LanguageMetrics()

    async def main() -> None:
        pool = VisionPool(
            [vision.address, other.address],
            torch.bfloat16,
            60.0,
            receiver_class("grpc")(),
            (checkpoint.max_dynamic_patch + 1) * checkpoint.tokens_per_tile,
            checkpoint.llm_hidden_size,
            routing="least-loaded",
            metrics=metrics,
        )
        async with (
            grpc.aio.insecure_channel(vision.address, options=CHANNEL_OPTIONS) as channel_a,
            grpc.aio.insecure_channel(other.address, options=CHANNEL_OPTIONS) as channel_b,
        ):
            busy_a = await park(vision_pb2_grpc.VisionServiceStub(channel_a), "park-a", 0)
            try:
                for number in range(3):  # least-loaded takes turns: the first tries A
                    encoded = await pool.encode(f"moved-{number}", eight_tiles(number))
                    assert encoded.server == other.address
                    assert [f.shape[0] for f in encoded.features] == [7 * 256, 256]
                    encoded.release()
                assert calls(vision.address, "busy") >= 1
                busy_b = await park(vision_pb2_grpc.VisionServiceStub(channel_b), "park-b", 1)
                with pytest.raises(DvdError) as refused:
                    await pool.encode("nowhere", eight_tiles(9))
                assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert vision.address in refused.value.message
                assert other.address in refused.value.message
                busy_b.cancel()
                # (read before the pool closes: members that leave drop their series)
                assert calls(other.address, "busy") == 1  # only once both were busy
                assert calls(other.address, "ok") == 3
            finally:
                busy_a.cancel()
                await pool.close()

    def calls(member: str, outcome: str) -> float:
        labels = {"member": member, "outcome": outcome}
        value = metrics.registry.get_sample_value("dvd_language_vision_member_calls_total", labels)
        return value or 0.0

    try:
        asyncio.run(main())
        assert (
            metrics.registry.get_sample_value("dvd_language_refused_total", {"reason": "vision"})
            == 1
        )
        for server in (vision, other):  # cancelled calls leave nothing queued
            wait_until(lambda s=server: s.metric("dvd_vision_queued_tiles") == 0, "queue")  # type: ignore[misc]
    finally:
        other.stop()


# ---- the gateway in front of fake language servers -----------------------------------------


class Fake:
    """A tests/fake_language_server.py process."""

    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "tests.fake_language_server", "--host", "127.0.0.1"]
        self.process = subprocess.Popen(
            [*argv, "--port", str(self.port), *extra], start_new_session=True
        )
        running = Running("fake", self.process, "", Path("/dev/null"))
        _wait_serving(running, self.address, language_pb2_grpc.LanguageServiceStub, 30)

    def counts(self) -> dict[str, int]:
        """Its calls: running, cancelled, expired (Health's detail)."""
        with grpc.insecure_channel(self.address) as channel:
            stub = language_pb2_grpc.LanguageServiceStub(channel)
            words = stub.Health(common_pb2.HealthRequest(), timeout=5).detail.split()
        return {words[i]: int(words[i + 1]) for i in range(0, len(words), 2)}

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[Fake, Fake, Fake, Fake]]:
    """A free member, two busy ones, and one whose gRPC refuses requests over 4 KiB."""
    started: list[Fake] = []
    try:
        for extra in ((), ("--busy",), ("--busy",), ("--max-receive-bytes", "4096")):
            started.append(Fake(*extra))
        yield started[0], started[1], started[2], started[3]
    finally:
        for fake in started:
            fake.stop()


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_gateway_moves_calls_off_a_busy_member_and_answers_429_when_all_are_busy(
    fakes: tuple[Fake, Fake, Fake, Fake],
) -> None:
    free, busy, busier, _ = fakes
    config = GatewayConfig(language_addresses=(busy.address, free.address))
    with serve(config) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for _ in range(4):
            reply = client.chat.completions.create(model=FAKE_MODEL, messages=ask("hi"))
            assert reply.choices[0].message.content == f"served by {free.address}"
        metrics = f"{url}/metrics"
        assert metric(metrics, "dvd_gateway_member_refusals_total", member=busy.address) >= 1

    config = GatewayConfig(language_addresses=(busy.address, busier.address))
    with serve(config) as url:
        body = {"model": FAKE_MODEL, "messages": ask("hi")}
        for stream in (False, True):
            response = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": stream})
            assert response.status_code == 429, response.text
            assert response.headers["retry-after"] == "1"
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
            assert "is busy" in error["message"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=FAKE_MODEL, messages=ask("hi"))
        metrics = f"{url}/metrics"
        refusals = [
            metric(metrics, "dvd_gateway_member_refusals_total", member=m.address)
            for m in (busy, busier)
        ]
        assert refusals == [3, 3]  # each call tried both members once
        assert metric(metrics, "dvd_gateway_requests_total", status="429") == 3
        assert httpx.get(f"{url}/health").status_code == 200


def test_a_message_over_grpcs_size_limit_is_a_400_not_a_busy_member(
    fakes: tuple[Fake, Fake, Fake, Fake],
) -> None:
    """gRPC refuses a message over its size limit with RESOURCE_EXHAUSTED too; without the
    busy mark it is the request's fault: a 400, no retry on another member, no back-off."""
    free, _, _, small = fakes
    config = GatewayConfig(language_addresses=(small.address, free.address))
    with serve(config) as url:
        body = {"model": FAKE_MODEL, "messages": ask("x " * 4096)}
        refused = 0
        for _ in range(4):  # least-loaded sends some of them to the small member
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
            if response.status_code == 200:
                assert response.json()["choices"][0]["message"]["content"].endswith(free.address)
                continue
            assert response.status_code == 400, response.text
            assert "too large to pass between servers" in response.json()["error"]["message"]
            refused += 1
        assert refused >= 1
        metrics = f"{url}/metrics"
        assert metric(metrics, "dvd_gateway_member_refusals_total", member=small.address) == 0
        assert httpx.get(f"{url}/health").status_code == 200


def test_client_timeouts_travel_to_the_language_server_as_its_deadline(
    fakes: tuple[Fake, Fake, Fake, Fake],
) -> None:
    free = fakes[0]

    def remaining(reply: Any) -> float:
        text = reply.choices[0].message.content
        assert text.startswith("remaining "), text
        return float(text.split()[1])

    config = GatewayConfig(language_addresses=(free.address,), request_timeout_s=30)
    with serve(config) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        create = client.chat.completions.create
        # (gRPC carries a deadline as a rounded timeout: what arrives may be a hair more)
        # openai's default timeout (600 s) is above --request-timeout-s: 30 s rules
        assert 0 < remaining(create(model=FAKE_MODEL, messages=ask("deadline"))) <= 30.5
        header = {"X-Request-Timeout": "5"}
        reply = create(model=FAKE_MODEL, messages=ask("deadline"), extra_headers=header)
        assert 0 < remaining(reply) <= 5.5
        # the client's own timeout, less a margin so that our 504 arrives before it gives up
        short = client.with_options(timeout=3.0)
        reply = short.chat.completions.create(model=FAKE_MODEL, messages=ask("deadline"))
        assert 0 < remaining(reply) < 3.0
        bad = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": FAKE_MODEL, "messages": ask("hi")},
            headers={"X-Request-Timeout": "soon"},
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-request-timeout"


def test_a_small_client_timeout_ends_in_a_timeout_and_stops_the_language_server_call(
    fakes: tuple[Fake, Fake, Fake, Fake],
) -> None:
    free = fakes[0]
    before = free.counts()
    config = GatewayConfig(language_addresses=(free.address,))
    with serve(config) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=1.5)
        with pytest.raises((openai.APITimeoutError, openai.InternalServerError)) as ended:
            client.chat.completions.create(model=FAKE_MODEL, messages=ask("hang"))
        if isinstance(ended.value, openai.InternalServerError):  # our 504 came first
            assert ended.value.status_code == 504
            assert ended.value.body["type"] == "timeout_error"  # type: ignore[index]
        # Streamed, with an explicit timeout: nothing was sent yet, so it is an HTTP 504
        response = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": FAKE_MODEL, "messages": ask("hang"), "stream": True},
            headers={"X-Request-Timeout": "1"},
            timeout=30,
        )
        assert response.status_code == 504, response.text
        error = response.json()["error"]
        assert error["type"] == "timeout_error" and "X-Request-Timeout 1" in error["message"]
        assert metric(f"{url}/metrics", "dvd_gateway_timeouts_total", limit="client") >= 1
        # Nothing keeps running downstream, and every server still serves.
        wait_until(lambda: free.counts()["running"] == 0, "the hung calls were not stopped")
        after = free.counts()
        assert after["cancelled"] == before["cancelled"] + 2
        assert after["expired"] >= before["expired"] + 1  # at least the X-Request-Timeout one
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 200
        reply = client.chat.completions.create(model=FAKE_MODEL, messages=ask("hi"))
        assert reply.choices[0].message.content == f"served by {free.address}"


# ---- the whole path: gateway, a real language server, the parking vision server ------------


@pytest.fixture(scope="module")
def language(
    vision: Vision, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A language server (vLLM) on the parking vision server that lets 2 requests wait;
    yields its address and its /metrics URL."""
    port, metrics_port = free_port(), free_port()
    argv = [sys.executable, "-m", "dvd", "language", "--model", str(tiny_checkpoint)]
    argv += ["--port", str(port), "--metrics-port", str(metrics_port)]
    argv += ["--vision", vision.address, "--max-waiting-requests", "2", "--max-num-seqs", "2"]
    argv += ["--kv-cache-gib", "0.25", "--max-model-len", "8192"]
    running = _start("language", argv, tmp_path_factory.mktemp("overload-language"))
    address = f"127.0.0.1:{port}"
    _wait_serving(running, address, language_pb2_grpc.LanguageServiceStub, START_TIMEOUT_S)
    yield address, f"http://127.0.0.1:{metrics_port}/metrics"
    running.stop()


def image_message(images: list[bytes], text: str = "Describe.") -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": data_url(image)}} for image in images
    ]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def timed_out(outcome: Future[Any]) -> bool:
    """Whether a call ended in a timeout: our 504, or the client giving up first."""
    error = outcome.exception(timeout=120)
    if isinstance(error, openai.InternalServerError):
        return error.status_code == 504
    return isinstance(error, openai.APITimeoutError)


def test_bounds_and_deadlines_through_the_whole_stack(
    vision: Vision, language: tuple[str, str]
) -> None:
    address, language_metrics = language
    with serve(GatewayConfig(language_addresses=(address,))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        patient = client.with_options(timeout=8.0)  # outlasts the steps below
        queued_before = vision.metric("dvd_vision_queued_tiles")
        assert queued_before == 0
        with ThreadPoolExecutor(2) as threads:
            # A request whose image parks in the vision queue: it waits for its first token.
            first = threads.submit(
                patient.chat.completions.create,
                model=model,
                messages=image_message([park_image(20)]),
                max_tokens=4,
            )
            wait_until(lambda: vision.metric("dvd_vision_queued_tiles") == 3, "first parked")
            # 8 more tiles would take the vision queue past 10: the lone vision server
            # refuses, so does the lone language server, and the client gets 429.
            with pytest.raises(openai.RateLimitError) as vision_full:
                client.chat.completions.create(
                    model=model, messages=image_message(eight_tiles(20)), max_tokens=4
                )
            assert vision_full.value.response.headers["retry-after"] == "1"
            assert "--max-queued-tiles" in vision_full.value.message
            # A second one parks: two requests wait, the language server's limit.
            second = threads.submit(
                patient.chat.completions.create,
                model=model,
                messages=image_message([park_image(21)]),
                max_tokens=4,
            )
            wait_until(lambda: vision.metric("dvd_vision_queued_tiles") == 6, "second parked")
            with pytest.raises(openai.RateLimitError) as language_full:
                client.chat.completions.create(model=model, messages=ask("hi"), max_tokens=4)
            assert "--max-waiting-requests" in language_full.value.message
            # Their client timeout passes: each ends in a timeout, and everything stops.
            assert timed_out(first) and timed_out(second)
        wait_until(lambda: vision.metric("dvd_vision_queued_tiles") == 0, "vision queue")
        wait_until(
            lambda: metric(language_metrics, "dvd_language_requests_in_flight") == 0, "language"
        )
        assert metric(language_metrics, "dvd_language_requests_waiting") == 0
        assert metric(language_metrics, "dvd_language_refused_total", reason="waiting") == 1
        assert metric(language_metrics, "dvd_language_refused_total", reason="vision") == 1

        # A deadline that passes while decoding: the stream ends with a timeout error event,
        # and the LLM request is aborted. How long 8000 tokens take depends on the machine:
        # a deadline that passes before the first token is tried again longer, one that the
        # whole stream beats is tried again shorter.
        timeout_s = 3.0
        for _ in range(8):
            try:
                stream = client.chat.completions.create(
                    model=model,
                    messages=ask("count"),
                    max_tokens=8000,
                    stream=True,
                    extra_body={"ignore_eos": True},
                    extra_headers={"X-Request-Timeout": f"{timeout_s:g}"},
                )
            except openai.InternalServerError as early:  # 504 before the first token
                assert early.status_code == 504, early
                timeout_s *= 2
                continue
            chunks = 0
            try:
                for _ in stream:
                    chunks += 1
            except openai.APIError as cut:
                assert chunks > 1, "the deadline should pass while tokens flow"
                assert f"did not finish within {timeout_s:g} s" in cut.message
                assert cut.body["type"] == "timeout_error"  # type: ignore[index]
                break
            timeout_s /= 4  # all 8000 tokens came within the deadline
        else:
            pytest.fail("no deadline passed while tokens flowed")
        wait_until(
            lambda: metric(language_metrics, "dvd_language_expired_total", stage="decoding") == 1,
            "the decoding request was not counted as expired",
        )
        assert metric(language_metrics, "dvd_language_requests_in_flight") == 0

        # Every server still serves, images included.
        reply = client.chat.completions.create(
            model=model, messages=image_message(eight_tiles(22)), max_tokens=4
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 200
