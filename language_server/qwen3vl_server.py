"""The language server's Qwen3-VL parts (the family dispatch in language_server/server.py):
vLLM's Qwen3-VL model on the LLM view, the chat-template prompt builder, and the vision
pool sized for [main | DeepStack] rows."""

from __future__ import annotations

import functools
import logging

from dvd.checkpoint.qwen3vl_config import Qwen3VLConfig, load_qwen3vl_config
from dvd.env import cache_dir
from dvd.features import parse_dtype
from dvd.tls import Tls
from dvd.v1 import vision_pb2
from language_server.config import LanguageServerConfig, context_length
from language_server.engine import LlmEngine
from language_server.image_features import FeatureSource
from language_server.metrics import LanguageMetrics
from language_server.qwen3vl_engine import Qwen3VLEngine
from language_server.qwen3vl_prompt import Qwen3VLPromptBuilder
from language_server.qwen3vl_view import prepare_qwen3vl_view
from language_server.vision_client import VisionPool
from vision_server.qwen3vl.preprocess import resized_grid
from vision_server.qwen3vl.processor_config import (
    ProcessorConfig,
    VideoProcessorConfig,
    load_processor_configs,
)
from vision_server.qwen3vl.video_item import clip_grid

log = logging.getLogger(__name__)


def image_rows(processor: ProcessorConfig, data: bytes) -> int:
    """Rows the vision server will send for an image, from its header and the checkpoint's
    pixel budgets (the most the budgets allow when the header cannot be read: the vision
    server then refuses the image anyway)."""
    grid = resized_grid(data, processor)
    if grid is None:
        return max_rows_per_image(processor)
    grid_h, grid_w = grid
    return grid_h * grid_w // processor.merge_size**2


def video_rows(video: VideoProcessorConfig, frames: list[bytes]) -> int:
    """Rows the vision server will send for a video, from its first frame's header, its
    frame count and the checkpoint's video budgets (the budget's most when the header
    cannot be read: the vision server then refuses the video anyway)."""
    grid = clip_grid(frames, video)
    if grid is None:
        return video.pixels.max_pixels // (
            video.pixels.temporal_patch_size * video.pixels.factor**2
        )
    grid_t, grid_h, grid_w = grid
    return grid_t * grid_h * grid_w // video.pixels.merge_size**2


def item_rows(
    processor: ProcessorConfig, video: VideoProcessorConfig, item: vision_pb2.ImageInput
) -> int:
    """Rows of an item of an EncodeRequest: a video's or an image's."""
    if item.HasField("video"):
        return video_rows(video, list(item.video.frames))
    return image_rows(processor, item.data)


def max_rows_per_image(processor: ProcessorConfig) -> int:
    """Rows of the largest image the processor config's budget allows (a vision server
    started with a larger --max-pixels sends plans the receivers refuse)."""
    return processor.max_pixels // processor.factor**2


def start_qwen3vl(
    config: LanguageServerConfig,
    metrics: LanguageMetrics,
    tls: Tls | None,
    make_receiver: object,
    settings_for: object,
) -> tuple[Qwen3VLConfig, LlmEngine, Qwen3VLPromptBuilder, FeatureSource, int]:
    """Checkpoint, engine, builder, vision pool and context length of a Qwen3-VL server."""
    checkpoint = load_qwen3vl_config(config.model)
    max_model_len = context_length(config, checkpoint.llm_config)
    view = prepare_qwen3vl_view(checkpoint, config.cache_dir or cache_dir())
    settings = settings_for(config, view, max_model_len)  # type: ignore[operator]
    engine = Qwen3VLEngine.start(checkpoint, settings).engine
    builder = Qwen3VLPromptBuilder.from_checkpoint(checkpoint, view)
    processor, video = load_processor_configs(checkpoint)
    vision = (
        _pool(config, checkpoint, processor, video, metrics, tls, make_receiver)
        if config.mode == "dvd"
        else _coupled(config, checkpoint, processor, video)
    )
    log.info(
        "Qwen3-VL: rows %d wide (%d DeepStack levels), up to %d rows per image",
        checkpoint.feature_width,
        checkpoint.vision.deepstack_levels,
        max_rows_per_image(processor),
    )
    return checkpoint, engine, builder, vision, max_model_len


def _coupled(
    config: LanguageServerConfig,
    checkpoint: Qwen3VLConfig,
    processor: ProcessorConfig,
    video: VideoProcessorConfig,
) -> FeatureSource:
    from language_server.qwen3vl_coupled import Qwen3VLCoupledVision
    from vision_server.qwen3vl.encoder import Qwen3VLEncoder

    encoder = Qwen3VLEncoder(checkpoint, config.vision_device, parse_dtype(config.dtype))
    return Qwen3VLCoupledVision(encoder, processor, video, config.max_image_pixels)


def _pool(
    config: LanguageServerConfig,
    checkpoint: Qwen3VLConfig,
    processor: ProcessorConfig,
    video: VideoProcessorConfig,
    metrics: LanguageMetrics,
    tls: Tls | None,
    make_receiver: object,
) -> FeatureSource:
    return VisionPool(
        list(config.vision),
        parse_dtype(config.dtype),
        config.vision_timeout_s,
        make_receiver(config, tls),  # type: ignore[operator]
        max_rows_per_image(processor),
        checkpoint.feature_width,
        routing=config.vision_routing,
        resolve_s=config.vision_resolve_s,
        dns_server=config.dns_server,
        metrics=metrics,
        tls=tls,
        rows_of=functools.partial(item_rows, processor, video),
    )
