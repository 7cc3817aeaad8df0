"""`dvd vision`: the vision server's command line."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dvd.flags import add_flag, add_tls_flags, tls_from_args
from vision_server.batch_sizer import DEFAULT_MAX_BATCH_MS

if TYPE_CHECKING:
    from vision_server.config import VisionServerConfig

COMMAND = "vision"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND,
        help="run a vision server (image decode, tiling, ViT, projector)",
        description="Serves VisionService over gRPC: decodes images, tiles them the InternVL "
        "way, runs the ViT and the MLP projector on batches of tiles from concurrent "
        "requests, and streams BF16 features back tile by tile.",
    )
    add_flag(
        parser,
        COMMAND,
        "--model",
        None,
        "checkpoint folder (original or -HF layout)",
        required=False,
    )
    add_flag(parser, COMMAND, "--host", "127.0.0.1", "address to listen on")
    add_flag(parser, COMMAND, "--port", 50051, "gRPC port")
    add_flag(parser, COMMAND, "--device", "auto", "torch device for the ViT: auto, cpu, cuda:N")
    add_flag(parser, COMMAND, "--dtype", "bfloat16", "ViT and feature dtype: bfloat16 or float32")
    add_flag(parser, COMMAND, "--max-batch-tiles", 32, "most tiles in one ViT batch")
    add_flag(
        parser,
        COMMAND,
        "--max-wait-ms",
        5.0,
        "how long a batch waits for more tiles after its first arrives",
    )
    add_flag(
        parser,
        COMMAND,
        "--max-batch-ms",
        DEFAULT_MAX_BATCH_MS,
        "latency target of one ViT batch: a batch takes fewer tiles (Qwen3-VL: patches) than "
        "the maximum where the time per tile measured so far says that many would take "
        "longer, so the requests at the head of the queue get their features first; 0: "
        "always fill up to the maximum",
    )
    add_flag(
        parser,
        COMMAND,
        "--max-queued-tiles",
        None,
        "most tiles waiting for the ViT; a call that would queue more is refused with "
        "RESOURCE_EXHAUSTED (the language server tries another vision server), unless the "
        "queue holds no other call's tiles; unset: 8 x --max-batch-tiles; 0: no bound "
        "(Qwen3-VL honours only 0: its bound is in patches, see --max-batch-patches)",
        type=int,
    )
    add_flag(parser, COMMAND, "--max-images-per-request", 16, "images allowed in one Encode call")
    add_flag(parser, COMMAND, "--max-image-pixels", 40_000_000, "largest image, in pixels")
    add_flag(
        parser,
        COMMAND,
        "--max-tiles",
        0,
        "upper bound on tiles per image; 0 uses the checkpoint's max_dynamic_patch",
    )
    add_flag(parser, COMMAND, "--rdma-device", "", "rdma transport: device name (default: first)")
    add_flag(parser, COMMAND, "--rdma-gid-index", 0, "rdma transport: GID index (RoCE: per host)")
    add_flag(
        parser,
        COMMAND,
        "--encoder-cache-mib",
        512,
        "features of recently seen images kept to skip the ViT on repeats; 0 disables it",
    )
    add_flag(parser, COMMAND, "--metrics-port", 0, "Prometheus /metrics port; 0 disables it")
    add_flag(
        parser,
        COMMAND,
        "--transport",
        "grpc,shm",
        "feature transports this server accepts, comma-separated (grpc, shm, rdma); each "
        "language server picks one per request",
    )
    add_flag(
        parser,
        COMMAND,
        "--vir-mode",
        "auto",
        "default tile resolution: router (ViR, -Flash models), always-1/4, always-1/16; "
        "auto picks router on -Flash checkpoints with flash_mode on, else always-1/4",
    )
    add_tls_flags(parser, COMMAND, "the language servers' tcp data ports")
    add_flag(
        parser,
        COMMAND,
        "--max-batch-patches",
        16384,
        "Qwen3-VL: most ViT patches in one forward (items of any calls packed whole); the "
        "queue bound is 8 forwards' patches (0 with --max-queued-tiles 0: no bound)",
    )
    add_flag(
        parser,
        COMMAND,
        "--min-pixels",
        0,
        "Qwen3-VL: least pixels of a resized image; 0: preprocessor_config.json's",
    )
    add_flag(
        parser,
        COMMAND,
        "--max-pixels",
        0,
        "Qwen3-VL: most pixels of a resized image; 0: preprocessor_config.json's",
    )
    add_flag(parser, COMMAND, "--log-level", "info", "logging level")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> VisionServerConfig:
    """The config `dvd vision` runs with; ValueError names a bad field."""
    from vision_server.config import VisionServerConfig

    return VisionServerConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        max_batch_tiles=args.max_batch_tiles,
        max_wait_ms=args.max_wait_ms,
        max_batch_ms=args.max_batch_ms,
        max_queued_tiles=args.max_queued_tiles,
        max_images_per_request=args.max_images_per_request,
        max_image_pixels=args.max_image_pixels,
        max_tiles=args.max_tiles,
        metrics_port=args.metrics_port,
        transport=args.transport,
        vir_mode=args.vir_mode,
        encoder_cache_mib=args.encoder_cache_mib,
        rdma_device=args.rdma_device,
        rdma_gid_index=args.rdma_gid_index,
        max_batch_patches=args.max_batch_patches,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        tls=tls_from_args(args),
    )


def run(args: argparse.Namespace) -> int:
    from dvd.checkpoint.family import require_servable
    from dvd.grpc_server import setup_logging
    from vision_server.server import run as run_server

    if not args.model:
        raise SystemExit("dvd vision: --model (or DVD_VISION_MODEL) is required")
    # Before torch and the model load: a family this version cannot serve is a one-line error.
    require_servable(args.model, COMMAND)
    config = config_from_args(args)
    setup_logging(args.log_level)
    return run_server(config)
