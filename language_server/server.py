"""Builds and runs a language server process."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from prometheus_client import start_http_server

from dvd import vir_mode
from dvd.checkpoint import CheckpointWeights, InternVLConfig, load_config
from dvd.checkpoint.family import Family, checkpoint_family
from dvd.checkpoint.verify import verify_llm
from dvd.env import cache_dir
from dvd.features import parse_dtype
from dvd.grpc_server import bind, new_server, serve_until_signal
from dvd.tls import Tls
from dvd.transport import FeatureReceiver, receiver_class
from dvd.v1 import language_pb2_grpc
from language_server.admission import WaitingRoom
from language_server.chat_prompt import ChatPromptBuilder, PromptBuilder
from language_server.config import LanguageServerConfig, context_length
from language_server.engine import EngineSettings, LlmEngine
from language_server.image_features import FeatureSource
from language_server.llm_view import prepare_llm_view
from language_server.metrics import LanguageMetrics
from language_server.service import LanguageService, ServiceLimits
from language_server.vllm_version import check_vllm_version

log = logging.getLogger(__name__)

TRUST = {
    "shm": "features stay in this host's shared memory; TLS covers the Encode stream that "
    "carries their offsets",
    "rdma": "RDMA writes are not encrypted; TLS covers the Encode stream and RdmaConnect, "
    "which carry the queue pair, buffer address and rkey",
}
"""What TLS does and does not cover for the transports without a connection of their own."""


def verify_checkpoint(config: LanguageServerConfig, checkpoint: InternVLConfig) -> None:
    """The tensors this process will load fit config.json: the LLM's, and in coupled mode
    the vision model's too (CheckpointMismatch naming them if not)."""
    weights = CheckpointWeights(checkpoint)
    verify_llm(checkpoint, weights)
    if config.mode == "coupled":
        from vision_server.encoder import verify_vision

        verify_vision(checkpoint, weights)


def make_feature_source(
    config: LanguageServerConfig,
    checkpoint: InternVLConfig,
    metrics: LanguageMetrics,
    tls: Tls | None = None,
) -> FeatureSource:
    dtype = parse_dtype(config.dtype)
    if config.mode == "dvd":
        from language_server.vision_client import VisionPool

        # Room for the most tiles an image can have (the grid plus its thumbnail) at 1/4.
        max_rows = (checkpoint.max_dynamic_patch + 1) * checkpoint.tokens_per_tile
        return VisionPool(
            list(config.vision),
            dtype,
            config.vision_timeout_s,
            make_receiver(config, tls),
            max_rows,
            checkpoint.llm_hidden_size,
            routing=config.vision_routing,
            rows_per_tile=checkpoint.tokens_per_tile,  # video frames reserve one tile's
            resolve_s=config.vision_resolve_s,
            dns_server=config.dns_server,
            metrics=metrics,
            tls=tls,
        )
    from language_server.coupled import CoupledVision
    from vision_server.encoder import TilingLimits, VisionEncoder

    encoder = VisionEncoder(checkpoint, config.vision_device, dtype)
    limits = TilingLimits(
        checkpoint.min_dynamic_patch,
        checkpoint.max_dynamic_patch,
        checkpoint.use_thumbnail,
        config.max_image_pixels,
    )
    mode = None if config.vir_mode == "auto" else vir_mode.parse(config.vir_mode)
    return CoupledVision(encoder, limits, config.max_batch_tiles, mode)


def make_receiver(config: LanguageServerConfig, tls: Tls | None = None) -> FeatureReceiver:
    """The transport's receiving side, with the settings its backend takes. With TLS, the
    tcp data port takes TLS only (mTLS with a CA), like the gRPC port; shm and rdma open
    no connection of their own (see TRUST)."""
    if tls is not None and config.transport in TRUST:
        log.info("%s transport: %s", config.transport, TRUST[config.transport])
    options: dict[str, dict[str, object]] = {
        "shm": {"arena_bytes": config.shm_arena_mib * 2**20},
        "tcp": {
            "host": config.tcp_host,
            "port": config.tcp_port,
            "advertise": config.tcp_advertise or None,
            "tls": tls.server_context() if tls is not None else None,
        },
        "rdma": {
            "device": config.rdma_device or None,
            "buffer_bytes": config.rdma_buffer_mib * 2**20,
            "gid_index": config.rdma_gid_index,
        },
    }
    return receiver_class(config.transport)(**options.get(config.transport, {}))


def engine_settings(config: LanguageServerConfig, view: Path, max_model_len: int) -> EngineSettings:
    """The engine's settings from the server's config (language_server/engine_args.py turns
    them into vLLM's AsyncEngineArgs)."""
    return EngineSettings(
        view=view,
        dtype=config.dtype,
        max_model_len=max_model_len,
        max_num_seqs=config.max_num_seqs,
        kv_cache_bytes=int(config.kv_cache_gib * 2**30),
        gpu_memory_utilization=config.gpu_memory_utilization,
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        quantization=config.quantization,
        max_num_batched_tokens=config.max_num_batched_tokens,
        enable_prefix_caching=config.enable_prefix_caching,
        enforce_eager=config.enforce_eager,
        extra=config.engine_args,
    )


async def serve(config: LanguageServerConfig, grace_s: float = 30.0) -> None:
    tls = config.tls.load()  # before vLLM starts: a bad file fails in a moment
    check_vllm_version()
    metrics = LanguageMetrics()
    builder: ChatPromptBuilder
    vision: FeatureSource
    if checkpoint_family(config.model) is Family.INTERNVL:
        checkpoint = load_config(config.model)
        max_model_len = context_length(config, checkpoint.llm_config)
        # Fail before vLLM starts, naming the tensors, rather than serve uninitialised weights.
        verify_checkpoint(config, checkpoint)
        view = prepare_llm_view(checkpoint, config.cache_dir or cache_dir())
        engine = LlmEngine.start(engine_settings(config, view, max_model_len))
        builder = PromptBuilder.from_checkpoint(checkpoint, view, parse_dtype(config.dtype))
        vision = make_feature_source(config, checkpoint, metrics, tls)
        name = checkpoint.name
    else:
        from language_server.qwen3vl_server import start_qwen3vl

        qwen3vl, engine, builder, vision, max_model_len = start_qwen3vl(
            config, metrics, tls, make_receiver, engine_settings
        )
        name = qwen3vl.name
    await vision.start()
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.host, registry=metrics.registry)
    limits = ServiceLimits(
        model_name=config.served_model_name or name,
        max_model_len=max_model_len,
        max_images_per_request=config.max_images_per_request,
        mode=config.mode,
    )
    waiting = WaitingRoom(config.waiting_bound, metrics.waiting, metrics.refused.labels("waiting"))
    log.info(
        "%s",
        f"requests refused beyond {config.waiting_bound} waiting for their first token "
        "(--max-waiting-requests)"
        if config.waiting_bound
        else "no bound on requests waiting for their first token",
    )
    service = LanguageService(limits, builder, engine, vision, metrics, waiting)
    server = new_server()
    language_pb2_grpc.add_LanguageServiceServicer_to_server(service, server)
    bind(server, config.address, tls)

    async def on_stop() -> None:
        service.ready = False
        await vision.close()
        engine.shutdown()

    await serve_until_signal(
        server, f"language server ({config.mode})", config.address, grace_s, on_stop, tls=tls
    )


def run(config: LanguageServerConfig) -> int:
    asyncio.run(serve(config))
    return 0
