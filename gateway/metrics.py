"""Prometheus metrics of chat completions, on a registry owned by the app (no module globals).

Each request carries a `RequestRecord` that serving fills in (tokens, timings, the backend);
when the request ends, `GatewayMetrics.finish` observes it once.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dvd.v1 import language_pb2
from gateway.deadline import RequestDeadline

REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60)
TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.5, 1)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

STAGES = ("queue", "preprocess", "encode", "transfer", "prompt", "prefill", "decode")
"""Stages reported by the language server's StageTimings (`<stage>_ns`)."""


@dataclass
class RequestRecord:
    """What one request did; logged and observed when it ends."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    status: int | None = None
    """Set by serving when a streamed response ends in an error after its 200 went out."""
    model: str = ""
    backend: str = ""
    stream: bool = False
    key_id: str = ""
    """The API key's id (gateway.auth.key_id), "invalid" or "none"; empty when keys are off."""
    prompt_tokens: int = 0
    image_tokens: int = 0
    video_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    timings: language_pb2.StageTimings | None = None
    deadline: RequestDeadline | None = None
    """The Generate call's deadline, once serving has worked it out."""

    def tokens_arrived(self, count: int) -> None:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.completion_tokens += count

    def finished(self, response: language_pb2.GenerateResponse) -> None:
        """Takes usage and timings from the last message of a Generate stream."""
        usage = response.usage
        self.prompt_tokens = usage.prompt_tokens
        self.image_tokens = usage.image_tokens
        self.video_tokens = usage.video_tokens
        self.completion_tokens = usage.completion_tokens or self.completion_tokens
        self.timings = response.timings

    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    def tpot_s(self) -> float | None:
        if self.first_token_at is None or self.last_token_at is None:
            return None
        if self.completion_tokens < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (self.completion_tokens - 1)

    def stage_seconds(self) -> dict[str, float]:
        """Stages that took time, in seconds (text-only requests have no vision stages)."""
        if self.timings is None:
            return {}
        found = {stage: getattr(self.timings, f"{stage}_ns") / 1e9 for stage in STAGES}
        return {stage: seconds for stage, seconds in found.items() if seconds > 0}


class GatewayMetrics:
    """The gateway's metrics, registered on their own CollectorRegistry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dvd_gateway_requests_total",
            "Chat completion requests by HTTP status (499: client went away).",
            ["status"],
            registry=r,
        )
        self.key_requests = Counter(
            "dvd_gateway_key_requests_total",
            "Chat completion requests by API key id (a hash prefix; invalid, none) and status.",
            ["key_id", "status"],
            registry=r,
        )
        self.admission_wait = Histogram(
            "dvd_gateway_admission_wait_seconds",
            "Time a chat completion waited for a place (--max-concurrent-requests).",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.admission_rejected = Counter(
            "dvd_gateway_admission_rejected_total",
            "Chat completions refused with 429: every place taken and the queue full.",
            registry=r,
        )
        self.in_flight = Gauge(
            "dvd_gateway_requests_in_flight", "Chat completion requests being served.", registry=r
        )
        self.request_seconds = Histogram(
            "dvd_gateway_request_seconds",
            "Time from request arrival to the last byte of the response.",
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "dvd_gateway_ttft_seconds",
            "Time from request arrival to the first generated token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "dvd_gateway_tpot_seconds",
            "Mean time per output token after the first, one observation per request.",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "dvd_gateway_stage_seconds",
            "Per-stage time reported by the language server (StageTimings).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "dvd_gateway_prompt_tokens_total", "Prompt tokens, image tokens included.", registry=r
        )
        self.image_tokens = Counter(
            "dvd_gateway_image_tokens_total", "Prompt tokens that are image features.", registry=r
        )
        self.completion_tokens = Counter(
            "dvd_gateway_completion_tokens_total", "Generated tokens.", registry=r
        )
        self.video_tokens = Counter(
            "dvd_gateway_video_tokens_total",
            "Of the image tokens, those of video frames.",
            registry=r,
        )
        self.videos = Counter(
            "dvd_gateway_videos_total",
            "Videos decoded, by outcome: ok, or refused (not a usable video, or over a limit).",
            ["outcome"],
            registry=r,
        )
        self.video_frames = Counter(
            "dvd_gateway_video_frames_total",
            "Frames sampled from videos and sent to language servers.",
            registry=r,
        )
        self.video_decode_seconds = Histogram(
            "dvd_gateway_video_decode_seconds",
            "Time to decode one video and sample its frames (PNG encoding included).",
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.member_calls = Counter(
            "dvd_gateway_member_calls_total",
            "Generate calls sent to each language server (retries count on each member tried).",
            ["member"],
            registry=r,
        )
        self.member_outstanding = Gauge(
            "dvd_gateway_member_outstanding",
            "Generate calls in progress on each language server: the load routing compares.",
            ["member"],
            registry=r,
        )
        self.member_refusals = Counter(
            "dvd_gateway_member_refusals_total",
            "Generate calls a language server refused with RESOURCE_EXHAUSTED (busy): the "
            "call went to another member, or the client got 429.",
            ["member"],
            registry=r,
        )
        self.timeouts = Counter(
            "dvd_gateway_timeouts_total",
            "Chat completions stopped by their deadline (504, or an SSE error event), by the "
            "limit that set it: server (--request-timeout-s) or client (its timeout header).",
            ["limit"],
            registry=r,
        )
        self.healthy_members = Gauge(
            "dvd_gateway_healthy_members",
            "Pool members whose last Health answer was SERVING, per tier.",
            ["tier"],
            registry=r,
        )
        self.scrape_up = Gauge(
            "dvd_gateway_scrape_up",
            "1 when the last /metrics scrape of a --scrape-metrics URL answered, else 0.",
            ["source"],
            registry=r,
        )

    def finish(self, record: RequestRecord, status: int, seconds: float) -> None:
        """Observes one finished chat completion request."""
        self.requests.labels(status=str(status)).inc()
        self.request_seconds.observe(seconds)
        if status == 504 and record.deadline is not None:  # 504: a deadline passed
            self.timeouts.labels(limit=record.deadline.source).inc()
        if record.key_id:
            self.key_requests.labels(key_id=record.key_id, status=str(status)).inc()
        ttft, tpot = record.ttft_s(), record.tpot_s()
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        for stage, stage_s in record.stage_seconds().items():
            self.stage_seconds.labels(stage=stage).observe(stage_s)
        self.prompt_tokens.inc(record.prompt_tokens)
        self.image_tokens.inc(record.image_tokens)
        self.completion_tokens.inc(record.completion_tokens)
        self.video_tokens.inc(record.video_tokens)

    def member_left(self, address: str) -> None:
        """Drops a departed member's series, so dashboards do not show it forever."""
        for metric in (self.member_calls, self.member_outstanding, self.member_refusals):
            with contextlib.suppress(KeyError):  # it never got a call
                metric.remove(address)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
