"""PNG plots of a comparison (matplotlib, headless Agg backend).

- ttft.png: TTFT CDF per system at the headline concurrency, and TTFT / TPOT box plots.
- throughput.png: request and output throughput against concurrency, one line per system.
- stages.png: mean ms per stage and system at the headline concurrency (stacked bars; dvd's
  transfer as the part queue + encode do not cover, see `stages.exposed`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.compare.results import SystemRun
from benchmarks.compare.stages import DVD_STAGES, exposed, means_ms


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _latencies(run: SystemRun, concurrency: int) -> tuple[list[float], list[float]]:
    level = run.level(concurrency)
    if level is None:
        return [], []
    done = [r for r in level.result.requests if r.ok]
    ttft = [r.ttft_s * 1000.0 for r in done if r.ttft_s is not None]
    tpot = [r.tpot_s * 1000.0 for r in done if r.tpot_s is not None]
    return ttft, tpot


def plot_latency(runs: dict[str, SystemRun], concurrency: int, path: Path) -> Path:
    plt = _pyplot()
    fig, (cdf, ttft_box, tpot_box) = plt.subplots(1, 3, figsize=(16, 4.8))
    names, ttfts, tpots = [], [], []
    for name, run in runs.items():
        ttft, tpot = _latencies(run, concurrency)
        if not ttft:
            continue
        ordered = sorted(ttft)
        fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
        cdf.step(ordered, fractions, where="post", label=name)
        names.append(name)
        ttfts.append(ttft)
        tpots.append(tpot or [0.0])
    cdf.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title=f"TTFT CDF, c={concurrency}")
    cdf.grid(alpha=0.3)
    if names:
        cdf.legend()
        ttft_box.boxplot(ttfts, tick_labels=names)
        tpot_box.boxplot(tpots, tick_labels=names)
    ttft_box.set(ylabel="TTFT (ms)", title="TTFT")
    tpot_box.set(ylabel="TPOT (ms)", title="time per output token")
    for axis in (ttft_box, tpot_box):
        axis.tick_params(axis="x", rotation=20)
        axis.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput(runs: dict[str, SystemRun], path: Path) -> Path:
    plt = _pyplot()
    fig, (requests, tokens) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run in runs.items():
        if not run.levels:
            continue
        levels = sorted(run.levels, key=lambda lv: lv.concurrency)
        x = [lv.concurrency for lv in levels]
        requests.plot(x, [lv.result.summary.request_throughput for lv in levels], "o-", label=name)
        tokens.plot(x, [lv.result.summary.output_throughput for lv in levels], "o-", label=name)
    requests.set(xlabel="concurrency", ylabel="requests / s", title="request throughput")
    tokens.set(xlabel="concurrency", ylabel="output tokens / s", title="output throughput")
    levels_run = sorted({lv.concurrency for run in runs.values() for lv in run.levels})
    for axis in (requests, tokens):
        axis.grid(alpha=0.3)
        axis.set_xticks(levels_run)
        axis.set_ylim(bottom=0)
        if levels_run:
            axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_stages(runs: dict[str, SystemRun], concurrency: int, path: Path) -> Path:
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(12, 4.5))
    names = [n for n, r in runs.items() if (lv := r.level(concurrency)) and lv.stages]
    bottoms = [0.0] * len(names)
    means = {}
    for name in names:
        level = runs[name].level(concurrency)
        found = means_ms(level.stages) if level else {}
        means[name] = exposed(found) if runs[name].stage_source == "dvd" else found
    for stage in DVD_STAGES:
        heights = [means[name].get(stage, 0.0) for name in names]
        if any(heights):
            label = "transfer (beyond queue + encode)" if stage == "transfer" else stage
            axis.bar(names, heights, bottom=bottoms, label=label)
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    axis.set(
        ylabel="mean ms per request",
        title=f"stage times, c={concurrency} (vLLM: prefill includes its ViT)",
    )
    axis.grid(alpha=0.3, axis="y")
    if names:
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(runs: dict[str, SystemRun], concurrency: int, out: Path) -> list[Path]:
    return [
        plot_latency(runs, concurrency, out / "ttft.png"),
        plot_throughput(runs, out / "throughput.png"),
        plot_stages(runs, concurrency, out / "stages.png"),
    ]
