"""Qwen3-VL served end to end (issue 13): `dvd up --model QWEN3VL_DIR` answers image and
video chats.

One `dvd up` at a time (fp32, qwen3vl-tiny): DvD over the grpc transport, DvD over shm, and
`dvd up --coupled` (the tower inside the language server), each started once for the tests
that use it. Fidelity: greedy tokens over the real gRPC path (the language server's
Generate; in DvD, features from the vision server through the transport) equal
transformers' `Qwen3VLForConditionalGeneration.generate` in fp32, fed pixel values from the
same preprocessing of the same PNG bytes and the chat template's ids with each image pad
expanded to the tokens its grid implies, so DvD == coupled as well; the prompt length and
image tokens reported in usage are what the grids imply. The gateway is checked with the
official openai client, streaming and not.

Video: a 2.5 s clip made with PyAV, sampled as the gateway does (5 frames at 2 fps, an odd
count: the last temporal patch repeats the last frame), sent as one item; the reference is
transformers fed pixel values from the same preprocessing of the same frames and the chat
template's text with its `<|vision_start|><|video_pad|><|vision_end|>` replaced as the
releases' processor (transformers 4.57's Qwen3VLProcessor) replaced it: per temporal patch
`<t seconds>` (transformers' _calculate_timestamps of the frame indices and the video's
fps) and the patch's markers and pads. (tcp was checked the same way by hand: a fourth
stack costs about 35 s.)
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dvd.checkpoint.qwen3vl_config import Qwen3VLConfig, load_qwen3vl_config
from dvd.v1 import language_pb2
from dvd.video import SampledVideo, VideoLimits, sample_video
from tests.stack import Stack, chat_message, generate, start_stack
from tests.videos import make_video
from vision_server.qwen3vl.preprocess import VisionInput, preprocess_image, preprocess_video
from vision_server.qwen3vl.processor_config import (
    load_image_processor_config,
    load_video_processor_config,
)
from vision_server.tiling import decode_image

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 12


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


CASES = {
    "one image": ([_png(96, 64, 1)], "What is this?"),
    # 64 x 96 is upscaled to 224 x 320 (70 tokens); 448 x 320 -> 140 tokens
    "two images": ([_png(96, 64, 2), _png(448, 320, 3)], "Compare them."),
    "text only": ([], "Tell me a story."),
}


@pytest.fixture(scope="module")
def tiny(qwen3vl_tiny_checkpoint: Path) -> Path:
    return qwen3vl_tiny_checkpoint


@pytest.fixture(scope="module")
def config(tiny: Path) -> Qwen3VLConfig:
    return load_qwen3vl_config(tiny)


@pytest.fixture(scope="module", params=["grpc", "shm", "coupled"])
def stack(
    request: pytest.FixtureRequest, tiny: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """`dvd up` on the checkpoint; PYTHONPATH puts this checkout first, so the children
    and vLLM's processes import its code."""
    with pytest.MonkeyPatch.context() as patch:
        path = os.environ.get("PYTHONPATH")
        patch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), path) if p))
        workdir = tmp_path_factory.mktemp(f"qwen3vl-{request.param}")
        how = ["--coupled"] if request.param == "coupled" else ["--transport", request.param]
        started = start_stack(tiny, workdir, "--dtype", "float32", *how)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def reference(tiny: Path) -> Any:
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


def _reference(
    reference: Any, tokenizer: Any, config: Qwen3VLConfig, tiny: Path, name: str
) -> tuple[list[int], int, int]:
    """transformers' greedy tokens, the prompt's length, and the template's (one pad per
    image) for a case."""
    images, text = CASES[name]
    content: list[dict[str, str]] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": text})
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    short = tokenizer.encode(templated, add_special_tokens=False)
    processor = load_image_processor_config(tiny)
    items: list[VisionInput] = [
        preprocess_image(decode_image(data, 10**8), processor) for data in images
    ]
    tokens = iter(config.tokens_of_grid(*item.grid_thw) for item in items)
    full: list[int] = []
    for token in short:
        full += [token] * next(tokens) if token == config.image_token_id else [token]
    inputs: dict[str, Any] = {
        "input_ids": torch.tensor([full]),
        "mm_token_type_ids": torch.tensor([[int(t == config.image_token_id) for t in full]]),
    }
    if items:
        inputs["pixel_values"] = torch.cat([item.pixel_values for item in items])
        inputs["image_grid_thw"] = torch.tensor([item.grid_thw for item in items])
    with torch.no_grad():
        out = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(full) :].tolist(), len(full), len(short)


@pytest.mark.parametrize("name", list(CASES))
def test_served_tokens_equal_transformers(
    name: str, stack: Stack, reference: Any, tokenizer: Any, config: Qwen3VLConfig, tiny: Path
) -> None:
    images, text = CASES[name]
    expected, prompt_tokens, template_tokens = _reference(reference, tokenizer, config, tiny, name)
    got, usage = generate(stack.language_port, [chat_message(text, images)], NEW_TOKENS)
    assert got == expected
    assert usage.prompt_tokens == prompt_tokens  # type: ignore[attr-defined]
    # image_tokens: each image's rows plus its <|vision_start|>/<|vision_end|>; the
    # template's ids hold one pad per image where the prompt holds the rows
    rows = prompt_tokens - template_tokens + len(images)
    assert usage.image_tokens == rows + 2 * len(images)  # type: ignore[attr-defined]


def test_features_travel_by_the_chosen_transport(stack: Stack) -> None:
    """The shm arena fits the widest image the processor allows (16 MiB in fp32 here): no
    request fell back to grpc."""
    assert "travel over grpc" not in stack.log_path.read_text(errors="replace")


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_openai_client_streaming_and_not(stack: Stack) -> None:
    from openai import OpenAI

    images, text = CASES["two images"]
    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": _data_url(data)}} for data in images
    ]
    content.append({"type": "text", "text": text})
    messages: Any = [{"role": "user", "content": content}]
    answer = client.chat.completions.create(
        model=model, messages=messages, max_tokens=NEW_TOKENS, temperature=0
    )
    assert answer.usage is not None
    # the template's text + 70 + 140 image rows, one pad each replaced
    assert answer.usage.prompt_tokens == 235
    assert answer.usage.completion_tokens == NEW_TOKENS
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=NEW_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer.choices[0].message.content
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[-1].prompt_tokens == 235


VIDEO = make_video("mp4", frames=10, rate=4, width=128, height=96, top=(200, 40, 90))
"""2.5 s at 4 fps: the gateway's sampler (2 fps) takes 5 frames."""
VIDEO_TEXT = "What happens in this video?"


@pytest.fixture(scope="module")
def sampled() -> SampledVideo:
    video = sample_video(VIDEO, VideoLimits())  # the gateway's defaults
    assert len(video.frames) == 5 and video.source_fps == 4
    return video


def _video_reference(
    reference: Any, tokenizer: Any, config: Qwen3VLConfig, tiny: Path, video: SampledVideo
) -> tuple[list[int], int, int]:
    """transformers' greedy tokens, the prompt's length and the video's tokens in it."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    content = [{"type": "video"}, {"type": "text", "text": VIDEO_TEXT}]
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    video_config = load_video_processor_config(tiny)
    frames = [np.asarray(decode_image(frame, 10**8)) for frame in video.frames]
    times = [index / video.source_fps for index in video.frame_indices]
    item = preprocess_video(frames, times, video_config)
    # transformers' own rule for the times written into the prompt (self is unused)
    seconds = Qwen3VLProcessor._calculate_timestamps(
        None, list(video.frame_indices), video.source_fps, 2
    )
    assert seconds == pytest.approx(item.timestamps)
    per_patch = config.tokens_of_grid(1, *item.grid_thw[1:])
    expansion = "".join(
        f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per_patch + "<|vision_end|>"
        for t in seconds
    )
    triple = "<|vision_start|><|video_pad|><|vision_end|>"
    assert templated.count(triple) == 1
    full = tokenizer.encode(templated.replace(triple, expansion), add_special_tokens=False)
    template = tokenizer.encode(templated, add_special_tokens=False)
    inputs = {
        "input_ids": torch.tensor([full]),
        "mm_token_type_ids": torch.tensor([[2 * int(t == config.video_token_id) for t in full]]),
        "pixel_values_videos": item.pixel_values,
        "video_grid_thw": torch.tensor([item.grid_thw]),
    }
    with torch.no_grad():
        out = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    # the video's tokens: its expansion in place of the template's three
    return out[0, len(full) :].tolist(), len(full), len(full) - len(template) + 3


def _video_message(video: SampledVideo) -> language_pb2.ChatMessage:
    frames = language_pb2.VideoFrames(
        frames=video.frames,
        timestamps_s=video.timestamps_s,
        frame_indices=video.frame_indices,
        source_fps=video.source_fps,
        source_frames=video.source_frames,
        duration_s=video.duration_s,
    )
    parts = [language_pb2.ContentPart(video=frames), language_pb2.ContentPart(text=VIDEO_TEXT)]
    return language_pb2.ChatMessage(role="user", content=parts)


def test_served_video_tokens_equal_transformers(
    stack: Stack,
    sampled: SampledVideo,
    reference: Any,
    tokenizer: Any,
    config: Qwen3VLConfig,
    tiny: Path,
) -> None:
    expected, prompt_tokens, video_tokens = _video_reference(
        reference, tokenizer, config, tiny, sampled
    )
    got, usage = generate(stack.language_port, [_video_message(sampled)], NEW_TOKENS)
    assert got == expected
    assert usage.prompt_tokens == prompt_tokens  # type: ignore[attr-defined]
    # 3 temporal patches (5 frames, the last doubled) of 6 x 8 patches: 12 rows each
    assert video_tokens > 3 * (12 + 2)  # rows, markers and the `<t seconds>` text
    assert usage.video_tokens == usage.image_tokens == video_tokens  # type: ignore[attr-defined]


def test_openai_client_streams_a_video(stack: Stack, sampled: SampledVideo) -> None:
    """Through the gateway (which decodes and samples the video_url): no 400, and the
    streamed answer and usage equal the non-streamed ones."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    url = "data:video/mp4;base64," + base64.b64encode(VIDEO).decode()
    content = [
        {"type": "video_url", "video_url": {"url": url}},
        {"type": "text", "text": VIDEO_TEXT},
    ]
    messages: Any = [{"role": "user", "content": content}]
    answer = client.chat.completions.create(
        model=model, messages=messages, max_tokens=NEW_TOKENS, temperature=0
    )
    assert answer.usage is not None and answer.usage.completion_tokens == NEW_TOKENS
    _, direct = generate(stack.language_port, [_video_message(sampled)], NEW_TOKENS)
    assert answer.usage.prompt_tokens == direct.prompt_tokens  # type: ignore[attr-defined]
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=NEW_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer.choices[0].message.content
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[-1].prompt_tokens == answer.usage.prompt_tokens
    # the video's region came from its first frame's header: no fallback to grpc
    assert "travel over grpc" not in stack.log_path.read_text(errors="replace")
