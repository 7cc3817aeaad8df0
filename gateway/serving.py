"""The work of one chat completion: parse, check, convert, call Generate, answer.

Errors before the first byte of the response are HTTP errors; once an SSE stream has begun,
an error becomes a `data: {"error": {...}}` event and the stream ends. A client that goes
away cancels the Generate call (the language server then aborts the LLM request). The call's
deadline is the smaller of the client's timeout and --request-timeout-s (gateway.deadline);
a request that runs past it gets 504 `timeout_error` (or that error as an SSE event), and
every server working on it stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import aclosing
from typing import Any, TypeVar

import grpc
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from dvd.errors import refused_as_busy
from dvd.v1 import language_pb2
from gateway.backends import BackendPool
from gateway.config import GatewayConfig
from gateway.convert import ModelLimits, to_generate_request
from gateway.deadline import request_deadline
from gateway.errors import REQUEST_ID_HEADER, ApiError, from_grpc, from_validation, to_api_error
from gateway.metrics import RequestRecord
from gateway.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
)

logger = logging.getLogger("dvd.gateway")

T = TypeVar("T")

Messages = AsyncGenerator[language_pb2.GenerateResponse, None]

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE_EVENT = "data: [DONE]\n\n"


class ClientGone(Exception):
    """The HTTP client disconnected before the response began."""


async def create_chat_completion(request: Request) -> Response:
    """POST /v1/chat/completions."""
    state = request.app.state
    config: GatewayConfig = state.config
    pool: BackendPool = state.pool
    record: RequestRecord = request.state.record
    chat = parse_chat_request(await request.body())
    record.stream = chat.stream
    record.deadline = deadline = request_deadline(
        request.headers, config.request_timeout_s, chat.stream
    )
    try:  # fetching images and decoding videos count against the deadline too
        async with asyncio.timeout(deadline.remaining_s()):
            record.model, limits = await served_model(pool, config, chat.model)
            generate_request = await to_generate_request(
                chat, record.request_id, config, state.media, limits, state.videos
            )
    except TimeoutError:
        raise deadline.exceeded() from None

    def on_backend(address: str) -> None:
        record.backend = address

    messages = pool.generate(
        generate_request,
        timeout_s=deadline.remaining_s(),
        metadata=[(REQUEST_ID_HEADER, record.request_id)],
        on_backend=on_backend,
    )
    try:
        if chat.stream:
            first = await unless_disconnected(request, _first(messages, record))
            events = sse_events(first, messages, record, chat.include_usage())
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        completion = await unless_disconnected(request, gather(messages, record))
    except ClientGone:
        record.status = 499
        return Response(status_code=499)
    except grpc.aio.AioRpcError as error:
        raise backend_error(error, record) from None
    return Response(completion.model_dump_json(), media_type="application/json")


def backend_error(error: grpc.aio.AioRpcError, record: RequestRecord) -> ApiError:
    """A language server's error as the client sees it; a deadline that passed names the
    limit that set it."""
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and record.deadline is not None:
        logger.info(
            "request %s ran past its deadline of %g s (%s); stopped",
            record.request_id,
            record.deadline.timeout_s,
            record.deadline.reason,
        )
        return record.deadline.exceeded()
    if refused_as_busy(error):
        logger.info(
            "request %s refused, every language server tried is busy: %s",
            record.request_id,
            error.details(),
        )
    return from_grpc(error, record.backend)


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """The request body as a checked ChatCompletionRequest, or a 400 naming the bad field."""
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as error:
        raise from_validation(error.errors()) from None


async def served_model(
    pool: BackendPool, config: GatewayConfig, requested: str | None
) -> tuple[str, ModelLimits]:
    """The served model's name (404 when the client asked for another) and its limits."""
    name = config.served_model_name or (await pool.info()).model
    if requested is not None and requested != name:
        raise ApiError(
            404,
            f"The model `{requested}` does not exist; this server serves `{name}`",
            param="model",
            code="model_not_found",
        )
    info = pool.cached_info
    if info is None:
        try:
            info = await pool.info()
        except ApiError:
            return name, ModelLimits()  # Generate will report the backend's state
    return name, ModelLimits(
        info.max_model_len or None, info.max_images_per_request or None, info.accepts_video
    )


def completion_id(request_id: str) -> str:
    return request_id if request_id.startswith("chatcmpl-") else f"chatcmpl-{request_id}"


async def _first(messages: Messages, record: RequestRecord) -> language_pb2.GenerateResponse:
    try:
        return await anext(messages)
    except StopAsyncIteration:
        raise _ended_early(record) from None


async def gather(messages: Messages, record: RequestRecord) -> ChatCompletion:
    """A non-streaming completion from every message of the Generate stream."""
    pieces: list[str] = []
    finish_reason = ""
    async with aclosing(messages):
        async for message in messages:
            _count(message, record)
            pieces.append(message.text)
            if message.finish_reason:
                finish_reason = message.finish_reason
                record.finished(message)
                break
    if not finish_reason:
        raise _ended_early(record)
    return ChatCompletion(
        id=completion_id(record.request_id),
        model=record.model,
        choices=[
            Choice(message=AssistantMessage(content="".join(pieces)), finish_reason=finish_reason)
        ],
        usage=Usage.of(record.prompt_tokens, record.completion_tokens, record.timings),
    )


async def sse_events(
    first: language_pb2.GenerateResponse,
    messages: Messages,
    record: RequestRecord,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The SSE body: role chunk, content chunks, finish chunk, [usage chunk], [DONE]."""
    chunks = _ChunkWriter(completion_id(record.request_id), record.model, include_usage)
    try:
        async with aclosing(messages):
            yield chunks.delta(Delta(role="assistant", content=""))
            message: language_pb2.GenerateResponse | None = first
            while message is not None:
                _count(message, record)
                if message.text:
                    yield chunks.delta(Delta(content=message.text))
                if message.finish_reason:
                    record.finished(message)
                    yield chunks.delta(Delta(), message.finish_reason)
                    break
                message = await anext(messages, None)
            else:
                raise _ended_early(record)
        if include_usage:
            yield chunks.usage(
                Usage.of(record.prompt_tokens, record.completion_tokens, record.timings)
            )
    except asyncio.CancelledError:
        record.status = 499  # the client went away mid-stream
        raise
    except Exception as exc:
        if isinstance(exc, grpc.aio.AioRpcError):
            exc = backend_error(exc, record)
        error = to_api_error(exc, record.request_id)
        record.status = error.status
        yield _sse(error.body())
        return
    yield DONE_EVENT


class _ChunkWriter:
    """Formats chat.completion.chunk events that share an id, a model and a timestamp."""

    def __init__(self, chunk_id: str, model: str, include_usage: bool) -> None:
        self.id = chunk_id
        self.model = model
        self.created = int(time.time())
        self.exclude = None if include_usage else {"usage"}

    def delta(self, delta: Delta, finish_reason: str | None = None) -> str:
        choice = ChunkChoice(delta=delta, finish_reason=finish_reason)
        return self._event([choice], None)

    def usage(self, usage: Usage) -> str:
        return self._event([], usage)

    def _event(self, choices: list[ChunkChoice], usage: Usage | None) -> str:
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        return f"data: {chunk.model_dump_json(exclude=self.exclude)}\n\n"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _count(message: language_pb2.GenerateResponse, record: RequestRecord) -> None:
    if message.token_ids or message.text:
        record.tokens_arrived(len(message.token_ids))


def _ended_early(record: RequestRecord) -> ApiError:
    return ApiError(
        502,
        f"language server {record.backend or '?'} ended the stream without a finish_reason",
        code="backend_protocol_error",
    )


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it and raising ClientGone if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
