"""`run_benchmark(config) -> BenchmarkResult`: the function API of `dvd bench serve`.

Order of a run: build the workload (images encoded once per size), open one HTTP client
for the run, ask GET /v1/models for the model when none is given, send the warm-up
requests one at a time (a failed one aborts the run: the endpoint is misconfigured), then
start the clock and dispatch the measured requests as the traffic schedule says.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpx

from benchmarks.serve import client
from benchmarks.serve.config import BenchConfig
from benchmarks.serve.overlap import Overlap, measure
from benchmarks.serve.record import RequestRecord
from benchmarks.serve.stats import Summary, summarize
from benchmarks.serve.traffic import Schedule, dispatch
from benchmarks.serve.workload import Workload, describe_sizes


@dataclass(frozen=True)
class BenchmarkResult:
    config: BenchConfig
    model: str
    """The model name the requests carried (config.model or the server's first)."""
    summary: Summary
    requests: list[RequestRecord]
    """One record per request sent, in send order; failed ones included."""
    started_at: str
    """When the measured run began (UTC, ISO 8601)."""

    @property
    def overlap(self) -> Overlap | None:
        """Encode time hidden behind decoding (dvd servers only)."""
        return measure(r.server_timings for r in self.requests if r.ok and r.server_timings)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": {**self.config.to_json(), "model": self.model},
            "summary": self.summary.to_json(),
            "requests": [record.to_json() for record in self.requests],
            "overlap": None if self.overlap is None else self.overlap.to_json(),
            "started_at": self.started_at,
            "machine": machine(),
        }


async def run_benchmark(
    config: BenchConfig,
    *,
    progress: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    workload: Workload | None = None,
) -> BenchmarkResult:
    """Runs the benchmark `config` describes against its endpoint.

    `progress` shows a progress bar on stderr; `transport` replaces the network (tests);
    `workload` is `Workload(config)` made beforehand (it encodes every image, which can take
    seconds that a caller measuring the servers' CPU use keeps out of its window).
    Raises ValueError when the endpoint cannot be used at all (no model listed, a warm-up
    request failed); failures of measured requests are recorded, not raised.
    """
    workload = workload or Workload(config)
    schedule = Schedule.of(config)
    timeout = httpx.Timeout(config.timeout_s, connect=min(config.timeout_s, 30.0))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport) as http:
        model = config.model or await client.first_model(http, config.base_url)

        async def send(
            index: int, due_s: float, origin: float, warmup: bool = False
        ) -> RequestRecord:
            spec = workload.request(index, warmup=warmup)
            payload = client.chat_payload(
                model,
                workload.messages(spec),
                max_tokens=config.output_tokens,
                temperature=config.temperature,
                ignore_eos=config.ignore_eos,
                extra=config.extra_body,
            )
            record = RequestRecord(index, describe_sizes(spec.image_sizes), scheduled_s=due_s)
            return await client.stream_chat(
                http, config.url, payload, record, timeout_s=config.timeout_s, origin=origin
            )

        for index in range(config.warmup_requests):
            warmup = await send(index, 0.0, time.perf_counter(), warmup=True)
            if not warmup.ok:
                raise ValueError(f"warmup_requests: warm-up request {index} failed: {warmup.error}")

        bar = _progress_bar(config, enabled=progress)
        failed: list[RequestRecord] = []
        origin = time.perf_counter()
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")

        async def measured(index: int, due_s: float) -> RequestRecord:
            record = await send(index, due_s, origin)
            if not record.ok:
                failed.append(record)
                bar.set_postfix_str(f"errors {len(failed)}", refresh=False)
            bar.update(1)
            return record

        try:
            records = await dispatch(
                schedule,
                measured,
                max_requests=config.num_requests,
                duration_s=config.duration_s,
                origin=origin,
            )
        finally:
            bar.close()
        duration_s = time.perf_counter() - origin
    summary = summarize(records, duration_s, config.slo_ms)
    return BenchmarkResult(config, model, summary, records, started_at)


def _progress_bar(config: BenchConfig, *, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=config.num_requests,
        desc="requests",
        unit="req",
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
    )


def machine() -> dict[str, Any]:
    """Names the machine the load generator ran on (outputs say where they were measured)."""
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
