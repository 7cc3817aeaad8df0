"""`dvd language`: the language server's command line."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dvd.flags import add_flag, add_repeated_flag, add_switch, add_tls_flags, tls_from_args

if TYPE_CHECKING:
    from language_server.config import LanguageServerConfig

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
        "vision servers, comma-separated (dvd mode): addresses (host:port) and DNS names "
        "(name:port or dns:///name:port, e.g. a headless Service); every address a name "
        "resolves to is a pool member of its own",
    )
    add_flag(
        parser,
        COMMAND,
        "--vision-routing",
        "cache-affine",
        "which vision server gets a request: cache-affine (rendezvous hashing of its first "
        "image, bounded by load, so repeated images hit one encoder cache) or least-loaded",
    )
    add_flag(
        parser,
        COMMAND,
        "--vision-resolve-s",
        5.0,
        "how often DNS names in --vision are resolved again (also at once when a call fails)",
    )
    add_flag(
        parser,
        COMMAND,
        "--dns-server",
        "",
        "resolve --vision names with this DNS server (ip:port) instead of the system resolver",
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
    add_engine_flags(parser, COMMAND)
    add_flag(parser, COMMAND, "--max-images-per-request", 16, "images allowed in one request")
    add_flag(
        parser,
        COMMAND,
        "--max-waiting-requests",
        None,
        "most requests waiting for their first token (encoding, queued in vLLM, in prefill); "
        "one more is refused with RESOURCE_EXHAUSTED (the gateway tries another language "
        "server or answers 429); unset: 2 x --max-num-seqs; 0: no bound",
        type=int,
    )
    add_flag(
        parser,
        COMMAND,
        "--vision-timeout-s",
        120.0,
        "deadline of one Encode call (less when the request's own deadline is nearer)",
    )
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
    add_tls_flags(parser, COMMAND, "vision servers")
    add_flag(parser, COMMAND, "--log-level", "info", "logging level")
    parser.set_defaults(func=run)


def add_engine_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """The vLLM engine's flags; `dvd up` has the same ones and forwards them (ENGINE_FLAGS)."""
    add_flag(
        parser,
        command,
        "--kv-cache-gib",
        2.0,
        "KV cache size in GiB per GPU; 0: vLLM sizes it from --gpu-memory-utilization",
    )
    add_flag(
        parser,
        command,
        "--gpu-memory-utilization",
        0.0,
        "fraction of each GPU's memory vLLM may use (weights, activations, KV cache), e.g. "
        "0.9; only with --kv-cache-gib 0",
    )
    add_flag(parser, command, "--tensor-parallel-size", 1, "GPUs the LLM is split across")
    add_flag(parser, command, "--pipeline-parallel-size", 1, "pipeline stages of the LLM")
    add_flag(
        parser,
        command,
        "--quantization",
        "",
        "vLLM quantization method, e.g. fp8, awq; empty: what the checkpoint's config says",
    )
    add_flag(
        parser,
        command,
        "--max-num-batched-tokens",
        0,
        "most tokens in one engine step (chunked prefill); 0: vLLM's default",
    )
    add_switch(
        parser,
        command,
        "--enable-prefix-caching",
        "reuse the KV cache of shared prompt prefixes",
        "vLLM's (on for generative models)",
    )
    add_flag(
        parser,
        command,
        "--enforce-eager",
        True,
        "run the LLM eagerly; --no-enforce-eager lets vLLM capture CUDA graphs and compile "
        "(faster decoding on GPUs, slower start)",
    )
    add_repeated_flag(
        parser,
        command,
        "--engine-arg",
        "any other vLLM engine argument (AsyncEngineArgs), e.g. kv_cache_dtype=fp8 or "
        "compilation_config='{\"cudagraph_capture_sizes\": [1, 2, 4]}'; VALUE is JSON when "
        "it parses, else a string; repeatable",
        "KEY=VALUE",
    )


ENGINE_FLAGS = (
    "--kv-cache-gib",
    "--gpu-memory-utilization",
    "--tensor-parallel-size",
    "--pipeline-parallel-size",
    "--quantization",
    "--max-num-batched-tokens",
)
"""add_engine_flags' flags that take one value, in the order `dvd up` forwards them."""


def config_from_args(args: argparse.Namespace) -> LanguageServerConfig:
    """The config `dvd language` runs with; ValueError names a bad field."""
    from language_server.config import LanguageServerConfig
    from language_server.engine_args import parse_engine_args

    return LanguageServerConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        mode=args.mode,
        vision=tuple(a.strip() for a in args.vision.split(",") if a.strip()),
        vision_routing=args.vision_routing,
        vision_resolve_s=args.vision_resolve_s,
        dns_server=args.dns_server,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        kv_cache_gib=args.kv_cache_gib,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        quantization=args.quantization,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        enforce_eager=args.enforce_eager,
        engine_args=parse_engine_args(args.engine_arg),
        max_images_per_request=args.max_images_per_request,
        max_waiting_requests=args.max_waiting_requests,
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
        tls=tls_from_args(args),
    )


def run(args: argparse.Namespace) -> int:
    from dvd.checkpoint.family import require_servable
    from dvd.grpc_server import setup_logging
    from language_server.engine_args import check_names
    from language_server.server import run as run_server

    if not args.model:
        raise SystemExit("dvd language: --model (or DVD_LANGUAGE_MODEL) is required")
    config = config_from_args(args)
    # Before logging is set up and anything heavy is read: a misspelt engine argument fails
    # in seconds, not after the checkpoint has been prepared; then the checkpoint's family.
    check_names(config.engine_args)
    require_servable(args.model, COMMAND)
    setup_logging(args.log_level)
    return run_server(config)
