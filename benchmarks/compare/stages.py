"""Per-stage times of a run, read from a server's Prometheus `/metrics` before and after it.

dvd's gateway exports `dvd_gateway_stage_seconds_{sum,count}{stage=...}` for queue,
preprocess, encode, transfer, prompt, prefill and decode (the language server's
StageTimings; a stage that took no time is not observed). vLLM's server exports its own
request histograms; three of them map onto dvd's stages, with other meanings:

| dvd stage | vLLM histogram | what vLLM counts |
| --- | --- | --- |
| queue | vllm:request_queue_time_seconds | waiting for the scheduler (dvd: in the ViT batcher) |
| prefill | vllm:request_prefill_time_seconds | scheduled until first token, the ViT included |
| decode | vllm:request_decode_time_seconds | first token until the last |

A run's stage mean is (sum after - sum before) / (count after - count before).

dvd's stages overlap within a request: the language server's transfer stage runs from an
image's plan to its last feature chunk, and while features stream batch by batch (every
mode but ViR's router, which decides over all tiles first) the plan goes out before the
tiles are queued and encoded. `exposed` therefore counts only the transfer time that
queue + encode do not cover; attribution uses it.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from typing import Any

DVD_STAGES = ("queue", "preprocess", "encode", "transfer", "prompt", "prefill", "decode")
BEFORE_FIRST_TOKEN = ("queue", "preprocess", "encode", "transfer", "prompt", "prefill")
VISION_STAGES = ("preprocess", "queue", "encode", "transfer")
DVD_HISTOGRAM = "dvd_gateway_stage_seconds"
VLLM_HISTOGRAMS = {
    "queue": "vllm:request_queue_time_seconds",
    "prefill": "vllm:request_prefill_time_seconds",
    "decode": "vllm:request_decode_time_seconds",
}
SOURCES = ("dvd", "vllm")


@dataclass(frozen=True)
class StageStat:
    """A histogram's running totals: seconds observed and observations."""

    sum_s: float
    count: float

    def minus(self, earlier: StageStat) -> StageStat:
        return StageStat(self.sum_s - earlier.sum_s, self.count - earlier.count)

    @property
    def mean_ms(self) -> float | None:
        return self.sum_s / self.count * 1000.0 if self.count > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean_ms, "count": round(self.count)}


Stages = dict[str, StageStat]


def parse(text: str, source: str) -> Stages:
    """The stage totals in a Prometheus text exposition (`source`: "dvd" or "vllm")."""
    from prometheus_client.parser import text_string_to_metric_families

    if source not in SOURCES:
        raise ValueError(f"source: {source!r} is not one of {SOURCES}")
    totals: dict[str, dict[str, float]] = {}
    wanted = (
        {DVD_HISTOGRAM: None} if source == "dvd" else {v: k for k, v in VLLM_HISTOGRAMS.items()}
    )
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            base, _, kind = sample.name.rpartition("_")
            if base not in wanted or kind not in ("sum", "count"):
                continue
            stage = sample.labels.get("stage") if source == "dvd" else wanted[base]
            if stage is None:
                continue
            slot = totals.setdefault(stage, {"sum": 0.0, "count": 0.0})
            slot[kind] += sample.value  # vLLM labels per engine: added up
    return {stage: StageStat(t["sum"], t["count"]) for stage, t in totals.items()}


def scrape(metrics_url: str, source: str, timeout_s: float = 10.0) -> Stages:
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as response:
        return parse(response.read().decode("utf-8", errors="replace"), source)


def delta(before: Stages, after: Stages) -> Stages:
    """What was observed between two scrapes; stages with no new observation are left out."""
    changes = {s: stat.minus(before.get(s, StageStat(0.0, 0.0))) for s, stat in after.items()}
    return {s: stat for s, stat in changes.items() if stat.count > 0}


def exposed(means: dict[str, float]) -> dict[str, float]:
    """dvd stage means with transfer cut to what queue + encode do not cover (see above)."""
    if "transfer" not in means:
        return dict(means)
    hidden = means.get("queue", 0.0) + means.get("encode", 0.0)
    return {**means, "transfer": max(0.0, means["transfer"] - hidden)}


def means_ms(stages: Stages) -> dict[str, float]:
    """{stage: mean ms} in dvd's stage order, stages without observations left out."""
    ordered = [s for s in DVD_STAGES if s in stages] + sorted(set(stages) - set(DVD_STAGES))
    return {s: m for s in ordered if (m := stages[s].mean_ms) is not None}
