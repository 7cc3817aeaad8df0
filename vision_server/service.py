"""The VisionService gRPC servicer: Encode (alone or on a session), Info, Health."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import torch

from dvd import vir_mode
from dvd.errors import InvalidInput, Overloaded, Unavailable
from dvd.grpc_options import MAX_CHUNK_BYTES
from dvd.transport import Emission, FeatureSender
from dvd.v1 import common_pb2, vision_pb2
from dvd.vir_mode import VirMode
from vision_server.batcher import Cancellation, EncodedTiles, TileBatcher, TileRun
from vision_server.config import VisionServerConfig
from vision_server.encoder import TilingLimits, VisionEncoder
from vision_server.encoder_cache import CachedImage, EncoderCache, image_key
from vision_server.metrics import VisionMetrics
from vision_server.service_base import CallState, VisionServiceBase
from vision_server.tile_features import TileFeatures, fixed_compression, select_rows
from vision_server.tiling import ImageLayout, TiledImage

log = logging.getLogger(__name__)


@dataclass
class EncodeProgress(CallState):
    """What one Encode call has done so far (units: tiles); its timings end up in EncodeDone."""

    mode: VirMode = VirMode.QUARTER  # the call's resolution mode, set when it is opened
    preprocess_ns: int = 0
    queue_ns: int = 0
    encode_ns: int = 0
    transfer_ns: int = 0
    tiles_compressed: int = 0
    rows_sent: int = 0
    layouts: list[ImageLayout] = field(default_factory=list)
    cache_keys: list[str | None] = field(default_factory=list)  # None: served from the cache
    # Each image's tile features until all its tiles are in: router mode decides over them,
    # and the encoder cache stores them.
    held: dict[int, list[EncodedTiles]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Image:
    """One image of a call, looked up in the encoder cache and counted before any work."""

    data: bytes
    limits: TilingLimits
    key: str
    cached: CachedImage | None
    tiles: int  # what tiling will make of it (0 when cached), read from its header


class VisionService(VisionServiceBase[EncodeProgress]):
    def __init__(
        self,
        config: VisionServerConfig,
        encoder: VisionEncoder,
        batcher: TileBatcher,
        metrics: VisionMetrics,
        senders: dict[str, FeatureSender],
        cache: EncoderCache | None = None,
    ) -> None:
        super().__init__(config, metrics, senders)
        self.cache = cache if cache is not None else EncoderCache(0)
        self.encoder = encoder
        self.batcher = batcher
        ckpt = encoder.config
        self.max_tiles = config.max_tiles or ckpt.max_dynamic_patch
        self.default_mode = (
            vir_mode.parse(config.vir_mode) if config.vir_mode != "auto" else encoder.default_mode()
        )
        encoder.check_mode(self.default_mode)
        metrics.queued_tiles.set_function(lambda: batcher.admitted_tiles)

    def _limits(self, image: vision_pb2.ImageInput) -> TilingLimits:
        ckpt = self.encoder.config
        max_tiles = self.max_tiles if image.max_tiles <= 0 else min(image.max_tiles, self.max_tiles)
        return TilingLimits(
            min(ckpt.min_dynamic_patch, max_tiles),
            max_tiles,
            ckpt.use_thumbnail,
            self.config.max_image_pixels,
        )

    @property
    def feature_dtype(self) -> torch.dtype:
        return self.encoder.dtype

    def _open_call(self, request: vision_pb2.EncodeRequest, state: CallState) -> EncodeProgress:
        """The resolution mode the request's tiles get (after the shared checks)."""
        if any(image.HasField("video") for image in request.images):
            # InternVL's language server sends a video's frames as one-tile images
            raise InvalidInput("an InternVL vision server takes no video items (ImageInput.video)")
        try:
            mode = vir_mode.from_wire(request.vir_mode) or self.default_mode
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        self.encoder.check_mode(mode)
        return EncodeProgress(
            started_ns=state.started_ns, cancellation=state.cancellation, mode=mode
        )

    def _withdraw(self, call: Cancellation) -> int:
        return self.batcher.withdraw(call)

    def _admit(self, call: Cancellation, tiles: int) -> None:
        """Reserves room for the call's `tiles`; Overloaded (RESOURCE_EXHAUSTED) when they
        would take the queue past --max-queued-tiles (see TileBatcher.admit)."""
        if self.batcher.admit(call, tiles):
            return
        self.metrics.queue_full.inc()
        raise Overloaded(
            f"vision server {self.config.address} is busy: {self.batcher.admitted_tiles} tiles "
            f"wait for the ViT, this call has {tiles} more, and the limit is "
            f"{self.batcher.max_queued_tiles} (--max-queued-tiles)"
        )

    async def _encode(
        self, request: vision_pb2.EncodeRequest, progress: EncodeProgress, emission: Emission
    ) -> AsyncIterator[vision_pb2.EncodeResponse]:
        mode = progress.mode
        cancellation = progress.cancellation
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue[EncodedTiles | BaseException] = asyncio.Queue()
        max_chunk = request.max_chunk_bytes or MAX_CHUNK_BYTES
        streaming = mode is not VirMode.ROUTER
        with_vir = mode is not VirMode.QUARTER
        images = [self._look_up(image, with_vir) for image in request.images]
        # The whole call is admitted, or refused, before any work on it.
        self._admit(cancellation, sum(image.tiles for image in images if image.cached is None))
        # Tile image i+1 while image i's tiles are already queued for the ViT.
        for index, image in enumerate(images):
            cached = image.cached
            self.metrics.cache.labels("hit" if cached else "miss").inc()
            if cached is not None:
                layout = cached.layout
                sink.put_nowait(EncodedTiles(index, 0, cached.features, 0, 0, 0))
            else:
                t0 = time.monotonic_ns()
                tiled: TiledImage = await loop.run_in_executor(
                    self._preprocess_pool, self.encoder.preprocess, image.data, image.limits
                )
                progress.preprocess_ns += time.monotonic_ns() - t0
                layout = tiled.layout
                run = TileRun(
                    request.request_id,
                    index,
                    0,
                    tiled.pixel_values,
                    sink,
                    with_vir=with_vir,
                    cancellation=cancellation,
                )
                self.batcher.submit(run)
            progress.layouts.append(layout)
            progress.cache_keys.append(None if cached else image.key)
            progress.units_expected += layout.num_tiles
            if streaming:
                tokens = self._fixed_tokens(mode, layout.num_tiles)
                yield vision_pb2.EncodeResponse(plan=self._plan(index, layout, tokens))
        while progress.units_done < progress.units_expected:
            result = await sink.get()
            if isinstance(result, BaseException):
                raise result
            self._account(progress, result)
            self._hold(progress, result)
            if streaming:
                compress = fixed_compression(mode, result.features.num_tiles)
                rows, tokens = result.features.rows(compress)
                first_row = sum(self._fixed_tokens(mode, result.first_tile))
                async for message in self._chunks(
                    emission, result.image_index, first_row, rows, max_chunk, progress
                ):
                    yield message
                self._count_tiles(progress, tokens)
        if not streaming:
            async for message in self._routed(emission, progress, max_chunk):
                yield message
        yield vision_pb2.EncodeResponse(done=self._done(progress, len(request.images)))

    def _look_up(self, image: vision_pb2.ImageInput, with_vir: bool) -> _Image:
        limits = self._limits(image)
        key = image_key(image.data, limits.max_tiles)
        cached = self.cache.get(key, with_vir)
        tiles = 0 if cached is not None else self.encoder.tile_count(image.data, limits)
        return _Image(image.data, limits, key, cached, tiles)

    def _fixed_tokens(self, mode: VirMode, tiles: int) -> list[int]:
        full = self.encoder.tokens_per_tile
        return [full // 4 if mode is VirMode.SIXTEENTH else full] * tiles

    def _account(self, progress: EncodeProgress, result: EncodedTiles) -> None:
        progress.queue_ns = max(progress.queue_ns, result.queue_ns)
        progress.encode_ns += result.encode_ns
        progress.units_done += result.features.num_tiles
        if result.batch_tiles:  # 0 for images served from the encoder cache
            self.metrics.batch_tiles.observe(result.batch_tiles)

    def _hold(self, progress: EncodeProgress, result: EncodedTiles) -> None:
        """Keeps an image's tiles; once all are in, caches the image unless it came from there."""
        parts = progress.held.setdefault(result.image_index, [])
        parts.append(result)
        layout = progress.layouts[result.image_index]
        key = progress.cache_keys[result.image_index]
        if key is not None and sum(p.features.num_tiles for p in parts) == layout.num_tiles:
            ordered = sorted(parts, key=lambda part: part.first_tile)
            self.cache.put(
                key, CachedImage(layout, TileFeatures.cat([p.features for p in ordered]))
            )
            self.metrics.cache_bytes.set(self.cache.bytes)

    async def _routed(
        self, emission: Emission, progress: EncodeProgress, max_chunk: int
    ) -> AsyncIterator[vision_pb2.EncodeResponse]:
        """Router mode: decide over all of the request's tiles, then send image by image."""
        images = []
        for index in range(len(progress.layouts)):
            parts = sorted(progress.held.pop(index), key=lambda part: part.first_tile)
            images.append(TileFeatures.cat([part.features for part in parts]))
        selected = select_rows(VirMode.ROUTER, images, self.encoder.config.flash)
        for index, (rows, tokens) in enumerate(selected):
            yield vision_pb2.EncodeResponse(plan=self._plan(index, progress.layouts[index], tokens))
            async for message in self._chunks(emission, index, 0, rows, max_chunk, progress):
                yield message
            self._count_tiles(progress, tokens)

    async def _chunks(
        self,
        emission: Emission,
        image_index: int,
        first_row: int,
        rows: torch.Tensor,
        max_chunk: int,
        progress: EncodeProgress,
    ) -> AsyncIterator[vision_pb2.EncodeResponse]:
        """One image's rows through the transport; the time counted includes handing the
        messages to gRPC (and, for shm/tcp/rdma, writing the bytes)."""
        started = time.monotonic_ns()
        try:
            async for chunk in emission.achunks(image_index, first_row, rows, max_chunk):
                self.metrics.feature_bytes.inc(len(chunk.data) or chunk.written.length)
                yield vision_pb2.EncodeResponse(chunk=chunk)
        except ValueError as exc:
            raise InvalidInput(f"cannot deliver features: {exc}") from None
        except ConnectionError as exc:  # the receiver's data socket went away
            raise Unavailable(f"cannot deliver features: {exc}") from None
        progress.transfer_ns += time.monotonic_ns() - started

    def _count_tiles(self, progress: EncodeProgress, tokens: list[int]) -> None:
        full = self.encoder.tokens_per_tile
        compressed = sum(1 for t in tokens if t < full)
        progress.tiles_compressed += compressed
        progress.rows_sent += sum(tokens)
        self.metrics.tiles_routed.labels("1/16").inc(compressed)
        self.metrics.tiles_routed.labels("1/4").inc(len(tokens) - compressed)
        self.metrics.visual_tokens.inc(sum(tokens))
        self.metrics.visual_tokens_saved.inc(full * len(tokens) - sum(tokens))

    def _done(self, progress: EncodeProgress, images: int) -> vision_pb2.EncodeDone:
        timings = vision_pb2.EncodeTimings(
            preprocess_ns=progress.preprocess_ns,
            queue_ns=progress.queue_ns,
            encode_ns=progress.encode_ns,
            transfer_ns=progress.transfer_ns,
            total_ns=time.monotonic_ns() - progress.started_ns,
        )
        self.metrics.images.inc(images)
        self.metrics.tiles.inc(progress.units_done)
        for stage in ("preprocess", "queue", "encode", "transfer", "total"):
            self.metrics.stage.labels(stage).observe(getattr(timings, f"{stage}_ns") / 1e9)
        return vision_pb2.EncodeDone(
            timings=timings,
            num_tiles=progress.units_done,
            num_tokens=progress.rows_sent,
            tiles_compressed=progress.tiles_compressed,
            images_from_cache=sum(key is None for key in progress.cache_keys),
        )

    def _plan(self, index: int, tiled: ImageLayout, tokens: list[int]) -> vision_pb2.ImagePlan:
        return vision_pb2.ImagePlan(
            image_index=index,
            num_tiles=tiled.num_tiles,
            grid_cols=tiled.grid_cols,
            grid_rows=tiled.grid_rows,
            tokens_per_tile=tokens,
            hidden_size=self.encoder.hidden_size,
            width=tiled.width,
            height=tiled.height,
        )

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
            transport=",".join(self.senders),
            max_batch_tiles=self.batcher.max_batch_tiles,
            max_queued_tiles=self.batcher.max_queued_tiles,
            max_wait_ms=int(self.config.max_wait_ms),
            max_image_pixels=self.config.max_image_pixels,
            has_router=ckpt.has_router,
            default_vir_mode=vir_mode.to_wire(self.default_mode),
        )
