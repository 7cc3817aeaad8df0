"""`dvd bench vir`: ViR on and off, same checkpoint, same traffic, one run.

Starts one DvD stack on an InternVL3.5-Flash checkpoint and sends the same image traffic
twice: with every tile at 1/4 (`always-1/4`, what the model does without ViR) and with the
router choosing per tile (`router`). Reports visual tokens per image (from the vision
server's metrics) and request throughput, TTFT and end-to-end latency for each, and the
router's figures as ratios to the 1/4 run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from dvd.flags import add_flag

COMMAND = "bench-vir"
MODES = ("always-1/4", "router")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "vir",
        help="ViR on and off: visual tokens per image and throughput, same run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flag(
        parser,
        COMMAND,
        "--model",
        None,
        "an InternVL3.5-Flash checkpoint; default: a random-weight one of --preset",
    )
    add_flag(parser, COMMAND, "--preset", "small-flash", "preset when no --model is given")
    add_flag(parser, COMMAND, "--num-requests", 24, "requests per mode")
    add_flag(parser, COMMAND, "--concurrency", 4, "requests in flight")
    add_flag(parser, COMMAND, "--image-size", "1344x1008", "image size (WIDTHxHEIGHT)")
    add_flag(parser, COMMAND, "--output-tokens", 16, "tokens generated per request")
    add_flag(parser, COMMAND, "--json", None, "write the report to this file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from benchmarks.serve.config import BenchConfig, parse_image_sizes
    from benchmarks.serve.runner import run_benchmark
    from benchmarks.systems import bench_checkpoint, dvd_up_argv, free_port, running, scalar_metric
    from dvd.checkpoint import load_config

    work = Path(tempfile.mkdtemp(prefix="dvd-bench-vir-"))
    model = bench_checkpoint(args.model, args.preset, work)
    if not load_config(model).has_router:
        raise SystemExit(f"dvd bench vir: {model} has no ViR (not an InternVL3.5-Flash model)")
    port, metrics_port = free_port(), free_port()
    argv = dvd_up_argv(
        model, port, "--kv-cache-gib", "1", "--vision-metrics-port", str(metrics_port)
    )
    report: dict[str, Any] = {"model": str(model), "modes": {}}
    url = f"http://127.0.0.1:{port}"
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    with running("dvd", argv, url, work / "dvd-up.log"):
        for mode in MODES:
            before_tokens = scalar_metric(metrics, "dvd_vision_visual_tokens_total")
            before_images = scalar_metric(metrics, "dvd_vision_images_total")
            config = BenchConfig(
                base_url=url,
                concurrency=args.concurrency,
                num_requests=args.num_requests,
                image_sizes=parse_image_sizes(args.image_size),
                output_tokens=args.output_tokens,
                ignore_eos=True,
                warmup_requests=2,
                extra_body={"vir_mode": mode},
                # A different image every request: repeats would hit the encoder cache and
                # leave the ViT, half of what is compared, out of the measurement.
                image_variants=args.num_requests + 2,
            )
            result = asyncio.run(run_benchmark(config))
            images = scalar_metric(metrics, "dvd_vision_images_total") - before_images
            tokens = scalar_metric(metrics, "dvd_vision_visual_tokens_total") - before_tokens
            summary = result.summary.to_json()
            report["modes"][mode] = {
                "visual_tokens_per_image": tokens / images if images else None,
                "request_throughput": summary["request_throughput"],
                "ttft_ms": summary["ttft_ms"],
                "e2e_ms": summary["e2e_ms"],
                "errors": summary["errors"],
            }
    quarter, router = report["modes"]["always-1/4"], report["modes"]["router"]
    report["router_vs_quarter"] = {
        "visual_tokens": router["visual_tokens_per_image"] / quarter["visual_tokens_per_image"],
        "request_throughput": router["request_throughput"] / quarter["request_throughput"],
        "ttft_mean": router["ttft_ms"]["mean"] / quarter["ttft_ms"]["mean"],
    }
    print(f"{'mode':<12}{'tokens/image':>14}{'req/s':>9}{'TTFT ms':>10}{'E2E ms':>10}")
    for mode, row in report["modes"].items():
        print(
            f"{mode:<12}{row['visual_tokens_per_image']:>14.0f}{row['request_throughput']:>9.2f}"
            f"{row['ttft_ms']['mean']:>10.0f}{row['e2e_ms']['mean']:>10.0f}"
        )
    ratios = report["router_vs_quarter"]
    print("router / always-1/4: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
