"""Builds the Qwen3-VL vision service (the family dispatch in vision_server/server.py)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from dvd.checkpoint.qwen3vl_config import load_qwen3vl_config
from dvd.features import parse_dtype
from dvd.transport import FeatureSender
from vision_server.config import QUEUED_BATCHES, VisionServerConfig
from vision_server.metrics import VisionMetrics
from vision_server.qwen3vl.encoder import Qwen3VLEncoder
from vision_server.qwen3vl.item_batcher import ItemBatcher
from vision_server.qwen3vl.processor_config import load_processor_configs
from vision_server.qwen3vl.service import ItemCache, Qwen3VLVisionService

log = logging.getLogger(__name__)


def make_service(
    config: VisionServerConfig, metrics: VisionMetrics, senders: dict[str, FeatureSender]
) -> tuple[Qwen3VLVisionService, Callable[[], Awaitable[None]]]:
    """The service and what stops its batcher; the batcher is started (needs a loop)."""
    checkpoint = load_qwen3vl_config(config.model)
    limits = (config.min_pixels or None, config.max_pixels or None)
    processor, video = load_processor_configs(checkpoint, image_limits=limits)
    encoder = Qwen3VLEncoder(
        checkpoint, config.device, parse_dtype(config.dtype), config.max_batch_patches
    )
    batcher = ItemBatcher(
        encoder,
        config.max_batch_patches,
        config.max_wait_ms,
        config.queued_patches_bound,
        config.max_batch_ms,
    )
    batcher.start()
    log.info(
        "Qwen3-VL: images resized to %d..%d pixels; forwards of up to %d patches and about "
        "%g ms (0: no target), gathered for up to %g ms; %s",
        processor.min_pixels,
        processor.max_pixels,
        config.max_batch_patches,
        config.max_batch_ms,
        config.max_wait_ms,
        f"calls refused beyond {config.queued_patches_bound} queued patches"
        if config.queued_patches_bound
        else "no bound on queued patches",
    )
    if config.max_queued_tiles:  # a count of InternVL tiles means nothing in patches
        log.warning(
            "Qwen3-VL: --max-queued-tiles %d does not apply (it counts InternVL tiles); the "
            "queue bound is %d patches (%d x --max-batch-patches); only --max-queued-tiles 0 "
            "(no bound) is honoured",
            config.max_queued_tiles,
            config.queued_patches_bound,
            QUEUED_BATCHES,
        )
    cache = ItemCache(config.encoder_cache_mib * 2**20)
    service = Qwen3VLVisionService(
        config, encoder, processor, batcher, metrics, senders, cache, video=video
    )
    return service, batcher.stop
