"""The whole stack as real processes on loopback, driven with the official openai client."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest
import torch
from PIL import Image

from tests.conftest import STACK_OF_TRANSPORT
from tests.images import data_url, png_bytes
from tests.stack import Stack, chat_message, generate, http_status

pytestmark = pytest.mark.integration

IMAGE_CASES = {"448x448": (448, 448), "1024x768": (1024, 768), "300x900": (300, 900)}


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=120
    )


def model_name(stack: Stack) -> str:
    return client(stack).models.list().data[0].id


def image_message(text: str, *images: bytes) -> dict:
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def test_text_chat_streaming_and_not_agree(any_dvd_stack: Stack) -> None:
    api, model = client(any_dvd_stack), model_name(any_dvd_stack)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colours."},
    ]
    reply = api.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    stream = api.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens


def test_image_chat_counts_image_tokens_in_usage(
    any_dvd_stack: Stack, tiny_checkpoint: Path
) -> None:
    api, model = client(any_dvd_stack), model_name(any_dvd_stack)
    text_only = api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe it."}], max_tokens=4
    )
    reply = api.chat.completions.create(
        model=model, messages=[image_message("Describe it.", png_bytes(1024, 768))], max_tokens=4
    )
    # 1024x768 -> 4x3 grid + thumbnail = 13 tiles of 256 tokens, plus <img> and </img>;
    # the placeholder line adds its newline to the text.
    image_tokens = 13 * 256 + 2
    extra = reply.usage.prompt_tokens - text_only.usage.prompt_tokens
    assert image_tokens <= extra <= image_tokens + 2
    stream = api.chat.completions.create(
        model=model,
        messages=[image_message("Describe it.", png_bytes(448, 448, seed=1))],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = list(stream)[-1].usage
    assert usage.prompt_tokens - text_only.usage.prompt_tokens >= 256 + 2


@pytest.mark.parametrize("case", ["text", *IMAGE_CASES, "two-images"])
def test_dvd_equals_coupled_token_for_token(
    case: str, any_dvd_stack: Stack, coupled_stack: Stack
) -> None:
    if case == "text":
        images: list[bytes] = []
    elif case == "two-images":
        images = [png_bytes(600, 300, seed=5), png_bytes(300, 600, seed=6)]
    else:
        images = [png_bytes(*IMAGE_CASES[case], seed=2)]
    messages = [chat_message("What is in the picture?", images)]
    dvd_ids, dvd_usage = generate(any_dvd_stack.language_port, messages, max_tokens=16)
    coupled_ids, coupled_usage = generate(coupled_stack.language_port, messages, max_tokens=16)
    assert dvd_ids == coupled_ids
    assert dvd_usage == coupled_usage
    # And through the gateway, with the official client.
    chat = [image_message("What is in the picture?", *images)]
    answers = [
        client(s).chat.completions.create(
            model=model_name(s), messages=chat, max_tokens=16, temperature=0
        )
        for s in (any_dvd_stack, coupled_stack)
    ]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content


@pytest.mark.parametrize("transport", ["grpc", "shm", "tcp"])
def test_features_arrive_bit_identical(
    transport: str, tiny_checkpoint: Path, request: pytest.FixtureRequest
) -> None:
    import grpc

    from dvd.checkpoint import load_config
    from dvd.grpc_options import CHANNEL_OPTIONS
    from dvd.transport import receiver_class
    from dvd.transport.base import RequestShape
    from dvd.v1 import vision_pb2, vision_pb2_grpc
    from vision_server.encoder import TilingLimits, VisionEncoder

    stack: Stack = request.getfixturevalue(STACK_OF_TRANSPORT[transport])
    receiver = receiver_class(transport)(**({"arena_bytes": 2**24} if transport == "shm" else {}))
    reception = receiver.open(RequestShape("bits", [13 * 256 * 64 * 2], 64, torch.bfloat16))
    image = png_bytes(1024, 768, seed=9)
    call = vision_pb2.EncodeRequest(
        request_id="bits",
        images=[vision_pb2.ImageInput(data=image)],
        max_chunk_bytes=100_000,
        destination=reception.destination,
    )
    try:
        with grpc.insecure_channel(
            f"127.0.0.1:{stack.vision_port}", options=CHANNEL_OPTIONS
        ) as channel:
            replies = list(vision_pb2_grpc.VisionServiceStub(channel).Encode(call, timeout=60))
        plan = replies[0].plan
        assert plan.num_tiles == 13 and (plan.grid_cols, plan.grid_rows) == (4, 3)
        reception.on_plan(plan)
        for reply in replies[1:-1]:
            assert len(reply.chunk.data) <= 100_000
            assert bool(reply.chunk.data) == (transport == "grpc")
            reception.on_chunk(reply.chunk)
        asyncio.run(reception.settle(30))
        (received,) = reception.features()
        assert replies[-1].done.num_tokens == 13 * 256

        encoder = VisionEncoder(load_config(tiny_checkpoint), "cpu", torch.bfloat16)
        tiles = encoder.preprocess(image, TilingLimits(1, 12, True, 10**8))
        produced = encoder.encode(tiles.pixel_values).quarter.reshape(-1, plan.hidden_size)
        assert torch.equal(received.view(torch.int16), produced.view(torch.int16))
    finally:
        reception.release()
        receiver.close()


def _post(stack: Stack, body: bytes | dict) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        stack.base_url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )


def _truncated_png() -> bytes:
    return png_bytes(640, 480)[:2000]


def _bad_requests(model: str) -> dict[str, tuple[bytes | dict, int]]:
    def with_url(url: str) -> dict:
        return {
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "hi"},
                    ],
                }
            ],
        }

    huge = io.BytesIO()
    Image.new("L", (8000, 6000)).save(huge, format="PNG")
    return {
        "invalid json": (b'{"model": "x", "messages": [', 400),
        "no messages": ({"model": model, "messages": []}, 400),
        "not base64": (with_url("data:image/png;base64,@@@not-base64@@@"), 400),
        "not an image": (with_url(data_url(b"plain text, not pixels")), 400),
        "truncated png": (with_url(data_url(_truncated_png())), 400),
        "over the pixel limit": (with_url(data_url(huge.getvalue())), 400),
        "too many images": (
            {
                "model": model,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_url(png_bytes(32, 32))}}
                        ]
                        * 40,
                    }
                ],
            },
            400,
        ),
        "prompt too long": (
            {"model": model, "messages": [{"role": "user", "content": "word " * 20000}]},
            400,
        ),
        "unknown model": (
            {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
            404,
        ),
    }


@pytest.mark.parametrize("case", list(_bad_requests("m")))
def test_bad_input_gets_an_openai_error_and_the_stack_stays_healthy(
    case: str, any_dvd_stack: Stack
) -> None:
    body, status = _bad_requests(model_name(any_dvd_stack))[case]
    response = _post(any_dvd_stack, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and "type" in error and "code" in error and "param" in error
    if case == "unknown model":
        assert error["code"] == "model_not_found"
    assert http_status(any_dvd_stack.base_url + "/ready") == 200
    ok = client(any_dvd_stack).chat.completions.create(
        model=model_name(any_dvd_stack),
        messages=[image_message("ok?", png_bytes(64, 64))],
        max_tokens=2,
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_a_client_that_goes_away_leaves_the_stack_healthy(any_dvd_stack: Stack) -> None:
    body = {
        "model": model_name(any_dvd_stack),
        "stream": True,
        "max_tokens": 2000,
        "messages": [image_message("go on", png_bytes(1024, 768, seed=4))],
        "ignore_eos": True,
    }
    with httpx.stream(
        "POST", any_dvd_stack.base_url + "/v1/chat/completions", json=body, timeout=60
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                break  # leave after the first token
    metrics = (
        urllib.request.urlopen(any_dvd_stack.base_url + "/metrics", timeout=10).read().decode()
    )
    assert "dvd_gateway_requests_total" in metrics
    assert http_status(any_dvd_stack.base_url + "/ready") == 200
    reply = client(any_dvd_stack).chat.completions.create(
        model=model_name(any_dvd_stack),
        messages=[{"role": "user", "content": "still there?"}],
        max_tokens=2,
    )
    assert reply.choices[0].message.content is not None


def test_metrics_report_every_stage(any_dvd_stack: Stack) -> None:
    client(any_dvd_stack).chat.completions.create(
        model=model_name(any_dvd_stack),
        messages=[image_message("x", png_bytes(448, 448))],
        max_tokens=2,
    )
    metrics = (
        urllib.request.urlopen(any_dvd_stack.base_url + "/metrics", timeout=10).read().decode()
    )
    for stage in ("queue", "preprocess", "encode", "transfer", "prompt", "prefill", "decode"):
        assert f'dvd_gateway_stage_seconds_count{{stage="{stage}"}}' in metrics
    for name in (
        "dvd_gateway_ttft_seconds",
        "dvd_gateway_tpot_seconds",
        "dvd_gateway_image_tokens_total",
    ):
        assert name in metrics


def test_models_health_and_ready(dvd_stack: Stack) -> None:
    models = httpx.get(dvd_stack.base_url + "/v1/models", timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "internvl3_5-tiny"
    assert http_status(dvd_stack.base_url + "/health") == 200
    assert http_status(dvd_stack.base_url + "/ready") == 200


def test_data_url_in_other_formats(any_dvd_stack: Stack) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (500, 300), (200, 30, 40)).save(buffer, format="JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    reply = client(any_dvd_stack).chat.completions.create(
        model=model_name(any_dvd_stack),
        max_tokens=2,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
    )
    assert reply.usage.prompt_tokens > 256
