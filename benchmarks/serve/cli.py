"""`dvd bench serve`: load-generate against any OpenAI-compatible chat completions endpoint.

Every flag's default comes from `DVD_BENCH_SERVE_<FLAG>` (see dvd.flags). httpx, tqdm,
numpy and PIL are imported in `run`, so `dvd --help` stays fast.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import TYPE_CHECKING, Any

from dvd.env import env_name, from_env
from dvd.flags import add_flag

if TYPE_CHECKING:
    from benchmarks.serve.config import BenchConfig

COMMAND = "bench-serve"
DEFAULT_NUM_REQUESTS = 100


def register(subparsers: Any) -> None:
    """Adds the `serve` tool to `dvd bench`."""
    parser = subparsers.add_parser(
        "serve",
        help="load-generate against an OpenAI-compatible chat endpoint (TTFT, TPOT, ITL, E2E)",
        description=(
            "Sends streamed chat completions with generated images and text at a fixed "
            "concurrency or an arrival rate, and reports TTFT, TPOT, ITL and end-to-end "
            "latency (mean, p50, p90, p99), throughputs, goodput against SLO targets and "
            "errors. Exits 1 when any request failed."
        ),
    )
    flag = functools.partial(add_flag, parser, COMMAND)
    flag("--base-url", "http://127.0.0.1:8000", "server root, without /v1")
    flag("--model", None, "model name to send; unset takes the first of GET /v1/models")
    flag("--endpoint", "/v1/chat/completions", "path of the chat completions endpoint")

    traffic = parser.add_argument_group(
        "traffic", "give --concurrency (a closed loop) or --request-rate (an open loop)"
    )
    exclusive = traffic.add_mutually_exclusive_group()
    _optional(exclusive, "--concurrency", int, "keep N requests in flight", metavar="N")
    _optional(
        exclusive,
        "--request-rate",
        float,
        "send requests at R per second (inf: all at once)",
        metavar="R",
    )
    add_flag(
        traffic,
        COMMAND,
        "--arrival",
        "poisson",
        "arrival process with --request-rate: exponential gaps or even ones",
        choices=["poisson", "constant"],
    )
    _optional(
        traffic,
        "--max-concurrency",
        int,
        "with --request-rate: most requests in flight (later arrivals wait)",
        metavar="N",
    )
    _optional(
        traffic,
        "--num-requests",
        int,
        f"stop after N requests ({DEFAULT_NUM_REQUESTS} when --duration is not given)",
        metavar="N",
    )
    _optional(
        traffic,
        "--duration",
        float,
        "stop sending after S seconds (with --num-requests: whichever comes first)",
        metavar="S",
    )
    add_flag(traffic, COMMAND, "--warmup", 0, "requests sent one by one first, not counted")

    workload = parser.add_argument_group("workload")
    wflag = functools.partial(add_flag, workload, COMMAND)
    wflag("--images-per-request", 1, "images in each request")
    wflag(
        "--image-sizes",
        "448x448",
        "image sizes WIDTHxHEIGHT, comma-separated (e.g. 448x448,896x896,1344x1008)",
    )
    wflag(
        "--image-order",
        "cycle",
        "cycle through --image-sizes, or pick each image's size at random (seeded)",
        choices=["cycle", "random"],
    )
    wflag(
        "--image-variants",
        1,
        "distinct images per size, cycled through (more defeats servers' image caches)",
    )
    wflag("--prompt-tokens", 64, "approximate prompt text length (random words)")
    wflag("--output-tokens", 128, "max_tokens of each request")
    wflag("--ignore-eos", False, "send ignore_eos: true so every request generates max_tokens")
    wflag("--temperature", 0.0, "sampling temperature")
    wflag(
        "--extra-body",
        "{}",
        'JSON object merged into every request, e.g. \'{"vir_mode": "router"}\'',
    )
    wflag("--seed", 0, "seed of prompts, images, Poisson gaps and random image sizes")

    out = parser.add_argument_group("limits and output")
    oflag = functools.partial(add_flag, out, COMMAND)
    oflag("--timeout-s", 600.0, "deadline of one request, in seconds")
    var = env_name(COMMAND, "--goodput")
    out.add_argument(
        "--goodput",
        nargs="+",
        default=from_env(var, "") or None,
        metavar="METRIC:MS",
        help="SLO targets for goodput, e.g. ttft:500 tpot:50 (metrics: ttft, tpot, e2e) "
        f"[env {var}; default unset]",
    )
    oflag("--json", None, "write the summary and every request's record to this file")
    oflag("--quiet", False, "no progress bar")
    parser.set_defaults(func=run)


def _optional(target: Any, flag: str, kind: type, help: str, **kwargs: Any) -> None:
    """A typed flag that is unset by default (add_flag makes those strings)."""
    var = env_name(COMMAND, flag)
    target.add_argument(
        flag,
        type=kind,
        default=from_env(var, "") or None,  # argparse converts a string default with `type`
        help=f"{help} [env {var}; default unset]",
        **kwargs,
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The BenchConfig the parsed flags describe (ValueError names a bad field)."""
    from benchmarks.serve.config import BenchConfig, parse_image_sizes, parse_slos

    num_requests = args.num_requests
    if num_requests is None and args.duration is None:
        num_requests = DEFAULT_NUM_REQUESTS
    return BenchConfig(
        base_url=args.base_url,
        model=args.model or None,
        endpoint=args.endpoint,
        concurrency=args.concurrency,
        request_rate=args.request_rate,
        arrival=args.arrival,
        max_concurrency=args.max_concurrency,
        num_requests=num_requests,
        duration_s=args.duration,
        images_per_request=args.images_per_request,
        image_sizes=parse_image_sizes(args.image_sizes),
        image_order=args.image_order,
        image_variants=args.image_variants,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        timeout_s=args.timeout_s,
        slo_ms=parse_slos(args.goodput or []),
        extra_body=parse_extra_body(args.extra_body),
        warmup_requests=args.warmup,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark, prints the table, writes --json; 1 if any request failed."""
    import asyncio

    from benchmarks.serve.report import format_table, write_json
    from benchmarks.serve.runner import run_benchmark

    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"dvd bench serve: {error}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(run_benchmark(config, progress=not args.quiet))
    except ValueError as error:
        print(f"dvd bench serve: {error}", file=sys.stderr)
        return 1
    print(format_table(result))
    if args.json:
        print(f"wrote {write_json(result, args.json)}")
    return 0 if result.summary.errors == 0 else 1


def parse_extra_body(text: str) -> dict[str, object]:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"extra_body: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError("extra_body: must be a JSON object")
    return value
