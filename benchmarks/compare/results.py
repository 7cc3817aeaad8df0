"""What was measured for each system: one `LevelRun` per concurrency level, in a `SystemRun`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from benchmarks.compare.stages import Stages

if TYPE_CHECKING:
    from benchmarks.compare.interference import CpuUse
    from benchmarks.serve.runner import BenchmarkResult


@dataclass(frozen=True)
class LevelRun:
    """One level against one system: the load generator's result and the server's
    per-stage times over exactly those requests."""

    concurrency: int
    """Requests kept in flight (a closed loop); 0 for an open-loop level (see `rate`)."""
    result: BenchmarkResult
    stages: Stages = field(default_factory=dict)
    cpu: CpuUse | None = None
    """Where the machine's CPUs went meanwhile, per process role (see `interference`)."""
    rate: float | None = None
    """Open-loop levels only: requests arrived at this rate (requests/s, Poisson)."""

    @property
    def name(self) -> str:
        return level_name(self.concurrency, self.rate)

    @property
    def other_cpus(self) -> float | None:
        """Average CPUs other processes on the machine used meanwhile."""
        return None if self.cpu is None else self.cpu.other


def level_name(concurrency: int, rate: float | None) -> str:
    """How reports name a level: "c=4", or "0.8 req/s" for an open-loop one."""
    return f"c={concurrency}" if rate is None else f"{rate:g} req/s"


def level_keys(traffic: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(level name, where a system's report keeps it, its key there) for every level of a
    report's traffic: the concurrency levels ("c=8", "by_concurrency", "8"), then the
    open-loop ones ("0.8 req/s", "by_rate", "0.8")."""
    keys = [
        (level_name(c, None), "by_concurrency", str(c)) for c in traffic.get("concurrencies", [])
    ]
    rates = traffic.get("request_rates", [])
    return keys + [(level_name(0, r), "by_rate", f"{r:g}") for r in rates]


@dataclass
class SystemRun:
    name: str
    """Short name, the key in the report: vllm, coupled, dvd-grpc, dvd-shm, dvd-vir."""
    label: str
    """One line saying what it is."""
    stage_source: str
    """Whose stage metrics it has: "dvd" (gateway) or "vllm" (vLLM's server)."""
    model: str = ""
    """The checkpoint folder it served."""
    command: list[str] = field(default_factory=list)
    extra_body: dict[str, Any] = field(default_factory=dict)
    levels: list[LevelRun] = field(default_factory=list)
    """Fixed-concurrency levels."""
    rate_levels: list[LevelRun] = field(default_factory=list)
    """Open-loop levels, one per arrival rate."""
    greedy: dict[str, str] = field(default_factory=dict)
    """Greedy answers to fixed prompts ("text", "image"), for comparing systems' outputs."""
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    """Why it could not be measured (fully or partly); None when every level ran."""
    started_s: float | None = None
    """Seconds from launch until it answered ready."""

    def level(self, concurrency: int) -> LevelRun | None:
        return next((lv for lv in self.levels if lv.concurrency == concurrency), None)

    def rate_level(self, rate: float) -> LevelRun | None:
        return next((lv for lv in self.rate_levels if lv.rate == rate), None)
