"""The figures of a run, computed from its request records: pure functions, no I/O.

Definitions (the same as vLLM's `vllm bench serve`):

- TTFT: from sending a request to its first content chunk.
- ITL: the gaps between consecutive content chunks, pooled over all successful requests.
- TPOT of a request: (e2e - ttft) / (output tokens - 1), for requests with more than one
  output token.
- Throughputs divide by the run's duration (first request sent to last one finished);
  token counts come from successful requests' usage.
- Goodput: successful requests per second that meet every SLO target. A request with at
  most one output token has no TPOT and meets a TPOT target; one with no content chunk has
  no TTFT and misses a TTFT target.
- Percentiles interpolate linearly between the closest ranks (numpy's default).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.serve.record import RequestRecord

PERCENTILES = (50.0, 90.0, 99.0)


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) of `values`, interpolating linearly between ranks."""
    if not values:
        raise ValueError("percentile: no values")
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile: p must be within 0..100, got {p}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean: no values")
    return math.fsum(values) / len(values)


def gaps(times: Sequence[float]) -> list[float]:
    """Differences between consecutive times: [t1 - t0, t2 - t1, ...]."""
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def tpot(e2e_s: float | None, ttft_s: float | None, output_tokens: int) -> float | None:
    """Time per output token after the first; None without e2e, TTFT or a second token."""
    if e2e_s is None or ttft_s is None or output_tokens <= 1:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


def meets_slos(record: RequestRecord, slo_ms: Mapping[str, float]) -> bool:
    """Whether a request succeeded within every target (ms) in `slo_ms` (ttft, tpot, e2e)."""
    if not record.ok:
        return False
    measured = {"ttft": record.ttft_s, "tpot": record.tpot_s, "e2e": record.e2e_s}
    for metric, target_ms in slo_ms.items():
        value = measured[metric]
        if value is None:
            if metric == "tpot":
                continue  # at most one output token: nothing to be late
            return False
        if value * 1000.0 > target_ms:
            return False
    return True


@dataclass(frozen=True)
class Distribution:
    """Mean and percentiles of one metric, in ms; None for all when there were no values."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0, None, None, None, None)
        p50, p90, p99 = (percentile(values, p) for p in PERCENTILES)
        return cls(len(values), mean(values), p50, p90, p99)

    def to_json(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "p50": self.p50, "p90": self.p90, "p99": self.p99}


@dataclass(frozen=True)
class Summary:
    sent: int
    """Requests sent."""
    completed: int
    errors: int
    duration_s: float
    request_throughput: float
    """Successful requests per second."""
    output_throughput: float
    """Output tokens of successful requests per second."""
    total_token_throughput: float
    """Prompt plus output tokens of successful requests per second."""
    prompt_tokens: int
    output_tokens: int
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2e_ms: Distribution
    goodput: float | None
    """Requests per second meeting every SLO target; None when no target was given."""

    def to_json(self) -> dict[str, Any]:
        return {
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "ttft_ms": self.ttft_ms.to_json(),
            "tpot_ms": self.tpot_ms.to_json(),
            "itl_ms": self.itl_ms.to_json(),
            "e2e_ms": self.e2e_ms.to_json(),
            "goodput": self.goodput,
            "sent": self.sent,
            "completed": self.completed,
            "errors": self.errors,
            "duration_s": self.duration_s,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
        }


def summarize(
    records: Sequence[RequestRecord], duration_s: float, slo_ms: Mapping[str, float]
) -> Summary:
    """The run's figures; errors are counted, and only successful requests enter the rest."""
    done = [r for r in records if r.ok]
    prompt_tokens = sum(r.prompt_tokens or 0 for r in done)
    output_tokens = sum(r.output_tokens for r in done)

    def per_second(amount: float) -> float:
        return amount / duration_s if duration_s > 0 else 0.0

    def ms(values: list[float | None]) -> Distribution:
        return Distribution.of([v * 1000.0 for v in values if v is not None])

    good = sum(meets_slos(r, slo_ms) for r in done) if slo_ms else None
    return Summary(
        sent=len(records),
        completed=len(done),
        errors=len(records) - len(done),
        duration_s=duration_s,
        request_throughput=per_second(len(done)),
        output_throughput=per_second(output_tokens),
        total_token_throughput=per_second(prompt_tokens + output_tokens),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        ttft_ms=ms([r.ttft_s for r in done]),
        tpot_ms=ms([r.tpot_s for r in done]),
        itl_ms=ms([gap for r in done for gap in r.itl_s]),
        e2e_ms=ms([r.e2e_s for r in done]),
        goodput=None if good is None else per_second(good),
    )
