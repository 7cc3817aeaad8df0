"""The VisionService gRPC servicer: Encode, Info, Health."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from dvd.errors import DvdError, InvalidInput
from dvd.features import chunk_rows, torch_dtype
from dvd.grpc_options import MAX_CHUNK_BYTES
from dvd.v1 import common_pb2, vision_pb2, vision_pb2_grpc
from vision_server.batcher import EncodedTiles, TileBatcher, TileRun
from vision_server.config import VisionServerConfig
from vision_server.encoder import TilingLimits, VisionEncoder
from vision_server.metrics import VisionMetrics
from vision_server.tiling import TiledImage

log = logging.getLogger(__name__)


class VisionService(vision_pb2_grpc.VisionServiceServicer):
    def __init__(
        self,
        config: VisionServerConfig,
        encoder: VisionEncoder,
        batcher: TileBatcher,
        metrics: VisionMetrics,
    ) -> None:
        self.config = config
        self.encoder = encoder
        self.batcher = batcher
        self.metrics = metrics
        self._preprocess_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        ckpt = encoder.config
        self.max_tiles = config.max_tiles or ckpt.max_dynamic_patch
        self.ready = True

    def close(self) -> None:
        self._preprocess_pool.shutdown(wait=False, cancel_futures=True)

    def _limits(self, image: vision_pb2.ImageInput) -> TilingLimits:
        ckpt = self.encoder.config
        max_tiles = self.max_tiles if image.max_tiles <= 0 else min(image.max_tiles, self.max_tiles)
        return TilingLimits(
            min(ckpt.min_dynamic_patch, max_tiles),
            max_tiles,
            ckpt.use_thumbnail,
            self.config.max_image_pixels,
        )

    def _validate(self, request: vision_pb2.EncodeRequest) -> None:
        if not request.images:
            raise InvalidInput("Encode needs at least one image")
        if len(request.images) > self.config.max_images_per_request:
            raise InvalidInput(
                f"{len(request.images)} images in one request; the limit is "
                f"{self.config.max_images_per_request}"
            )
        try:
            wanted = torch_dtype(request.feature_dtype)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        if wanted != self.encoder.dtype:
            raise InvalidInput(
                f"features are produced in {self.encoder.dtype}, request asked for {wanted}"
            )

    async def Encode(
        self, request: vision_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[vision_pb2.EncodeResponse]:
        started = time.monotonic_ns()
        self.metrics.in_flight.inc()
        runs: list[TileRun] = []
        status = "ok"
        try:
            self._validate(request)
            async for message in self._encode(request, runs, started):
                yield message
        except DvdError as exc:
            status = exc.code.name.lower()
            log.info("encode %s rejected: %s", request.request_id, exc.message)
            await context.abort(exc.code, exc.message)
        except asyncio.CancelledError:
            status = "cancelled"
            log.info("encode %s cancelled by the caller", request.request_id)
            raise
        finally:
            for run in runs:
                run.cancelled = True
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(status).inc()

    async def _encode(
        self, request: vision_pb2.EncodeRequest, runs: list[TileRun], started: int
    ) -> AsyncIterator[vision_pb2.EncodeResponse]:
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue[EncodedTiles | BaseException] = asyncio.Queue()
        max_chunk = request.max_chunk_bytes or MAX_CHUNK_BYTES
        tiles_expected = 0
        preprocess_ns = 0
        # Tile image i+1 while image i's tiles are already queued for the ViT.
        for index, image in enumerate(request.images):
            t0 = time.monotonic_ns()
            tiled: TiledImage = await loop.run_in_executor(
                self._preprocess_pool, self.encoder.preprocess, image.data, self._limits(image)
            )
            preprocess_ns += time.monotonic_ns() - t0
            run = TileRun(request.request_id, index, 0, tiled.pixel_values, sink)
            runs.append(run)
            self.batcher.submit(run)
            tiles_expected += tiled.num_tiles
            yield vision_pb2.EncodeResponse(plan=self._plan(index, tiled))
        queue_ns = encode_ns = transfer_ns = 0
        tiles_done = rows_sent = 0
        while tiles_done < tiles_expected:
            result = await sink.get()
            if isinstance(result, BaseException):
                raise result
            queue_ns = max(queue_ns, result.queue_ns)
            encode_ns += result.encode_ns
            self.metrics.batch_tiles.observe(result.batch_tiles)
            t0 = time.monotonic_ns()
            features = result.features.reshape(-1, result.features.shape[-1])
            first_row = result.first_tile * self.encoder.tokens_per_tile
            for chunk in chunk_rows(features, first_row, max_chunk):
                yield vision_pb2.EncodeResponse(
                    chunk=vision_pb2.FeatureChunk(
                        image_index=result.image_index,
                        row_offset=chunk.row_offset,
                        descriptor=chunk.descriptor,
                        data=chunk.data,
                    )
                )
                self.metrics.feature_bytes.inc(len(chunk.data))
            transfer_ns += time.monotonic_ns() - t0
            tiles_done += result.features.shape[0]
            rows_sent += features.shape[0]
        timings = vision_pb2.EncodeTimings(
            preprocess_ns=preprocess_ns,
            queue_ns=queue_ns,
            encode_ns=encode_ns,
            transfer_ns=transfer_ns,
            total_ns=time.monotonic_ns() - started,
        )
        self._observe(timings, len(request.images), tiles_done)
        yield vision_pb2.EncodeResponse(
            done=vision_pb2.EncodeDone(timings=timings, num_tiles=tiles_done, num_tokens=rows_sent)
        )

    def _plan(self, index: int, tiled: TiledImage) -> vision_pb2.ImagePlan:
        return vision_pb2.ImagePlan(
            image_index=index,
            num_tiles=tiled.num_tiles,
            grid_cols=tiled.grid_cols,
            grid_rows=tiled.grid_rows,
            tokens_per_tile=[self.encoder.tokens_per_tile] * tiled.num_tiles,
            hidden_size=self.encoder.hidden_size,
            width=tiled.width,
            height=tiled.height,
        )

    def _observe(self, timings: vision_pb2.EncodeTimings, images: int, tiles: int) -> None:
        self.metrics.images.inc(images)
        self.metrics.tiles.inc(tiles)
        for stage in ("preprocess", "queue", "encode", "transfer", "total"):
            self.metrics.stage.labels(stage).observe(getattr(timings, f"{stage}_ns") / 1e9)

    async def Info(
        self, request: common_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.VisionInfo:
        ckpt = self.encoder.config
        return vision_pb2.VisionInfo(
            model=ckpt.name,
            hidden_size=ckpt.llm_hidden_size,
            tokens_per_tile=ckpt.tokens_per_tile,
            image_size=ckpt.image_size,
            min_tiles=ckpt.min_dynamic_patch,
            max_tiles=self.max_tiles,
            use_thumbnail=ckpt.use_thumbnail,
            device=str(self.encoder.device),
            transport=self.config.transport,
            max_batch_tiles=self.batcher.max_batch_tiles,
            max_wait_ms=int(self.config.max_wait_ms),
            max_image_pixels=self.config.max_image_pixels,
        )

    async def Health(
        self, request: common_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.HealthResponse:
        if self.ready:
            return common_pb2.HealthResponse(status=common_pb2.HealthResponse.STATUS_SERVING)
        return common_pb2.HealthResponse(
            status=common_pb2.HealthResponse.STATUS_NOT_SERVING, detail="draining"
        )
