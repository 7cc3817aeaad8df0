"""Coupled mode: the vision model runs inside the language server, one request at a time.

This is the baseline DvD is measured against: no vision server, no feature transfer, and
no batching of tiles across requests. Encoding runs on one worker thread, so requests'
images are encoded serially, the way a coupled VLM server encodes them inside its serving
loop. It uses the same VisionEncoder and the same per-request ViR decision as the vision
server, so both modes produce the same features from the same images.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

from dvd.deadline import Deadline
from dvd.errors import InvalidInput
from dvd.vir_mode import VirMode
from language_server.image_features import EncodedImages, VisualItem
from language_server.in_process_vision import InProcessVision
from vision_server.encoder import TilingLimits, VisionEncoder
from vision_server.tile_features import TileFeatures, select_rows


class CoupledVision(InProcessVision):
    def __init__(
        self,
        encoder: VisionEncoder,
        limits: TilingLimits,
        max_batch_tiles: int,
        default_mode: VirMode | None = None,
    ) -> None:
        self.encoder = encoder
        self.limits = limits
        self.max_batch_tiles = max_batch_tiles
        self.default_mode = default_mode or encoder.default_mode()
        encoder.check_mode(self.default_mode)
        super().__init__()

    def _encode_all(
        self, images: list[bytes], mode: VirMode, max_tiles: Sequence[int]
    ) -> EncodedImages:
        result = EncodedImages(features=[], server="in-process")
        per_image = []
        for data, bound in zip(images, list(max_tiles) or [0] * len(images), strict=True):
            t0 = time.monotonic_ns()
            tiled = self.encoder.preprocess(data, self._limits(bound))
            t1 = time.monotonic_ns()
            batches = tiled.pixel_values.split(self.max_batch_tiles)
            with_vir = mode is not VirMode.QUARTER
            per_image.append(TileFeatures.cat([self.encoder.encode(b, with_vir) for b in batches]))
            result.preprocess_ns += t1 - t0
            result.encode_ns += time.monotonic_ns() - t1
        for rows, tokens in select_rows(mode, per_image, self.encoder.config.flash):
            result.features.append(rows)
            result.tokens_per_tile.append(tokens)
        return result

    def _limits(self, max_tiles: int) -> TilingLimits:
        """The tiling limits of one image: the server's, or fewer tiles when it asks."""
        if max_tiles <= 0 or max_tiles >= self.limits.max_tiles:
            return self.limits
        return replace(
            self.limits,
            min_tiles=min(self.limits.min_tiles, max_tiles),
            max_tiles=max_tiles,
        )

    async def encode(
        self,
        request_id: str,
        images: Sequence[VisualItem],
        mode: VirMode | None = None,
        deadline: Deadline = Deadline(),
        max_tiles: Sequence[int] = (),
    ) -> EncodedImages:
        files = [item for item in images if isinstance(item, bytes)]
        if len(files) != len(images):  # InternVL's prompt sends a video's frames as images
            raise InvalidInput("InternVL takes no video items, only a video's frames as images")
        chosen = mode or self.default_mode
        self.encoder.check_mode(chosen)
        try:
            return await self.run_encode(
                deadline, lambda: self._encode_all(files, chosen, max_tiles)
            )
        except ValueError as exc:  # e.g. a mode the checkpoint cannot serve
            raise InvalidInput(str(exc)) from None
