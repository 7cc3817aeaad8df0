"""`BenchConfig`: one frozen description of a load-generation run, built by the CLI or callers.

Traffic is either a fixed concurrency (a new request as soon as one finishes) or an arrival
rate (Poisson or evenly spaced, optionally capped in flight). A run stops after
`num_requests` requests or `duration_s` seconds, whichever comes first; requests in flight
then finish and are counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from benchmarks.serve.traffic import ARRIVALS

IMAGE_ORDERS = ("cycle", "random")
SLO_METRICS = ("ttft", "tpot", "e2e")
# Names other tools use for the same SLO (vLLM's `--goodput e2el:MS`).
SLO_ALIASES = {"e2el": "e2e"}
MAX_IMAGE_SIDE = 16384

ImageSize = tuple[int, int]
"""(width, height) in pixels."""


@dataclass(frozen=True)
class BenchConfig:
    """Where requests go, how fast they are sent, what they contain, and the SLOs."""

    base_url: str
    """Server root, e.g. http://127.0.0.1:8000 (no /v1)."""
    model: str | None = None
    """Model name sent in each request; None takes the first of GET /v1/models."""
    endpoint: str = "/v1/chat/completions"
    concurrency: int | None = None
    """Fixed concurrency: this many requests in flight, a new one as soon as one ends."""
    request_rate: float | None = None
    """Arrival rate in requests/s (inf: all at once); excludes `concurrency`."""
    arrival: str = "poisson"
    """With `request_rate`: "poisson" (exponential gaps) or "constant" (even gaps)."""
    max_concurrency: int | None = None
    """With `request_rate`: most requests in flight; later arrivals wait for a slot."""
    num_requests: int | None = 100
    """Stop sending after this many requests (None: only `duration_s` stops the run)."""
    duration_s: float | None = None
    """Stop sending after this many seconds (None: only `num_requests` stops the run)."""
    images_per_request: int = 1
    image_sizes: tuple[ImageSize, ...] = ((448, 448),)
    """Image buckets (width, height); each request's images are drawn from them."""
    image_order: str = "cycle"
    """"cycle" through `image_sizes` in order, or pick each "random"ly (seeded)."""
    image_variants: int = 1
    """Distinct images made per size (all encoded before the run); requests cycle through."""
    prompt_tokens: int = 64
    """Approximate prompt text length: this many random words (about a token each)."""
    output_tokens: int = 128
    """max_tokens of every request."""
    ignore_eos: bool = False
    """Send vLLM's `ignore_eos: true`, so every request generates `output_tokens` tokens."""
    extra_body: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """More fields for every request body, e.g. {"vir_mode": "router"} (dvd's ViR)."""
    temperature: float = 0.0
    timeout_s: float = 600.0
    """Deadline of one request, from sending it to the end of its stream."""
    slo_ms: Mapping[str, float] = field(default_factory=dict, hash=False)
    """SLO targets for goodput: ms per metric (ttft, tpot, e2e); stored read-only."""
    warmup_requests: int = 0
    """Requests sent one at a time before the measured run, and not counted."""
    seed: int = 0
    """Seeds prompts, images, Poisson gaps and random image choice."""
    arrival_seed: int | None = None
    """Seeds the Poisson gaps instead of `seed` (None: `seed`), so that a run repeated with
    new images can keep its arrival times."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "slo_ms", MappingProxyType(_normalize_slos(self.slo_ms)))
        object.__setattr__(self, "image_sizes", tuple(tuple(s) for s in self.image_sizes))
        self._check_target()
        self._check_traffic()
        self._check_workload()

    def _check_target(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url: must start with http:// or https://, got {self.base_url!r}"
            )
        if not self.endpoint.startswith("/"):
            raise ValueError(f"endpoint: must start with '/', got {self.endpoint!r}")
        if self.model is not None and not self.model.strip():
            raise ValueError("model: must not be empty (use None to ask GET /v1/models)")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: must be positive, got {self.timeout_s}")

    def _check_traffic(self) -> None:
        if (self.concurrency is None) == (self.request_rate is None):
            raise ValueError(
                "concurrency, request_rate: give exactly one (a fixed concurrency or an "
                "arrival rate)"
            )
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency: must be at least 1, got {self.concurrency}")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError(f"request_rate: must be positive, got {self.request_rate}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival: {self.arrival!r} is not one of {', '.join(ARRIVALS)}")
        if self.max_concurrency is not None:
            if self.request_rate is None:
                raise ValueError("max_concurrency: only applies with request_rate")
            if self.max_concurrency < 1:
                raise ValueError(f"max_concurrency: must be at least 1, got {self.max_concurrency}")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("num_requests, duration_s: give at least one")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests: must be at least 1, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s: must be positive, got {self.duration_s}")
        if (
            self.duration_s is None
            and self.request_rate is not None
            and math.isinf(self.request_rate)
            and self.num_requests is None
        ):
            raise ValueError("num_requests: needed with an infinite request_rate")
        if self.warmup_requests < 0:
            raise ValueError(f"warmup_requests: must be at least 0, got {self.warmup_requests}")

    def _check_workload(self) -> None:
        if self.images_per_request < 0:
            raise ValueError(
                f"images_per_request: must be at least 0, got {self.images_per_request}"
            )
        if self.images_per_request > 0 and not self.image_sizes:
            raise ValueError("image_sizes: at least one size is needed when sending images")
        for size in self.image_sizes:
            if len(size) != 2 or not all(1 <= side <= MAX_IMAGE_SIDE for side in size):
                raise ValueError(
                    f"image_sizes: {size!r} is not (width, height) within 1..{MAX_IMAGE_SIDE}"
                )
        if self.image_variants < 1:
            raise ValueError(f"image_variants: must be at least 1, got {self.image_variants}")
        if self.image_order not in IMAGE_ORDERS:
            raise ValueError(
                f"image_order: {self.image_order!r} is not one of {', '.join(IMAGE_ORDERS)}"
            )
        if self.prompt_tokens < 1:
            raise ValueError(f"prompt_tokens: must be at least 1, got {self.prompt_tokens}")
        if self.output_tokens < 1:
            raise ValueError(f"output_tokens: must be at least 1, got {self.output_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature: must be within 0..2, got {self.temperature}")

    @property
    def url(self) -> str:
        """The chat completions URL requests are posted to."""
        return self.base_url.rstrip("/") + self.endpoint

    @property
    def traffic(self) -> str:
        """The traffic in words, e.g. "concurrency 4" or "poisson 2 req/s, at most 8"."""
        if self.concurrency is not None:
            return f"concurrency {self.concurrency}"
        text = f"{self.arrival} {self.request_rate:g} req/s"
        if self.max_concurrency is not None:
            text += f", at most {self.max_concurrency} in flight"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "model": self.model,
            "endpoint": self.endpoint,
            "concurrency": self.concurrency,
            "request_rate": _json_float(self.request_rate),
            "arrival": self.arrival if self.request_rate is not None else None,
            "max_concurrency": self.max_concurrency,
            "num_requests": self.num_requests,
            "duration_s": self.duration_s,
            "images_per_request": self.images_per_request,
            "image_sizes": [format_image_size(s) for s in self.image_sizes],
            "image_order": self.image_order,
            "image_variants": self.image_variants,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "ignore_eos": self.ignore_eos,
            "extra_body": dict(self.extra_body),
            "temperature": self.temperature,
            "timeout_s": self.timeout_s,
            "slo_ms": dict(self.slo_ms),
            "warmup_requests": self.warmup_requests,
            "seed": self.seed,
            "arrival_seed": self.arrival_seed,
        }


def parse_image_sizes(text: str) -> tuple[ImageSize, ...]:
    """`"448x448, 1344x1008"` -> `((448, 448), (1344, 1008))` (WIDTHxHEIGHT)."""
    sizes = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        width, sep, height = part.lower().partition("x")
        if not sep or not width.isdigit() or not height.isdigit():
            raise ValueError(f"image_sizes: {part!r} is not WIDTHxHEIGHT (e.g. 448x448)")
        sizes.append((int(width), int(height)))
    if not sizes:
        raise ValueError(f"image_sizes: no size in {text!r}")
    return tuple(sizes)


def format_image_size(size: ImageSize) -> str:
    return f"{size[0]}x{size[1]}"


def parse_slos(items: Iterable[str]) -> dict[str, float]:
    """`["ttft:200", "tpot:50"]` (or one string "ttft:200 tpot:50") -> {"ttft": 200.0, ...}."""
    if isinstance(items, str):
        items = items.replace(",", " ").split()
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        try:
            milliseconds = float(value)
        except ValueError:
            milliseconds = math.nan
        if not sep or math.isnan(milliseconds):
            raise ValueError(f"slo_ms: {item!r} is not METRIC:MS (e.g. ttft:200)")
        slos[name.strip().lower()] = milliseconds
    return _normalize_slos(slos)


def _normalize_slos(slo_ms: Mapping[str, float]) -> dict[str, float]:
    normalized: dict[str, float] = {}
    for name, milliseconds in slo_ms.items():
        metric = SLO_ALIASES.get(name, name)
        if metric not in SLO_METRICS:
            raise ValueError(f"slo_ms: unknown metric {name!r} (use {', '.join(SLO_METRICS)})")
        if not float(milliseconds) > 0:
            raise ValueError(f"slo_ms: {name} target must be positive ms, got {milliseconds}")
        normalized[metric] = float(milliseconds)
    return dict(sorted(normalized.items()))


def _json_float(value: float | None) -> float | str | None:
    """JSON has no Infinity: an infinite rate is written as the string "inf"."""
    if value is not None and math.isinf(value):
        return "inf"
    return value
