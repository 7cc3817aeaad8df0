"""Prometheus metrics of a language server, on a registry the server owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STAGES = ("queue", "preprocess", "encode", "transfer", "prompt", "prefill", "decode", "total")


class LanguageMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dvd_language_requests_total", "Generate requests", ["status"], registry=r
        )
        self.in_flight = Gauge(
            "dvd_language_requests_in_flight", "Generate calls in progress", registry=r
        )
        self.prompt_tokens = Counter(
            "dvd_language_prompt_tokens_total", "Prompt tokens", registry=r
        )
        self.image_tokens = Counter(
            "dvd_language_image_tokens_total", "Prompt tokens that carry image features", registry=r
        )
        self.completion_tokens = Counter(
            "dvd_language_completion_tokens_total", "Generated tokens", registry=r
        )
        self.stage = Histogram(
            "dvd_language_stage_seconds",
            "Per-request time in each stage",
            ["stage"],
            buckets=_SECONDS,
            registry=r,
        )
