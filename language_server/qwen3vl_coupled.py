"""Coupled mode for Qwen3-VL: the tower runs inside the language server, one request at a
time (the baseline DvD is measured against), with the same preprocessing, encoder and
content keys as the vision server, so both modes give vLLM the same rows under the same
multi_modal_uuids."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc

from dvd.deadline import Deadline
from dvd.errors import DvdError
from dvd.vir_mode import VirMode
from language_server.image_features import EncodedImages
from vision_server.qwen3vl.encoder import Qwen3VLEncoder
from vision_server.qwen3vl.preprocess import preprocess_image
from vision_server.qwen3vl.processor_config import ProcessorConfig
from vision_server.qwen3vl.service import content_key, key_salt
from vision_server.tiling import decode_image


class Qwen3VLCoupledVision:
    def __init__(
        self, encoder: Qwen3VLEncoder, processor: ProcessorConfig, max_image_pixels: int
    ) -> None:
        self.encoder = encoder
        self.processor = processor
        self.max_image_pixels = max_image_pixels
        self._salt = key_salt(encoder, processor, "pil")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coupled-vit")

    def _encode_all(self, images: list[bytes]) -> EncodedImages:
        result = EncodedImages(features=[], server="in-process")
        t0 = time.monotonic_ns()
        items = [
            preprocess_image(decode_image(data, self.max_image_pixels), self.processor)
            for data in images
        ]
        t1 = time.monotonic_ns()
        for encoded in self.encoder.encode(items):
            result.features.append(encoded.features)
            result.tokens_per_tile.append([int(encoded.features.shape[0])])
            result.grids.append(encoded.grid_thw)
        result.content_keys = [content_key(data, self._salt) for data in images]
        result.preprocess_ns = t1 - t0
        result.encode_ns = time.monotonic_ns() - t1
        return result

    async def encode(
        self,
        request_id: str,
        images: list[bytes],
        mode: VirMode | None = None,
        deadline: Deadline = Deadline(),
        max_tiles: Sequence[int] = (),  # InternVL's per-image tile bound: no tiles here
    ) -> EncodedImages:
        queued = time.monotonic_ns()

        def timed() -> EncodedImages:
            if deadline.expired():
                raise DvdError(
                    "the request's deadline passed before its images were encoded",
                    code=grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            started = time.monotonic_ns()
            result = self._encode_all(images)
            result.queue_ns = started - queued
            return result

        return await asyncio.get_running_loop().run_in_executor(self._executor, timed)

    async def start(self) -> None:
        """Nothing to connect to: the tower is in this process."""

    def member_addresses(self) -> list[str]:
        return []

    async def healthy(self) -> list[tuple[str, bool]]:
        return []

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
