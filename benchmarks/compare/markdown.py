"""The comparison report as Markdown, rendered from the JSON report (nothing recomputed)."""

from __future__ import annotations

from typing import Any

from benchmarks.compare.stages import DVD_STAGES

OTHER_CPUS_NOTED = 0.1
"""Levels during which other processes used at least this many CPUs are named in the notes."""
PLOTS = {
    "ttft.png": "TTFT distribution per system (CDF, headline concurrency) and TTFT/TPOT box plots",
    "throughput.png": "request and output throughput against concurrency",
    "stages.png": "mean time per stage and system (headline concurrency)",
}


def number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _figure_row(name: str, figs: dict[str, Any], base: str) -> str:
    ttft, tpot = figs["ttft_ms"], figs["tpot_ms"]
    ratios = figs.get(f"ratio_to_{base}") or {}
    cells = [
        name,
        number(figs["request_throughput"], 2),
        number(figs["output_throughput"], 1),
        *(number(ttft[s], 0) for s in ("mean", "p50", "p90", "p99")),
        *(number(tpot[s], 1) for s in ("mean", "p50", "p90", "p99")),
        str(figs["errors"]),
        ratio(ratios.get("request_throughput")),
        ratio(ratios.get("output_throughput")),
        ratio((ratios.get("ttft_ms") or {}).get("mean")),
        ratio((ratios.get("tpot_ms") or {}).get("mean")),
    ]
    return "| " + " | ".join(cells) + " |"


def _figures_table(rows: list[tuple[str, dict[str, Any]]], base: str) -> list[str]:
    head = (
        "| system | req/s | output tok/s | TTFT mean | p50 | p90 | p99 | TPOT mean | p50 | p90 "
        f"| p99 | errors | req/s vs {base} | tok/s vs {base} | TTFT vs {base} | TPOT vs {base} |"
    )
    return [head, "|" + " --- |" * 16, *(_figure_row(n, f, base) for n, f in rows)]


def context_lines(report: dict[str, Any]) -> list[str]:
    machine, traffic = report.get("machine") or {}, report.get("traffic") or {}
    checkpoint, sizing = report.get("checkpoint") or {}, report.get("sizing") or {}
    pinning = report.get("pinning") or {}
    per_level = traffic.get("requests_per_level") or {}
    lines = [
        f"- **Machine**: {machine.get('cpu_model', '?')}, {machine.get('cpus', '?')} CPUs "
        f"(this run: {machine.get('affinity', '?')}), {machine.get('memory_gib', '?')} GiB, "
        f"GPU: {machine.get('gpu') or 'none'}; torch {machine.get('torch', '?')}, "
        f"vLLM {machine.get('vllm', '?')}.",
        f"- **Checkpoint**: {checkpoint.get('description', '?')}",
        f"- **Traffic**: {traffic.get('images_per_request')} image per request, sizes "
        f"{', '.join(traffic.get('image_sizes', []))} (cycled, a distinct image per request), "
        f"~{traffic.get('prompt_words')} prompt words, {traffic.get('output_tokens')} output "
        f"tokens (ignore_eos), greedy, streamed; fixed concurrency "
        f"{', '.join(map(str, traffic.get('concurrencies', [])))}, "
        + ", ".join(f"{n} requests at c={c}" for c, n in per_level.items())
        + _open_loop_traffic(traffic)
        + f", after {traffic.get('warmup_requests')} warm-up requests.",
        f"- **Sizing (every system)**: {sizing.get('dtype')}, max_model_len "
        f"{sizing.get('max_model_len')}, max_num_seqs {sizing.get('max_num_seqs')}, KV cache "
        f"{sizing.get('kv_cache_gib')} GiB, eager (no torch.compile / CUDA graphs).",
    ]
    if pinning.get("enabled"):
        lines.append(
            f"- **Pinning**: split systems: vision server on CPUs {pinning['vision_cpus']}, "
            f"language server on CPUs {pinning['language_cpus']}; coupled systems get the "
            f"same CPUs in total: {pinning['vllm']}; {pinning['coupled']}. "
            f"Not pinned: {pinning['unpinned']}."
        )
    else:
        lines.append("- **Pinning**: none.")
    if "dvd-up" in report.get("systems", {}):
        lines.append(
            "- **dvd-up** gets no placement flags from the benchmark: `dvd up` places its "
            "servers on the CPUs, sets their thread counts and priorities itself (its log "
            "says how; see dvd/placement.py)."
        )
    return lines


def systems_table(report: dict[str, Any]) -> list[str]:
    """Which system served which checkpoint folder (the folder names the model and preset)."""
    lines = ["| system | what | checkpoint served |", "| --- | --- | --- |"]
    for name, system in report["systems"].items():
        lines.append(f"| {name} | {system.get('label', '')} | `{system.get('model') or '-'}` |")
    return lines


def _open_loop_traffic(traffic: dict[str, Any]) -> str:
    rates = traffic.get("request_rates") or []
    if not rates:
        return ""
    return (
        f"; then open loop: {traffic.get('requests_per_rate')} requests arriving at Poisson "
        f"times at each of {', '.join(f'{r:g}' for r in rates)} requests/s"
    )


CPU_INTRO = (
    "Average CPUs each process kept busy while the level ran, and in brackets its CPU "
    "seconds per completed request (from /proc; the load generator is this benchmark's own "
    "process, idle is what the CPUs it may use left unused). CPU time is what a process "
    "took, useful or not: vLLM's processes busy-poll for up to a second after each engine "
    "step. At a fixed concurrency C, mean latency is C / throughput: once idle is near "
    "zero, only fewer CPU seconds per request raise throughput and lower latency together."
)


def cpu_table(rows: list[tuple[list[str], dict[str, Any] | None]], heads: list[str]) -> list[str]:
    """One row per (leading cells, a level's `cpu` figures); a column per role present."""
    from benchmarks.compare.interference import IDLE, LOAD_GENERATOR, ROLE_ORDER

    present = {role for _, cpu in rows if cpu for role in cpu["by_role"]}
    if not present:
        return []  # reports from before CPU use was measured
    roles = [role for role in ROLE_ORDER if role in present]
    lines = [
        "| " + " | ".join([*heads, *roles, "serving CPU s / request"]) + " |",
        "|" + " --- |" * (len(heads) + len(roles) + 1),
    ]
    for cells, cpu in rows:
        if not cpu:
            continue
        per_request = cpu.get("per_request_s") or {}
        shown = []
        for role in roles:
            cpus = cpu["by_role"].get(role)
            seconds = per_request.get(role)
            shown.append(
                number(cpus, 2) + ("" if seconds is None or role == IDLE else f" ({seconds:.2f})")
            )
        serving = [s for role, s in per_request.items() if role != LOAD_GENERATOR]
        shown.append(number(sum(serving), 2) if serving else "-")
        lines.append("| " + " | ".join([*cells, *shown]) + " |")
    return lines


def report_levels(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(system, level name, the level's entry) for every level each system ran: the
    concurrency levels ("c=4"), then the open-loop ones ("0.8 req/s")."""
    from benchmarks.compare.results import level_keys

    keys = level_keys(report.get("traffic") or {})
    return [
        (name, level, system[group][key])
        for name, system in report["systems"].items()
        for level, group, key in keys
        if key in system.get(group, {})
    ]


def cpu_section(table: list[str]) -> list[str]:
    """The "Where the CPUs went" section around `table`; nothing without one."""
    if not table:
        return []
    return ["## Where the CPUs went", "", CPU_INTRO, "", *table, ""]


def _cpu_table(report: dict[str, Any]) -> list[str]:
    rows = [([name, level], entry.get("cpu")) for name, level, entry in report_levels(report)]
    return cpu_table(rows, ["system", "level"])


def _stages_table(report: dict[str, Any]) -> list[str]:
    lines = [
        "| system | level | " + " | ".join(DVD_STAGES) + " | transfer beyond encode |",
        "|" + " --- |" * (len(DVD_STAGES) + 3),
    ]
    for name, level, entry in report_levels(report):
        stages = entry.get("stages_ms") or {}
        cells = [number((stages.get(s) or {}).get("mean")) for s in DVD_STAGES]
        cells.append(number(entry.get("transfer_exposed_ms")))
        lines.append(f"| {name} | {level} | " + " | ".join(cells) + " |")
    return lines


OPEN_LOOP_INTRO = (
    "Requests arrive at Poisson times at the given rate, whether or not earlier ones are "
    "answered, as from many independent users: every system faces the same offered load. "
    "(At a fixed concurrency the load instead follows each system's speed: mean latency "
    "is concurrency / throughput there, so a system that answers faster also receives more "
    "requests.) A rate above what a system sustains shows as throughput below the rate and "
    "latency growing with the number of requests."
)


def _open_loop_lines(report: dict[str, Any], ran: list[tuple[str, Any]], base: str) -> list[str]:
    rates = (report.get("traffic") or {}).get("request_rates", [])
    if not rates:
        return []
    lines = ["## Open loop: requests arriving at a fixed rate", "", OPEN_LOOP_INTRO, ""]
    for rate in rates:
        key = f"{rate:g}"
        rows = [(n, s["by_rate"][key]) for n, s in ran if key in s.get("by_rate", {})]
        lines += [f"### {key} requests/s", "", *_figures_table(rows, base), ""]
    return lines


def render(report: dict[str, Any], command: str = "") -> str:
    systems: dict[str, Any] = report["systems"]
    traffic = report.get("traffic") or {}
    headline = traffic.get("headline_concurrency")
    base = "vllm" if "vllm" in report.get("baselines", []) else "coupled"
    lines = ["# dvd bench compare", ""]
    if command:
        lines += [f"`{command}`", ""]
    lines += [*context_lines(report), "", "## Systems", "", *systems_table(report), ""]
    ran = [(n, s) for n, s in systems.items() if s.get("by_concurrency")]
    lines += [
        f"## Headline: concurrency {headline}",
        "",
        "Latencies in ms. Ratios are system / baseline: above 1 is better for throughput, "
        "below 1 is better for latency.",
        "",
        *_figures_table([(n, s) for n, s in ran if s.get("concurrency") == headline], base),
        "",
    ]
    if base != "coupled" and "coupled" in report.get("baselines", []):
        lines += [
            "Against dvd's own coupled baseline:",
            "",
            *_figures_table(
                [(n, s) for n, s in ran if s.get("concurrency") == headline], "coupled"
            ),
            "",
        ]
    lines += ["## Every concurrency level", ""]
    for c in traffic.get("concurrencies", []):
        rows = [(n, s["by_concurrency"][str(c)]) for n, s in ran if str(c) in s["by_concurrency"]]
        lines += [f"### Concurrency {c}", "", *_figures_table(rows, base), ""]
    lines += _open_loop_lines(report, ran, base)
    lines += [
        "## Stage times (mean ms per request)",
        "",
        "From each server's /metrics before and after each level. dvd: the gateway's "
        "`dvd_gateway_stage_seconds`; vLLM: its queue, prefill (the ViT included) and decode "
        "histograms, in the queue, prefill and decode columns (vLLM's own image "
        "preprocessing in its API server is in none of them). Stages overlap: within a "
        "request, dvd's transfer runs from an image's plan to its last chunk, and while "
        "features stream batch by batch that contains the tiles' queueing and encoding, so "
        "the last column gives the transfer time they do not cover (what the attribution "
        "below uses); across requests they overlap too, so they do not add up to latency.",
        "",
        *_stages_table(report),
        "",
        *cpu_section(_cpu_table(report)),
        "## Where DvD is slower than a baseline",
        "",
    ]
    found = report.get("attribution") or []
    lines += [f"- {entry['summary']}" for entry in found] or [
        "- Nowhere: no split system is slower than a baseline by more than 3 %."
    ]
    lines += ["", "## Same weights, same answers?", ""]
    for name, system in systems.items():
        greedy = system.get("greedy") or {}
        if not greedy:
            continue
        match = greedy.get("matches_vllm")
        verdict = (
            ""
            if match is None
            else " - matches vLLM: "
            + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in match.items())
        )
        lines.append(
            f"- {name}: text {greedy.get('text')!r}, image {greedy.get('image')!r}{verdict}"
        )
    lines += ["", "## Plots", ""]
    lines += [f"- `{name}`: {what}" for name, what in PLOTS.items()]
    lines += ["", "## Notes", ""]
    for name, system in systems.items():
        for note in system.get("notes", []):
            lines.append(f"- {name}: {note}")
        if system.get("error"):
            first = str(system["error"]).splitlines()[0]
            lines.append(f"- {name}: **not measured (fully)**: {first}")
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    busy = [
        f"{name} {level}: {entry['other_cpus']:.2f}"
        for name, level, entry in report_levels(report)
        if (entry.get("other_cpus") or 0.0) >= OTHER_CPUS_NOTED
    ]
    if busy:
        lines.append(
            "- Other processes on the machine kept CPUs busy during some levels (average "
            "CPUs; those figures are less comparable): " + ", ".join(busy)
        )
    return "\n".join(lines) + "\n"
