"""Prometheus metrics of a vision server, on a registry the server owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class VisionMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dvd_vision_requests_total", "Encode requests", ["status"], registry=r
        )
        self.images = Counter("dvd_vision_images_total", "Images encoded", registry=r)
        self.tiles = Counter("dvd_vision_tiles_total", "Tiles encoded", registry=r)
        self.feature_bytes = Counter(
            "dvd_vision_feature_bytes_total", "Feature bytes sent", registry=r
        )
        self.in_flight = Gauge(
            "dvd_vision_requests_in_flight", "Encode requests in progress", registry=r
        )
        self.sessions = Gauge(
            "dvd_vision_sessions",
            "EncodeSession streams open (one per language server)",
            registry=r,
        )
        self.session_batch = Histogram(
            "dvd_vision_session_batch_responses",
            "Responses packed into one EncodeSession message",
            buckets=(1, 2, 3, 4, 6, 8, 16, 32, 64),
            registry=r,
        )
        self.stage = Histogram(
            "dvd_vision_stage_seconds",
            "Per-request time in each stage",
            ["stage"],
            buckets=_SECONDS,
            registry=r,
        )
        self.tiles_routed = Counter(
            "dvd_vision_tiles_routed_total",
            "Tiles sent at each resolution (1/4: 256 tokens, 1/16: 64 tokens per 448-px tile)",
            ["resolution"],
            registry=r,
        )
        self.visual_tokens = Counter(
            "dvd_vision_visual_tokens_total", "Feature rows (LLM tokens) sent", registry=r
        )
        self.visual_tokens_saved = Counter(
            "dvd_vision_visual_tokens_saved_total",
            "Feature rows not sent because ViR compressed tiles to 1/16",
            registry=r,
        )
        self.cache = Counter(
            "dvd_vision_encoder_cache_total",
            "Images looked up in the encoder cache",
            ["result"],
            registry=r,
        )
        self.cache_bytes = Gauge(
            "dvd_vision_encoder_cache_bytes",
            "Bytes of features held by the encoder cache",
            registry=r,
        )
        self.queued_tiles = Gauge(
            "dvd_vision_queued_tiles",
            "Tiles admitted and not yet in a ViT batch, queued or being tiled (bounded by "
            "--max-queued-tiles)",
            registry=r,
        )
        self.queue_full = Counter(
            "dvd_vision_queue_full_total",
            "Encode calls refused with RESOURCE_EXHAUSTED: their tiles would have taken the "
            "queue past --max-queued-tiles",
            registry=r,
        )
        self.expired = Counter(
            "dvd_vision_expired_total",
            "Encode calls stopped because their deadline passed",
            registry=r,
        )
        self.tiles_dropped = Counter(
            "dvd_vision_tiles_dropped_total",
            "Queued tiles dropped unencoded because their call ended first (deadline passed, "
            "caller left, call failed)",
            registry=r,
        )
        self.batch_tiles = Histogram(
            "dvd_vision_batch_tiles",
            "Tiles per ViT batch",
            buckets=(1, 2, 4, 8, 13, 16, 26, 32, 64, 128),
            registry=r,
        )
