"""`RequestRecord`: what was measured for one request, filled in by the client as it streams.

Times are seconds from `time.perf_counter()`: `scheduled_s` and `start_s` count from the
start of the run, the chunk times and `e2e_s` from the request's own `start_s`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from benchmarks.serve import stats


@dataclass
class RequestRecord:
    index: int
    """Position in the run (0 = first sent)."""
    images: tuple[str, ...] = ()
    """Sizes of the request's images, "WIDTHxHEIGHT"."""
    scheduled_s: float = 0.0
    """When the traffic schedule wanted it sent; `start_s - scheduled_s` is client queueing."""
    start_s: float = 0.0
    """When it was sent."""
    status: int = 0
    """HTTP status; 0 when no response arrived."""
    error: str | None = None
    """Why it failed (HTTP error, error event mid-stream, timeout, connection); None if ok."""
    chunk_times_s: list[float] = field(default_factory=list)
    """Arrival of each chunk with non-empty content (a chunk may carry several tokens)."""
    e2e_s: float | None = None
    """Until the stream ended (data: [DONE]), or until it failed."""
    prompt_tokens: int | None = None
    """From the final usage chunk (images included); None if the server sent no usage."""
    completion_tokens: int | None = None
    """From the final usage chunk; None if the server sent no usage."""
    finish_reason: str | None = None
    server_timings: dict[str, int] | None = None
    """dvd's per-stage timings from the usage chunk (`dvd_timings`); None elsewhere."""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        """Time to the first content chunk."""
        return self.chunk_times_s[0] if self.chunk_times_s else None

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive content chunks."""
        return stats.gaps(self.chunk_times_s)

    @property
    def output_tokens(self) -> int:
        """completion_tokens, or the number of content chunks when no usage came."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        return len(self.chunk_times_s)

    @property
    def tpot_s(self) -> float | None:
        return stats.tpot(self.e2e_s, self.ttft_s, self.output_tokens)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "ok": self.ok,
            "status": self.status,
            "error": self.error,
            "images": list(self.images),
            "scheduled_s": self.scheduled_s,
            "start_s": self.start_s,
            "ttft_ms": _ms(self.ttft_s),
            "tpot_ms": _ms(self.tpot_s),
            "e2e_ms": _ms(self.e2e_s),
            "itl_ms": [t * 1000.0 for t in self.itl_s],
            "chunk_times_ms": [t * 1000.0 for t in self.chunk_times_s],
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "server_timings": self.server_timings,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0
