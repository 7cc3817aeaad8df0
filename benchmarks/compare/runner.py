"""Runs the comparison: one system at a time is started, measured, and stopped.

For each system: launch it (its own process group), ask it two greedy questions (a text
and an image prompt, to check that the systems serving the same weights answer alike),
send the warm-up requests, then each concurrency level and each open-loop rate with a
scrape of its `/metrics` before and after (so the stage times cover exactly that level's
requests), and stop it.
A system that fails to start or to serve is recorded with its error and log tail; the
others still run.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from benchmarks.compare.config import CompareConfig
from benchmarks.compare.interference import IDLE, CpuWatch, wait_quiet
from benchmarks.compare.lineup import SystemSpec, dvd_argv
from benchmarks.compare.results import LevelRun, SystemRun, level_name
from benchmarks.compare.stages import Stages, delta, scrape

if TYPE_CHECKING:
    from benchmarks.serve.config import BenchConfig

GREEDY_TEXT = "Describe the city by the river in one sentence."
GREEDY_IMAGE_PROMPT = "What is in this image?"
GREEDY_IMAGE_SIZE = (448, 448)
GREEDY_TOKENS = 16
METRICS_PATH = "/metrics"


def greedy_answers(base_url: str, extra_body: dict[str, Any]) -> dict[str, str]:
    """The system's greedy answers (GREEDY_TOKENS tokens) to a text and an image prompt."""
    from benchmarks.serve.workload import data_url, noisy_gradient_png

    image = data_url(noisy_gradient_png(*GREEDY_IMAGE_SIZE, seed=7))
    prompts = {
        "text": GREEDY_TEXT,
        "image": [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": GREEDY_IMAGE_PROMPT},
        ],
    }
    answers = {}
    with httpx.Client(base_url=base_url, timeout=300) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        for key, content in prompts.items():
            body = {
                "model": model,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": GREEDY_TOKENS,
                "temperature": 0.0,
                "ignore_eos": True,
                **extra_body,
            }
            response = http.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            answers[key] = response.json()["choices"][0]["message"]["content"]
    return answers


def omp_binding(log_text: str) -> str | None:
    """What vLLM's CPU backend bound its engine's OpenMP threads to, from its start-up log."""
    cores = re.findall(r"core ids=\[([0-9, ]*)\]", log_text)
    reserved = re.findall(r"reserved_cpus=\[([0-9, ]*)\]", log_text)
    if not cores:
        return None
    text = f"vLLM bound its OpenMP threads to CPUs [{cores[-1]}]"
    return text + (f", reserved [{reserved[-1]}] for its other processes" if reserved else "")


def _scrape(run: SystemRun, metrics_url: str, level: str) -> Stages | None:
    try:
        return scrape(metrics_url, run.stage_source)
    except OSError as exc:
        run.notes.append(f"{level}: no stage metrics ({exc})")
        return None


def _measure_levels(
    run: SystemRun, config: CompareConfig, base_url: str, out: Path, progress: bool
) -> None:
    from benchmarks.serve.runner import run_benchmark

    traffic = config.traffic
    warm = asyncio.run(run_benchmark(traffic.warmup(base_url, run.extra_body)))
    if warm.summary.completed == 0:
        errors = {r.error for r in warm.requests}
        raise RuntimeError(f"every warm-up request failed: {'; '.join(map(str, errors))}")
    measure = partial(_measure_level, run, config, base_url + METRICS_PATH, out, progress)
    for index, concurrency in enumerate(traffic.concurrencies):
        bench = partial(traffic.level, base_url, index, run.extra_body)
        run.levels.append(measure(bench, concurrency, None))
    for index, rate in enumerate(traffic.request_rates):
        bench = partial(traffic.rate_level, base_url, index, run.extra_body)
        run.rate_levels.append(measure(bench, 0, rate))


def _measure_level(
    run: SystemRun,
    config: CompareConfig,
    metrics_url: str,
    out: Path,
    progress: bool,
    bench_for: Callable[[int], BenchConfig],
    concurrency: int,
    rate: float | None,
) -> LevelRun:
    """One level (`bench_for(attempt)` gives its requests), run again with new images while
    other processes kept the machine busy; the quietest attempt is kept."""
    from benchmarks.serve.report import write_json
    from benchmarks.serve.runner import run_benchmark
    from benchmarks.serve.workload import Workload

    name = level_name(concurrency, rate)
    attempts: list[LevelRun] = []
    for attempt in range(config.retries + 1):
        wait_quiet(config.quiet_wait_s)
        bench = bench_for(attempt)
        workload = Workload(bench)  # its images are encoded before the CPU window opens
        before = _scrape(run, metrics_url, name)
        watch = CpuWatch()
        watch.start()
        result = asyncio.run(run_benchmark(bench, progress=progress, workload=workload))
        cpu = watch.stop()
        after = _scrape(run, metrics_url, name)
        stages = delta(before, after) if before is not None and after is not None else {}
        attempts.append(LevelRun(concurrency, result, stages, cpu, rate))
        summary = result.summary
        other = None if cpu is None else cpu.other
        idle = None if cpu is None else cpu.by_role[IDLE]
        print(
            f"  {run.name} {name}: {summary.request_throughput:.2f} req/s, "
            f"TTFT mean {summary.ttft_ms.mean or 0:.0f} ms, errors {summary.errors}, "
            f"other processes {other or 0:.2f} CPUs, idle {idle or 0:.2f} CPUs",
            flush=True,
        )
        if other is None or other <= config.busy_cpus:
            break
    kept = min(attempts, key=lambda a: a.other_cpus or 0.0)
    if len(attempts) > 1:
        busy = ", ".join(f"{a.other_cpus or 0:.2f}" for a in attempts)
        run.notes.append(
            f"{name} was run {len(attempts)} times (other processes used {busy} "
            "CPUs); the quietest attempt is reported"
        )
    file = f"c{concurrency}" if rate is None else f"rate{rate:g}"
    write_json(kept.result, out / "raw" / f"{run.name}-{file}.json")
    return kept


def measure_system(
    spec: SystemSpec,
    config: CompareConfig,
    checkpoints: dict[str, Path],
    cache: Path,
    progress: bool = False,
) -> SystemRun:
    """Starts `spec`, measures it at every level, stops it; errors end up in the run."""
    from benchmarks.compare.vllm_native import prepare
    from benchmarks.systems import free_port, launch

    model = checkpoints[spec.checkpoint]
    run = SystemRun(
        spec.name, spec.label, spec.stage_source, model=model.name, extra_body=spec.extra_body
    )
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = config.out / "logs" / f"{spec.name}.log"
    env: dict[str, str] = {}
    try:
        if spec.name == "vllm":
            cpus = config.pinning.coupled if config.pinning.enabled else ""
            plan = prepare(model, port, sizing=config.sizing, cache=cache, cpus=cpus)
            run.command, env = plan.argv, plan.env
            run.notes += plan.notes
            ready_path = "/v1/models"
        else:
            run.command = dvd_argv(spec, model, port, config.sizing, config.pinning)
            ready_path = "/ready"
    except Exception as exc:  # preparing the launch (e.g. installing torchvision) failed
        run.error = f"could not prepare {spec.name}: {exc}"
        return run
    print(f"{spec.name}: starting ({' '.join(run.command)})", flush=True)
    started = time.monotonic()
    try:
        system = launch(
            spec.name,
            run.command,
            base_url,
            log_path,
            ready_path=ready_path,
            timeout_s=config.ready_timeout_s,
            env=env,
        )
    except RuntimeError as exc:
        run.error = f"did not start: {exc}"
        return run
    run.started_s = time.monotonic() - started
    try:
        run.greedy = greedy_answers(base_url, spec.extra_body)
        _measure_levels(run, config, base_url, config.out, progress)
    except Exception as exc:  # a failed system is reported, the next one still runs
        run.error = f"{type(exc).__name__}: {exc}\n{system.log_tail()}"
    finally:
        system.stop()
    binding = omp_binding(log_path.read_text(errors="replace")) if log_path.exists() else None
    if binding:
        run.notes.append(binding)
    return run


def write_report(report: dict[str, Any], out: Path) -> Path:
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
