"""EncodeSession: many Encode calls multiplexed on one long-lived gRPC stream.

The servers here are real grpc.aio servers on loopback running the real session code
(vision_server/session.py) and the real client (dvd/encode_session.py, VisionPool); only
the encoding is scripted: each request's image bytes say what its call does, so that
failures, hangs and interleavings can be produced at will without a ViT. The full vision
server behind a session is covered by test_stack.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

import grpc
import pytest
import torch

from dvd.deadline import Deadline
from dvd.encode_session import (
    SESSION_MAX_REQUEST_BYTES,
    CallFailed,
    EncodeSession,
    RpcCall,
    SessionCall,
)
from dvd.errors import DvdError, InvalidInput
from dvd.grpc_options import CHANNEL_OPTIONS, MAX_CHUNK_BYTES, SERVER_OPTIONS
from dvd.grpc_server import bind, new_server
from dvd.transport import receiver_class, sender_class
from dvd.v1 import vision_pb2, vision_pb2_grpc
from language_server.vision_client import VisionPool
from vision_server.session import EncodeServicer, Outbox, Sessions

HIDDEN = 8
ROWS = 4


def _plan(tiles: int) -> vision_pb2.EncodeResponse:
    return vision_pb2.EncodeResponse(
        plan=vision_pb2.ImagePlan(
            image_index=0, num_tiles=tiles, tokens_per_tile=[ROWS] * tiles, hidden_size=HIDDEN
        )
    )


def _done(tiles: int) -> vision_pb2.EncodeResponse:
    return vision_pb2.EncodeResponse(
        done=vision_pb2.EncodeDone(num_tiles=tiles, num_tokens=tiles * ROWS)
    )


class ScriptedVision(EncodeServicer):
    """Each request's first image says what the call does:
    "<n>"   plan, n tiles of ROWS rows (values: the request id as a number) through the
            real sender of the request's transport, done;
    "fail"  INVALID_ARGUMENT;
    "hang"  waits until cancelled;
    "gate"  waits for `gate`, then answers like "1".
    """

    def __init__(self) -> None:
        self.sessions = Sessions(self.run_call)
        self.senders = {name: sender_class(name)() for name in ("grpc", "shm")}
        self.gate = asyncio.Event()
        self.started: list[str] = []
        self.cancelled: list[str] = []

    async def run_call(
        self, request: vision_pb2.EncodeRequest, deadline: Deadline
    ) -> AsyncGenerator[vision_pb2.EncodeResponse, None]:
        script = request.images[0].data.decode()
        self.started.append(request.request_id)
        try:
            if script == "fail":
                raise InvalidInput("that is not an image")
            if script == "hang":
                await asyncio.Event().wait()
            if script == "gate":
                await self.gate.wait()
                script = "1"
            tiles = int(script)
            rows = torch.full((ROWS, HIDDEN), float(request.request_id), dtype=torch.bfloat16)
            kind = request.destination.WhichOneof("kind")
            emission = self.senders[kind or "grpc"].open(request)
            try:
                yield _plan(tiles)
                for tile in range(tiles):
                    for chunk in emission.chunks(0, tile * ROWS, rows, MAX_CHUNK_BYTES):
                        yield vision_pb2.EncodeResponse(chunk=chunk)
                yield _done(tiles)
            finally:
                emission.close()
        except asyncio.CancelledError:
            self.cancelled.append(request.request_id)
            raise


@contextlib.asynccontextmanager
async def scripted_server(
    port: int = 0,
) -> AsyncIterator[tuple[ScriptedVision, grpc.aio.Server, str]]:
    vision = ScriptedVision()
    server = new_server()
    vision_pb2_grpc.add_VisionServiceServicer_to_server(vision, server)
    bound = bind(server, f"127.0.0.1:{port}")
    await server.start()
    try:
        yield vision, server, f"127.0.0.1:{bound}"
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def connected() -> AsyncIterator[tuple[ScriptedVision, grpc.aio.Channel]]:
    """A scripted server and a channel to it."""
    async with (
        scripted_server() as (vision, _, address),
        grpc.aio.insecure_channel(address) as channel,
    ):
        yield vision, channel


def _request(script: str, request_id: str = "1") -> vision_pb2.EncodeRequest:
    return vision_pb2.EncodeRequest(
        request_id=request_id, images=[vision_pb2.ImageInput(data=script.encode())]
    )


async def _collect(session: EncodeSession, request: vision_pb2.EncodeRequest) -> list[str]:
    return [m.WhichOneof("kind") for m in [r async for r in await session.start(request)]]


async def _until(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def test_concurrent_calls_share_one_stream_and_each_gets_its_own_responses() -> None:
    async def main() -> None:
        async with connected() as (vision, channel):
            session = EncodeSession(vision_pb2_grpc.VisionServiceStub(channel))

            async def one(number: int) -> None:
                chunks = number % 4
                call = await session.start(_request(str(chunks), str(number)))
                responses = [r async for r in call]
                kinds = [r.WhichOneof("kind") for r in responses]
                assert kinds == ["plan"] + ["chunk"] * chunks + ["done"]
                for index, response in enumerate(responses[1:-1]):
                    assert response.chunk.row_offset == index * ROWS
                    values = torch.frombuffer(bytearray(response.chunk.data), dtype=torch.bfloat16)
                    assert bool((values == number).all()), "another call's rows"

            await asyncio.gather(*(one(n) for n in range(1, 41)))
            assert len(vision.sessions.active) == 1
            await session.close()

    asyncio.run(main())


def test_responses_ready_together_travel_in_one_message() -> None:
    async def main() -> None:
        async with connected() as (_, channel):
            rpc = vision_pb2_grpc.VisionServiceStub(channel).EncodeSession()
            await rpc.write(vision_pb2.SessionRequest(call_id=7, encode=_request("3")))
            message = await rpc.read()
            assert [r.call_id for r in message.responses] == [7] * 5
            kinds = [r.response.WhichOneof("kind") for r in message.responses]
            assert kinds == ["plan", "chunk", "chunk", "chunk", "done"]
            await rpc.done_writing()
            assert await rpc.read() is grpc.aio.EOF  # half-closed and idle: it ends
            assert await rpc.code() == grpc.StatusCode.OK

    asyncio.run(main())


def test_a_failed_call_reports_its_status_and_the_session_goes_on() -> None:
    async def main() -> None:
        async with connected() as (_, channel):
            session = EncodeSession(vision_pb2_grpc.VisionServiceStub(channel))
            with pytest.raises(CallFailed) as failed:
                await _collect(session, _request("fail"))
            assert failed.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "not an image" in failed.value.details
            assert await _collect(session, _request("1")) == ["plan", "chunk", "done"]
            await session.close()

    asyncio.run(main())


def test_a_reused_call_id_is_refused_without_harming_the_first_call() -> None:
    async def main() -> None:
        async with connected() as (vision, channel):
            rpc = vision_pb2_grpc.VisionServiceStub(channel).EncodeSession()
            await rpc.write(vision_pb2.SessionRequest(call_id=1, encode=_request("gate")))
            await _until(lambda: vision.started)
            await rpc.write(vision_pb2.SessionRequest(call_id=1, encode=_request("1")))
            refused = (await rpc.read()).responses[0]
            assert refused.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
            vision.gate.set()
            message = await rpc.read()
            assert message.responses[-1].response.WhichOneof("kind") == "done"
            rpc.cancel()

    asyncio.run(main())


def test_cancel_stops_the_call_on_the_server_and_spares_the_others() -> None:
    async def main() -> None:
        async with connected() as (vision, channel):
            session = EncodeSession(vision_pb2_grpc.VisionServiceStub(channel))
            call = await session.start(_request("hang", "5"))
            await _until(lambda: "5" in vision.started)
            call.cancel()
            await _until(lambda: vision.cancelled == ["5"])
            assert await _collect(session, _request("2")) == ["plan", "chunk", "chunk", "done"]
            await session.close()

    asyncio.run(main())


def test_draining_finishes_running_calls_refuses_new_ones_and_ends_the_session() -> None:
    async def main() -> None:
        async with connected() as (vision, channel):
            session = EncodeSession(vision_pb2_grpc.VisionServiceStub(channel))
            running = asyncio.create_task(_collect(session, _request("gate")))
            await _until(lambda: vision.started)
            await vision.sessions.drain()
            with pytest.raises(CallFailed) as refused:
                await _collect(session, _request("1"))
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            vision.gate.set()
            assert await running == ["plan", "chunk", "done"]
            await _until(lambda: not vision.sessions.active)
            # A session opened while the server drains ends at once: callers go elsewhere.
            with pytest.raises(CallFailed) as ended:
                await _collect(session, _request("1"))
            assert ended.value.code == grpc.StatusCode.UNAVAILABLE
            await session.close()

    asyncio.run(main())


def test_a_server_that_dies_fails_calls_in_flight_and_the_next_call_reconnects() -> None:
    async def main() -> None:
        async with scripted_server() as (vision, server, address):
            port = int(address.rsplit(":", 1)[1])
            async with grpc.aio.insecure_channel(address) as channel:
                session = EncodeSession(vision_pb2_grpc.VisionServiceStub(channel))
                call = await session.start(_request("hang"))
                await _until(lambda: vision.started)
                await server.stop(0)
                with pytest.raises(CallFailed) as failed:
                    _ = [r async for r in call]
                assert failed.value.code == grpc.StatusCode.UNAVAILABLE
                async with scripted_server(port):
                    kinds = None
                    async with asyncio.timeout(30):
                        while kinds is None:  # until the channel has reconnected
                            try:
                                kinds = await _collect(session, _request("1"))
                            except CallFailed as exc:
                                assert exc.code == grpc.StatusCode.UNAVAILABLE
                                await asyncio.sleep(0.1)
                    assert kinds == ["plan", "chunk", "done"]
                await session.close()

    asyncio.run(main())


def test_outbox_waits_when_full_and_packs_what_is_queued() -> None:
    async def main() -> None:
        def response(size: int) -> vision_pb2.SessionResponse:
            chunk = vision_pb2.FeatureChunk(data=b"x" * size)
            return vision_pb2.SessionResponse(
                call_id=1, response=vision_pb2.EncodeResponse(chunk=chunk)
            )

        outbox = Outbox(max_bytes=1000)
        await outbox.put(response(600))
        await outbox.put(response(600))  # over the limit now: the next put waits
        third = asyncio.create_task(outbox.put(response(600)))
        await asyncio.sleep(0.05)
        assert not third.done()
        assert len(await outbox.take(max_bytes=100)) == 1  # at least one, however large
        await asyncio.wait_for(third, 5)
        assert len(await outbox.take(max_bytes=10_000)) == 2
        await outbox.close()
        assert await outbox.take() == []

    asyncio.run(main())


def _pool(addresses: list[str], transport: str, timeout_s: float = 30.0) -> VisionPool:
    options = {"arena_bytes": 1 << 20} if transport == "shm" else {}
    return VisionPool(
        addresses,
        torch.bfloat16,
        timeout_s,
        receiver_class(transport)(**options),
        max_rows_per_image=ROWS,
        hidden=HIDDEN,
    )


# grpc: each request on an Encode RPC of its own; shm: on the session.
TRANSPORTS = ["grpc", "shm"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_vision_pool_retries_a_dead_server_on_a_live_one(transport: str) -> None:
    async def main() -> None:
        async with scripted_server() as (_, _, live):
            async with scripted_server() as (_, _, dead):
                pass  # stopped: its port now refuses connections
            pool = _pool([dead, live], transport)
            try:
                for number in range(4):  # whichever it picks first, every request succeeds
                    encoded = await pool.encode(str(number), [b"1"])
                    assert encoded.server == live
                    assert bool((encoded.features[0] == number).all())
                    encoded.release()
            finally:
                await pool.close()

    asyncio.run(main())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_vision_pool_gives_up_after_its_timeout_and_cancels_the_call(transport: str) -> None:
    async def main() -> None:
        async with scripted_server() as (vision, _, address):
            pool = _pool([address], transport, timeout_s=0.5)
            try:
                with pytest.raises(DvdError) as failed:
                    await pool.encode("9", [b"hang"])
                assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                await _until(lambda: vision.cancelled == ["9"])
                assert pool.servers[0].images_in_flight == 0
                encoded = await pool.encode("3", [b"1"])  # the server still serves us
                assert bool((encoded.features[0] == 3).all())
                encoded.release()
            finally:
                await pool.close()

    asyncio.run(main())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_vision_pool_reports_a_bad_image_as_invalid_input(transport: str) -> None:
    async def main() -> None:
        async with scripted_server() as (_, _, address):
            pool = _pool([address], transport)
            try:
                with pytest.raises(InvalidInput, match="not an image"):
                    await pool.encode("1", [b"fail"])
                encoded = await pool.encode("2", [b"1"])
                encoded.release()
            finally:
                await pool.close()

    asyncio.run(main())


def test_servers_accept_the_keepalive_pings_of_an_idle_session() -> None:
    # An idle session's client pings every KEEPALIVE_TIME_MS with no data in between; a
    # server that wants them rarer answers GOAWAY "too_many_pings" and breaks the session
    # (seen with gRPC's default of 5 minutes). Waiting out real pings would take minutes.
    server = dict(SERVER_OPTIONS)
    client = dict(CHANNEL_OPTIONS)
    assert (
        server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    )


def test_a_caller_cancelled_while_sending_leaves_the_session_to_the_others() -> None:
    # grpc.aio cancels a whole stream when a task is cancelled inside its write: the
    # session writes from a task of its own, and the abandoned call is cancelled after.
    async def main() -> None:
        async with connected() as (vision, channel):
            session = EncodeSession(vision_pb2_grpc.VisionServiceStub(channel))
            other = asyncio.create_task(_collect(session, _request("gate", "1")))
            await _until(lambda: "1" in vision.started)
            abandoned = asyncio.create_task(session.start(_request("hang", "7")))
            await asyncio.sleep(0)  # it has queued its request and waits for the write
            abandoned.cancel()
            with pytest.raises(asyncio.CancelledError):
                await abandoned
            await _until(lambda: "7" in vision.cancelled)
            vision.gate.set()
            assert await other == ["plan", "chunk", "done"]
            assert await _collect(session, _request("1")) == ["plan", "chunk", "done"]
            await session.close()

    asyncio.run(main())


def test_a_call_s_timeout_stops_it_on_the_server() -> None:
    async def main() -> None:
        async with connected() as (vision, channel):
            session = EncodeSession(vision_pb2_grpc.VisionServiceStub(channel))
            call = await session.start(_request("hang", "4"), timeout_s=0.2)
            with pytest.raises(CallFailed) as failed:
                _ = [r async for r in call]
            assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert vision.cancelled == ["4"]
            await session.close()

    asyncio.run(main())


def test_requests_with_large_images_get_an_encode_call_of_their_own() -> None:
    async def main() -> None:
        async with connected() as (_, channel):
            session = EncodeSession(vision_pb2_grpc.VisionServiceStub(channel))
            small = _request("1")
            small.destination.shm.arena = "dvd-arena-1-0"
            large = vision_pb2.EncodeRequest()
            large.CopyFrom(small)
            large.images[0].data = b"1" * (SESSION_MAX_REQUEST_BYTES + 1)
            for request, kind in ((small, SessionCall), (large, RpcCall), (_request("1"), RpcCall)):
                call = await session.call(request)
                assert isinstance(call, kind)
                call.cancel()
            await session.close()

    asyncio.run(main())
