"""What `dvd bench compare` runs: the traffic, how every system is sized, and the CPU split.

One frozen `CompareConfig`, built by the CLI. Every system gets the same `Sizing` (dtype,
context, batch, KV cache) and the same `Traffic`; `Pinning` splits this process's CPUs
between the vision and the language servers of the split systems and gives the coupled
ones (vLLM, dvd --coupled) all of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.serve.config import BenchConfig, ImageSize, format_image_size
from dvd.placement import format_cpus as cpu_list


@dataclass(frozen=True)
class Sizing:
    """The engine sizes every system gets (dvd's language server defaults to 64 sequences)."""

    dtype: str = "bfloat16"
    max_model_len: int = 4096
    max_num_seqs: int = 64
    kv_cache_gib: float = 1.0

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype: {self.dtype!r} is not bfloat16 or float32")
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len: must be positive, got {self.max_model_len}")
        if not self.kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib: must be positive, got {self.kv_cache_gib}")

    @property
    def kv_cache_bytes(self) -> int:
        return int(self.kv_cache_gib * 2**30)

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "kv_cache_gib": self.kv_cache_gib,
        }


@dataclass(frozen=True)
class Traffic:
    """The same requests for every system: fixed concurrency levels, one after another, then
    open-loop levels at fixed arrival rates.

    Level i sends `requests_at(c)` requests with seed `FIRST_SEED + i`, and every request
    carries its own image (`image_variants` = requests), so no system can answer from a
    prefix or encoder cache; warm-up requests use yet another seed.

    At a fixed concurrency (a closed loop) a request is sent only when one ends, so the
    load follows the server's speed and mean latency is concurrency / throughput. At an
    arrival rate (an open loop: `requests_per_rate` requests at Poisson times, seed
    `RATE_SEED + i`) requests come whether or not earlier ones are answered, as from many
    independent users: two systems then face the same offered load, and latency shows how
    each copes with it.
    """

    image_sizes: tuple[ImageSize, ...] = ((448, 448), (896, 896))
    images_per_request: int = 1
    prompt_tokens: int = 32
    output_tokens: int = 16
    concurrencies: tuple[int, ...] = (1, 4)
    min_requests: int = 8
    requests_per_client: int = 4
    """Each level sends at least this many requests per client (x its concurrency)."""
    warmup_requests: int = 2
    timeout_s: float = 300.0
    request_rates: tuple[float, ...] = ()
    """Open-loop levels (requests/s), measured after the concurrency levels."""
    requests_per_rate: int = 32

    FIRST_SEED = 1000
    WARMUP_SEED = 999
    RATE_SEED = 2000

    def __post_init__(self) -> None:
        if not self.concurrencies or any(c < 1 for c in self.concurrencies):
            raise ValueError(f"concurrencies: need positive levels, got {self.concurrencies}")
        if self.min_requests < 1 or self.requests_per_client < 1:
            raise ValueError("min_requests, requests_per_client: must be at least 1")
        if self.warmup_requests < 0:
            raise ValueError(f"warmup_requests: must be >= 0, got {self.warmup_requests}")
        if any(not 0 < rate < float("inf") for rate in self.request_rates):
            raise ValueError(
                f"request_rates: need positive, finite rates, got {self.request_rates}"
            )
        keys = [f"{rate:g}" for rate in self.request_rates]
        if len(set(keys)) != len(keys):
            raise ValueError(f"request_rates: each rate once, got {', '.join(keys)}")
        if self.requests_per_rate < 1:
            raise ValueError(f"requests_per_rate: must be at least 1, got {self.requests_per_rate}")

    @property
    def headline_concurrency(self) -> int:
        """The level whose figures head the report: the highest load."""
        return max(self.concurrencies)

    def requests_at(self, concurrency: int) -> int:
        return max(self.min_requests, self.requests_per_client * concurrency)

    def _config(
        self,
        base_url: str,
        concurrency: int | None,
        requests: int,
        seed: int,
        extra: dict[str, Any],
        rate: float | None = None,
        arrival_seed: int | None = None,
    ) -> BenchConfig:
        return BenchConfig(
            base_url=base_url,
            concurrency=concurrency,
            request_rate=rate,
            arrival="poisson",
            num_requests=requests,
            images_per_request=self.images_per_request,
            image_sizes=self.image_sizes,
            image_variants=requests,
            prompt_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens,
            ignore_eos=True,
            extra_body=extra,
            timeout_s=self.timeout_s,
            seed=seed,
            arrival_seed=arrival_seed,
        )

    def level(
        self, base_url: str, index: int, extra_body: dict[str, Any] | None = None, attempt: int = 0
    ) -> BenchConfig:
        """Level `index`; a repeated attempt gets new seeds, so new images (no cache hits)."""
        concurrency = self.concurrencies[index]
        requests = self.requests_at(concurrency)
        seed = self.FIRST_SEED + index + 100 * attempt
        return self._config(base_url, concurrency, requests, seed, dict(extra_body or {}))

    def rate_level(
        self, base_url: str, index: int, extra_body: dict[str, Any] | None = None, attempt: int = 0
    ) -> BenchConfig:
        """Open-loop level `index`: `requests_per_rate` requests at Poisson arrival times.
        A repeated attempt gets new images but the same arrival times, so every system
        faces the same offered load."""
        seed = self.RATE_SEED + index + 100 * attempt
        extra = dict(extra_body or {})
        rate = self.request_rates[index]
        arrivals = self.RATE_SEED + index
        return self._config(base_url, None, self.requests_per_rate, seed, extra, rate, arrivals)

    def warmup(self, base_url: str, extra_body: dict[str, Any] | None = None) -> BenchConfig:
        count = max(self.warmup_requests, 1)
        return self._config(base_url, 1, count, self.WARMUP_SEED, dict(extra_body or {}))

    def to_json(self) -> dict[str, Any]:
        return {
            "image_sizes": [format_image_size(s) for s in self.image_sizes],
            "image_order": "cycle",
            "images_per_request": self.images_per_request,
            "distinct_image_per_request": True,
            "prompt_words": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "concurrencies": list(self.concurrencies),
            "requests_per_level": {str(c): self.requests_at(c) for c in self.concurrencies},
            "warmup_requests": self.warmup_requests,
            "headline_concurrency": self.headline_concurrency,
            "request_rates": list(self.request_rates),
            "requests_per_rate": self.requests_per_rate,
            "arrival": "poisson",
        }


QUICK = Traffic()
FULL = Traffic(
    concurrencies=(1, 2, 4, 8), min_requests=16, requests_per_client=6, warmup_requests=3
)


@dataclass(frozen=True)
class Pinning:
    """CPU sets: the split systems' vision and language servers, and the coupled systems."""

    vision: str
    language: str
    coupled: str
    enabled: bool = True

    @classmethod
    def split(cls, cpus: list[int]) -> Pinning:
        """Half of `cpus` to vision (the first half), half to language; all to coupled."""
        ordered = sorted(cpus)
        if len(ordered) < 2:
            one = cpu_list(ordered)
            return cls(one, one, one)
        half = len(ordered) // 2
        return cls(cpu_list(ordered[:half]), cpu_list(ordered[half:]), cpu_list(ordered))

    @classmethod
    def of_this_process(cls, enabled: bool = True) -> Pinning:
        pinning = cls.split(sorted(os.sched_getaffinity(0)))
        return pinning if enabled else cls("", "", "", enabled=False)

    def to_json(self) -> dict[str, Any]:
        if not self.enabled:
            return {"enabled": False, "note": "no process was pinned (--no-pin)"}
        return {
            "enabled": True,
            "vllm": f"taskset -c {self.coupled} (API server and engine)",
            "coupled": f"dvd up --coupled --language-cpus {self.coupled}",
            "dvd": f"dvd up --vision-cpus {self.vision} --language-cpus {self.language}",
            "vision_cpus": self.vision,
            "language_cpus": self.language,
            "coupled_cpus": self.coupled,
            "unpinned": "the dvd gateway process and this load generator run on any CPU",
        }


@dataclass(frozen=True)
class CompareConfig:
    out: Path
    traffic: Traffic = field(default_factory=Traffic)
    sizing: Sizing = field(default_factory=Sizing)
    pinning: Pinning = field(default_factory=lambda: Pinning("", "", "", enabled=False))
    systems: tuple[str, ...] = ()
    """Names of the systems to run, in order (see `systems.SYSTEM_NAMES`)."""
    preset: str = "small"
    vir_preset: str = "small-flash"
    seed: int = 0
    ready_timeout_s: float = 600.0
    quick: bool = False
    quiet_wait_s: float = 60.0
    """Before each level, wait up to this long for other processes to leave the CPUs."""
    busy_cpus: float = 0.3
    """A level during which other processes used more CPUs than this on average is repeated."""
    retries: int = 2
    """How often a busy level is repeated at most; the quietest attempt is kept."""
