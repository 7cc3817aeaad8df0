"""The VisionService for Qwen3-VL checkpoints: images and videos in, [main | DeepStack] rows
out.

Items are images (`ImageInput.data`) or whole videos (`ImageInput.video`: sampled frames
and their times, one item each, `video_item.py`). Per call: every item is looked up in the
encoder cache (keyed by its bytes and everything that shapes its rows), the call's patches
are admitted against the queue bound, each item is decoded and preprocessed (smart_resize
to the pixel budgets, patchify) on a worker thread and queued to the ItemBatcher, which
packs items of all calls into forwards by patches. Each item's plan (modality, grid_thw,
DeepStack levels, content key, a video's time per temporal patch; rows in
`tokens_per_tile[0]`, width in `hidden_size`) goes out before its rows; rows go out item by
item as their forward finishes, through the same transports as InternVL's tile rows.

The overload bound: `--max-queued-tiles` counts tiles for InternVL; for Qwen3-VL the bound
is in ViT patches, QUEUED_BATCHES x --max-batch-patches (0 with --max-queued-tiles 0: no
bound), since a Qwen3-VL forward is sized in patches.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import torch

from dvd.errors import InvalidInput, Overloaded, Unavailable
from dvd.grpc_options import MAX_CHUNK_BYTES
from dvd.transport import Emission, FeatureSender
from dvd.v1 import common_pb2, vision_pb2
from vision_server.batcher import Cancellation
from vision_server.config import VisionServerConfig
from vision_server.metrics import VisionMetrics
from vision_server.qwen3vl.encoder import EncodedItem, Qwen3VLEncoder
from vision_server.qwen3vl.item_batcher import EncodedResult, ItemBatcher
from vision_server.qwen3vl.preprocess import (
    VisionInput,
    patch_timestamps,
    preprocess_image,
    resized_grid,
)
from vision_server.qwen3vl.processor_config import ProcessorConfig, VideoProcessorConfig
from vision_server.qwen3vl.video_item import clip, clip_content_key, clip_grid, preprocess_clip
from vision_server.service_base import CallState, VisionServiceBase
from vision_server.tiling import decode_image

log = logging.getLogger(__name__)

FAMILY = "qwen3_vl"


def key_salt(
    encoder: Qwen3VLEncoder, processor: ProcessorConfig, video: VideoProcessorConfig, resize: str
) -> bytes:
    """Everything besides an item's bytes that shapes its rows: checkpoint, dtype, image and
    video pixel budgets, resize mode."""
    return (
        f"{encoder.config.path.resolve()}|{encoder.dtype}|{processor.min_pixels}|"
        f"{processor.max_pixels}|{video.pixels.min_pixels}|{video.pixels.max_pixels}|"
        f"{video.cap_pixels_per_frame}|{resize}"
    ).encode()


def content_key(data: bytes, salt: bytes) -> str:
    """An image's content key: the encoder cache's key and vLLM's multi_modal_uuid."""
    digest = hashlib.blake2b(data, digest_size=16)
    digest.update(salt)
    return digest.hexdigest()


class ItemCache:
    """Encoded items by content key, least recently used evicted past `capacity_bytes`."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, EncodedItem] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> EncodedItem | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, entry: EncodedItem) -> None:
        size = entry.features.numel() * entry.features.element_size()
        if size > self.capacity_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.features.numel() * old.features.element_size()
            self._entries[key] = entry
            self.bytes += size
            while self.bytes > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.features.numel() * evicted.features.element_size()


@dataclass(frozen=True)
class _Item:
    """One image or video of a call, looked up in the cache."""

    data: bytes  # an image's file; empty for a video
    frames: list[bytes]  # a video's frames (a one-frame video doubled, video_item.clip)
    frame_times: list[float]  # seconds of each of `frames`
    key: str
    cached: EncodedItem | None
    patches: int  # what preprocessing will make of it (0 when cached), from its header(s)

    @property
    def is_video(self) -> bool:
        return bool(self.frames)


class Qwen3VLVisionService(VisionServiceBase[CallState]):
    unit = "images"

    def __init__(
        self,
        config: VisionServerConfig,
        encoder: Qwen3VLEncoder,
        processor: ProcessorConfig,
        batcher: ItemBatcher,
        metrics: VisionMetrics,
        senders: dict[str, FeatureSender],
        cache: ItemCache,
        resize: str = "pil",
        *,
        video: VideoProcessorConfig,
    ) -> None:
        super().__init__(config, metrics, senders)
        self.encoder = encoder
        self.processor = processor
        self.video = video
        self.batcher = batcher
        self.cache = cache
        self.resize = resize
        self._key_salt = key_salt(encoder, processor, video, resize)
        metrics.queued_tiles.set_function(lambda: batcher.admitted_patches)

    @property
    def feature_dtype(self) -> torch.dtype:
        return self.encoder.dtype

    def _open_call(self, request: vision_pb2.EncodeRequest, state: CallState) -> CallState:
        return state  # nothing besides the shared checks

    def _withdraw(self, call: Cancellation) -> int:
        return self.batcher.withdraw(call)

    def _patches(self, data: bytes) -> int:
        """Patches preprocessing will make of the image, from its header (1 if unreadable:
        decoding reports that image later)."""
        grid = resized_grid(data, self.processor)
        if grid is None:
            return 1
        grid_h, grid_w = grid
        return grid_h * grid_w

    def _look_up(self, item: vision_pb2.ImageInput) -> _Item:
        if item.HasField("video"):
            frames, times = clip(item.video.frames, item.video.timestamps_s)
            key = clip_content_key(frames, times, self._key_salt)
            cached = self.cache.get(key)
            grid = clip_grid(frames, self.video)
            patches = 0 if cached is not None else (grid[0] * grid[1] * grid[2] if grid else 1)
            return _Item(b"", frames, times, key, cached, patches)
        key = content_key(item.data, self._key_salt)
        cached = self.cache.get(key)
        patches = 0 if cached is not None else self._patches(item.data)
        return _Item(item.data, [], [], key, cached, patches)

    def _preprocess(self, item: _Item) -> VisionInput:
        if item.is_video:
            return preprocess_clip(
                item.frames, item.frame_times, self.video, self.config.max_image_pixels
            )
        image = decode_image(item.data, self.config.max_image_pixels)
        return preprocess_image(image, self.processor, resize=self.resize)  # type: ignore[arg-type]

    async def _encode(
        self, request: vision_pb2.EncodeRequest, state: CallState, emission: Emission
    ) -> AsyncIterator[vision_pb2.EncodeResponse]:
        call = state.cancellation
        loop = asyncio.get_running_loop()
        max_chunk = request.max_chunk_bytes or MAX_CHUNK_BYTES
        images = [self._look_up(image) for image in request.images]
        state.units_expected = len(images)
        patches = sum(image.patches for image in images)
        if not self.batcher.admit(call, patches):
            self.metrics.queue_full.inc()
            raise Overloaded(
                f"vision server {self.config.address} is busy: "
                f"{self.batcher.admitted_patches} patches wait for the ViT, this call has "
                f"{patches} more, and the limit is {self.batcher.max_queued_patches} "
                "(QUEUED_BATCHES x --max-batch-patches)"
            )
        preprocess_ns = queue_ns = encode_ns = transfer_ns = rows_sent = 0
        pending: list[asyncio.Future[EncodedResult] | EncodedItem] = []
        for image in images:
            self.metrics.cache.labels("hit" if image.cached else "miss").inc()
            if image.cached is not None:
                pending.append(image.cached)
                continue
            t0 = time.monotonic_ns()
            item = await loop.run_in_executor(self._preprocess_pool, self._preprocess, image)
            preprocess_ns += time.monotonic_ns() - t0
            pending.append(self.batcher.submit(item, call))
        for index, (image, waiting) in enumerate(zip(images, pending, strict=True)):
            if isinstance(waiting, EncodedItem):
                encoded = waiting
            else:
                result = await waiting
                encoded = result.item
                queue_ns = max(queue_ns, result.queue_ns)
                encode_ns += result.encode_ns
                self.metrics.batch_tiles.observe(result.batch_patches)
                self.cache.put(image.key, encoded)
                self.metrics.cache_bytes.set(self.cache.bytes)
            state.units_done += 1
            yield vision_pb2.EncodeResponse(plan=self._plan(index, encoded, image))
            t0 = time.monotonic_ns()
            try:
                async for chunk in emission.achunks(index, 0, encoded.features, max_chunk):
                    self.metrics.feature_bytes.inc(len(chunk.data) or chunk.written.length)
                    yield vision_pb2.EncodeResponse(chunk=chunk)
            except ValueError as exc:
                raise InvalidInput(f"cannot deliver features: {exc}") from None
            except ConnectionError as exc:
                raise Unavailable(f"cannot deliver features: {exc}") from None
            transfer_ns += time.monotonic_ns() - t0
            rows_sent += int(encoded.features.shape[0])
            self.metrics.visual_tokens.inc(int(encoded.features.shape[0]))
        timings = vision_pb2.EncodeTimings(
            preprocess_ns=preprocess_ns,
            queue_ns=queue_ns,
            encode_ns=encode_ns,
            transfer_ns=transfer_ns,
            total_ns=time.monotonic_ns() - state.started_ns,
        )
        self.metrics.images.inc(len(images))
        for stage in ("preprocess", "queue", "encode", "transfer", "total"):
            self.metrics.stage.labels(stage).observe(getattr(timings, f"{stage}_ns") / 1e9)
        yield vision_pb2.EncodeResponse(
            done=vision_pb2.EncodeDone(
                timings=timings,
                num_tiles=len(images),
                num_tokens=rows_sent,
                images_from_cache=sum(image.cached is not None for image in images),
            )
        )

    def _plan(self, index: int, encoded: EncodedItem, item: _Item) -> vision_pb2.ImagePlan:
        t, h, w = encoded.grid_thw
        patch = self.processor.patch_size
        times = patch_timestamps(item.frame_times, self.video.pixels) if item.is_video else ()
        return vision_pb2.ImagePlan(
            image_index=index,
            num_tiles=1,
            grid_cols=1,
            grid_rows=1,
            tokens_per_tile=[int(encoded.features.shape[0])],
            hidden_size=self.encoder.feature_width,
            width=w * patch,  # the resized image's (or frames') size
            height=h * patch,
            modality=vision_pb2.MODALITY_VIDEO if item.is_video else vision_pb2.MODALITY_IMAGE,
            grid_thw=[t, h, w],
            deepstack_levels=self.encoder.config.vision.deepstack_levels,
            patch_times_s=times,
            content_key=item.key,
        )

    async def Info(
        self, request: common_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.VisionInfo:
        return vision_pb2.VisionInfo(
            model=self.encoder.config.name,
            hidden_size=self.encoder.feature_width,
            device=str(self.encoder.device),
            transport=",".join(self.senders),
            max_wait_ms=int(self.config.max_wait_ms),
            max_image_pixels=self.config.max_image_pixels,
            max_queued_tiles=self.batcher.max_queued_patches,
            family=FAMILY,
            max_batch_patches=self.batcher.max_batch_patches,
            min_pixels=self.processor.min_pixels,
            max_pixels=self.processor.max_pixels,
        )
