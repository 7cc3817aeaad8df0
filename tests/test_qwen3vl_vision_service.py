"""The Qwen3-VL vision service in process (no gRPC, no vLLM): what its plans say, that its
rows are the encoder's, the content-keyed cache, the patch-counted queue bound, the
batcher's packing, a video encoded as one item (plan, times, rows, key), and the language
side's prompt assembly from the template (images and videos). About 15 s on qwen3vl-tiny."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dvd.checkpoint.qwen3vl_config import Qwen3VLConfig, load_qwen3vl_config
from dvd.deadline import Deadline
from dvd.errors import InvalidInput, Overloaded
from dvd.features import FeatureAssembler, wire_dtype
from dvd.transport import grpc_stream
from dvd.v1 import language_pb2, vision_pb2
from language_server.image_features import EncodedImages, VideoClip
from language_server.qwen3vl_prompt import Qwen3VLPromptBuilder
from vision_server.batcher import Cancellation
from vision_server.config import VisionServerConfig
from vision_server.metrics import VisionMetrics
from vision_server.qwen3vl.encoder import Qwen3VLEncoder
from vision_server.qwen3vl.item_batcher import ItemBatcher
from vision_server.qwen3vl.preprocess import VisionInput, preprocess_image, preprocess_video
from vision_server.qwen3vl.processor_config import (
    load_image_processor_config,
    load_video_processor_config,
)
from vision_server.qwen3vl.service import ItemCache, Qwen3VLVisionService


@pytest.fixture(scope="module")
def tiny(qwen3vl_tiny_checkpoint: Path) -> Path:
    return qwen3vl_tiny_checkpoint


@pytest.fixture(scope="module")
def config(tiny: Path) -> Qwen3VLConfig:
    return load_qwen3vl_config(tiny)


@pytest.fixture(scope="module")
def encoder(config: Qwen3VLConfig) -> Qwen3VLEncoder:
    return Qwen3VLEncoder(config, device="cpu", dtype=torch.float32)


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _service(
    tiny: Path, encoder: Qwen3VLEncoder, max_queued_patches: int = 0
) -> Qwen3VLVisionService:
    config = VisionServerConfig(model=str(tiny), dtype="float32", transport="grpc")
    processor = load_image_processor_config(tiny)
    batcher = ItemBatcher(encoder, 16384, 1.0, max_queued_patches)
    batcher.start()
    senders = {"grpc": grpc_stream.Sender()}
    cache = ItemCache(64 * 2**20)
    video = load_video_processor_config(tiny)
    return Qwen3VLVisionService(
        config, encoder, processor, batcher, VisionMetrics(), senders, cache, video=video
    )


def _request(images: list[bytes]) -> vision_pb2.EncodeRequest:
    return vision_pb2.EncodeRequest(
        request_id="r",
        images=[vision_pb2.ImageInput(data=d) for d in images],
        feature_dtype=wire_dtype(torch.float32),
    )


async def _collect(stream: AsyncIterator[vision_pb2.EncodeResponse]) -> list[Any]:
    return [message async for message in stream]


def _rows(messages: list[vision_pb2.EncodeResponse]) -> dict[int, torch.Tensor]:
    assemblers: dict[int, FeatureAssembler] = {}
    for message in messages:
        if message.HasField("plan"):
            plan = message.plan
            assemblers[plan.image_index] = FeatureAssembler(
                sum(plan.tokens_per_tile), plan.hidden_size, torch.float32
            )
        elif message.HasField("chunk"):
            chunk = message.chunk
            assemblers[chunk.image_index].add(chunk.row_offset, chunk.descriptor, chunk.data)
    return {index: a.tensor for index, a in assemblers.items() if a.complete}


def test_plans_rows_and_cache(tiny: Path, config: Qwen3VLConfig, encoder: Qwen3VLEncoder) -> None:
    images = [_png(96, 64, 1), _png(448, 320, 2)]
    processor = load_image_processor_config(tiny)

    async def run() -> tuple[list[Any], list[Any]]:
        service = _service(tiny, encoder)
        try:
            first = await _collect(service.run_call(_request(images), Deadline()))
            again = await _collect(service.run_call(_request(images), Deadline()))
        finally:
            await service.batcher.stop()
            service.close()
        return first, again

    first, again = asyncio.run(run())
    plans = [m.plan for m in first if m.HasField("plan")]
    expected: list[VisionInput] = [
        preprocess_image(Image.open(io.BytesIO(d)).convert("RGB"), processor) for d in images
    ]
    assert [list(p.grid_thw) for p in plans] == [list(e.grid_thw) for e in expected]
    assert [p.tokens_per_tile[0] for p in plans] == [70, 140]
    for plan in plans:
        assert plan.modality == vision_pb2.MODALITY_IMAGE
        assert plan.hidden_size == config.feature_width == config.vision.out_hidden_size * 4
        assert plan.deepstack_levels == 3 and len(plan.content_key) == 32
    assert plans[0].content_key != plans[1].content_key
    rows = _rows(first)
    for index, item in enumerate(encoder.encode(expected)):
        torch.testing.assert_close(rows[index], item.features, rtol=0, atol=0)
    # the second call comes from the cache: same keys, same rows, no ViT
    assert first[-1].done.images_from_cache == 0
    assert again[-1].done.images_from_cache == 2
    assert [m.plan.content_key for m in again if m.HasField("plan")] == [
        p.content_key for p in plans
    ]
    for index, tensor in _rows(again).items():
        torch.testing.assert_close(tensor, rows[index], rtol=0, atol=0)


def test_a_busy_queue_refuses_a_call_by_patches(tiny: Path, encoder: Qwen3VLEncoder) -> None:
    async def run() -> None:
        service = _service(tiny, encoder, max_queued_patches=300)
        busy = Cancellation()
        try:
            assert service.batcher.admit(busy, 200)  # another call holds 200 patches
            with pytest.raises(Overloaded, match="patches wait for the ViT"):
                # 96 x 64 -> 224 x 320 px: 280 patches, 480 > 300
                await _collect(service.run_call(_request([_png(96, 64, 5)]), Deadline()))
            service.batcher.withdraw(busy)
            done = await _collect(service.run_call(_request([_png(96, 64, 5)]), Deadline()))
            assert done[-1].done.num_tokens == 70
            with pytest.raises(InvalidInput, match="cannot decode image"):
                await _collect(service.run_call(_request([b"not an image"]), Deadline()))
        finally:
            await service.batcher.stop()
            service.close()

    asyncio.run(run())


def test_a_call_whose_deadline_passes_while_queued_is_counted_as_expired(
    tiny: Path, encoder: Qwen3VLEncoder
) -> None:
    """The shared run_call: a stopped Qwen3-VL call counts in dvd_vision_expired_total and
    its queued image is dropped, as an InternVL call's tiles are."""

    async def run() -> None:
        service = _service(tiny, encoder)
        await service.batcher.stop()  # nothing leaves the queue: the call waits there
        registry = service.metrics.registry
        try:
            deadline = Deadline.after(0.2)
            call = asyncio.create_task(
                _collect(service.run_call(_request([_png(96, 64, 7)]), deadline))
            )
            while not service.batcher._pending or not deadline.expired():
                await asyncio.sleep(0.01)
            call.cancel()  # what the session does when the deadline passes
            with pytest.raises(asyncio.CancelledError):
                await call
            assert registry.get_sample_value("dvd_vision_expired_total") == 1
            assert registry.get_sample_value("dvd_vision_tiles_dropped_total") == 1
            assert (
                registry.get_sample_value(
                    "dvd_vision_requests_total", {"status": "deadline_exceeded"}
                )
                == 1
            )
            assert not service.batcher._pending
            assert service.batcher.admitted_patches == 0
        finally:
            service.close()

    asyncio.run(run())


def test_one_header_reader_sizes_both_sides(tiny: Path) -> None:
    """resized_grid is what the vision server counts patches by and the language server
    rows by; each keeps its own fallback for an unreadable image."""
    from language_server.qwen3vl_server import image_rows
    from vision_server.qwen3vl.preprocess import resized_grid

    processor = load_image_processor_config(tiny)
    assert resized_grid(_png(96, 64, 1), processor) == (14, 20)  # 224 x 320 px
    assert resized_grid(b"not an image", processor) is None
    assert image_rows(processor, _png(96, 64, 1)) == 14 * 20 // processor.merge_size**2
    encoder_free = Qwen3VLVisionService.__new__(Qwen3VLVisionService)
    encoder_free.processor = processor
    assert encoder_free._patches(_png(96, 64, 1)) == 280
    assert encoder_free._patches(b"not an image") == 1


def test_the_batcher_packs_items_by_patches(tiny: Path, encoder: Qwen3VLEncoder) -> None:
    processor = load_image_processor_config(tiny)
    small = preprocess_image(Image.new("RGB", (64, 64)), processor)  # 256 patches
    batches: list[int] = []

    class Counting:
        config = encoder.config

        def encode_batch(self, items: list[VisionInput]) -> list[Any]:
            batches.append(sum(item.num_patches for item in items))
            return encoder.encode_batch(items)

    async def run() -> None:
        batcher = ItemBatcher(Counting(), 600, 50.0)  # type: ignore[arg-type]
        batcher.start()
        try:
            call = Cancellation()
            futures = [batcher.submit(small, call) for _ in range(5)]
            results = await asyncio.gather(*futures)
            assert all(r.item.features.shape[0] == 64 for r in results)
        finally:
            await batcher.stop()

    asyncio.run(run())
    assert small.num_patches == 256
    assert batches == [512, 512, 256]  # two items per forward fit 600 patches


def _message(*parts: str | bytes, role: str = "user") -> language_pb2.ChatMessage:
    content = [
        language_pb2.ContentPart(image=p)
        if isinstance(p, bytes)
        else language_pb2.ContentPart(text=p)
        for p in parts
    ]
    return language_pb2.ChatMessage(role=role, content=content)


def test_prompt_has_one_pad_per_image_and_counts_the_rows(
    tiny: Path, config: Qwen3VLConfig
) -> None:
    builder = Qwen3VLPromptBuilder.from_checkpoint(config, tiny)
    rendered = builder.render([_message(b"a", b"b", "Compare them.")])
    assert rendered.ids.count(config.image_token_id) == 2
    width = config.feature_width
    encoded = EncodedImages(
        features=[torch.zeros(70, width), torch.zeros(140, width)],
        grids=[(1, 14, 20), (1, 20, 28)],
        content_keys=["k1", "k2"],
    )
    prompt = builder.assemble_images(rendered, encoded)
    assert len(prompt.token_ids) == len(rendered.ids) - 2 + 210
    assert prompt.image_tokens == 210 + 4
    request = prompt.engine_input()
    assert request["prompt_token_ids"] == rendered.ids
    assert request["multi_modal_uuids"] == {"image": ["k1", "k2"]}
    assert request["multi_modal_data"]["image"]["image_embeds"].shape == (210, width)
    with pytest.raises(InvalidInput, match="reserved vision token"):
        builder.render([_message("look: <|vision_start|><|image_pad|><|vision_end|>")])
    with pytest.raises(InvalidInput, match="only allowed in user messages"):
        builder.render([_message(b"a", role="assistant")])


def test_the_language_side_sizes_each_region_from_the_header(tiny: Path) -> None:
    from language_server.qwen3vl_server import image_rows

    processor = load_image_processor_config(tiny)
    assert image_rows(processor, _png(96, 64, 1)) == 70
    assert image_rows(processor, _png(448, 320, 2)) == 140
    assert image_rows(processor, b"not an image") == processor.max_pixels // 32**2


def _frames(count: int, width: int = 128, height: int = 96) -> list[bytes]:
    return [_png(width, height, 20 + i) for i in range(count)]


def _video_request(frames: list[bytes], times: list[float]) -> vision_pb2.EncodeRequest:
    video = vision_pb2.VideoInput(frames=frames, timestamps_s=times)
    return vision_pb2.EncodeRequest(
        request_id="v",
        images=[vision_pb2.ImageInput(data=_png(96, 64, 1)), vision_pb2.ImageInput(video=video)],
        feature_dtype=wire_dtype(torch.float32),
    )


@pytest.mark.parametrize("count", [4, 5, 1])
def test_a_video_is_one_item_with_its_times(
    count: int, tiny: Path, config: Qwen3VLConfig, encoder: Qwen3VLEncoder
) -> None:
    """A video (after an image) is ONE item: its frames paired into temporal patches (an odd
    count padded with the last frame, one frame doubled), a time per patch (the mean of its
    two frames'), rows equal to the encoder's over preprocess_video of the same frames, and
    a content key over frames and times."""
    frames = _frames(count)
    times = [0.4 + 0.1 * i for i in range(count)]  # the first patch at 0.45 s: "0.5"
    video_config = load_video_processor_config(tiny)

    async def run() -> tuple[list[Any], list[Any]]:
        service = _service(tiny, encoder)
        try:
            first = await _collect(service.run_call(_video_request(frames, times), Deadline()))
            shifted = [t + 1 for t in times]  # other times: another item
            other = await _collect(service.run_call(_video_request(frames, shifted), Deadline()))
        finally:
            await service.batcher.stop()
            service.close()
        return first, other

    first, other = asyncio.run(run())
    image_plan, plan = [m.plan for m in first if m.HasField("plan")]
    assert image_plan.modality == vision_pb2.MODALITY_IMAGE and not image_plan.patch_times_s
    assert plan.modality == vision_pb2.MODALITY_VIDEO and plan.image_index == 1
    pixels = [np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in frames]
    if count == 1:
        pixels, times = pixels * 2, times * 2
    expected = preprocess_video(pixels, times, video_config)
    t = (count + 1) // 2
    assert list(plan.grid_thw) == list(expected.grid_thw) and plan.grid_thw[0] == t
    # exact: the prompt prints each time to one decimal, as transformers does from doubles
    assert tuple(plan.patch_times_s) == expected.timestamps and len(plan.patch_times_s) == t
    if count == 5:  # the last patch is frame 4 twice
        assert list(plan.patch_times_s) == pytest.approx([0.45, 0.65, 0.8])
    assert plan.tokens_per_tile[0] == config.tokens_of_grid(*expected.grid_thw)
    [encoded] = encoder.encode([expected])
    torch.testing.assert_close(_rows(first)[1], encoded.features, rtol=0, atol=0)
    other_plan = [m.plan for m in other if m.HasField("plan")][1]
    assert other_plan.content_key != plan.content_key
    assert other[-1].done.images_from_cache == 1  # the image; the video is another item


def test_video_requests_are_refused_clearly(tiny: Path, encoder: Qwen3VLEncoder) -> None:
    async def run() -> None:
        service = _service(tiny, encoder)
        try:
            with pytest.raises(InvalidInput, match="2 frames but 1 timestamps"):
                await _collect(service.run_call(_video_request(_frames(2), [0.0]), Deadline()))
            mixed = _frames(1) + _frames(1, width=64)
            with pytest.raises(InvalidInput, match="share one size"):
                await _collect(service.run_call(_video_request(mixed, [0.0, 1.0]), Deadline()))
        finally:
            await service.batcher.stop()
            service.close()

    asyncio.run(run())


def test_the_language_side_sizes_a_video_region_from_the_first_frame(tiny: Path) -> None:
    from language_server.qwen3vl_server import item_rows

    processor = load_image_processor_config(tiny)
    video_config = load_video_processor_config(tiny)
    frames = _frames(5)
    pixels = [np.asarray(Image.open(io.BytesIO(f))) for f in frames]
    expected = preprocess_video(pixels, [0.0] * 5, video_config)
    item = vision_pb2.ImageInput(video=vision_pb2.VideoInput(frames=frames))
    rows = item_rows(processor, video_config, item)
    assert rows == expected.num_patches // 4 and expected.grid_thw[0] == 3


def _video_part(frames: list[bytes], indices: list[int], fps: float) -> language_pb2.ContentPart:
    return language_pb2.ContentPart(
        video=language_pb2.VideoFrames(
            frames=frames,
            timestamps_s=[i / fps for i in indices],
            frame_indices=indices,
            source_fps=fps,
        )
    )


def test_prompt_has_a_bare_pad_per_video_and_counts_what_vllm_writes(
    tiny: Path, config: Qwen3VLConfig
) -> None:
    """A video part: the template's <|vision_start|><|video_pad|><|vision_end|> becomes the
    bare pad vLLM expands; the expanded prompt (usage) has, per temporal patch, the
    `<t seconds>` text, the markers and the rows; the item goes to the vision side whole,
    with frame index / fps as each frame's time."""
    builder = Qwen3VLPromptBuilder.from_checkpoint(config, tiny)
    assert builder.accepts_video is True
    video = _video_part([b"f0", b"f1", b"f2", b"f3"], [0, 10, 20, 30], 20.0)
    message = language_pb2.ChatMessage(
        role="user",
        content=[
            language_pb2.ContentPart(image=b"a"),
            video,
            language_pb2.ContentPart(text="What happens?"),
        ],
    )
    [image, clip] = builder.visual_inputs([message], max_images=1)
    assert image.item == b"a"
    assert clip.item == VideoClip((b"f0", b"f1", b"f2", b"f3"), (0.0, 0.5, 1.0, 1.5))
    rendered = builder.render([message])
    assert rendered.modalities == ("image", "video")
    ids = rendered.ids
    at = ids.index(config.video_token_id)
    assert ids[at - 1] != config.vision_start_token_id  # bare
    assert ids[at + 1] != config.vision_end_token_id
    assert ids.count(config.vision_start_token_id) == 1  # the image's
    width = config.feature_width
    encoded = EncodedImages(
        features=[torch.zeros(70, width), torch.zeros(2 * 12, width)],
        grids=[(1, 14, 20), (2, 6, 8)],
        content_keys=["k1", "kv"],
        timestamps=[(), (0.25, 1.25)],
    )
    prompt = builder.assemble_images(rendered, encoded)
    stamps = [
        builder.tokenizer.encode(f"<{t} seconds>", add_special_tokens=False) for t in ("0.2", "1.2")
    ]
    # (0.25 prints as 0.2: Python's round-half-even, as vLLM's f"{t:.1f}")
    video_tokens = sum(len(s) for s in stamps) + 2 * (12 + 2)
    assert prompt.video_tokens == video_tokens
    assert prompt.image_tokens == 70 + 2 + video_tokens
    assert len(prompt.token_ids) == len(ids) - 2 + 70 + video_tokens
    expanded = prompt.token_ids
    start = expanded.index(stamps[0][0], expanded.index(config.vision_end_token_id))
    patch = stamps[0] + [config.vision_start_token_id] + [config.video_token_id] * 12
    assert expanded[start : start + len(patch)] == patch
    request = prompt.engine_input()
    assert request["prompt_token_ids"] == ids
    assert request["multi_modal_uuids"] == {"image": ["k1"], "video": ["kv"]}
    assert request["multi_modal_data"]["video"]["timestamps"] == [[0.25, 1.25]]
    assert request["multi_modal_data"]["video"]["video_embeds"].shape == (24, width)
    with pytest.raises(InvalidInput, match="only allowed in user messages"):
        builder.render([language_pb2.ChatMessage(role="assistant", content=[video])])
    with pytest.raises(InvalidInput, match="reserved vision token"):
        builder.render([_message("<|video_pad|>")])


def test_a_video_without_times_is_refused(tiny: Path, config: Qwen3VLConfig) -> None:
    builder = Qwen3VLPromptBuilder.from_checkpoint(config, tiny)
    untimed = language_pb2.ContentPart(video=language_pb2.VideoFrames(frames=[b"f0", b"f1"]))
    message = language_pb2.ChatMessage(role="user", content=[untimed])
    with pytest.raises(InvalidInput, match="writes each frame pair's time"):
        builder.visual_inputs([message], max_images=1)
