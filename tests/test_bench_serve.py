"""Tests of `dvd bench serve`: statistics and traffic by hand-computed numbers, the client
against an in-process fake server (httpx.MockTransport), and, marked integration, real runs
against a dvd stack on loopback, beside vLLM's own `vllm bench serve` on the same traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import random
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from benchmarks.serve import stats
from benchmarks.serve.client import sse_data
from benchmarks.serve.config import BenchConfig, parse_image_sizes, parse_slos
from benchmarks.serve.record import RequestRecord
from benchmarks.serve.report import format_table, write_json
from benchmarks.serve.runner import BenchmarkResult, run_benchmark
from benchmarks.serve.traffic import Schedule, arrival_offsets, dispatch
from benchmarks.serve.workload import Workload, noisy_gradient_png
from tests.stack import Stack

pytestmark = pytest.mark.timeout(120)

SUMMARY_KEYS = {
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "ttft_ms",
    "tpot_ms",
    "itl_ms",
    "e2e_ms",
    "goodput",
    "completed",
    "errors",
    "duration_s",
}
DISTRIBUTION_KEYS = {"mean", "p50", "p90", "p99"}


def record(
    index: int = 0,
    chunks: tuple[float, ...] = (0.1, 0.2, 0.3),
    e2e: float | None = 0.4,
    prompt: int | None = 10,
    completion: int | None = 3,
    error: str | None = None,
) -> RequestRecord:
    return RequestRecord(
        index,
        chunk_times_s=list(chunks),
        e2e_s=e2e,
        prompt_tokens=prompt,
        completion_tokens=completion,
        error=error,
        status=200 if error is None else 500,
    )


# ---- stats ----------------------------------------------------------------------------------


def test_percentiles_interpolate_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4; rank = 3 * p / 100
    assert stats.percentile(values, 0) == 1.0
    assert stats.percentile(values, 50) == pytest.approx(2.5)
    assert stats.percentile(values, 90) == pytest.approx(3.7)
    assert stats.percentile(values, 99) == pytest.approx(3.97)
    assert stats.percentile(values, 100) == 4.0
    assert stats.percentile([7.0], 99) == 7.0
    ten = [float(i) for i in range(1, 11)]  # rank = 9 * p / 100
    assert stats.percentile(ten, 90) == pytest.approx(9.1)
    assert stats.percentile(ten, 99) == pytest.approx(9.91)
    with pytest.raises(ValueError, match="no values"):
        stats.percentile([], 50)
    with pytest.raises(ValueError, match=r"0\.\.100"):
        stats.percentile([1.0], 101)


def test_distribution_of_values_and_of_none() -> None:
    dist = stats.Distribution.of([10.0, 20.0, 30.0, 40.0])
    assert (dist.count, dist.mean, dist.p50) == (4, 25.0, 25.0)
    assert dist.p90 == pytest.approx(37.0)
    assert dist.p99 == pytest.approx(39.7)
    empty = stats.Distribution.of([])
    assert empty.to_json() == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_tpot_excludes_the_first_token() -> None:
    assert stats.tpot(1.0, 0.2, 5) == pytest.approx(0.2)  # (1.0 - 0.2) / 4
    assert stats.tpot(1.0, 0.2, 1) is None
    assert stats.tpot(None, 0.2, 5) is None
    assert stats.tpot(1.0, None, 5) is None
    # A chunk may carry several tokens: TPOT counts tokens (usage), ITL counts chunks.
    two_chunks = record(chunks=(0.1, 0.5), e2e=0.5, completion=5)
    assert two_chunks.tpot_s == pytest.approx(0.1)
    assert two_chunks.itl_s == pytest.approx([0.4])


def test_summary_counts_errors_and_only_successes_enter_figures() -> None:
    records = [
        record(0, chunks=(0.1, 0.2, 0.3), e2e=0.4, prompt=10, completion=3),
        record(1, chunks=(0.3, 0.5, 0.9), e2e=1.1, prompt=20, completion=5),
        record(2, chunks=(), e2e=0.05, prompt=None, completion=None, error="HTTP 500: boom"),
    ]
    summary = stats.summarize(records, duration_s=2.0, slo_ms={})
    assert (summary.sent, summary.completed, summary.errors) == (3, 2, 1)
    assert summary.request_throughput == pytest.approx(1.0)
    assert summary.output_throughput == pytest.approx(4.0)  # (3 + 5) / 2
    assert summary.total_token_throughput == pytest.approx(19.0)  # (10 + 20 + 8) / 2
    assert summary.ttft_ms.mean == pytest.approx(200.0)  # 100, 300
    assert summary.ttft_ms.p90 == pytest.approx(280.0)
    # TPOT: (0.4 - 0.1) / 2 = 150 ms and (1.1 - 0.3) / 4 = 200 ms.
    assert summary.tpot_ms.mean == pytest.approx(175.0)
    assert summary.tpot_ms.p50 == pytest.approx(175.0)
    # ITL pooled: 100, 100, 200, 400 ms.
    assert summary.itl_ms.mean == pytest.approx(200.0)
    assert summary.itl_ms.p50 == pytest.approx(150.0)
    assert summary.itl_ms.p99 == pytest.approx(394.0)
    assert summary.e2e_ms.p50 == pytest.approx(750.0)
    assert summary.goodput is None
    assert stats.summarize([], 0.0, {}).request_throughput == 0.0


def test_goodput_counts_requests_meeting_every_slo() -> None:
    records = [
        record(0, chunks=(0.1, 0.2, 0.3), e2e=0.4, completion=3),  # ttft 100, tpot 150
        record(1, chunks=(0.3, 0.5, 0.9), e2e=1.1, completion=5),  # ttft 300, tpot 200
        record(2, chunks=(0.05,), e2e=0.05, completion=1),  # ttft 50, no tpot
        record(3, error="timed out after 1 s"),  # fast figures, but failed
    ]
    assert stats.summarize(records, 2.0, {"ttft": 200.0}).goodput == pytest.approx(1.0)
    assert stats.summarize(records, 2.0, {"tpot": 180.0}).goodput == pytest.approx(1.0)
    both = stats.summarize(records, 2.0, {"ttft": 350.0, "tpot": 160.0})
    assert both.goodput == pytest.approx(1.0)  # requests 0 and 2
    assert stats.summarize(records, 2.0, {"e2e": 1000.0}).goodput == pytest.approx(1.0)
    no_content = record(4, chunks=(), e2e=0.1, completion=0)
    assert not stats.meets_slos(no_content, {"ttft": 1000.0})
    assert stats.meets_slos(no_content, {"tpot": 1.0})


# ---- traffic --------------------------------------------------------------------------------


def take(iterator: Any, count: int) -> list[float]:
    return [next(iterator) for _ in range(count)]


def test_constant_arrivals_are_exact() -> None:
    assert take(arrival_offsets(4.0, "constant"), 5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    offsets = take(arrival_offsets(3.0, "constant"), 3001)
    assert offsets[3000] == 1000.0
    assert take(arrival_offsets(math.inf, "poisson"), 3) == [0.0, 0.0, 0.0]


def test_poisson_arrivals_have_the_rate_and_follow_the_seed() -> None:
    rate, count = 5.0, 20_000
    offsets = take(arrival_offsets(rate, "poisson", seed=1), count + 1)
    gaps = stats.gaps(offsets)
    assert offsets[0] == 0.0 and all(g >= 0 for g in gaps)
    assert stats.mean(gaps) == pytest.approx(1 / rate, rel=0.03)
    # Exponential gaps: the standard deviation equals the mean.
    spread = math.sqrt(stats.mean([(g - 1 / rate) ** 2 for g in gaps]))
    assert spread == pytest.approx(1 / rate, rel=0.05)
    assert take(arrival_offsets(rate, "poisson", seed=1), 10) == offsets[:10]
    assert take(arrival_offsets(rate, "poisson", seed=2), 10) != offsets[:10]


def test_schedule_and_config_reject_bad_traffic() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        Schedule()
    with pytest.raises(ValueError, match="arrival"):
        Schedule(request_rate=1.0, arrival="bursty")
    with pytest.raises(ValueError, match="concurrency, request_rate"):
        BenchConfig("http://x")
    with pytest.raises(ValueError, match="concurrency, request_rate"):
        BenchConfig("http://x", concurrency=2, request_rate=1.0)
    with pytest.raises(ValueError, match="max_concurrency"):
        BenchConfig("http://x", concurrency=2, max_concurrency=4)
    with pytest.raises(ValueError, match="num_requests, duration_s"):
        BenchConfig("http://x", concurrency=2, num_requests=None)
    with pytest.raises(ValueError, match="base_url"):
        BenchConfig("127.0.0.1:8000", concurrency=2)
    with pytest.raises(ValueError, match="image_sizes"):
        BenchConfig("http://x", concurrency=1, image_sizes=((0, 448),))
    assert Schedule.of(BenchConfig("http://x", concurrency=3)).max_in_flight == 3
    rate = BenchConfig("http://x", request_rate=2.0, arrival="constant", max_concurrency=5)
    assert Schedule.of(rate) == Schedule(2.0, "constant", 5, 0)


class InFlight:
    """A fake `send` that notes how many calls overlap and when each was due."""

    def __init__(self, hold_s: float = 0.01) -> None:
        self.hold_s = hold_s
        self.now = 0
        self.most = 0
        self.due: list[float] = []

    async def __call__(self, index: int, due_s: float) -> int:
        self.due.append(due_s)
        self.now += 1
        self.most = max(self.most, self.now)
        await asyncio.sleep(self.hold_s * random.Random(index).uniform(0.5, 1.5))
        self.now -= 1
        return index


def test_fixed_concurrency_is_never_exceeded_and_keeps_order() -> None:
    send = InFlight()
    results = asyncio.run(
        dispatch(Schedule(max_in_flight=3), send, max_requests=20, duration_s=None)
    )
    assert results == list(range(20))
    assert send.most == 3


def test_max_concurrency_caps_an_open_loop() -> None:
    send = InFlight()
    schedule = Schedule(request_rate=math.inf, max_in_flight=2)
    results = asyncio.run(dispatch(schedule, send, max_requests=9, duration_s=None))
    assert results == list(range(9))
    assert send.most == 2


def test_constant_rate_sends_on_time_and_duration_stops_it() -> None:
    send = InFlight(hold_s=0.0)
    schedule = Schedule(request_rate=5.0, arrival="constant")
    start = time.perf_counter()
    results = asyncio.run(dispatch(schedule, send, max_requests=None, duration_s=0.5))
    elapsed = time.perf_counter() - start
    assert results == [0, 1, 2]  # due at 0, 0.2, 0.4; 0.6 is past the duration
    assert send.due == [0.0, 0.2, 0.4]
    assert 0.4 <= elapsed < 3.0


def test_duration_stops_a_closed_loop() -> None:
    send = InFlight(hold_s=0.02)
    results = asyncio.run(
        dispatch(Schedule(max_in_flight=2), send, max_requests=None, duration_s=0.2)
    )
    assert 2 <= len(results) <= 40
    assert all(0.0 <= due < 0.2 for due in send.due)
    assert send.most <= 2


# ---- config, workload, CLI ------------------------------------------------------------------


def test_parsers_of_sizes_and_slos() -> None:
    sizes = parse_image_sizes("448x448, 896x896,1344x1008")
    assert sizes == ((448, 448), (896, 896), (1344, 1008))
    assert parse_slos(["ttft:200", "tpot:50.5"]) == {"ttft": 200.0, "tpot": 50.5}
    assert parse_slos("e2el:1000") == {"e2e": 1000.0}  # vLLM's name
    for bad in (["ttft"], ["ttft:fast"], ["itl:5"], ["ttft:0"]):
        with pytest.raises(ValueError, match="slo_ms"):
            parse_slos(bad)
    with pytest.raises(ValueError, match="image_sizes"):
        parse_image_sizes("448*448")


def test_workload_is_deterministic_and_images_have_their_sizes() -> None:
    config = BenchConfig(
        "http://x",
        concurrency=1,
        images_per_request=2,
        image_sizes=((64, 48), (32, 32), (16, 40)),
        prompt_tokens=12,
        seed=3,
    )
    workload = Workload(config)
    first, second = workload.request(0), workload.request(1)
    assert first == Workload(config).request(0)
    assert first.prompt != second.prompt
    assert len(first.prompt.split()) == 12
    assert first.image_sizes == ((64, 48), (32, 32))
    assert second.image_sizes == ((16, 40), (64, 48))
    randomly = Workload(
        BenchConfig(
            "http://x",
            concurrency=1,
            image_order="random",
            seed=3,
            images_per_request=2,
            image_sizes=config.image_sizes,
        )
    )
    picks = [randomly.request(i).image_sizes for i in range(6)]
    assert picks == [randomly.request(i).image_sizes for i in range(6)]
    assert workload.request(0, warmup=True).prompt != first.prompt
    png = noisy_gradient_png(64, 48, seed=3)
    assert png == noisy_gradient_png(64, 48, seed=3)
    assert png != noisy_gradient_png(64, 48, seed=3, variant=1)
    assert Image.open(io.BytesIO(png)).size == (64, 48)
    content = workload.messages(first)[0]["content"]
    assert [part["type"] for part in content] == ["image_url", "image_url", "text"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_image_variants_give_requests_of_a_size_different_images() -> None:
    def urls(variants: int) -> list[str]:
        config = BenchConfig("http://x", concurrency=1, image_variants=variants,
                             image_sizes=((32, 32),))  # fmt: skip
        workload = Workload(config)
        specs = [workload.request(i) for i in range(4)]
        assert [s.image_sizes for s in specs] == [((32, 32),)] * 4
        return [workload.messages(s)[0]["content"][0]["image_url"]["url"] for s in specs]

    assert len(set(urls(1))) == 1
    assert len(set(urls(3))) == 3
    assert urls(3)[0] == urls(3)[3]


def bench_parser() -> argparse.ArgumentParser:
    from benchmarks import cli

    parser = argparse.ArgumentParser(prog="dvd")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_flags_build_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.serve.cli import config_from_args, run

    parser = bench_parser()
    args = parser.parse_args(
        ["bench", "serve", "--base-url", "http://h:1", "--request-rate", "2.5",
         "--arrival", "constant", "--max-concurrency", "4", "--duration", "30",
         "--image-sizes", "448x448,896x896", "--images-per-request", "2",
         "--output-tokens", "8", "--ignore-eos", "--goodput", "ttft:500", "tpot:50",
         "--json", "out.json", "--quiet"]
    )  # fmt: skip
    assert args.func is run
    config = config_from_args(args)
    assert (config.request_rate, config.arrival, config.max_concurrency) == (2.5, "constant", 4)
    assert (config.num_requests, config.duration_s) == (None, 30.0)
    assert config.image_sizes == ((448, 448), (896, 896))
    assert config.ignore_eos and config.output_tokens == 8
    assert dict(config.slo_ms) == {"ttft": 500.0, "tpot": 50.0}
    assert args.json == "out.json" and args.quiet

    monkeypatch.setenv("DVD_BENCH_SERVE_CONCURRENCY", "6")
    env_config = config_from_args(bench_parser().parse_args(["bench", "serve"]))
    assert (env_config.concurrency, env_config.num_requests) == (6, 100)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "serve", "--concurrency", "2", "--request-rate", "1"])
    bad = bench_parser().parse_args(["bench", "serve", "--concurrency", "0"])
    assert run(bad) == 2


# ---- the client against a fake server -------------------------------------------------------


def sse(*events: Any) -> list[bytes]:
    out = []
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        out.append(f"data: {data}\n\n".encode())
    return out


def chunk(content: str | None = None, finish: str | None = None, role: str | None = None) -> dict:
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def usage(prompt: int, completion: int) -> dict:
    return {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}


def good_stream(tokens: int) -> list[bytes]:
    body = [chunk("", role="assistant")]
    body += [chunk(f"t{i} ") for i in range(tokens)]
    return sse(*body, chunk(finish="length"), usage(300, tokens), "[DONE]")


def fake_server(
    reply: Callable[[dict[str, Any]], httpx.Response], seen: list[dict[str, Any]] | None = None
) -> httpx.MockTransport:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake-model"}]})
        assert request.url.path == "/v1/chat/completions"
        payload = json.loads(request.content)
        if seen is not None:
            seen.append(payload)
        return reply(payload)

    return httpx.MockTransport(handler)


def streamed(parts: list[bytes], gap_s: float = 0.0) -> httpx.Response:
    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            if gap_s:
                await asyncio.sleep(gap_s)
            yield part

    return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})


def run_fake(transport: httpx.MockTransport, **fields: Any) -> BenchmarkResult:
    config = BenchConfig(
        "http://fake",
        **{"concurrency": 2, "num_requests": 4, "image_sizes": ((32, 32),), **fields},
    )
    return asyncio.run(run_benchmark(config, transport=transport))


def test_streams_are_timed_per_content_chunk_and_counted_by_usage(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    transport = fake_server(lambda p: streamed(good_stream(p["max_tokens"]), 0.002), seen)
    result = run_fake(transport, output_tokens=5, ignore_eos=True, slo_ms={"ttft": 10_000})
    assert result.model == "fake-model"
    assert [r.index for r in result.requests] == [0, 1, 2, 3]
    for rec in result.requests:
        assert rec.ok and rec.status == 200 and rec.finish_reason == "length"
        assert (rec.prompt_tokens, rec.completion_tokens) == (300, 5)
        assert len(rec.chunk_times_s) == 5  # the empty role chunk is no token
        assert rec.ttft_s is not None and rec.ttft_s > 0
        assert rec.e2e_s is not None and rec.e2e_s >= rec.chunk_times_s[-1]
        assert rec.images == ("32x32",)
    payload = seen[0]
    assert payload["stream"] is True and payload["stream_options"] == {"include_usage": True}
    assert payload["ignore_eos"] is True and payload["max_tokens"] == 5
    assert payload["temperature"] == 0.0 and payload["model"] == "fake-model"
    summary = result.summary
    assert (summary.completed, summary.errors, summary.output_tokens) == (4, 0, 20)
    assert summary.goodput == pytest.approx(summary.request_throughput)
    assert "TTFT (ms)" in format_table(result)

    data = json.loads(write_json(result, tmp_path / "out" / "run.json").read_text())
    assert {"config", "summary", "requests"} <= set(data)
    assert set(data["summary"]) >= SUMMARY_KEYS
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(data["summary"][key]) == DISTRIBUTION_KEYS
    assert data["config"]["model"] == "fake-model"
    assert data["requests"][0]["completion_tokens"] == 5
    assert len(data["requests"][0]["itl_ms"]) == 4
    no_eos = []
    run_fake(fake_server(lambda p: streamed(good_stream(2)), no_eos), output_tokens=2)
    assert "ignore_eos" not in no_eos[0]


def test_every_kind_of_failure_is_recorded() -> None:
    failures = {
        0: httpx.Response(400, json={"error": {"message": "image too large", "code": 400}}),
        1: streamed(sse(chunk("a"), {"error": {"message": "backend died"}})),
        2: streamed(sse(chunk("a"), chunk("b"))),  # no [DONE]
        3: streamed(good_stream(3)),
    }
    order: list[int] = []

    def by_order(payload: dict[str, Any]) -> httpx.Response:
        order.append(len(order))
        return failures[order[-1]]

    result = run_fake(fake_server(by_order), concurrency=1, output_tokens=3)
    errors = [r.error for r in result.requests]
    assert errors[0] == "HTTP 400: image too large" and result.requests[0].status == 400
    assert errors[1] is not None and "backend died" in errors[1]
    assert errors[2] == "the stream ended without data: [DONE]"
    assert errors[3] is None
    assert (result.summary.completed, result.summary.errors) == (1, 3)
    table = format_table(result)
    assert "1 x HTTP 400: image too large" in table


def test_a_request_past_its_deadline_fails() -> None:
    transport = fake_server(lambda p: streamed(good_stream(3), gap_s=0.2))
    result = run_fake(transport, num_requests=2, timeout_s=0.1)
    assert all(r.error == "timed out after 0.1 s" for r in result.requests)
    assert result.summary.errors == 2 and result.summary.ttft_ms.mean is None


def test_unreachable_server_and_failed_warmup_raise() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(ValueError, match="GET http://fake/v1/models failed"):
        run_fake(httpx.MockTransport(refuse))
    with pytest.raises(ValueError, match="warm-up request 0 failed"):
        run_fake(fake_server(lambda p: httpx.Response(503, text="down")), warmup_requests=1)


def test_sse_parser_joins_data_lines_and_skips_comments() -> None:
    async def lines() -> AsyncIterator[str]:
        for line in [": ping", 'data: {"a":', "data: 1}", "", "event: x", "data:[DONE]", ""]:
            yield line

    async def collect() -> list[str]:
        return [data async for data in sse_data(lines())]

    assert asyncio.run(collect()) == ['{"a":\n1}', "[DONE]"]


# ---- against a real dvd stack ---------------------------------------------------------------


def stack_config(stack: Stack, **fields: Any) -> BenchConfig:
    shape = {
        "concurrency": 2,
        "num_requests": 8,
        "images_per_request": 1,
        "image_sizes": ((448, 448),),
        "prompt_tokens": 16,
        "output_tokens": 8,
        "ignore_eos": True,
        "timeout_s": 120.0,
    }
    return BenchConfig(stack.base_url, **{**shape, **fields})


@pytest.mark.integration
def test_bench_serve_against_a_dvd_stack(dvd_stack: Stack, tmp_path: Path) -> None:
    result = asyncio.run(run_benchmark(stack_config(dvd_stack, slo_ms={"ttft": 60_000})))
    assert [r.error for r in result.requests] == [None] * 8, dvd_stack.log_tail()
    assert [r.completion_tokens for r in result.requests] == [8] * 8
    assert all(r.prompt_tokens is not None and r.prompt_tokens > 256 for r in result.requests)
    summary = result.summary
    assert (summary.completed, summary.errors) == (8, 0)
    assert summary.output_tokens == 64
    assert summary.ttft_ms.mean is not None and summary.tpot_ms.mean is not None
    assert summary.goodput is not None
    data = json.loads(write_json(result, tmp_path / "bench.json").read_text())
    assert set(data["summary"]) >= SUMMARY_KEYS
    assert len(data["requests"]) == 8
    assert data["config"]["image_sizes"] == ["448x448"]


VLLM_BENCH = """
import argparse, json, sys
from vllm.benchmarks.serve import add_cli_args, main
parser = argparse.ArgumentParser()
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[2:]))
with open(sys.argv[1], "w") as out:
    json.dump({k: v for k, v in result.items() if isinstance(v, (int, float, str))}, out)
"""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_vllm_bench_serve_runs_unmodified_and_agrees(
    dvd_stack: Stack, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    pytest.importorskip("vllm.benchmarks.serve")
    # vLLM's random-mm dataset needs a tokenizer; the checkpoint's config.json names remote
    # code (auto_map), so give it a folder with the tokenizer files only.
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    for name in TOKENIZER_FILES:
        if (tiny_checkpoint / name).exists():
            shutil.copy(tiny_checkpoint / name, tokenizer / name)
    model = httpx.get(dvd_stack.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
    out = tmp_path / "vllm.json"
    argv = [
        "--backend", "openai-chat", "--base-url", dvd_stack.base_url,
        "--endpoint", "/v1/chat/completions", "--model", model, "--tokenizer", str(tokenizer),
        "--dataset-name", "random-mm", "--num-prompts", "8", "--max-concurrency", "2",
        "--random-mm-base-items-per-request", "1",
        "--random-mm-bucket-config", "{(448, 448, 1): 1.0}",
        "--random-input-len", "16", "--random-output-len", "8", "--ignore-eos",
        "--temperature", "0", "--num-warmups", "1", "--seed", "0", "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", VLLM_BENCH, str(out), *argv],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=tmp_path,
    )
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    theirs = json.loads(out.read_text())
    assert (theirs["completed"], theirs["failed"]) == (8, 0), done.stdout[-3000:]
    assert theirs["total_output_tokens"] == 64

    ours = asyncio.run(run_benchmark(stack_config(dvd_stack, model=model, warmup_requests=1)))
    assert (ours.summary.completed, ours.summary.errors) == (8, 0)
    assert ours.summary.output_tokens == theirs["total_output_tokens"]
    # Same traffic, same server, noisy machine: agree within a factor of 3.
    assert ours.summary.ttft_ms.mean is not None
    ratios = {
        "mean TTFT": ours.summary.ttft_ms.mean / theirs["mean_ttft_ms"],
        "output throughput": ours.summary.output_throughput / theirs["output_throughput"],
        "request throughput": ours.summary.request_throughput / theirs["request_throughput"],
    }
    assert all(1 / 3 <= r <= 3 for r in ratios.values()), (ratios, format_table(ours))
