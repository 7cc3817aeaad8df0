"""`dvd language`: the language server's command line."""

from __future__ import annotations

import argparse

from dvd.flags import add_flag

COMMAND = "language"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND,
        help="run a language server (the LLM on vLLM, fed with image features)",
        description="Serves LanguageService over gRPC: applies the chat template, gets image "
        "features from vision servers (dvd mode) or computes them in-process (coupled "
        "mode), splices them into the prompt embeddings and runs the LLM on vLLM.",
    )
    add_flag(parser, COMMAND, "--model", None, "checkpoint folder (original or -HF layout)")
    add_flag(parser, COMMAND, "--host", "127.0.0.1", "address to listen on")
    add_flag(parser, COMMAND, "--port", 50061, "gRPC port")
    add_flag(
        parser,
        COMMAND,
        "--mode",
        "dvd",
        "dvd: features from vision servers; coupled: vision model in this process",
    )
    add_flag(
        parser,
        COMMAND,
        "--vision",
        "127.0.0.1:50051",
        "vision server address(es), comma-separated (dvd mode)",
    )
    add_flag(
        parser,
        COMMAND,
        "--served-model-name",
        None,
        "model name clients use; defaults to the checkpoint folder's name",
    )
    add_flag(
        parser,
        COMMAND,
        "--transport",
        "grpc",
        "how feature bytes travel from vision servers (dvd mode): grpc (in the stream, "
        "works everywhere), shm (shared memory, same host), rdma (pyverbs)",
    )
    add_flag(parser, COMMAND, "--shm-arena-mib", 1024, "size of the shm transport's arena")
    add_flag(parser, COMMAND, "--tcp-host", "127.0.0.1", "tcp transport: data listener address")
    add_flag(parser, COMMAND, "--tcp-port", 0, "tcp transport: data listener port; 0: any free")
    add_flag(
        parser,
        COMMAND,
        "--tcp-advertise",
        "",
        "tcp transport: host name vision servers dial (default: --tcp-host)",
    )
    add_flag(parser, COMMAND, "--rdma-device", "", "rdma transport: device name (default: first)")
    add_flag(
        parser,
        COMMAND,
        "--rdma-buffer-mib",
        1024,
        "rdma transport: registered receive buffer, at most 4096",
    )
    add_flag(parser, COMMAND, "--rdma-gid-index", 0, "rdma transport: GID index (RoCE: per host)")
    add_flag(parser, COMMAND, "--dtype", "bfloat16", "LLM and feature dtype: bfloat16 or float32")
    add_flag(
        parser,
        COMMAND,
        "--max-model-len",
        0,
        "context length in tokens; 0 means min(max_position_embeddings, 32768)",
    )
    add_flag(parser, COMMAND, "--max-num-seqs", 64, "most sequences vLLM batches at once")
    add_flag(parser, COMMAND, "--kv-cache-gib", 2.0, "KV cache size in GiB")
    add_flag(parser, COMMAND, "--max-images-per-request", 16, "images allowed in one request")
    add_flag(parser, COMMAND, "--vision-timeout-s", 120.0, "deadline of one Encode call")
    add_flag(parser, COMMAND, "--vision-device", "auto", "coupled mode: torch device of the ViT")
    add_flag(parser, COMMAND, "--max-batch-tiles", 32, "coupled mode: most tiles in one ViT batch")
    add_flag(
        parser, COMMAND, "--max-image-pixels", 40_000_000, "coupled mode: largest image, in pixels"
    )
    add_flag(
        parser,
        COMMAND,
        "--vir-mode",
        "auto",
        "coupled mode: default tile resolution (router, always-1/4, always-1/16); in dvd mode "
        "the vision server's --vir-mode applies",
    )
    add_flag(parser, COMMAND, "--metrics-port", 0, "Prometheus /metrics port; 0 disables it")
    add_flag(parser, COMMAND, "--log-level", "info", "logging level")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dvd.grpc_server import setup_logging
    from language_server.config import LanguageServerConfig
    from language_server.server import run as run_server

    if not args.model:
        raise SystemExit("dvd language: --model (or DVD_LANGUAGE_MODEL) is required")
    setup_logging(args.log_level)
    config = LanguageServerConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        mode=args.mode,
        vision=tuple(a.strip() for a in args.vision.split(",") if a.strip()),
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        kv_cache_gib=args.kv_cache_gib,
        max_images_per_request=args.max_images_per_request,
        vision_timeout_s=args.vision_timeout_s,
        vision_device=args.vision_device,
        max_batch_tiles=args.max_batch_tiles,
        max_image_pixels=args.max_image_pixels,
        metrics_port=args.metrics_port,
        vir_mode=args.vir_mode,
        transport=args.transport,
        shm_arena_mib=args.shm_arena_mib,
        tcp_host=args.tcp_host,
        tcp_port=args.tcp_port,
        tcp_advertise=args.tcp_advertise,
        rdma_device=args.rdma_device,
        rdma_buffer_mib=args.rdma_buffer_mib,
        rdma_gid_index=args.rdma_gid_index,
    )
    return run_server(config)
