"""The server's end of EncodeSession: many Encode calls on one long-lived stream.

Why it exists: in Python gRPC a call costs both ends about half a millisecond before any
byte moves, and every streamed message about a tenth more. For transports whose bytes
travel outside the stream (shm, tcp, rdma) that fixed cost was most of a request's
transfer time. A session pays for the call once per connection, and its writer packs all
responses that are ready when it wakes into one message, so a request whose plan, chunk
and done are ready together costs a single message, and busy servers send fewer.

Each call runs as its own task through the same code as Encode (`run_call`); its
responses go to an outbox bounded in bytes, so a slow reader holds up the encoders as a
plain stream's flow control would, instead of piling features up in memory.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing

import grpc
from prometheus_client import Gauge, Histogram

from dvd.deadline import Deadline
from dvd.errors import DvdError, Overloaded, Unavailable, trailing_metadata
from dvd.grpc_options import MAX_CHUNK_BYTES
from dvd.grpc_server import close_when_done
from dvd.v1 import vision_pb2, vision_pb2_grpc

log = logging.getLogger(__name__)

RunCall = Callable[
    [vision_pb2.EncodeRequest, Deadline], AsyncGenerator[vision_pb2.EncodeResponse, None]
]
"""Runs one Encode call; raises DvdError when it fails. Its caller stops it (cancels it)
when the deadline passes; the deadline tells it why it was stopped."""

MAX_QUEUED_BYTES = 4 * MAX_CHUNK_BYTES
"""Responses waiting for the writer before calls wait for room (two chunks per message)."""

MAX_MESSAGE_BYTES = 2 * MAX_CHUNK_BYTES
"""The writer stops packing responses into one message once it holds this many bytes."""

MAX_CALLS = 4096
"""Calls in flight on one session; a caller beyond it gets RESOURCE_EXHAUSTED."""


class Outbox:
    """Responses waiting to be written, in order; `put` waits while it is full."""

    def __init__(self, max_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: deque[tuple[vision_pb2.SessionResponse, int]] = deque()
        self._bytes = 0
        self._closed = False
        self._changed = asyncio.Condition()

    async def put(self, response: vision_pb2.SessionResponse) -> None:
        size = response.ByteSize()
        async with self._changed:
            # An empty outbox takes any message, however large: nothing is ever stuck.
            await self._changed.wait_for(lambda: self._bytes < self.max_bytes or self._closed)
            self._items.append((response, size))
            self._bytes += size
            self._changed.notify_all()

    async def close(self) -> None:
        """No more responses: `take` returns None once the outbox is empty."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    async def take(self, max_bytes: int = MAX_MESSAGE_BYTES) -> list[vision_pb2.SessionResponse]:
        """Everything queued (at least one, at most max_bytes unless one is larger);
        waits for the first; [] once closed and empty."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._items) or self._closed)
            batch: list[vision_pb2.SessionResponse] = []
            taken = 0
            while self._items and (not batch or taken + self._items[0][1] <= max_bytes):
                response, size = self._items.popleft()
                batch.append(response)
                taken += size
            self._bytes -= taken
            self._changed.notify_all()
            return batch


class Session:
    """One caller's stream: reads calls and cancels, writes every call's responses."""

    def __init__(self, run_call: RunCall, peer: str, batch_sizes: Histogram | None = None) -> None:
        self.run_call = run_call
        self.peer = peer
        self.batch_sizes = batch_sizes
        self.outbox = Outbox()
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.reading = True  # until the caller half-closes
        self.draining = False  # the server is shutting down: no new calls

    async def serve(
        self, requests: AsyncIterator[vision_pb2.SessionRequest]
    ) -> AsyncGenerator[vision_pb2.SessionResponses, None]:
        reader = asyncio.create_task(self._read(requests))
        try:
            while batch := await self.outbox.take():
                if self.batch_sizes is not None:
                    self.batch_sizes.observe(len(batch))
                yield vision_pb2.SessionResponses(responses=batch)
        finally:
            reader.cancel()
            for task in list(self.calls.values()):
                task.cancel()

    async def drain(self) -> None:
        """Lets running calls finish, refuses new ones, ends the stream once idle."""
        self.draining = True
        await self._end_if_idle()

    async def _read(self, requests: AsyncIterator[vision_pb2.SessionRequest]) -> None:
        try:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "encode":
                    await self._start(request.call_id, request.encode, request.timeout_ms)
                elif kind == "cancel":
                    task = self.calls.get(request.call_id)
                    if task is not None:
                        task.cancel()
        except grpc.aio.AioRpcError as exc:  # the caller went away mid-stream
            log.info("session with %s broke: %s", self.peer, exc.code().name)
        except Exception:  # e.g. a message that would not parse: end cleanly, not unseen
            log.exception("session with %s: unreadable request; ending the session", self.peer)
        self.reading = False
        await self._end_if_idle()

    async def _start(
        self, call_id: int, request: vision_pb2.EncodeRequest, timeout_ms: int
    ) -> None:
        refusal: DvdError | None = None
        if self.draining:
            refusal = Unavailable("the vision server is shutting down")
        elif call_id in self.calls:
            refusal = DvdError(
                f"call {call_id} is already running", code=grpc.StatusCode.ALREADY_EXISTS
            )
        elif len(self.calls) >= MAX_CALLS:
            refusal = Overloaded(f"{MAX_CALLS} calls in flight on one session")
        if refusal is not None:
            await self.outbox.put(_error(call_id, refusal))
            return
        deadline = Deadline.after(timeout_ms / 1000 if timeout_ms else None)
        self.calls[call_id] = asyncio.create_task(self._run(call_id, request, deadline))

    async def _run(
        self, call_id: int, request: vision_pb2.EncodeRequest, deadline: Deadline
    ) -> None:
        timer = asyncio.timeout(deadline.remaining())
        try:
            async with timer, aclosing(self.run_call(request, deadline)) as responses:
                async for response in responses:
                    await self.outbox.put(
                        vision_pb2.SessionResponse(call_id=call_id, response=response)
                    )
        except TimeoutError as exc:
            if timer.expired():
                error = DvdError(
                    "the call's timeout passed", code=grpc.StatusCode.DEADLINE_EXCEEDED
                )
            else:  # not ours: a bug, like any other exception below
                log.exception("encode %s failed", request.request_id)
                error = DvdError(f"internal error: {exc}")
            await self.outbox.put(_error(call_id, error))
        except DvdError as exc:
            await self.outbox.put(_error(call_id, exc))
        except asyncio.CancelledError:
            pass  # the caller cancelled it (or left): it expects nothing more
        except Exception as exc:  # a bug must fail the call, not the other calls
            log.exception("encode %s failed", request.request_id)
            await self.outbox.put(_error(call_id, DvdError(f"internal error: {exc}")))
        finally:
            self.calls.pop(call_id, None)
            await self._end_if_idle()

    async def _end_if_idle(self) -> None:
        if not self.calls and (self.draining or not self.reading):
            await self.outbox.close()


def _error(call_id: int, error: DvdError) -> vision_pb2.SessionResponse:
    return vision_pb2.SessionResponse(
        call_id=call_id,
        error=vision_pb2.CallError(code=error.code.value[0], message=error.message),
    )


class Sessions:
    """The sessions a server holds, so that shutdown can drain them all."""

    def __init__(
        self,
        run_call: RunCall,
        open_sessions: Gauge | None = None,
        batch_sizes: Histogram | None = None,
    ) -> None:
        self.run_call = run_call
        self.open_sessions = open_sessions
        self.batch_sizes = batch_sizes
        self.active: set[Session] = set()
        self.draining = False

    async def serve(
        self, requests: AsyncIterator[vision_pb2.SessionRequest], peer: str
    ) -> AsyncIterator[vision_pb2.SessionResponses]:
        session = Session(self.run_call, peer, self.batch_sizes)
        if self.draining:  # opened during shutdown: it ends at once, the caller goes elsewhere
            await session.drain()
        self.active.add(session)
        self._count()
        log.info("session with %s opened", peer)
        try:
            async with aclosing(session.serve(requests)) as messages:
                async for message in messages:
                    yield message
        finally:
            self.active.discard(session)
            self._count()
            log.info("session with %s closed", peer)

    def _count(self) -> None:
        if self.open_sessions is not None:
            self.open_sessions.set(len(self.active))

    async def drain(self) -> None:
        self.draining = True
        for session in list(self.active):
            await session.drain()


class EncodeServicer(vision_pb2_grpc.VisionServiceServicer, ABC):
    """Serves Encode and EncodeSession from one `run_call`, so that a call behaves the same
    whichever way it arrives. Subclasses set `self.sessions = Sessions(self.run_call)`."""

    sessions: Sessions

    @abstractmethod
    def run_call(
        self, request: vision_pb2.EncodeRequest, deadline: Deadline
    ) -> AsyncGenerator[vision_pb2.EncodeResponse, None]:
        """One call's responses; raises DvdError when it fails. The caller cancels it once
        `deadline` passes (a session's timer, or gRPC's for an Encode RPC)."""

    async def Encode(
        self, request: vision_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[vision_pb2.EncodeResponse]:
        deadline = Deadline.of_context(context)  # gRPC cancels this handler once it passes
        work = self.run_call(request, deadline)
        close_when_done(context, work)
        try:
            async with aclosing(work) as responses:
                async for response in responses:
                    yield response
        except DvdError as exc:
            await context.abort(exc.code, exc.message, trailing_metadata(exc))

    async def EncodeSession(
        self,
        request_iterator: AsyncIterator[vision_pb2.SessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[vision_pb2.SessionResponses]:
        async for message in self.sessions.serve(request_iterator, context.peer()):
            yield message
