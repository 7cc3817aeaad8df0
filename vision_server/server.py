"""Builds and runs a vision server process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import torch
from prometheus_client import start_http_server

from dvd.checkpoint import load_config
from dvd.checkpoint.family import Family, checkpoint_family
from dvd.features import parse_dtype
from dvd.grpc_server import bind, new_server, serve_until_signal
from dvd.tls import Tls, describe_client
from dvd.transport import FeatureSender, parse_names, sender_class
from dvd.v1 import vision_pb2_grpc
from vision_server.batcher import TileBatcher
from vision_server.config import VisionServerConfig
from vision_server.encoder import VisionEncoder
from vision_server.encoder_cache import EncoderCache
from vision_server.metrics import VisionMetrics
from vision_server.service import VisionService

if TYPE_CHECKING:
    from vision_server.qwen3vl.service import Qwen3VLVisionService

log = logging.getLogger(__name__)


def make_sender(name: str, config: VisionServerConfig, tls: Tls | None = None) -> FeatureSender:
    """A transport's sending side, with the settings its backend takes. Only tcp opens
    connections of its own, so only it takes `tls`: shm never leaves the host, and rdma's
    set-up travels over this server's (TLS) gRPC port."""
    if name == "rdma":
        options = {"device": config.rdma_device or None, "gid_index": config.rdma_gid_index}
        return sender_class(name)(**options)  # type: ignore[call-arg]
    if name == "tcp" and tls is not None:
        log.info("tcp transport: data connections %s", describe_client(tls))
        tcp_options = {"tls": tls.client_context(), "server_name": tls.config.server_name}
        return sender_class(name)(**tcp_options)  # type: ignore[call-arg]
    return sender_class(name)()


def check_device(device: str) -> None:
    """A CUDA device that this host does not have is a clear error before the model loads
    (torch would say only "invalid device ordinal", or fail later on the first tile)."""
    if not device.startswith("cuda"):
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise ValueError(
            f"vision server: device {device} does not exist here ({count} CUDA device(s) "
            "visible; CUDA_VISIBLE_DEVICES renumbers them from 0)"
        )


async def serve(config: VisionServerConfig, grace_s: float = 10.0) -> None:
    tls = config.tls.load()  # before the model: a bad file fails in a moment
    check_device(config.device)
    metrics = VisionMetrics()
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.host, registry=metrics.registry)
    senders = {name: make_sender(name, config, tls) for name in parse_names(config.transport)}
    if checkpoint_family(config.model) is not Family.INTERNVL:
        from vision_server.qwen3vl.server import make_service

        qwen3vl, stop_batcher = make_service(config, metrics, senders)
        await _serve(config, qwen3vl, stop_batcher, grace_s, tls)
        return
    checkpoint = load_config(config.model)
    encoder = VisionEncoder(checkpoint, config.device, parse_dtype(config.dtype))
    batcher = TileBatcher(
        encoder.encode,
        config.max_batch_tiles,
        config.max_wait_ms,
        config.queued_tiles_bound,
        config.max_batch_ms,
    )
    batcher.start()
    log.info(
        "ViT batches of up to %d tiles and about %g ms (0: no target), gathered for up to "
        "%g ms; %s",
        config.max_batch_tiles,
        config.max_batch_ms,
        config.max_wait_ms,
        f"calls refused beyond {config.queued_tiles_bound} queued tiles (--max-queued-tiles)"
        if config.queued_tiles_bound
        else "no bound on queued tiles",
    )
    cache = EncoderCache(config.encoder_cache_mib * 2**20)
    service = VisionService(config, encoder, batcher, metrics, senders, cache)
    await _serve(config, service, batcher.stop, grace_s, tls)


async def _serve(
    config: VisionServerConfig,
    service: VisionService | Qwen3VLVisionService,
    stop_batcher: Callable[[], Awaitable[None]],
    grace_s: float,
    tls: Tls | None,
) -> None:
    server = new_server()
    vision_pb2_grpc.add_VisionServiceServicer_to_server(service, server)
    bind(server, config.address, tls)

    async def on_stop() -> None:
        service.ready = False
        await stop_batcher()
        service.close()

    await serve_until_signal(
        server,
        "vision server",
        config.address,
        grace_s,
        on_stop,
        on_draining=service.drain,
        tls=tls,
    )


def run(config: VisionServerConfig) -> int:
    torch.set_grad_enabled(False)
    asyncio.run(serve(config))
    return 0
