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
    """One concurrency level against one system: the load generator's result and the
    server's per-stage times over exactly those requests."""

    concurrency: int
    result: BenchmarkResult
    stages: Stages = field(default_factory=dict)
    cpu: CpuUse | None = None
    """Where the machine's CPUs went meanwhile, per process role (see `interference`)."""

    @property
    def other_cpus(self) -> float | None:
        """Average CPUs other processes on the machine used meanwhile."""
        return None if self.cpu is None else self.cpu.other


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
    greedy: dict[str, str] = field(default_factory=dict)
    """Greedy answers to fixed prompts ("text", "image"), for comparing systems' outputs."""
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    """Why it could not be measured (fully or partly); None when every level ran."""
    started_s: float | None = None
    """Seconds from launch until it answered ready."""

    def level(self, concurrency: int) -> LevelRun | None:
        return next((lv for lv in self.levels if lv.concurrency == concurrency), None)
