"""The printed table and the JSON file of a run.

JSON layout: `{"config": {...}, "summary": {...}, "requests": [...], "started_at", "machine"}`;
`summary` holds request_throughput, output_throughput, total_token_throughput, ttft_ms,
tpot_ms, itl_ms and e2e_ms (each {"mean", "p50", "p90", "p99"}, null without values),
goodput (null without SLO targets), sent, completed, errors, duration_s, prompt_tokens and
output_tokens; each request record is `RequestRecord.to_json()`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.serve.runner import BenchmarkResult
    from benchmarks.serve.stats import Distribution

ERRORS_SHOWN = 5


def format_table(result: BenchmarkResult) -> str:
    config, summary = result.config, result.summary
    images = (
        f"{config.images_per_request} image(s) per request from "
        + ", ".join(f"{w}x{h}" for w, h in config.image_sizes)
        if config.images_per_request
        else "no images"
    )
    stop = [f"{config.num_requests} requests"] if config.num_requests is not None else []
    stop += [f"{config.duration_s:g} s"] if config.duration_s is not None else []
    eos = ", ignore_eos" if config.ignore_eos else ""
    lines = [
        " dvd bench serve ".center(64, "="),
        f"{'endpoint':<24}{config.url}",
        f"{'model':<24}{result.model}",
        f"{'traffic':<24}{config.traffic}; stop after {' or '.join(stop)}",
        f"{'workload':<24}{images}; ~{config.prompt_tokens} prompt words; "
        f"max {config.output_tokens} output tokens{eos}",
        f"{'requests':<24}{summary.completed} completed, {summary.errors} errors, "
        f"{summary.sent} sent in {summary.duration_s:.2f} s",
        "",
        f"{'':<24}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name, dist in (
        ("TTFT (ms)", summary.ttft_ms),
        ("TPOT (ms)", summary.tpot_ms),
        ("ITL (ms)", summary.itl_ms),
        ("E2E (ms)", summary.e2e_ms),
    ):
        lines.append(f"{name:<24}{_row(dist)}")
    lines += [
        "",
        f"{'request throughput':<24}{summary.request_throughput:10.2f} req/s",
        f"{'output throughput':<24}{summary.output_throughput:10.2f} tok/s",
        f"{'total token throughput':<24}{summary.total_token_throughput:10.2f} tok/s",
        f"{'tokens':<24}{summary.prompt_tokens} prompt, {summary.output_tokens} output",
    ]
    if summary.goodput is not None:
        targets = ", ".join(f"{metric} <= {ms:g} ms" for metric, ms in config.slo_ms.items())
        lines.append(f"{'goodput':<24}{summary.goodput:10.2f} req/s ({targets})")
    overlap = result.overlap
    if overlap is not None and overlap.encode_hidden_fraction is not None:
        lines.append(
            f"{'encode hidden':<24}{overlap.encode_hidden_fraction:10.0%} of "
            f"{overlap.encode_busy_s:.2f} s of vision encoding ran while the LLM decoded"
        )
    lines.append(f"{'errors':<24}{summary.errors:10d}")
    messages = Counter(r.error for r in result.requests if r.error is not None)
    for message, count in messages.most_common(ERRORS_SHOWN):
        lines.append(f"  {count:>5} x {message}")
    if len(messages) > ERRORS_SHOWN:
        lines.append(f"  ... and {len(messages) - ERRORS_SHOWN} other error messages")
    lines.append("=" * 64)
    return "\n".join(lines)


def _row(dist: Distribution) -> str:
    values = (dist.mean, dist.p50, dist.p90, dist.p99)
    return "".join(f"{'-':>10}" if v is None else f"{v:10.2f}" for v in values)


def write_json(result: BenchmarkResult, path: str | Path) -> Path:
    """Writes the result as JSON (parent folders created); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return target
