"""`dvd bench compare`'s report (ratios, stage attribution, Markdown, plots) from synthetic
results, its launch plans, and benchmarks/gpu.sh's Python part on the CPU with tiny shapes.

No system is started here: a full comparison takes minutes (see the slow test at the end).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.compare.config import QUICK, Pinning, Sizing, Traffic, cpu_list
from benchmarks.compare.lineup import SystemSpec, dvd_argv, lineup
from benchmarks.compare.markdown import render
from benchmarks.compare.report import (
    attribute,
    build_report,
    compare_stages,
    ratios,
    slower_on,
)
from benchmarks.compare.results import LevelRun, SystemRun
from benchmarks.compare.runner import omp_binding
from benchmarks.compare.stages import StageStat, delta, exposed, means_ms, parse
from benchmarks.compare.vllm_native import server_argv, torchvision_release
from benchmarks.serve.config import BenchConfig
from benchmarks.serve.record import RequestRecord
from benchmarks.serve.runner import BenchmarkResult
from benchmarks.serve.stats import summarize

ROOT = Path(__file__).resolve().parent.parent


def result(
    concurrency: int, e2e_s: float, ttft_s: float, n: int = 8, tokens: int = 16
) -> BenchmarkResult:
    """n successful requests, each `tokens` long, one after another: duration n * e2e_s."""
    records = []
    for i in range(n):
        gap = (e2e_s - ttft_s) / (tokens - 1)
        record = RequestRecord(i, ("448x448",), start_s=i * e2e_s)
        record.chunk_times_s = [ttft_s + k * gap for k in range(tokens)]
        record.e2e_s = e2e_s
        record.completion_tokens = tokens
        record.prompt_tokens = 300
        records.append(record)
    config = BenchConfig(base_url="http://x", concurrency=concurrency, num_requests=n)
    summary = summarize(records, duration_s=n * e2e_s, slo_ms={})
    return BenchmarkResult(config, "m", summary, records, "2026-01-01T00:00:00+00:00")


def stages(**means_ms: float) -> dict[str, StageStat]:
    return {name: StageStat(ms / 1000.0 * 4, 4) for name, ms in means_ms.items()}


def system(name: str, source: str, e2e_s: float, ttft_s: float, **stage_ms: float) -> SystemRun:
    run = SystemRun(name, name, source, model="ckpt")
    run.levels = [LevelRun(c, result(c, e2e_s / c, ttft_s), stages(**stage_ms)) for c in (1, 4)]
    return run


def runs() -> dict[str, SystemRun]:
    return {
        "vllm": system("vllm", "vllm", 1.0, 0.5, queue=10, prefill=400, decode=500),
        "coupled": system(
            "coupled", "dvd", 2.0, 1.0, preprocess=50, encode=300, prompt=5, prefill=200, decode=500
        ),
        "dvd-grpc": system(
            "dvd-grpc",
            "dvd",
            1.25,
            0.75,
            preprocess=50,
            queue=20,
            encode=300,
            transfer=400,
            prompt=5,
            prefill=200,
            decode=500,
        ),
    }


def test_ratios_are_system_over_baseline_for_every_figure() -> None:
    report = build_report(runs(), 4, {"traffic": QUICK.to_json()})
    grpc = report["systems"]["dvd-grpc"]
    assert grpc["concurrency"] == 4
    # 8 requests of 1.25/4 s one after another: 3.2 req/s; vLLM: 4 req/s.
    assert grpc["request_throughput"] == pytest.approx(3.2)
    assert grpc["ratio_to_vllm"]["request_throughput"] == pytest.approx(0.8)
    assert grpc["ratio_to_vllm"]["output_throughput"] == pytest.approx(0.8)
    assert grpc["ratio_to_vllm"]["ttft_ms"]["mean"] == pytest.approx(1.5)
    assert grpc["ratio_to_vllm"]["ttft_ms"]["p99"] == pytest.approx(1.5)
    assert set(grpc["ratio_to_vllm"]["tpot_ms"]) == {"mean", "p50", "p90", "p99"}
    assert grpc["ratio_to_coupled"]["request_throughput"] == pytest.approx(1.6)
    assert report["systems"]["vllm"]["ratio_to_vllm"]["request_throughput"] == pytest.approx(1.0)
    assert set(grpc["by_concurrency"]) == {"1", "4"}
    assert grpc["errors"] == 0
    assert grpc["stages_ms"]["encode"] == {"mean": pytest.approx(300.0), "count": 4}
    json.dumps(report)  # serialisable as it is


def test_ratios_without_a_baseline_are_null() -> None:
    only = {k: v for k, v in runs().items() if k != "vllm"}
    report = build_report(only, 4, {})
    assert report["systems"]["dvd-grpc"]["ratio_to_vllm"] is None
    assert report["baselines"] == ["coupled"]
    figs: dict[str, Any] = {"request_throughput": 1.0, "output_throughput": 0.0}
    figs |= {n: {s: None for s in ("mean", "p50", "p90", "p99")} for n in ("ttft_ms", "tpot_ms")}
    same = ratios(figs, figs)
    assert same is not None and same["output_throughput"] is None  # 0 / 0
    assert ratios(figs, None) is None


def test_slower_on_ignores_differences_within_tolerance() -> None:
    flat = {s: 1.0 for s in ("mean", "p50", "p90", "p99")}
    level = {
        "request_throughput": 0.99,
        "output_throughput": 0.5,
        "ttft_ms": flat,
        "tpot_ms": {**flat, "mean": 1.2},
    }
    assert slower_on(level) == ["output_throughput", "tpot_ms.mean"]
    assert slower_on(None) == []


def test_attribution_against_coupled_names_the_stage_that_grew() -> None:
    rows = compare_stages({"encode": 300.0, "transfer": 100.0}, {"encode": 250.0}, "dvd")
    assert rows[0] == {
        "stage": "transfer",
        "system_ms": 100.0,
        "baseline_ms": 0.0,
        "delta_ms": 100.0,
    }
    assert rows[1]["stage"] == "encode" and rows[1]["delta_ms"] == pytest.approx(50.0)


def test_attribution_against_vllm_groups_the_stages_before_the_first_token() -> None:
    report = build_report(runs(), 4, {})
    found = [
        a
        for a in report["attribution"]
        if a["baseline"] == "vllm" and a["level"] == "concurrency 4"
    ]
    assert [a["system"] for a in found] == ["coupled", "dvd-grpc"]
    entry = found[1]
    assert "request_throughput" in entry["slower_on"]
    top = entry["stages"][0]
    # dvd-grpc's transfer (400 ms) covers its queue and encode (320 ms): 80 ms are its own.
    # Before its first token: 50+20+300+80+5+200 = 655 ms; vLLM: 10+400 = 410 ms.
    assert top["stage"] == "until first token"
    assert top["delta_ms"] == pytest.approx(245.0)
    assert entry["culprit"] == "encode"
    assert "encode" in entry["summary"] and "0.80x" in entry["summary"]
    # dvd-grpc is faster than coupled: nothing to attribute there.
    assert not [a for a in report["attribution"] if a["baseline"] == "coupled"]
    coupled = found[0]
    assert coupled["stages"][0]["stage"] == "until first token"
    assert coupled["culprit"] == "encode"


def test_exposed_transfer_is_what_queue_and_encode_do_not_cover() -> None:
    assert exposed({"queue": 20.0, "encode": 300.0, "transfer": 400.0}) == {
        "queue": 20.0,
        "encode": 300.0,
        "transfer": 80.0,
    }
    assert exposed({"encode": 300.0, "transfer": 5.0})["transfer"] == 0.0
    assert exposed({"decode": 1.0}) == {"decode": 1.0}
    report = build_report(runs(), 4, {})
    assert report["systems"]["dvd-grpc"]["transfer_exposed_ms"] == pytest.approx(80.0)
    assert report["systems"]["dvd-grpc"]["stages_ms"]["transfer"]["mean"] == pytest.approx(400.0)


def test_attribution_when_no_stage_grew() -> None:
    same: dict[str, Any] = {"request_throughput": 0.5, "output_throughput": 0.5}
    same |= {n: {s: 1.0 for s in ("mean", "p50", "p90", "p99")} for n in ("ttft_ms", "tpot_ms")}
    entry = attribute("a", "coupled", "c=1", same, {"encode": 10.0}, {"encode": 20.0}, "dvd")
    assert entry is not None and entry["culprit"] is None
    assert "no stage takes longer" in entry["summary"]
    assert attribute("a", "coupled", "c=1", None, {}, {}, "dvd") is None


PROMETHEUS = """# TYPE dvd_gateway_stage_seconds histogram
dvd_gateway_stage_seconds_bucket{le="0.5",stage="encode"} 2.0
dvd_gateway_stage_seconds_sum{stage="encode"} 0.6
dvd_gateway_stage_seconds_count{stage="encode"} 3.0
dvd_gateway_stage_seconds_sum{stage="decode"} 1.5
dvd_gateway_stage_seconds_count{stage="decode"} 3.0
# TYPE vllm:request_prefill_time_seconds histogram
vllm:request_prefill_time_seconds_sum{engine="0",model_name="m"} 0.9
vllm:request_prefill_time_seconds_count{engine="0",model_name="m"} 3.0
vllm:request_decode_time_seconds_sum{engine="0",model_name="m"} 1.2
vllm:request_decode_time_seconds_count{engine="0",model_name="m"} 3.0
"""


def test_stage_metrics_parse_and_difference() -> None:
    dvd = parse(PROMETHEUS, "dvd")
    assert dvd["encode"] == StageStat(0.6, 3.0)
    assert means_ms(dvd) == {"encode": pytest.approx(200.0), "decode": pytest.approx(500.0)}
    vllm = parse(PROMETHEUS, "vllm")
    assert set(vllm) == {"prefill", "decode"}
    later = {**dvd, "encode": StageStat(1.6, 5.0)}
    assert delta(dvd, later) == {"encode": StageStat(pytest.approx(1.0), 2.0)}  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source"):
        parse(PROMETHEUS, "other")


def test_markdown_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from benchmarks.compare.plots import plot_all

    data = runs()
    data["dvd-vir"] = SystemRun("dvd-vir", "dvd-vir", "dvd", error="did not start: boom")
    meta = {"traffic": QUICK.to_json(), "pinning": Pinning.split([0, 1]).to_json()}
    report = build_report(data, 4, meta)
    assert report["systems"]["dvd-vir"]["ok"] is False
    text = render(report, "dvd bench compare --quick")
    assert "## Headline: concurrency 4" in text
    assert "| dvd-grpc | 3.20 |" in text
    assert "until first token" in text
    assert "dvd-vir: **not measured (fully)**: did not start: boom" in text
    for path in plot_all(data, 4, tmp_path):
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_role_of_names_each_server_by_its_command_line() -> None:
    from benchmarks.compare.interference import role_of

    python = "/repo/.venv/bin/python"
    assert role_of(f"{python} -m dvd vision --model m --port 1") == "vision server"
    assert role_of(f"{python} -m dvd language --model m") == "language server"
    assert role_of(f"{python} -m dvd gateway --port 2") == "gateway"
    assert role_of(f"{python} -m dvd up --model m") == "dvd up"
    assert role_of("VLLM::EngineCore") == "vLLM engine"
    assert role_of("VLLM::Worker_TP0") == "vLLM engine"
    assert role_of(f"{python} -m vllm.entrypoints.openai.api_server --model m") == (
        "vLLM API server"
    )
    assert role_of(f"{python} -m dvd vision-other") == "other (ours)"


def test_cpu_watch_splits_the_machine_between_our_processes_others_and_idle() -> None:
    """A real child that spins and exits is counted under the process that reaped it (this
    one, the load generator), once; the rest is other processes or idle, and the averages
    add up to the CPUs this process may use."""
    from benchmarks.compare.interference import IDLE, LOAD_GENERATOR, OTHER, CpuWatch

    watch = CpuWatch()
    watch.start()
    spin = "import time\nend = time.time() + 1.0\nwhile time.time() < end: pass"
    subprocess.run([sys.executable, "-c", spin, "dvd", "gateway"], check=True, timeout=60)
    use = watch.stop()
    assert use is not None
    # the child was reaped by this process, so its CPU time is this process's (cutime)
    assert use.by_role[LOAD_GENERATOR] > 0
    assert use.by_role[OTHER] >= 0 and use.by_role[IDLE] >= 0
    assert sum(use.by_role.values()) == pytest.approx(use.cpus, rel=0.25)
    per_request = use.per_request_s(completed=2)
    assert LOAD_GENERATOR in per_request and OTHER not in per_request
    assert per_request[LOAD_GENERATOR] == pytest.approx(
        use.by_role[LOAD_GENERATOR] * use.seconds / 2
    )


def test_a_child_reaped_during_the_window_counts_only_its_time_in_it() -> None:
    """Its reaper's cutime holds the child's whole life; what it used before start() is
    not the window's."""
    from benchmarks.compare.interference import LOAD_GENERATOR, CpuWatch

    spin = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"
    child = subprocess.Popen([sys.executable, "-c", spin])
    time.sleep(1.0)
    watch = CpuWatch()
    watch.start()
    stat = Path(f"/proc/{child.pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    before_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    _, _, usage = os.wait4(child.pid, 0)  # reaped here, by the load generator
    child.returncode = 0
    use = watch.stop()
    assert use is not None
    counted_s = use.by_role.get(LOAD_GENERATOR, 0.0) * use.seconds
    in_window_s = usage.ru_utime + usage.ru_stime - before_s
    assert counted_s <= in_window_s + 0.3  # + this process's own few ms, with slack


def test_cpu_watch_names_a_live_child_by_its_role() -> None:
    from benchmarks.compare.interference import CpuWatch

    spin = "import time\nend = time.time() + 60\nwhile time.time() < end: pass"
    child = subprocess.Popen([sys.executable, "-c", spin, "dvd", "vision", "--model", "m"])
    try:
        watch = CpuWatch()
        watch.start()
        subprocess.run([sys.executable, "-c", "import time; time.sleep(1)"], timeout=60)
        use = watch.stop()
    finally:
        child.kill()
        child.wait(timeout=30)
    assert use is not None and use.by_role.get("vision server", 0.0) > 0


def test_the_report_says_where_the_cpus_went() -> None:
    from benchmarks.compare.interference import IDLE, LOAD_GENERATOR, OTHER, CpuUse

    data = runs()
    level = data["dvd-grpc"].levels[1]
    cpu = CpuUse(
        2,
        10.0,
        {LOAD_GENERATOR: 0.1, "vision server": 1.0, "vLLM engine": 0.8, OTHER: 0.8, IDLE: 0.0},
    )
    data["dvd-grpc"].levels[1] = LevelRun(level.concurrency, level.result, level.stages, cpu)
    report = build_report(data, 4, {"traffic": QUICK.to_json()})
    grpc = report["systems"]["dvd-grpc"]
    assert grpc["other_cpus"] == 0.8
    completed = grpc["completed"]
    assert grpc["cpu"]["per_request_s"]["vision server"] == pytest.approx(10.0 / completed)
    assert OTHER not in grpc["cpu"]["per_request_s"]
    text = render(report)
    assert "dvd-grpc c=4: 0.80" in text
    assert "## Where the CPUs went" in text
    row = next(line for line in text.splitlines() if line.startswith("| dvd-grpc | c=4 | 0.10"))
    serving = (10.0 + 8.0) / completed
    assert row.endswith(f"| {serving:.2f} |")
    assert f"1.00 ({10.0 / completed:.2f})" in row


def test_pinning_and_launch_plans(tmp_path: Path) -> None:
    assert cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert Pinning.split([0, 1]) == Pinning("0", "1", "0-1")
    assert Pinning.split([3]) == Pinning("3", "3", "3")
    assert Pinning.split(list(range(8))) == Pinning("0-3", "4-7", "0-7")
    specs = {s.name: s for s in lineup("shm")}
    assert list(specs) == ["vllm", "coupled", "dvd-grpc", "dvd-shm", "dvd-vir", "dvd-up"]
    assert specs["dvd-vir"].extra_body == {"vir_mode": "router"}
    assert specs["dvd-vir"].checkpoint == "vir"
    assert [s.name for s in lineup(None)][-2:] == ["dvd-vir", "dvd-up"]
    pinning, sizing = Pinning("0", "1", "0-1"), Sizing()
    coupled = dvd_argv(specs["coupled"], tmp_path, 8000, sizing, pinning)
    assert coupled[coupled.index("--language-cpus") + 1] == "0-1"
    assert "--coupled" in coupled and "--vision-cpus" not in coupled
    split = dvd_argv(specs["dvd-shm"], tmp_path, 8000, sizing, pinning)
    assert split[split.index("--vision-cpus") + 1] == "0"
    assert split[split.index("--transport") + 1] == "shm"
    assert split[split.index("--kv-cache-gib") + 1] == "1"
    # dvd-up is measured as users start it: the benchmark's pinning never reaches it
    defaults = dvd_argv(specs["dvd-up"], tmp_path, 8000, sizing, pinning)
    assert not {"--vision-cpus", "--language-cpus", "--transport"} & set(defaults)
    vllm = server_argv("python", tmp_path / "m-hf", 9000, sizing)
    assert vllm[vllm.index("--kv-cache-memory-bytes") + 1] == str(2**30)
    assert "--enforce-eager" in vllm and vllm[vllm.index("--served-model-name") + 1] == "m-hf"
    assert torchvision_release("2.13.0+cpu") == "0.28"
    with pytest.raises(ValueError):
        torchvision_release("3.0")
    assert isinstance(specs["vllm"], SystemSpec) and specs["vllm"].coupled


def _compare_args(*argv: str) -> Any:
    import argparse

    from benchmarks.compare.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["compare", *argv])


def _one_level_compare_args(out: Path, preset: str, systems: str, *extra: str) -> Any:
    """A short end-to-end compare: concurrency 1, 448 px images, 8 tokens, 4 requests per
    open-loop rate (when `extra` asks for one)."""
    return _compare_args(
        "--quick",
        "--out",
        str(out),
        "--preset",
        preset,
        "--systems",
        systems,
        "--concurrency",
        "1",
        "--image-sizes",
        "448x448",
        "--output-tokens",
        "8",
        "--rate-requests",
        "4",
        *extra,
    )


def test_qwen3vl_lineup_serves_one_checkpoint_and_has_no_vir(tmp_path: Path) -> None:
    from benchmarks.compare.lineup import QWEN3VL_NO_VIR
    from dvd.checkpoint.family import Family

    specs = {s.name: s for s in lineup("shm", Family.QWEN3_VL)}
    assert list(specs) == ["vllm", "coupled", "dvd-grpc", "dvd-shm", "dvd-up"]
    assert {s.checkpoint for s in specs.values()} == {"hf"}  # one folder for every system
    assert "Qwen3-VL served natively" in specs["vllm"].label
    assert "ViR" in QWEN3VL_NO_VIR and "skipped" in QWEN3VL_NO_VIR
    # the dvd systems' command lines do not depend on the family
    grpc = dvd_argv(specs["dvd-grpc"], tmp_path, 8000, Sizing(), Pinning("0", "1", "0-1"))
    assert grpc[grpc.index("--transport") + 1] == "grpc"
    assert grpc[grpc.index("--model") + 1] == str(tmp_path)
    assert [s.name for s in lineup(None, Family.QWEN3_VL)] == [
        "vllm",
        "coupled",
        "dvd-grpc",
        "dvd-up",
    ]


def test_compare_arguments_pick_the_family_from_the_preset() -> None:
    from benchmarks.compare.cli import _family, _notes, _specs
    from benchmarks.compare.lineup import QWEN3VL_NO_VIR
    from dvd.checkpoint.family import Family

    args = _compare_args("--preset", "qwen3vl-small", "--systems", "vllm,dvd-grpc,dvd-fast")
    family = _family(args.preset)
    assert family is Family.QWEN3_VL and _family("small") is Family.INTERNVL
    specs = _specs(args, family)
    assert [s.name for s in specs][:2] == ["vllm", "dvd-grpc"] and len(specs) == 3
    assert _notes(specs, family)[0] == QWEN3VL_NO_VIR
    assert "torchvision image processor" in _notes(specs, family)[1]
    assert _notes(specs[1:], family) == [QWEN3VL_NO_VIR]  # no vllm: no preprocessor note
    every = _specs(_compare_args("--preset", "qwen3vl-tiny"), family)
    assert "dvd-vir" not in {s.name for s in every}
    with pytest.raises(SystemExit, match="dvd-vir does not apply to Qwen3-VL"):
        _specs(_compare_args("--preset", "qwen3vl-tiny", "--systems", "vllm,dvd-vir"), family)
    with pytest.raises(SystemExit, match="qwen3vl-tiny"):
        _family("qwen3vl-huge")  # the message lists the known presets
    internvl = _specs(_compare_args("--systems", "vllm,dvd-vir"), Family.INTERNVL)
    assert [s.checkpoint for s in internvl] == ["hf", "vir"]
    assert _notes(internvl, Family.INTERNVL)[0].startswith("dvd-vir serves a different model")


def test_checkpoint_plans_name_the_folders_each_system_serves(tmp_path: Path) -> None:
    from benchmarks.compare.checkpoints import CheckpointPlan, make_checkpoints
    from dvd.checkpoint.family import checkpoint_family

    internvl = CheckpointPlan("small", "small-flash", 0, frozenset({"original", "hf"}))
    assert internvl.folder_names() == {
        "hf": "internvl3_5-small-random-hf",
        "original": "internvl3_5-small-random",
    }
    plan = CheckpointPlan("qwen3vl-tiny", "small-flash", 3, frozenset({"hf"}))
    paths, meta = make_checkpoints(plan, tmp_path)
    assert paths == {"hf": tmp_path / "qwen3vl-tiny-random"}
    assert [p.name for p in tmp_path.iterdir()] == ["qwen3vl-tiny-random"]  # nothing else made
    assert checkpoint_family(paths["hf"]).value == "qwen3_vl"
    assert meta["family"] == "qwen3_vl" and meta["layouts"] == {"hf": "qwen3vl-tiny-random"}
    assert "ONE checkpoint `qwen3vl-tiny-random`" in meta["description"]
    assert "seed 3" in meta["description"]
    both, meta = make_checkpoints(
        CheckpointPlan("tiny", "tiny-flash", 0, frozenset({"original", "hf"})), tmp_path / "ivl"
    )
    assert [checkpoint_family(p).value for p in both.values()] == ["internvl", "internvl"]
    assert meta["layouts"] == {
        "original": "internvl3_5-tiny-random",
        "hf": "internvl3_5-tiny-random-hf",
    }
    assert "vir" not in meta and "dvd-vir" not in meta["description"]  # not asked for: not made


def test_markdown_says_which_checkpoint_each_system_served() -> None:
    data = runs()
    data["vllm"].model, data["dvd-grpc"].model = "qwen3vl-small-random", "qwen3vl-small-random"
    data["vllm"].label = "vLLM OpenAI server, Qwen3-VL served natively (ViT in the engine)"
    text = render(build_report(data, 4, {"traffic": QUICK.to_json()}))
    assert (
        "| vllm | vLLM OpenAI server, Qwen3-VL served natively (ViT in the engine) "
        "| `qwen3vl-small-random` |" in text
    )
    assert "| dvd-grpc | dvd-grpc | `qwen3vl-small-random` |" in text


def test_traffic_levels_use_their_own_seeds_and_distinct_images() -> None:
    traffic = Traffic(concurrencies=(1, 4), min_requests=8, requests_per_client=4)
    first, second = (
        traffic.level("http://x", 0),
        traffic.level("http://x", 1, {"vir_mode": "router"}),
    )
    assert (first.concurrency, first.num_requests, second.num_requests) == (1, 8, 16)
    assert first.seed != second.seed != traffic.warmup("http://x").seed
    assert second.image_variants == 16 and second.ignore_eos
    assert dict(second.extra_body) == {"vir_mode": "router"}


def test_open_loop_levels_send_poisson_arrivals_with_their_own_seeds() -> None:
    traffic = Traffic(concurrencies=(4,), request_rates=(0.5, 2.0), requests_per_rate=12)
    slow, fast = traffic.rate_level("http://x", 0), traffic.rate_level("http://x", 1, {"k": 1})
    assert (slow.concurrency, slow.request_rate, slow.arrival) == (None, 0.5, "poisson")
    assert (slow.num_requests, slow.image_variants, fast.request_rate) == (12, 12, 2.0)
    seeds = {
        slow.seed,
        fast.seed,
        traffic.level("http://x", 0).seed,
        traffic.warmup("http://x").seed,
    }
    assert len(seeds) == 4
    assert traffic.rate_level("http://x", 0, attempt=1).seed != slow.seed
    assert dict(fast.extra_body) == {"k": 1}
    assert traffic.to_json()["request_rates"] == [0.5, 2.0]
    for bad in ((0.0,), (-1.0,), (float("inf"),)):
        with pytest.raises(ValueError, match="request_rates"):
            Traffic(request_rates=bad)
    with pytest.raises(ValueError, match="requests_per_rate"):
        Traffic(request_rates=(1.0,), requests_per_rate=0)
    with pytest.raises(SystemExit, match="--request-rates"):
        from benchmarks.compare.cli import _traffic

        _traffic(_compare_args("--request-rates", "1,fast"))


def test_open_loop_levels_get_ratios_to_the_baseline_at_the_same_rate() -> None:
    from benchmarks.compare.rounds import render_summary, summarize

    data = runs()
    timings = {"vllm": ((2.0, 1.0), (2.0, 1.0)), "dvd-grpc": ((1.0, 0.25), (4.0, 2.0))}
    for name, per_rate in timings.items():
        data[name].rate_levels = [
            LevelRun(0, result(1, e2e_s, ttft_s), stages(encode=100), None, rate)
            for rate, (e2e_s, ttft_s) in zip((0.5, 0.9), per_rate, strict=True)
        ]
    report = build_report(data, 4, {"traffic": Traffic(request_rates=(0.5, 0.9)).to_json()})
    grpc = report["systems"]["dvd-grpc"]
    assert set(grpc["by_rate"]) == {"0.5", "0.9"}
    assert grpc["by_rate"]["0.5"]["ratio_to_vllm"]["ttft_ms"]["p50"] == pytest.approx(0.25)
    assert grpc["by_rate"]["0.9"]["ratio_to_vllm"]["ttft_ms"]["p50"] == pytest.approx(2.0)
    assert grpc["by_rate"]["0.5"]["stages_ms"]["encode"]["mean"] == pytest.approx(100.0)
    assert report["systems"]["coupled"]["by_rate"] == {}  # it ran no open-loop level
    levels = {(a["system"], a["baseline"], a["level"]) for a in report["attribution"]}
    assert ("dvd-grpc", "vllm", "0.9 requests/s") in levels  # slower there, and said so
    assert ("dvd-grpc", "vllm", "0.5 requests/s") not in levels
    text = render(report)
    assert "## Open loop: requests arriving at a fixed rate" in text
    assert "### 0.9 requests/s" in text
    assert "- dvd-grpc vs vllm at 0.9 requests/s: " in text
    stage_row = next(line for line in text.splitlines() if line.startswith("| dvd-grpc | 0.9"))
    assert "100.0" in stage_row  # the stage table has the open-loop level's encode time
    summary = summarize([report, report])
    assert list(summary["levels"]) == ["c=1", "c=4", "0.5 req/s", "0.9 req/s"]
    assert summary["mean_ratios"]["0.5 req/s"]["dvd-grpc"]["ttft_p50_ratio"] == pytest.approx(0.25)
    assert "## Open loop, 0.9 req/s" in render_summary(summary, report, "")


def test_omp_binding_from_a_vllm_log() -> None:
    log = "x [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0]\n y \treserved_cpus=[1]\n"
    assert (
        omp_binding(log)
        == "vLLM bound its OpenMP threads to CPUs [0], reserved [1] for its other processes"
    )
    assert omp_binding("nothing") is None


def test_sitecustomize_defines_torchvision_schemas_on_import(tmp_path: Path) -> None:
    """The hook defines the schemas only when `torchvision` is imported (here a stub that
    checks they exist, like torchvision's _meta_registrations does)."""
    stub = tmp_path / "torchvision"
    stub.mkdir()
    (stub / "__init__.py").write_text(
        "import torch\n"
        "torch.library.register_fake('torchvision::nms')(lambda dets, scores, iou: dets)\n"
    )
    site = ROOT / "benchmarks" / "compare" / "vllm_site"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(tmp_path)])}
    code = "import sys; assert 'torch' not in sys.modules; import torchvision; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# benchmarks/gpu.sh: its Python part on the CPU with tiny shapes.


def test_gpu_shapes_are_the_real_internvit_sizes() -> None:
    import torch

    from benchmarks.gpu.shapes import SHAPES
    from vision_server.model import InternVLVision

    small, big = SHAPES["internvit-300m"], SHAPES["internvit-6b"]
    assert (small.tokens, small.tokens_out) == (1025, 256)
    assert 0.72e12 < small.flops_per_tile() < 0.76e12  # ~720 GFLOP of ViT + the projector
    assert 11.5e12 < big.flops_per_tile() < 12.5e12
    with torch.device("meta"):
        vit_300m = InternVLVision(small.internvl_config()).vision_model
        vit_6b = InternVLVision(big.internvl_config()).vision_model
    assert 0.28e9 < sum(p.numel() for p in vit_300m.parameters()) < 0.32e9
    assert 5.5e9 < sum(p.numel() for p in vit_6b.parameters()) < 6.0e9
    assert big.feature_bytes(1) == 256 * 5120 * 2


def test_gpu_sh_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_LIMIT_S": "240"}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--cpu-smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["problems"] == []
    assert report["matmul"]["tflops"] > 0
    for entry in report["vit"].values():
        assert [row["batch"] for row in entry["batches"]] == [1, 2]
        assert all(row["tiles_per_s"] > 0 and row["fraction_of_matmul"] for row in entry["batches"])
    rows = report["transfer"]["results"]
    assert {row["transport"] for row in rows} == {"grpc", "shm"}
    assert all(row["gib_per_s"] > 0 for row in rows)
    assert set(report["transfer"]["ceilings_gib_per_s"]) == {
        "d2h_pageable",
        "d2h_pinned",
        "memcpy",
        "socket",
    }
    summary = (out / "summary.txt").read_text()
    assert "tiles/s" in summary and "transfer shm" in summary


def test_gpu_check_without_a_gpu_says_so(tmp_path: Path) -> None:
    import torch

    from benchmarks.gpu.main import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["--out", str(tmp_path)]) == 2
    report = json.loads((tmp_path / "report.json").read_text())
    assert "no CUDA device" in report["problems"][0]


def test_gpu_check_stubs_import_here() -> None:
    from benchmarks.gpu.stubs import import_error

    assert import_error() is None


@pytest.mark.slow
@pytest.mark.integration
def test_compare_runs_vllm_and_coupled_on_the_tiny_preset(tmp_path: Path) -> None:
    """vLLM's own server and dvd --coupled on the same tiny weights answer alike."""
    out = tmp_path / "compare"
    args = _one_level_compare_args(
        out, "tiny", "vllm,coupled", "--vir-preset", "tiny-flash", "--request-rates", "2"
    )
    assert args.func(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["systems"]) == {"vllm", "coupled"}
    coupled = report["systems"]["coupled"]
    assert coupled["by_rate"]["2"]["completed"] == 4
    assert coupled["by_rate"]["2"]["ratio_to_vllm"]["ttft_ms"]["p50"] > 0
    assert coupled["cpu"]["by_role"]["language server"] > 0  # the coupled server itself
    assert "## Open loop" in (out / "report.md").read_text()
    assert coupled["ok"] and coupled["errors"] == 0
    assert coupled["greedy"]["matches_vllm"] == {"text": True, "image": True}
    assert coupled["ratio_to_vllm"]["request_throughput"] > 0
    assert (out / "report.md").exists() and (out / "ttft.png").exists()


def _round_report(vllm_ttft: float, dvd_ttft: float, dvd_rate: float) -> dict[str, Any]:
    def level(rate: float, ttft: float, base: tuple[float, float] | None) -> dict[str, Any]:
        stats = {"mean": ttft, "p50": ttft, "p90": ttft * 2, "p99": ttft * 3}
        ratios = None
        if base is not None:
            ratios = {"request_throughput": rate / base[0], "ttft_ms": {"p50": ttft / base[1]}}
        return {
            "request_throughput": rate,
            "ttft_ms": stats,
            "tpot_ms": {"mean": 50.0, "p50": 50.0, "p90": 60.0, "p99": 70.0},
            "errors": 0,
            "ratio_to_vllm": ratios,
            "stages_ms": {"encode": {"mean": 300.0}},
        }

    return {
        "traffic": {"concurrencies": [8]},
        "baselines": ["vllm"],
        "systems": {
            "vllm": {"by_concurrency": {"8": level(1.0, vllm_ttft, (1.0, vllm_ttft))}},
            "dvd-up": {"by_concurrency": {"8": level(dvd_rate, dvd_ttft, (1.0, vllm_ttft))}},
        },
    }


def test_rounds_are_summarised_against_their_own_baseline() -> None:
    from benchmarks.compare.rounds import render_summary, summarize

    rounds = [_round_report(2000.0, 1000.0, 1.5), _round_report(4000.0, 3000.0, 1.3)]
    summary = summarize(rounds)
    first, second = summary["levels"]["c=8"]["dvd-up"]
    assert (first["ttft_p50_ratio"], second["ttft_p50_ratio"]) == (0.5, 0.75)
    assert summary["mean_ratios"]["c=8"]["dvd-up"]["ttft_p50_ratio"] == pytest.approx(0.625)
    assert summary["mean_ratios"]["c=8"]["dvd-up"]["throughput_ratio"] == pytest.approx(1.4)
    text = render_summary(summary, rounds[0], "dvd bench compare --rounds 2")
    assert "| 2 | dvd-up | 1.300 | 3000 | 6000 | 9000 |" in text
    assert "dvd-up req/s 1.40x, TTFT p50 0.62x" in text
    assert "| 2 | dvd-up | c=8 | - | - | 300.0 |" in text  # the stage table: encode only


@pytest.mark.slow
@pytest.mark.integration
def test_compare_runs_vllm_and_dvd_grpc_on_one_qwen3vl_checkpoint(tmp_path: Path) -> None:
    """vLLM's own server (its Qwen3-VL, ViT in the engine) and dvd over grpc serve the one
    qwen3vl-tiny folder and answer alike; the report names the folder and skips dvd-vir.
    About 2 min on a shared 2-core machine (two servers started, 8 requests each)."""
    out = tmp_path / "compare"
    args = _one_level_compare_args(
        out, "qwen3vl-tiny", "vllm,dvd-grpc", "--quiet-wait-s", "0", "--retries", "0"
    )
    assert args.func(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["systems"]) == {"vllm", "dvd-grpc"}
    assert {s["model"] for s in report["systems"].values()} == {"qwen3vl-tiny-random"}
    assert report["checkpoint"]["family"] == "qwen3_vl"
    grpc = report["systems"]["dvd-grpc"]
    assert grpc["ok"] and grpc["errors"] == 0
    assert grpc["greedy"]["matches_vllm"] == {"text": True, "image": True}
    assert grpc["ratio_to_vllm"]["request_throughput"] > 0
    text = (out / "report.md").read_text()
    assert "| vllm | vLLM OpenAI server, Qwen3-VL served natively" in text
    assert "dvd-vir does not apply to Qwen3-VL" in text
