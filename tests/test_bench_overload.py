"""Tests of `dvd bench overload`'s bookkeeping: the gateway flags of each arm, the order the
arms run in, how a request's record is classified, and the ratios. The benchmark itself
starts servers for minutes and is run by hand (benchmarks/results/overload-cpu/COMMAND.txt).
"""

from __future__ import annotations

import argparse

import pytest

from benchmarks.overload import ADMISSION, UNLIMITED, arm_limits, arm_order, outcome, ratios
from benchmarks.serve.record import RequestRecord


def options(**overrides: int) -> argparse.Namespace:
    values = {"calibration_concurrency": 8, "max_concurrent_requests": 0, "max_queued_requests": -1}
    return argparse.Namespace(**{**values, **overrides})


def test_unlimited_arm_turns_admission_off() -> None:
    assert arm_limits(options(), UNLIMITED) == ["--max-concurrent-requests", "0"]


def test_admission_arm_defaults_to_the_calibration_concurrency_and_as_many_queued() -> None:
    assert arm_limits(options(), ADMISSION) == [
        "--max-concurrent-requests",
        "8",
        "--max-queued-requests",
        "8",
    ]
    explicit = options(max_concurrent_requests=3, max_queued_requests=0)
    assert arm_limits(explicit, ADMISSION)[1::2] == ["3", "0"]


def test_arms_alternate_so_drift_hits_both() -> None:
    assert arm_order(1) == [UNLIMITED, ADMISSION]
    assert arm_order(3) == [UNLIMITED, ADMISSION, ADMISSION, UNLIMITED, UNLIMITED, ADMISSION]


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (200, None, "completed"),
        (429, "HTTP 429: too many requests", "refused_429"),
        (503, "HTTP 503: shutting down", "server_error_5xx"),
        (0, "timed out after 30 s", "client_timeout"),
        (200, "timed out after 30 s", "client_timeout"),
        (0, "connection error: ReadError", "other_failure"),
        (400, "HTTP 400: bad image", "other_failure"),
    ],
)
def test_outcome_of_a_record(status: int, error: str | None, expected: str) -> None:
    assert outcome(RequestRecord(0, status=status, error=error)) == expected


def test_ratios_take_each_arms_median_over_rounds() -> None:
    def run(arm: str, goodput: float, ttft: float, e2e: float) -> dict:
        return {"arm": arm, "goodput": goodput, "ttft_ms": {"p50": ttft}, "e2e_ms": {"p99": e2e}}

    runs = [
        run(UNLIMITED, 1.0, 8000.0, 15000.0),
        run(ADMISSION, 6.0, 2000.0, 3000.0),
        run(ADMISSION, 8.0, 1000.0, 3000.0),
        run(UNLIMITED, 2.0, 8000.0, 15000.0),
    ]
    assert ratios(runs) == pytest.approx({"goodput": 7.0 / 1.5, "ttft_p50": 0.1875, "e2e_p99": 0.2})
