"""`dvd bench pool`: N vision servers behind one DNS name, least-loaded against cache-affine.

Starts N vision servers on one port at 127.0.0.2, 127.0.0.3, ... and a DNS server on
loopback that resolves one name to all of them (a headless Service's shape), then, for each
routing policy in turn, a language server that knows the vision tier only by that name and
a gateway, and sends the same multi-turn-like traffic: every image comes back several times
(`--image-variants` distinct images over `--num-requests` requests), as a chat resends its
images on every turn. The vision servers are started afresh for each policy, so both begin
with empty encoder caches.

Reported per policy: each member's share of the tiles, the encoder-cache hit rate over the
repeated images (hits / (images sent - distinct images)), request throughput and mean
TTFT; then cache-affine's figures as ratios to least-loaded's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dvd.flags import add_flag
from dvd.routing import CACHE_AFFINE, LEAST_LOADED

COMMAND = "bench-pool"
NAME = "vision.bench"
POLICIES = (LEAST_LOADED, CACHE_AFFINE)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pool",
        help="N vision servers behind one name: tile shares and cache hits per routing policy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flag(parser, COMMAND, "--model", None, "checkpoint; default: a random one of --preset")
    add_flag(parser, COMMAND, "--preset", "small", "preset when no --model is given")
    add_flag(parser, COMMAND, "--vision-servers", 2, "vision servers behind the name")
    add_flag(parser, COMMAND, "--num-requests", 48, "requests per policy")
    add_flag(parser, COMMAND, "--image-variants", 12, "distinct images among them")
    add_flag(parser, COMMAND, "--concurrency", 4, "requests in flight")
    add_flag(parser, COMMAND, "--image-size", "896x448", "image size (WIDTHxHEIGHT)")
    add_flag(parser, COMMAND, "--output-tokens", 8, "tokens generated per request")
    add_flag(parser, COMMAND, "--json", None, "write the report to this file")
    parser.set_defaults(func=run)


def member_counters(metrics_url: str, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    pattern = rf'^{name}\{{member="([^"]+)"\}} (\S+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.MULTILINE)}


@contextlib.contextmanager
def vision_tier(model: Path, count: int, work: Path, dns: Any) -> Iterator[int]:
    """`count` fresh vision servers on one port behind NAME; yields the port."""
    from benchmarks.systems import free_port, running

    port = free_port()
    hosts = [f"127.0.0.{2 + i}" for i in range(count)]
    with contextlib.ExitStack() as stack:
        for host in hosts:
            metrics_port = free_port()
            argv = [sys.executable, "-m", "dvd", "vision", "--model", str(model)]
            argv += ["--host", host, "--port", str(port), "--metrics-port", str(metrics_port)]
            url = f"http://{host}:{metrics_port}"
            stack.enter_context(
                running(f"vision {host}", argv, url, work / f"{host}.log", ready_path="/metrics")
            )
        dns.set(NAME, hosts)
        yield port


def distinct_images(config: Any) -> int:
    """How many different images the run's requests carry."""
    from benchmarks.serve.workload import Workload

    workload = Workload(config)
    return len({image for i in range(config.num_requests) for image in workload.request(i).images})


def run_policy(model: Path, policy: str, args: argparse.Namespace, work: Path, dns: Any) -> dict:
    from benchmarks.serve.config import BenchConfig, parse_image_sizes
    from benchmarks.serve.runner import run_benchmark
    from benchmarks.systems import free_port, running

    with vision_tier(model, args.vision_servers, work / policy, dns) as vision_port:
        language_port, metrics_port, gateway_port = free_port(), free_port(), free_port()
        language = [sys.executable, "-m", "dvd", "language", "--model", str(model)]
        language += ["--port", str(language_port), "--metrics-port", str(metrics_port)]
        language += ["--vision", f"dns:///{NAME}:{vision_port}", "--dns-server", dns.address]
        language += ["--vision-routing", policy, "--kv-cache-gib", "1"]
        gateway = [sys.executable, "-m", "dvd", "gateway", "--port", str(gateway_port)]
        gateway += ["--language", f"127.0.0.1:{language_port}"]
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        url = f"http://127.0.0.1:{gateway_port}"
        with (
            running(
                "language",
                language,
                f"http://127.0.0.1:{metrics_port}",
                work / policy / "language.log",
                ready_path="/metrics",
            ),
            running("gateway", gateway, url, work / policy / "gateway.log"),
        ):
            config = BenchConfig(
                base_url=url,
                concurrency=args.concurrency,
                num_requests=args.num_requests,
                image_sizes=parse_image_sizes(args.image_size),
                image_variants=args.image_variants,
                output_tokens=args.output_tokens,
                ignore_eos=True,
                # Random, not cyclic: with a cycle of an even number of images, least-loaded's
                # turn-taking sends each image back to the same member by accident.
                image_order="random",
            )
            result = asyncio.run(run_benchmark(config)).summary.to_json()
            tiles = member_counters(metrics, "dvd_language_vision_member_tiles_total")
            images = member_counters(metrics, "dvd_language_vision_member_images_total")
            hits = member_counters(metrics, "dvd_language_vision_member_cache_hits_total")
    sent = sum(images.values())
    repeats = sent - distinct_images(config)
    total_tiles = sum(tiles.values()) or 1
    return {
        "tile_share": {member: n / total_tiles for member, n in sorted(tiles.items())},
        "images": sent,
        "cache_hits": sum(hits.values()),
        "repeat_hit_rate": sum(hits.values()) / repeats if repeats else None,
        "request_throughput": result["request_throughput"],
        "ttft_ms_mean": result["ttft_ms"]["mean"],
        "errors": result["errors"],
    }


def run(args: argparse.Namespace) -> int:
    from benchmarks.dns_server import DnsServer
    from benchmarks.systems import bench_checkpoint

    work = Path(tempfile.mkdtemp(prefix="dvd-bench-pool-"))
    model = bench_checkpoint(args.model, args.preset, work)
    report: dict[str, Any] = {
        "model": str(model),
        "vision_servers": args.vision_servers,
        "num_requests": args.num_requests,
        "image_variants": args.image_variants,
        "concurrency": args.concurrency,
        "image_size": args.image_size,
        "policies": {},
    }
    with DnsServer() as dns:
        for policy in POLICIES:
            report["policies"][policy] = run_policy(model, policy, args, work, dns)
    least, affine = (report["policies"][p] for p in POLICIES)
    report["cache_affine_vs_least_loaded"] = {
        "request_throughput": affine["request_throughput"] / least["request_throughput"],
        "ttft_mean": affine["ttft_ms_mean"] / least["ttft_ms_mean"],
    }
    print(f"{'policy':<14}{'repeat hits':>12}{'req/s':>8}{'TTFT ms':>9}  tile shares")
    for policy, row in report["policies"].items():
        shares = " ".join(f"{share:.2f}" for share in row["tile_share"].values())
        rate = row["repeat_hit_rate"]
        print(
            f"{policy:<14}{(rate or 0) * 100:>11.0f}%{row['request_throughput']:>8.2f}"
            f"{row['ttft_ms_mean']:>9.0f}  {shares}"
        )
    ratios = report["cache_affine_vs_least_loaded"]
    print("cache-affine / least-loaded: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
