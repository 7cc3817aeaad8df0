"""Coupled mode for Qwen3-VL: the tower runs inside the language server, one request at a
time (the baseline DvD is measured against), with the same preprocessing, encoder and
content keys as the vision server (images, and videos as one item each), so both modes give
vLLM the same rows under the same multi_modal_uuids and times."""

from __future__ import annotations

import time
from collections.abc import Sequence

from dvd.deadline import Deadline
from dvd.vir_mode import VirMode
from language_server.image_features import EncodedImages, VideoClip, VisualItem
from language_server.in_process_vision import InProcessVision
from vision_server.qwen3vl.encoder import Qwen3VLEncoder
from vision_server.qwen3vl.preprocess import VisionInput, preprocess_image
from vision_server.qwen3vl.processor_config import ProcessorConfig, VideoProcessorConfig
from vision_server.qwen3vl.service import content_key, key_salt
from vision_server.qwen3vl.video_item import clip, clip_content_key, preprocess_clip
from vision_server.tiling import decode_image


class Qwen3VLCoupledVision(InProcessVision):
    def __init__(
        self,
        encoder: Qwen3VLEncoder,
        processor: ProcessorConfig,
        video: VideoProcessorConfig,
        max_image_pixels: int,
    ) -> None:
        self.encoder = encoder
        self.processor = processor
        self.video = video
        self.max_image_pixels = max_image_pixels
        self._salt = key_salt(encoder, processor, video, "pil")
        super().__init__()

    def _preprocess(self, item: VisualItem) -> tuple[VisionInput, str]:
        """An item's patches and content key, as the vision server makes them."""
        if isinstance(item, VideoClip):
            frames, times = clip(item.frames, item.timestamps_s)
            inputs = preprocess_clip(frames, times, self.video, self.max_image_pixels)
            return inputs, clip_content_key(frames, times, self._salt)
        image = decode_image(item, self.max_image_pixels)
        return preprocess_image(image, self.processor), content_key(item, self._salt)

    def _encode_all(self, images: Sequence[VisualItem]) -> EncodedImages:
        result = EncodedImages(features=[], server="in-process")
        t0 = time.monotonic_ns()
        prepared = [self._preprocess(item) for item in images]
        items = [inputs for inputs, _ in prepared]
        t1 = time.monotonic_ns()
        for encoded in self.encoder.encode(items):
            result.features.append(encoded.features)
            result.tokens_per_tile.append([int(encoded.features.shape[0])])
            result.grids.append(encoded.grid_thw)
        result.content_keys = [key for _, key in prepared]
        result.timestamps = [inputs.timestamps for inputs in items]
        result.preprocess_ns = t1 - t0
        result.encode_ns = time.monotonic_ns() - t1
        return result

    async def encode(
        self,
        request_id: str,
        images: Sequence[VisualItem],
        mode: VirMode | None = None,
        deadline: Deadline = Deadline(),
        max_tiles: Sequence[int] = (),  # InternVL's per-image tile bound: no tiles here
    ) -> EncodedImages:
        return await self.run_encode(deadline, lambda: self._encode_all(images))
