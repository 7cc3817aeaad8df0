"""`dvd bench compare --rounds N`: the same systems N times, alternating, and one summary.

A machine drifts (thermal state, page cache, a neighbour's job); running vllm, dvd, vllm,
dvd, ... and reporting every round separately shows that drift as the spread between
rounds instead of folding it into one system's figures. Each round is a complete report
(round-K/report.json and .md, built exactly as a single run's); the summary lines them up:
per concurrency level and round, each system's request throughput and TTFT / TPOT
percentiles, with the ratio to the same round's baseline.
"""

from __future__ import annotations

from statistics import mean
from typing import Any

from benchmarks.compare.results import level_keys

HEADLINE_STATS = ("p50", "p90", "p99")


def _row(report: dict[str, Any], name: str, group: str, key: str) -> dict[str, Any] | None:
    level = (report["systems"].get(name) or {}).get(group, {}).get(key)
    if level is None:
        return None
    base = report["baselines"][0] if report.get("baselines") else None
    ratios = level.get(f"ratio_to_{base}") if base else None
    return {
        "request_throughput": level["request_throughput"],
        "ttft_ms": {s: level["ttft_ms"][s] for s in ("mean", *HEADLINE_STATS)},
        "tpot_ms": {s: level["tpot_ms"][s] for s in ("mean", *HEADLINE_STATS)},
        "errors": level["errors"],
        "baseline": base,
        "throughput_ratio": (ratios or {}).get("request_throughput"),
        "ttft_p50_ratio": ((ratios or {}).get("ttft_ms") or {}).get("p50"),
        "stages_ms": {s: v.get("mean") for s, v in (level.get("stages_ms") or {}).items()},
        "cpu": level.get("cpu"),
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """{"levels": {level: {system: [row per round]}}, "mean_ratios": {level: {system: {...}}}},
    levels named as `level_keys` names them ("c=8", "0.8 req/s")."""
    names = list(rounds[0]["systems"])
    levels: dict[str, dict[str, list[dict[str, Any] | None]]] = {}
    mean_ratios: dict[str, dict[str, dict[str, float | None]]] = {}
    for level, group, key in level_keys(rounds[0]["traffic"]):
        levels[level] = {n: [_row(r, n, group, key) for r in rounds] for n in names}
        mean_ratios[level] = {}
        for name, rows in levels[level].items():
            got = [row for row in rows if row is not None]
            mean_ratios[level][name] = {
                key: _mean([row[key] for row in got])
                for key in ("throughput_ratio", "ttft_p50_ratio")
            }
    return {"rounds": len(rounds), "levels": levels, "mean_ratios": mean_ratios}


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return mean(present) if present and len(present) == len(values) else None


def render_summary(summary: dict[str, Any], first_round: dict[str, Any], command: str) -> str:
    """Markdown: context from round 1, then one table per level with a row per round."""
    from benchmarks.compare.markdown import context_lines, number, ratio

    lines = ["# dvd bench compare: summary of alternated rounds", ""]
    if command:
        lines += [f"`{command}`", ""]
    lines += [
        f"{summary['rounds']} rounds; in each, every system ran once, in the order the "
        "tables list them. Full reports (every percentile, stage breakdown, notes): "
        "`round-K/report.md`. Ratios are to the same round's baseline: below 1 is better for "
        "TTFT, above 1 is better for throughput.",
        "",
        *context_lines(first_round),
        "",
    ]
    head = (
        "| round | system | req/s | TTFT p50 | p90 | p99 | TPOT p50 | p90 | p99 | errors "
        "| req/s vs baseline | TTFT p50 vs baseline |"
    )
    for level, systems in summary["levels"].items():
        title = f"Concurrency {level[2:]}" if level.startswith("c=") else f"Open loop, {level}"
        lines += [f"## {title}", "", head, "|" + " --- |" * 12]
        for index in range(summary["rounds"]):
            for name, rows in systems.items():
                row = rows[index]
                if row is None:
                    lines.append(f"| {index + 1} | {name} | not measured |" + " |" * 9)
                    continue
                ttft, tpot = row["ttft_ms"], row["tpot_ms"]
                lines.append(
                    f"| {index + 1} | {name} | {number(row['request_throughput'], 3)} | "
                    + " | ".join(number(ttft[s], 0) for s in HEADLINE_STATS)
                    + " | "
                    + " | ".join(number(tpot[s], 1) for s in HEADLINE_STATS)
                    + f" | {row['errors']} | {ratio(row['throughput_ratio'])} | "
                    f"{ratio(row['ttft_p50_ratio'])} |"
                )
        means = summary["mean_ratios"][level]
        lines += [
            "",
            "Mean over rounds: "
            + "; ".join(
                f"{name} req/s {ratio(m['throughput_ratio'])}, TTFT p50 "
                f"{ratio(m['ttft_p50_ratio'])}"
                for name, m in means.items()
            ),
            "",
        ]
    lines += _stage_lines(summary)
    lines += ["", *_cpu_lines(summary)]
    return "\n".join(lines) + "\n"


def _stage_lines(summary: dict[str, Any]) -> list[str]:
    """Mean ms per stage, per round and level, for the systems that report stages (dvd's
    own; vLLM's queue / prefill / decode too, with the ViT inside its prefill)."""
    from benchmarks.compare.markdown import number
    from benchmarks.compare.stages import DVD_STAGES

    lines = [
        "## Where the time goes (mean ms per request, per stage)",
        "",
        "dvd: the gateway's stage histograms (queue = waiting in the ViT batcher); vLLM: its "
        "queue, prefill (the ViT included) and decode. Stages before the first token: queue, "
        "preprocess, encode, transfer (overlaps queue and encode), prompt, prefill.",
        "",
        "| round | system | level | " + " | ".join(DVD_STAGES) + " |",
        "|" + " --- |" * (len(DVD_STAGES) + 3),
    ]
    for level, systems in summary["levels"].items():
        for index in range(summary["rounds"]):
            for name, rows in systems.items():
                stages = (rows[index] or {}).get("stages_ms") or {}
                if stages:
                    cells = [number(stages.get(stage)) for stage in DVD_STAGES]
                    lines.append(f"| {index + 1} | {name} | {level} | " + " | ".join(cells) + " |")
    return lines


def _cpu_lines(summary: dict[str, Any]) -> list[str]:
    """Average CPUs per process and CPU seconds per request, per round and level."""
    from benchmarks.compare.markdown import cpu_section, cpu_table

    rows = [
        ([str(index + 1), name, level], (per_round[index] or {}).get("cpu"))
        for level, systems in summary["levels"].items()
        for index in range(summary["rounds"])
        for name, per_round in systems.items()
    ]
    return cpu_section(cpu_table(rows, ["round", "system", "level"]))
