"""Converts a checked OpenAI chat request into the language server's `GenerateRequest`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from dvd import vir_mode
from dvd.grpc_options import MAX_MESSAGE_BYTES
from dvd.v1 import language_pb2
from gateway.config import GatewayConfig
from gateway.errors import ApiError
from gateway.images import load_image
from gateway.media_guard import MediaFetcher
from gateway.protocol import ChatCompletionRequest, ImagePart, VideoPart
from gateway.videos import VideoLoader

T = TypeVar("T")


@dataclass(frozen=True)
class ModelLimits:
    """What the served model allows, as far as the gateway knows it."""

    max_model_len: int | None = None
    max_images: int | None = None
    accepts_video: bool = True
    """False when the language servers said they take no video parts (Info)."""


async def to_generate_request(
    chat: ChatCompletionRequest,
    request_id: str,
    config: GatewayConfig,
    fetcher: MediaFetcher | None = None,
    limits: ModelLimits = ModelLimits(),
    videos: VideoLoader | None = None,
) -> language_pb2.GenerateRequest:
    """Messages (images loaded and checked, videos sampled into frames, order kept) and
    sampling settings."""
    sampling = sampling_options(chat, config.max_tokens_limit, limits.max_model_len)
    images = await load_images(chat, config, fetcher, limits.max_images)
    frames = await load_videos(
        chat, config, videos or VideoLoader(config, fetcher), limits.accepts_video
    )
    messages = []
    for m, message in enumerate(chat.messages):
        parts = []
        for p, part in enumerate(message.parts()):
            if isinstance(part, ImagePart):
                parts.append(language_pb2.ContentPart(image=images[(m, p)]))
            elif isinstance(part, VideoPart):
                parts.append(language_pb2.ContentPart(video=frames[(m, p)]))
            else:
                parts.append(language_pb2.ContentPart(text=part.text))
        messages.append(language_pb2.ChatMessage(role=message.role, content=parts))
    request = language_pb2.GenerateRequest(
        request_id=request_id,
        messages=messages,
        sampling=sampling,
        vir_mode=vir_mode.to_wire(vir_mode.parse(chat.vir_mode) if chat.vir_mode else None),
    )
    size = request.ByteSize() if frames else 0  # a walk over up to 256 MiB: once
    if size > MAX_MESSAGE_BYTES:
        # Sampled frames are PNGs: a long noisy video at full resolution can outgrow what
        # one gRPC message may carry, which would otherwise fail as a transport error.
        raise ApiError(
            400,
            f"messages: the videos' sampled frames take {size} bytes, more than "
            f"the {MAX_MESSAGE_BYTES} one request may carry to a language server; send "
            "shorter or smaller videos (or lower --max-video-frames / --max-video-pixels)",
            param="messages",
            code="video_too_large",
        )
    return request


async def load_images(
    chat: ChatCompletionRequest,
    config: GatewayConfig,
    fetcher: MediaFetcher | None,
    model_max_images: int | None = None,
) -> dict[tuple[int, int], bytes]:
    """Every image's bytes keyed by (message index, part index), after the count check."""
    where = [
        (m, p, part.image_url.url)
        for m, message in enumerate(chat.messages)
        for p, part in enumerate(message.parts())
        if isinstance(part, ImagePart)
    ]
    limit = config.max_images_per_request
    if model_max_images:
        limit = min(limit, model_max_images)
    if len(where) > limit:
        raise ApiError(
            400,
            f"messages: {len(where)} images in one request; at most {limit} are allowed",
            param="messages",
            code="too_many_images",
        )
    loads = [
        load_image(url, config, fetcher, f"messages[{m}].content[{p}].image_url.url")
        for m, p, url in where
    ]
    data = await _gather(loads)
    return {(m, p): blob for (m, p, _), blob in zip(where, data, strict=True)}


async def load_videos(
    chat: ChatCompletionRequest,
    config: GatewayConfig,
    videos: VideoLoader,
    accepts_video: bool = True,
) -> dict[tuple[int, int], language_pb2.VideoFrames]:
    """Every video's sampled frames keyed by (message index, part index), after the count
    check; videos load concurrently (their decodes share --max-concurrent-video-decodes)."""
    where = [
        (m, p, part.video_url.url)
        for m, message in enumerate(chat.messages)
        for p, part in enumerate(message.parts())
        if isinstance(part, VideoPart)
    ]
    if where and not accepts_video:
        raise ApiError(
            400,
            "messages: the served model's language servers take no video input",
            param="messages",
            code="video_not_supported",
        )
    if len(where) > config.max_videos_per_request:
        raise ApiError(
            400,
            f"messages: {len(where)} videos in one request; at most "
            f"{config.max_videos_per_request} are allowed",
            param="messages",
            code="too_many_videos",
        )
    loads = [videos.load(url, f"messages[{m}].content[{p}].video_url.url") for m, p, url in where]
    data = await _gather(loads)
    return {(m, p): video for (m, p, _), video in zip(where, data, strict=True)}


async def _gather(awaitables: Sequence[Awaitable[T]]) -> list[T]:
    """asyncio.gather that cancels the rest when one fails."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


def sampling_options(
    chat: ChatCompletionRequest, max_tokens_limit: int | None, max_model_len: int | None
) -> language_pb2.SamplingOptions:
    """OpenAI sampling fields as SamplingOptions; unset fields get OpenAI's defaults."""
    param = "max_completion_tokens" if chat.max_completion_tokens else "max_tokens"
    max_tokens = chat.requested_max_tokens()
    if max_tokens_limit is not None:
        if max_tokens is None:
            max_tokens = max_tokens_limit
        elif max_tokens > max_tokens_limit:
            raise ApiError(
                400,
                f"{param}: {max_tokens} is over this server's limit of {max_tokens_limit}",
                param=param,
            )
    if max_model_len and max_tokens is not None and max_tokens >= max_model_len:
        raise ApiError(
            400,
            f"{param}: {max_tokens} leaves no room for the prompt in the model's context of "
            f"{max_model_len} tokens",
            param=param,
        )
    return language_pb2.SamplingOptions(
        max_tokens=max_tokens or 0,
        temperature=1.0 if chat.temperature is None else chat.temperature,
        top_p=1.0 if chat.top_p is None else chat.top_p,
        seed=chat.seed or 0,
        has_seed=chat.seed is not None,
        stop=chat.stop_list(),
        ignore_eos=chat.ignore_eos,
    )
