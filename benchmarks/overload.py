"""`dvd bench overload`: the same overload with and without the gateway's admission control.

One vision server (its encoder cache off, so every request costs a ViT pass) and one
language server, both with their own overload bounds off (`--max-queued-tiles 0`,
`--max-waiting-requests 0`), are started once and shared; each arm gets a fresh gateway in front of
them. First a closed loop at `--calibration-concurrency` measures what the servers sustain
(req/s) and a typical end-to-end latency. Then each arm receives
the same open-loop Poisson traffic at `--load-factor` times that rate for `--duration-s`:

- `unlimited`: `--max-concurrent-requests 0`, every request accepted and queued;
- `admission`: `--max-concurrent-requests` and `--max-queued-requests` sized to the servers
  (by default the calibration concurrency, and as many again queued), beyond which the
  gateway answers 429 with Retry-After at once.

Reported per arm: goodput (completed requests per second whose end-to-end latency met the
SLO: `--slo-factor` times the calibrated median, unless `--slo-e2e-ms` is given), completed
requests, refusals (429), client timeouts, 5xx and other failures, TTFT and end-to-end
percentiles of the completed requests; then admission's figures as ratios to unlimited's.
Requests are not retried: a 429 counts as refused, which is what a client sees before its
backoff. The arms alternate over `--rounds` (A B, then B A, ...) so drift hits both; the
language server is idle again before each arm starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dvd.flags import add_flag

COMMAND = "bench-overload"
UNLIMITED = "unlimited"
ADMISSION = "admission"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "overload",
        help="goodput and latency at about twice the sustainable load, with and without "
        "admission control",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flag(parser, COMMAND, "--model", None, "checkpoint; default: a random one of --preset")
    add_flag(parser, COMMAND, "--preset", "small", "preset when no --model is given")
    add_flag(parser, COMMAND, "--calibration-concurrency", 8, "closed-loop concurrency")
    add_flag(parser, COMMAND, "--calibration-requests", 64, "requests of the calibration")
    add_flag(parser, COMMAND, "--load-factor", 2.0, "offered load / calibrated req/s")
    add_flag(parser, COMMAND, "--duration-s", 60.0, "seconds of offered load per arm")
    add_flag(parser, COMMAND, "--rounds", 1, "times each arm runs (alternating order)")
    add_flag(parser, COMMAND, "--timeout-s", 60.0, "client deadline of one request")
    add_flag(
        parser,
        COMMAND,
        "--max-concurrent-requests",
        0,
        "admission arm's limit; 0: the calibration concurrency",
    )
    add_flag(
        parser,
        COMMAND,
        "--max-queued-requests",
        -1,
        "admission arm's queue; -1: as many as --max-concurrent-requests",
    )
    add_flag(parser, COMMAND, "--slo-factor", 3.0, "e2e SLO = this x calibrated median e2e")
    add_flag(parser, COMMAND, "--slo-e2e-ms", 0.0, "fixed e2e SLO in ms (0: use --slo-factor)")
    add_flag(parser, COMMAND, "--image-size", "448x448", "image size (WIDTHxHEIGHT)")
    add_flag(parser, COMMAND, "--output-tokens", 16, "tokens generated per request")
    add_flag(parser, COMMAND, "--json", None, "write the report to this file")
    parser.set_defaults(func=run)


def wait_idle(metrics_url: str, timeout_s: float) -> None:
    """Waits until the language server has no Generate call left (cancelled work included)."""
    deadline = time.monotonic() + timeout_s
    from benchmarks.systems import scalar_metric

    while scalar_metric(metrics_url, "dvd_language_requests_in_flight") > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"language server still busy after {timeout_s:.0f} s")
        time.sleep(0.5)


@contextlib.contextmanager
def servers(model: Path, work: Path) -> Iterator[tuple[int, str]]:
    """A vision server and a language server; yields the language port and its metrics URL."""
    from benchmarks.systems import free_port, running

    vision_port, vision_metrics = free_port(), free_port()
    language_port, language_metrics = free_port(), free_port()
    vision = [sys.executable, "-m", "dvd", "vision", "--model", str(model)]
    vision += ["--port", str(vision_port), "--metrics-port", str(vision_metrics)]
    # Every request costs a ViT pass: with the encoder cache on, the arms would be served
    # from features the calibration left behind and the load would not be the one measured.
    vision += ["--encoder-cache-mib", "0"]
    # The servers' own bounds off: the arms differ only in the gateway's admission control
    # (with them on, the unlimited arm would get the language server's 429s instead).
    vision += ["--max-queued-tiles", "0"]
    language = [sys.executable, "-m", "dvd", "language", "--model", str(model)]
    language += ["--port", str(language_port), "--metrics-port", str(language_metrics)]
    language += ["--vision", f"127.0.0.1:{vision_port}", "--kv-cache-gib", "1"]
    language += ["--max-waiting-requests", "0"]
    metrics = f"http://127.0.0.1:{language_metrics}"
    with (
        running(
            "vision",
            vision,
            f"http://127.0.0.1:{vision_metrics}",
            work / "vision.log",
            ready_path="/metrics",
        ),
        running("language", language, metrics, work / "language.log", ready_path="/metrics"),
    ):
        yield language_port, metrics + "/metrics"


@contextlib.contextmanager
def gateway(language_port: int, limits: list[str], log: Path) -> Iterator[str]:
    from benchmarks.systems import free_port, running

    port = free_port()
    argv = [sys.executable, "-m", "dvd", "gateway", "--port", str(port)]
    argv += ["--language", f"127.0.0.1:{language_port}", *limits]
    url = f"http://127.0.0.1:{port}"
    with running("gateway", argv, url, log):
        yield url


def bench_config(args: argparse.Namespace, url: str, **traffic: Any) -> Any:
    from benchmarks.serve.config import BenchConfig, parse_image_sizes

    return BenchConfig(
        base_url=url,
        image_sizes=parse_image_sizes(args.image_size),
        image_variants=16,
        output_tokens=args.output_tokens,
        ignore_eos=True,
        timeout_s=args.timeout_s,
        **traffic,
    )


def calibrate(args: argparse.Namespace, url: str) -> dict[str, float]:
    from benchmarks.serve.runner import run_benchmark

    config = bench_config(
        args,
        url,
        concurrency=args.calibration_concurrency,
        num_requests=args.calibration_requests,
        warmup_requests=2,
    )
    summary = asyncio.run(run_benchmark(config)).summary
    if summary.errors:
        raise RuntimeError(f"calibration: {summary.errors} requests failed")
    return {
        "request_throughput": summary.request_throughput,
        "e2e_ms_p50": summary.e2e_ms.p50,
        "concurrency": args.calibration_concurrency,
    }


def outcome(record: Any) -> str:
    """What happened to one request, in the report's words."""
    if record.ok:
        return "completed"
    if record.status == 429:
        return "refused_429"
    if (record.error or "").startswith("timed out"):  # the client's deadline, mid-stream too
        return "client_timeout"
    if record.status >= 500:
        return "server_error_5xx"
    return "other_failure"


def run_arm(args: argparse.Namespace, url: str, rate: float, slo_ms: float) -> dict[str, Any]:
    from benchmarks.serve.runner import run_benchmark

    config = bench_config(
        args,
        url,
        request_rate=rate,
        num_requests=None,
        duration_s=args.duration_s,
        slo_ms={"e2e": slo_ms},
    )
    result = asyncio.run(run_benchmark(config))
    summary = result.summary
    outcomes = {
        name: 0
        for name in (
            "completed",
            "refused_429",
            "client_timeout",
            "server_error_5xx",
            "other_failure",
        )
    }
    for record in result.requests:
        outcomes[outcome(record)] += 1
    return {
        "sent": summary.sent,
        "outcomes": outcomes,
        "goodput": summary.goodput,
        "request_throughput": summary.request_throughput,
        "ttft_ms": summary.ttft_ms.to_json(),
        "e2e_ms": summary.e2e_ms.to_json(),
        "duration_s": summary.duration_s,
        "errors": sorted({r.error for r in result.requests if r.error and r.status != 429}),
    }


def arm_limits(args: argparse.Namespace, arm: str) -> list[str]:
    if arm == UNLIMITED:
        return ["--max-concurrent-requests", "0"]
    concurrent = args.max_concurrent_requests or args.calibration_concurrency
    queued = concurrent if args.max_queued_requests < 0 else args.max_queued_requests
    return ["--max-concurrent-requests", str(concurrent), "--max-queued-requests", str(queued)]


def arm_order(rounds: int) -> list[str]:
    order: list[str] = []
    for index in range(rounds):
        pair = [UNLIMITED, ADMISSION]
        order += pair if index % 2 == 0 else pair[::-1]
    return order


def run(args: argparse.Namespace) -> int:
    from benchmarks.systems import bench_checkpoint

    work = Path(tempfile.mkdtemp(prefix="dvd-bench-overload-"))
    model = bench_checkpoint(args.model, args.preset, work)
    report: dict[str, Any] = {
        "model": str(model),
        "image_size": args.image_size,
        "output_tokens": args.output_tokens,
        "duration_s": args.duration_s,
        "load_factor": args.load_factor,
        "timeout_s": args.timeout_s,
        "limits": {arm: arm_limits(args, arm) for arm in (UNLIMITED, ADMISSION)},
        "runs": [],
    }
    with servers(model, work) as (language_port, metrics):
        with gateway(language_port, arm_limits(args, UNLIMITED), work / "calibrate.log") as url:
            report["calibration"] = calibration = calibrate(args, url)
        rate = args.load_factor * calibration["request_throughput"]
        slo_ms = args.slo_e2e_ms or args.slo_factor * calibration["e2e_ms_p50"]
        report.update(offered_rate=rate, slo_e2e_ms=slo_ms)
        print(f"calibrated {calibration['request_throughput']:.2f} req/s; offering {rate:.2f}")
        for index, arm in enumerate(arm_order(args.rounds)):
            wait_idle(metrics, timeout_s=args.timeout_s + 60)
            log = work / f"gateway-{index}-{arm}.log"
            with gateway(language_port, arm_limits(args, arm), log) as url:
                row = run_arm(args, url, rate, slo_ms)
            report["runs"].append({"arm": arm, **row})
            print_row(arm, row)
    report["admission_vs_unlimited"] = ratios(report["runs"])
    print(
        "admission / unlimited: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in report["admission_vs_unlimited"].items())
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Admission's figures over unlimited's, each the median over that arm's rounds."""

    def median(arm: str, pick: Callable[[dict[str, Any]], float | None]) -> float:
        return float(statistics.median(pick(r) or 0.0 for r in runs if r["arm"] == arm))

    def ratio(pick: Callable[[dict[str, Any]], float | None]) -> float:
        unlimited = median(UNLIMITED, pick)
        return median(ADMISSION, pick) / unlimited if unlimited else float("inf")

    return {
        "goodput": ratio(lambda r: r["goodput"]),
        "ttft_p50": ratio(lambda r: r["ttft_ms"]["p50"]),
        "e2e_p99": ratio(lambda r: r["e2e_ms"]["p99"]),
    }


def print_row(arm: str, row: dict[str, Any]) -> None:
    counts = " ".join(f"{name} {count}" for name, count in row["outcomes"].items())
    ttft, e2e = row["ttft_ms"], row["e2e_ms"]
    print(
        f"{arm:<10} goodput {row['goodput'] or 0:.2f} req/s; {counts}; "
        f"TTFT p50/p99 {ttft['p50'] or 0:.0f}/{ttft['p99'] or 0:.0f} ms; "
        f"e2e p50/p99 {e2e['p50'] or 0:.0f}/{e2e['p99'] or 0:.0f} ms"
    )
