"""Coupled mode: the vision model runs inside the language server, one request at a time.

This is the baseline DvD is measured against: no vision server, no feature transfer, and
no batching of tiles across requests. Encoding runs on one worker thread under a lock, so
requests' images are encoded serially, the way a coupled VLM server encodes them inside
its serving loop. It uses the same VisionEncoder as the vision server, so both modes
produce the same features from the same image.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from language_server.image_features import EncodedImages
from vision_server.encoder import TilingLimits, VisionEncoder


class CoupledVision:
    def __init__(self, encoder: VisionEncoder, limits: TilingLimits, max_batch_tiles: int) -> None:
        self.encoder = encoder
        self.limits = limits
        self.max_batch_tiles = max_batch_tiles
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coupled-vit")

    def _encode_all(self, images: list[bytes]) -> EncodedImages:
        result = EncodedImages(features=[], server="in-process")
        for data in images:
            t0 = time.monotonic_ns()
            tiled = self.encoder.preprocess(data, self.limits)
            t1 = time.monotonic_ns()
            parts = [
                self.encoder.encode(batch)
                for batch in tiled.pixel_values.split(self.max_batch_tiles)
            ]
            features = torch.cat(parts)
            result.features.append(features.reshape(-1, features.shape[-1]))
            result.preprocess_ns += t1 - t0
            result.encode_ns += time.monotonic_ns() - t1
        return result

    async def encode(self, request_id: str, images: list[bytes]) -> EncodedImages:
        queued = time.monotonic_ns()
        loop = asyncio.get_running_loop()

        def timed() -> EncodedImages:
            started = time.monotonic_ns()
            result = self._encode_all(images)
            result.queue_ns = started - queued
            return result

        return await loop.run_in_executor(self._executor, timed)

    async def healthy(self) -> list[tuple[str, bool]]:
        return []

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
