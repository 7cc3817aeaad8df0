"""Prometheus metrics of a language server, on a registry the server owns."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OUTCOMES = ("ok", "retried", "busy", "error")
"""Encode call outcomes per vision member: retried means it failed UNAVAILABLE and the
request was tried again; busy means it refused the request (RESOURCE_EXHAUSTED, its queue
was full) and the request went to another member or was refused."""
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
        self.waiting = Gauge(
            "dvd_language_requests_waiting",
            "Generate calls that have no token yet: encoding, in the LLM's queue or in "
            "prefill (bounded by --max-waiting-requests)",
            registry=r,
        )
        self.refused = Counter(
            "dvd_language_refused_total",
            "Generate calls refused with RESOURCE_EXHAUSTED, by reason: waiting "
            "(--max-waiting-requests reached), vision (every vision server's queue was full)",
            ["reason"],
            registry=r,
        )
        self.expired = Counter(
            "dvd_language_expired_total",
            "Generate calls stopped because their deadline passed (the LLM request aborted), "
            "by stage: waiting (before the first token) or decoding",
            ["stage"],
            registry=r,
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
        # The vision pool, per member (one vision server process, label "member": its
        # address). A member's series are removed when it leaves the pool.
        self.vision_calls = Counter(
            "dvd_language_vision_member_calls_total",
            "Encode calls sent to each vision server",
            ["member", "outcome"],
            registry=r,
        )
        self.vision_tiles = Counter(
            "dvd_language_vision_member_tiles_total",
            "Tiles each vision server encoded (or served from its cache) for this server",
            ["member"],
            registry=r,
        )
        self.vision_cache_hits = Counter(
            "dvd_language_vision_member_cache_hits_total",
            "Images each vision server served from its encoder cache",
            ["member"],
            registry=r,
        )
        self.vision_images = Counter(
            "dvd_language_vision_member_images_total",
            "Images sent to each vision server",
            ["member"],
            registry=r,
        )
        self.vision_in_flight = Gauge(
            "dvd_language_vision_member_in_flight",
            "Images in flight on each vision server",
            ["member"],
            registry=r,
        )
        self.healthy_vision_members = Gauge(
            "dvd_language_healthy_vision_members",
            "Vision servers that answered the last health check SERVING",
            registry=r,
        )
        self.vision_members = Gauge(
            "dvd_language_vision_members",
            "Vision servers in the pool, by state (active: gets calls; draining: gone from "
            "DNS, finishing its calls)",
            ["state"],
            registry=r,
        )

    def forget_vision_member(self, member: str) -> None:
        """Drops a departed member's series (pods come and go; their labels should not)."""
        for family in (self.vision_tiles, self.vision_cache_hits, self.vision_images):
            _remove(family, member)
        _remove(self.vision_in_flight, member)
        for outcome in OUTCOMES:
            _remove(self.vision_calls, member, outcome)


def _remove(family: Counter | Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # that label set was never used
        family.remove(*labels)
