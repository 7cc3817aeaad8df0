"""One streamed chat completion over HTTP/SSE, timed chunk by chunk, into a `RequestRecord`.

Every request streams (`stream: true`, `stream_options.include_usage: true`). The client
notes when each chunk with non-empty `delta.content` arrives, reads `prompt_tokens` and
`completion_tokens` from the final usage chunk, and ends at `data: [DONE]`.

A request fails (and its record says why, never raising) on: an HTTP status other than 200
(with the server's error message), an `{"error": ...}` event in the stream (how OpenAI
servers report errors after the response has begun), a stream that ends without
`data: [DONE]`, a connection error (or any other exception), or the deadline `timeout_s`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from benchmarks.serve.record import RequestRecord

ERROR_TEXT_LIMIT = 500


def chat_payload(
    model: str,
    messages: list[dict[str, Any]],
    *,
    max_tokens: int,
    temperature: float,
    ignore_eos: bool,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        payload["ignore_eos"] = True  # vLLM's extension, honoured by the dvd gateway
    payload.update(extra or {})
    return payload


async def first_model(http: httpx.AsyncClient, base_url: str) -> str:
    """The id of the first model GET /v1/models lists (ValueError when there is none)."""
    url = base_url.rstrip("/") + "/v1/models"
    try:
        response = await http.get(url)
    except httpx.HTTPError as exc:
        raise ValueError(f"model: GET {url} failed: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        status, text = response.status_code, _error_text(response.text)
        raise ValueError(f"model: GET {url} answered {status}: {text}")
    try:
        models = response.json().get("data") or []
    except (json.JSONDecodeError, AttributeError):
        models = []
    if not models or not isinstance(models[0], dict) or "id" not in models[0]:
        raise ValueError(f"model: GET {url} lists no model")
    return str(models[0]["id"])


async def stream_chat(
    http: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    record: RequestRecord,
    *,
    timeout_s: float,
    origin: float,
) -> RequestRecord:
    """Posts `payload` and fills `record` as the stream arrives; returns the record.

    `origin` is the `time.perf_counter()` the run's times count from.
    """
    start = time.perf_counter()
    record.start_s = start - origin
    try:
        await asyncio.wait_for(_stream(http, url, payload, record, start), timeout_s)
    except asyncio.TimeoutError:
        record.error = f"timed out after {timeout_s:g} s"
    except Exception as exc:  # connection errors, and anything else: recorded, never lost
        record.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if record.error is not None and record.e2e_s is None:
        record.e2e_s = time.perf_counter() - start
    return record


async def _stream(
    http: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    record: RequestRecord,
    start: float,
) -> None:
    async with http.stream("POST", url, json=payload) as response:
        record.status = response.status_code
        if response.status_code != 200:
            body = (await response.aread()).decode("utf-8", errors="replace")
            record.error = f"HTTP {response.status_code}: {_error_text(body)}"
            return
        async for data in sse_data(response.aiter_lines()):
            now = time.perf_counter() - start
            if data == "[DONE]":
                record.e2e_s = now
                return
            if not _take_event(data, record, now):
                record.e2e_s = now
                return
    record.error = "the stream ended without data: [DONE]"


def _take_event(data: str, record: RequestRecord, now: float) -> bool:
    """Adds one chunk to `record`; False (with `record.error` set) when the stream failed."""
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        record.error = f"not JSON in the stream: {_error_text(data)}"
        return False
    if not isinstance(event, dict):
        record.error = f"unexpected event in the stream: {_error_text(data)}"
        return False
    if event.get("error"):
        record.error = f"error event: {_error_text(json.dumps(event['error']))}"
        return False
    for choice in event.get("choices") or []:
        if (choice.get("delta") or {}).get("content"):
            record.chunk_times_s.append(now)
            break
    for choice in event.get("choices") or []:
        if choice.get("finish_reason"):
            record.finish_reason = str(choice["finish_reason"])
    usage = event.get("usage")
    if usage:
        record.prompt_tokens = usage.get("prompt_tokens")
        record.completion_tokens = usage.get("completion_tokens")
        if isinstance(usage.get("dvd_timings"), dict):
            record.server_timings = usage["dvd_timings"]
    return True


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each server-sent event (multi-line data joined by newlines)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue  # a comment (keep-alive)
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


def _error_text(body: str) -> str:
    """The message of an OpenAI-style error body, else the body itself; shortened."""
    text = body
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, TypeError):
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)
        if isinstance(error, dict) and error.get("message"):
            text = str(error["message"])
        elif isinstance(error, str):
            text = error
    text = " ".join(text.split())
    if len(text) > ERROR_TEXT_LIMIT:
        text = text[:ERROR_TEXT_LIMIT] + "..."
    return text
