"""The Qwen3-VL vision service in process (no gRPC, no vLLM): what its plans say, that its
rows are the encoder's, the content-keyed cache, the patch-counted queue bound, the
batcher's packing, and the language side's prompt assembly from the template. About 10 s
on qwen3vl-tiny."""

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
from language_server.image_features import EncodedImages
from language_server.qwen3vl_prompt import Qwen3VLPromptBuilder
from vision_server.batcher import Cancellation
from vision_server.config import VisionServerConfig
from vision_server.metrics import VisionMetrics
from vision_server.qwen3vl.encoder import Qwen3VLEncoder
from vision_server.qwen3vl.item_batcher import ItemBatcher
from vision_server.qwen3vl.preprocess import VisionInput, preprocess_image
from vision_server.qwen3vl.processor_config import load_image_processor_config
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
    return Qwen3VLVisionService(
        config, encoder, processor, batcher, VisionMetrics(), senders, cache
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


def test_a_video_part_is_refused_not_dropped(tiny: Path, config: Qwen3VLConfig) -> None:
    """Qwen3-VL video is not served yet: the gateway is told so (accepts_video false), and a
    video part sent to the language server directly is an InvalidInput, not ignored text."""
    from dvd.errors import InvalidInput

    builder = Qwen3VLPromptBuilder.from_checkpoint(config, tiny)
    assert builder.accepts_video is False
    video = language_pb2.ContentPart(
        video=language_pb2.VideoFrames(frames=[b"png"], timestamps_s=[0.0], frame_indices=[0])
    )
    message = language_pb2.ChatMessage(
        role="user", content=[video, language_pb2.ContentPart(text="What happens?")]
    )
    with pytest.raises(InvalidInput, match="video input is not served for Qwen3-VL"):
        builder.render([message])
