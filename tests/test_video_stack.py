"""A video through the InternVL prompt and a real stack.

- The prompt: a video part renders to exactly the tokens of InternVL's own video prompt
  written by hand ("Frame1: <image>\\nFrame2: <image>\\n...\\n" + question, the model card's
  format), each frame one image slot (PromptBuilder on the tiny checkpoint's tokenizer).
- The stack (`dvd up`, tiny InternVL): the openai client sends a short video as a
  `video_url` data: URL and gets an answer; usage.prompt_tokens is that hand-written
  prompt's text tokens plus, per frame, one tile's rows and its <img></img> markers (the
  frames are wide: dynamic tiling would have cut each into 4 tiles); and the answer equals,
  token for token (greedy), the one Generate gives for a video part built in the test from
  the frames dvd.video samples, so the gateway sends exactly those frames.
"""

from __future__ import annotations

import base64
from pathlib import Path

import openai
import pytest
import torch

from dvd.checkpoint import load_config
from dvd.v1 import language_pb2
from dvd.video import sample_video
from gateway.config import GatewayConfig
from language_server.chat_prompt import PromptBuilder
from language_server.llm_view import prepare_llm_view
from tests.stack import Stack, generate
from tests.videos import make_video

QUESTION = "What happens in this video?"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def builder(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> PromptBuilder:
    config = load_config(tiny_checkpoint)
    view = prepare_llm_view(config, tmp_path_factory.mktemp("llm-view"))
    return PromptBuilder.from_checkpoint(config, view, torch.float32)


MARK = "<<image>>"


def hand_written(builder: PromptBuilder, frames: int, system: str = "") -> list[list[int]]:
    """InternVL's video prompt written by hand, templated and tokenised here: the token ids
    between its <image> places."""
    text = "".join(f"Frame{i}: {MARK}\n" for i in range(1, frames + 1)) + QUESTION
    chat = [{"role": "system", "content": system}] if system else []
    chat.append({"role": "user", "content": text})
    tokenizer = builder.tokenizer
    templated = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return [tokenizer.encode(p, add_special_tokens=False) for p in templated.split(MARK)]


def video_message(frames: list[bytes]) -> language_pb2.ChatMessage:
    video = language_pb2.VideoFrames(
        frames=frames, timestamps_s=[0.5 * i for i in range(len(frames))]
    )
    return language_pb2.ChatMessage(
        role="user",
        content=[language_pb2.ContentPart(video=video), language_pb2.ContentPart(text=QUESTION)],
    )


def test_video_renders_as_internvl_frame_prompt(builder: PromptBuilder) -> None:
    frames = [b"f1", b"f2", b"f3"]
    system = language_pb2.ChatMessage(
        role="system", content=[language_pb2.ContentPart(text="Be brief.")]
    )
    ours = builder.render([system, video_message(frames)])
    assert ours.segments == hand_written(builder, 3, system="Be brief.")
    assert ours.frame_slots == (True, True, True)
    rows = [torch.zeros(256, builder.embed_table.shape[1]) for _ in frames]
    prompt = builder.assemble(ours, rows)
    assert prompt.image_tokens == prompt.video_tokens == 3 * (256 + 2)


def wide_video() -> bytes:
    """2 s at 10 fps, 160x48 frames: sampled at 2 fps, 4 frames."""
    return make_video("mp4", frames=20, rate=10, width=160, height=48)


@pytest.mark.integration
def test_video_through_the_stack(dvd_stack: Stack, builder: PromptBuilder) -> None:
    data = wide_video()
    sampled = sample_video(data, GatewayConfig().video_limits())  # the gateway's defaults
    assert len(sampled.frames) == 4
    api = openai.OpenAI(base_url=dvd_stack.base_url + "/v1", api_key="-", max_retries=0)
    model = api.models.list().data[0].id
    url = f"data:video/mp4;base64,{base64.b64encode(data).decode()}"
    content = [
        {"type": "video_url", "video_url": {"url": url}},
        {"type": "text", "text": QUESTION},
    ]
    reply = api.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],  # type: ignore[list-item,misc]
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None
    text_tokens = sum(len(segment) for segment in hand_written(builder, 4))
    tokens_per_frame = 256 + 2  # one 448-px tile's rows + <img> + </img>
    assert reply.usage.prompt_tokens == text_tokens + 4 * tokens_per_frame

    # The same frames as a video part straight to the language server: the same tokens.
    direct, usage = generate(
        dvd_stack.language_port, [video_message(sampled.frames)], max_tokens=MAX_TOKENS
    )
    assert usage.prompt_tokens == reply.usage.prompt_tokens
    assert usage.video_tokens == usage.image_tokens == 4 * tokens_per_frame
    assert reply.usage.completion_tokens == len(direct)
    tokenizer = builder.tokenizer
    assert reply.choices[0].message.content == tokenizer.decode(direct, skip_special_tokens=True)


@pytest.mark.integration
def test_coupled_mode_gives_frames_one_tile_too(dvd_stack: Stack, coupled_stack: Stack) -> None:
    """Coupled mode (the ViT in the language server) tiles frames as the vision server does:
    the same prompt length and the same greedy tokens."""
    frames = sample_video(wide_video(), GatewayConfig().video_limits()).frames
    dvd_tokens, dvd_usage = generate(dvd_stack.language_port, [video_message(frames)], MAX_TOKENS)
    coupled_tokens, coupled_usage = generate(
        coupled_stack.language_port, [video_message(frames)], MAX_TOKENS
    )
    assert coupled_usage.video_tokens == dvd_usage.video_tokens == 4 * (256 + 2)
    assert coupled_usage.prompt_tokens == dvd_usage.prompt_tokens
    assert coupled_tokens == dvd_tokens


@pytest.mark.integration
def test_an_internvl_vision_server_refuses_a_video_item(dvd_stack: Stack) -> None:
    """A whole video as one item (ImageInput.video) is Qwen3-VL's; InternVL's language
    server sends frames as images, so an InternVL vision server refuses it clearly."""
    import grpc

    from dvd.v1 import vision_pb2, vision_pb2_grpc

    video = vision_pb2.VideoInput(frames=[b"f0", b"f1"], timestamps_s=[0.0, 0.5])
    request = vision_pb2.EncodeRequest(
        request_id="video-item", images=[vision_pb2.ImageInput(video=video)]
    )
    with grpc.insecure_channel(f"127.0.0.1:{dvd_stack.vision_port}") as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Encode(request, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "takes no video items" in (caught.value.details() or "")
