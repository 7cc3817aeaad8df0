"""The comparison report as JSON: figures per system, ratios to the baselines, and, where a
split (DvD) system is slower than a baseline, the stages that cost the time. Pure functions.

Layout:

    {"machine", "checkpoint", "traffic", "sizing", "pinning", "baselines",
     "systems": {NAME: {"label", "model", "ok", "error", "notes", "command", "startup_s",
                        "concurrency": C (the headline level),
                        "request_throughput", "output_throughput", "ttft_ms", "tpot_ms",
                        "e2e_ms", "errors", "completed",
                        "ratio_to_vllm", "ratio_to_coupled", "stages_ms",
                        "transfer_exposed_ms", "other_cpus",
                        "cpu": {"cpus", "seconds", "by_role": {ROLE: CPUs},
                                "per_request_s": {ROLE: CPU s}},
                        "by_concurrency": {"C": {same figures, ratios and stages}},
                        "by_rate": {"R": {the same, for the open-loop level at R req/s}},
                        "greedy": {"text", "image", "matches_vllm"}}},
     "attribution": [{"system", "baseline", "level", "slower_on", "stages",
                      "culprit", "summary"}]}

Ratios are system / baseline for every figure (throughputs: above 1 is better; latencies:
below 1 is better); null where either side has no value. Stage times are means in ms.
"""

from __future__ import annotations

from typing import Any

from benchmarks.compare.results import LevelRun, SystemRun
from benchmarks.compare.stages import BEFORE_FIRST_TOKEN, DVD_STAGES, exposed, means_ms

BASELINES = ("vllm", "coupled")
"""Systems that run the ViT inside the LLM server; every system gets ratios to both."""
THROUGHPUTS = ("request_throughput", "output_throughput")
LATENCIES = ("ttft_ms", "tpot_ms")
STATS = ("mean", "p50", "p90", "p99")
TOLERANCE = 0.03
"""A system counts as slower when a ratio is worse than 1 by more than this (3 %)."""


def figures(level: LevelRun) -> dict[str, Any]:
    summary = level.result.summary.to_json()
    return {
        "request_throughput": summary["request_throughput"],
        "output_throughput": summary["output_throughput"],
        "ttft_ms": summary["ttft_ms"],
        "tpot_ms": summary["tpot_ms"],
        "e2e_ms": summary["e2e_ms"],
        "errors": summary["errors"],
        "completed": summary["completed"],
        "duration_s": summary["duration_s"],
    }


def cpu_figures(level: LevelRun) -> dict[str, Any] | None:
    """The level's CPU use: average CPUs per role, and CPU seconds per completed request."""
    if level.cpu is None:
        return None
    completed = level.result.summary.completed
    return {**level.cpu.to_json(), "per_request_s": level.cpu.per_request_s(completed)}


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def ratios(figs: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any] | None:
    """system / baseline for each throughput and each latency statistic; None without one."""
    if base is None:
        return None
    out: dict[str, Any] = {name: ratio(figs[name], base[name]) for name in THROUGHPUTS}
    for name in LATENCIES:
        out[name] = {s: ratio(figs[name][s], base[name][s]) for s in STATS}
    return out


def slower_on(level_ratios: dict[str, Any] | None) -> list[str]:
    """The figures on which a system is worse than its baseline by more than TOLERANCE."""
    if level_ratios is None:
        return []
    worse = [n for n in THROUGHPUTS if (r := level_ratios[n]) is not None and r < 1 - TOLERANCE]
    worse += [
        f"{n}.mean"
        for n in LATENCIES
        if (r := level_ratios[n]["mean"]) is not None and r > 1 + TOLERANCE
    ]
    return worse


def compare_stages(
    system: dict[str, float], baseline: dict[str, float], baseline_source: str
) -> list[dict[str, Any]]:
    """Rows {stage, system_ms, baseline_ms, delta_ms}, largest increase first.

    Against a dvd baseline (coupled) stage by stage. Against vLLM, whose prefill contains
    its ViT and whose queue is its scheduler's: "until first token" (dvd: the sum of its
    stages before the first token; vLLM: queue + prefill) and "decode". dvd's transfer
    should come in as `stages.exposed` gives it (the part encoding does not cover).
    """
    rows: list[dict[str, Any]] = []
    if baseline_source == "dvd":
        for stage in DVD_STAGES:
            if stage in system or stage in baseline:
                mine, theirs = system.get(stage, 0.0), baseline.get(stage, 0.0)
                rows.append(_row(stage, mine, theirs))
    else:
        before = sum(system.get(s, 0.0) for s in BEFORE_FIRST_TOKEN)
        theirs = baseline.get("queue", 0.0) + baseline.get("prefill", 0.0)
        rows.append(_row("until first token", before, theirs))
        rows.append(_row("decode", system.get("decode", 0.0), baseline.get("decode", 0.0)))
    return sorted(rows, key=lambda row: -row["delta_ms"])


def _row(stage: str, mine: float, theirs: float) -> dict[str, Any]:
    return {"stage": stage, "system_ms": mine, "baseline_ms": theirs, "delta_ms": mine - theirs}


def attribute(
    name: str,
    baseline: str,
    level: str,
    level_ratios: dict[str, Any] | None,
    system_stages: dict[str, float],
    baseline_stages: dict[str, float],
    baseline_source: str,
) -> dict[str, Any] | None:
    """Why `name` is slower than `baseline` at `level` ("concurrency 4", "0.5 requests/s");
    None when it is not slower."""
    worse = slower_on(level_ratios)
    if not worse or level_ratios is None:
        return None
    rows = compare_stages(system_stages, baseline_stages, baseline_source)
    culprit = rows[0]["stage"] if rows and rows[0]["delta_ms"] > 0 else None
    if culprit == "until first token":
        before = {s: system_stages[s] for s in BEFORE_FIRST_TOKEN if s in system_stages}
        culprit = max(before, key=before.__getitem__) if before else culprit
    entry = {
        "system": name,
        "baseline": baseline,
        "level": level,
        "slower_on": worse,
        "stages": rows,
        "culprit": culprit,
    }
    entry["summary"] = _summary(entry, level_ratios, system_stages, baseline_source)
    return entry


def _summary(
    entry: dict[str, Any],
    level_ratios: dict[str, Any],
    system_stages: dict[str, float],
    baseline_source: str,
) -> str:
    shown = []
    for figure in entry["slower_on"]:
        name, _, stat = figure.partition(".")
        value = level_ratios[name][stat] if stat else level_ratios[name]
        shown.append(f"{figure} {value:.2f}x")
    text = f"{entry['system']} vs {entry['baseline']} at {entry['level']}: " + ", ".join(shown)
    if not entry["stages"] or not system_stages:
        return text + "; no stage metrics to attribute it"
    top = entry["stages"][0]
    if top["delta_ms"] <= 0:
        return text + "; no stage takes longer on average (the time is lost between stages)"
    text += (
        f"; largest increase: {top['stage']} +{top['delta_ms']:.1f} ms per request "
        f"({top['system_ms']:.1f} vs {top['baseline_ms']:.1f} ms)"
    )
    if baseline_source == "vllm" and top["stage"] == "until first token":
        parts = ", ".join(
            f"{s} {system_stages[s]:.1f}" for s in BEFORE_FIRST_TOKEN if s in system_stages
        )
        text += f"; of which {entry['culprit']} is the largest (ms: {parts})"
    return text


def _system_entry(run: SystemRun, headline: int, runs: dict[str, SystemRun]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "label": run.label,
        "model": run.model,
        "ok": run.error is None and bool(run.levels),
        "error": run.error,
        "notes": run.notes,
        "command": run.command,
        "extra_body": run.extra_body,
        "startup_s": run.started_s,
        "stage_source": run.stage_source,
    }
    by_level = {
        str(level.concurrency): _level_entry(
            run, level, {b: runs[b].level(level.concurrency) for b in BASELINES if b in runs}
        )
        for level in run.levels
    }
    top = by_level.get(str(headline))
    if top is None and by_level:
        top = by_level[max(by_level, key=int)]
    entry["concurrency"] = headline if str(headline) in by_level else None
    entry.update(top or {})
    entry["by_concurrency"] = by_level
    entry["by_rate"] = {
        f"{level.rate:g}": _level_entry(
            run, level, {b: runs[b].rate_level(level.rate) for b in BASELINES if b in runs}
        )
        for level in run.rate_levels
        if level.rate is not None
    }
    entry["greedy"] = dict(run.greedy)
    vllm = runs.get("vllm")
    if run.greedy and vllm is not None and vllm.greedy and run.name != "vllm":
        entry["greedy"]["matches_vllm"] = {
            key: run.greedy.get(key) == vllm.greedy.get(key) for key in vllm.greedy
        }
    return entry


def _level_entry(
    run: SystemRun, level: LevelRun, baselines: dict[str, LevelRun | None]
) -> dict[str, Any]:
    """A level's figures, its ratios to each baseline's same level, stages and CPU use."""
    figs = figures(level)
    for base in BASELINES:
        base_level = baselines.get(base)
        figs[f"ratio_to_{base}"] = ratios(figs, figures(base_level) if base_level else None)
    figs["stages_ms"] = {s: st.to_json() for s, st in level.stages.items()}
    figs["transfer_exposed_ms"] = _attributable(run, level).get("transfer")
    figs["other_cpus"] = level.other_cpus
    figs["cpu"] = cpu_figures(level)
    return figs


def _attributable(run: SystemRun, level: LevelRun) -> dict[str, float]:
    means = means_ms(level.stages)
    return exposed(means) if run.stage_source == "dvd" else means


def attributions(runs: dict[str, SystemRun]) -> list[dict[str, Any]]:
    """Every (system, baseline, level) where a dvd system is slower than a baseline (dvd's
    coupled mode against vLLM too: it shows what dvd's own vision path costs), at the
    concurrency levels and the open-loop rates."""
    found = []
    for name, run in runs.items():
        if name == "vllm":
            continue
        for base in BASELINES:
            other = runs.get(base)
            if other is None or base == name:
                continue
            pairs = [(lv, other.level(lv.concurrency)) for lv in run.levels]
            pairs += [(lv, other.rate_level(lv.rate)) for lv in run.rate_levels if lv.rate]
            for level, base_level in pairs:
                if base_level is None:
                    continue
                entry = attribute(
                    name,
                    base,
                    _spelled(level),
                    ratios(figures(level), figures(base_level)),
                    _attributable(run, level),
                    _attributable(other, base_level),
                    other.stage_source,
                )
                if entry is not None:
                    found.append(entry)
    return found


def _spelled(level: LevelRun) -> str:
    """The level in a sentence: "concurrency 4", "0.5 requests/s"."""
    return (
        f"concurrency {level.concurrency}" if level.rate is None else f"{level.rate:g} requests/s"
    )


def build_report(
    runs: dict[str, SystemRun], headline_concurrency: int, meta: dict[str, Any]
) -> dict[str, Any]:
    """`meta` gives machine, checkpoint, traffic, sizing and pinning (copied as they are)."""
    report = {key: meta.get(key) for key in ("machine", "checkpoint", "traffic", "sizing")}
    report["pinning"] = meta.get("pinning")
    report["baselines"] = [b for b in BASELINES if b in runs]
    report["systems"] = {
        name: _system_entry(run, headline_concurrency, runs) for name, run in runs.items()
    }
    report["attribution"] = attributions(runs)
    for key, value in meta.items():
        report.setdefault(key, value)
    return report
