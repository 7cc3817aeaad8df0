"""Encode time hidden behind decoding, from the per-request stage timings."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.serve.overlap import intersection, measure, union
from tests.stack import Stack


def test_union_and_intersection_of_intervals() -> None:
    assert union([(5, 7), (0, 2), (1, 3), (7, 9), (4, 4)]) == [(0, 3), (5, 9)]
    assert intersection([(0, 3), (5, 9)], [(2, 6), (8, 20)]) == 1 + 1 + 1


def timings(sent: int, queue: int, encode: int, first: int, last: int) -> dict[str, int]:
    return {
        "vision_sent_unix_ns": sent,
        "preprocess_ns": 0,
        "queue_ns": queue,
        "encode_ns": encode,
        "first_token_unix_ns": first,
        "last_token_unix_ns": last,
    }


def test_encoding_of_one_request_during_anothers_decode_counts_as_hidden() -> None:
    # Request A decodes over [10, 30); request B encodes over [15, 25), then decodes.
    a = timings(sent=1, queue=0, encode=5, first=10, last=30)
    b = timings(sent=12, queue=3, encode=10, first=26, last=40)
    overlap = measure([a, b])
    assert overlap is not None
    assert overlap.encode_busy_s == pytest.approx((5 + 10) / 1e9)
    assert overlap.encode_hidden_s == pytest.approx(10 / 1e9)
    assert overlap.encode_hidden_fraction == pytest.approx(10 / 15)
    assert measure([{"first_token_unix_ns": 1, "last_token_unix_ns": 2}]) is None


@pytest.mark.integration
def test_a_steady_stream_of_image_requests_reports_its_overlap(dvd_stack: Stack) -> None:
    from benchmarks.serve.config import BenchConfig
    from benchmarks.serve.runner import run_benchmark

    config = BenchConfig(
        base_url=dvd_stack.base_url,
        concurrency=3,
        num_requests=9,
        image_sizes=((896, 896),),
        image_variants=9,
        output_tokens=24,
        ignore_eos=True,
    )
    result = asyncio.run(run_benchmark(config))
    assert result.summary.errors == 0
    assert all(r.server_timings and r.server_timings["encode_ns"] > 0 for r in result.requests)
    overlap = result.overlap
    assert overlap is not None and overlap.encode_busy_s > 0
    assert overlap.encode_hidden_fraction is not None
    assert 0.0 <= overlap.encode_hidden_fraction <= 1.0
    assert result.to_json()["overlap"]["encode_hidden_fraction"] == overlap.encode_hidden_fraction
