"""The pure parts of overload bounds and deadlines: deadline arithmetic, the gateway's
timeout headers, the tile queue's admission rule, the waiting room, flags and defaults.
The processes that use them are tested in test_overload.py."""

from __future__ import annotations

import argparse
import asyncio
import time

import pytest
import torch

from dvd.deadline import EXPIRY_TOLERANCE_S, Deadline
from dvd.errors import Overloaded
from gateway.deadline import (
    CLIENT,
    SERVER,
    client_margin,
    parse_seconds,
    request_deadline,
)
from gateway.errors import ApiError
from language_server.admission import WaitingRoom
from vision_server.batcher import Cancellation, TileBatcher, TileRun
from vision_server.tile_features import TileFeatures

# ---- dvd.deadline ---------------------------------------------------------------------------


class Context:
    """What Deadline.of_context reads: a gRPC server context's time_remaining()."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


def test_a_missing_deadline_caps_nothing_and_never_expires() -> None:
    for deadline in (Deadline(), Deadline.after(None), Deadline.after(0), Deadline.after(-1)):
        assert deadline.at is None and deadline.remaining() is None
        assert not deadline.expired()
        assert deadline.cap(120.0) == 120.0
    assert Deadline.of_context(Context(None)) == Deadline()


def test_a_deadline_caps_timeouts_by_what_is_left_of_it() -> None:
    before = time.monotonic()
    deadline = Deadline.after(30.0)
    after = time.monotonic()
    assert deadline.at is not None and before + 30.0 <= deadline.at <= after + 30.0
    remaining = deadline.remaining()
    assert remaining is not None and 0 < remaining <= 30.0
    assert deadline.cap(120.0) <= 30.0  # the request's deadline is nearer
    assert deadline.cap(5.0) == 5.0  # the fixed timeout is nearer
    assert not deadline.expired()


def test_a_passed_deadline_has_nothing_left_and_caps_to_zero() -> None:
    passed = Deadline(time.monotonic() - 1.0)
    assert passed.remaining() == 0.0 and passed.cap(120.0) == 0.0 and passed.expired()
    # gRPC reports 0 left once it cancels a handler at its deadline
    assert Deadline.of_context(Context(0.0)).expired()
    assert Deadline.of_context(Context(-0.5)).expired()
    almost = Deadline(time.monotonic() + EXPIRY_TOLERANCE_S / 2)
    assert almost.expired()  # a timer that fires a hair early still counts as the deadline
    assert not Deadline.of_context(Context(10.0)).expired()


# ---- gateway.deadline ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2", 2.0), (" 2.5 ", 2.5), ("600.0", 600.0), ("1e-3", 0.001)],
)
def test_parse_seconds_reads_positive_numbers(text: str, seconds: float) -> None:
    assert parse_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-1", "nan", "inf", "-inf", "ten", "5s", "1,5"])
def test_parse_seconds_refuses_anything_else(text: str) -> None:
    assert parse_seconds(text) is None


def test_without_headers_the_server_timeout_is_the_deadline() -> None:
    deadline = request_deadline({}, 600.0, stream=False)
    assert (deadline.timeout_s, deadline.source) == (600.0, SERVER)
    assert "--request-timeout-s 600" in deadline.reason


def test_an_explicit_timeout_below_the_server_s_wins_whether_streamed_or_not() -> None:
    for stream in (False, True):
        deadline = request_deadline({"x-request-timeout": "2.5"}, 600.0, stream)
        assert (deadline.timeout_s, deadline.source) == (2.5, CLIENT)
        assert "X-Request-Timeout 2.5" in deadline.reason
    capped = request_deadline({"x-request-timeout": "900"}, 600.0, stream=False)
    assert (capped.timeout_s, capped.source) == (600.0, SERVER)


def test_an_unreadable_explicit_timeout_is_a_400_naming_the_header() -> None:
    for bad in ("0", "soon", "-3", "nan"):
        with pytest.raises(ApiError) as refused:
            request_deadline({"x-request-timeout": bad}, 600.0, stream=False)
        assert refused.value.status == 400
        assert refused.value.param == "x-request-timeout"
        assert "X-Request-Timeout" in refused.value.message


def test_the_openai_client_s_read_timeout_bounds_non_streamed_requests_less_a_margin() -> None:
    deadline = request_deadline({"x-stainless-read-timeout": "2.0"}, 600.0, stream=False)
    assert deadline.source == CLIENT
    assert deadline.timeout_s == pytest.approx(2.0 - client_margin(2.0))
    assert 0 < client_margin(2.0) < 2.0
    assert client_margin(600.0) == 1.0 and client_margin(5.0) == pytest.approx(0.5)
    assert "timeout of 2 s" in deadline.reason
    # a client that waits longer than the server's limit leaves that limit in charge
    longer = request_deadline({"x-stainless-read-timeout": "900.0"}, 600.0, stream=False)
    assert (longer.timeout_s, longer.source) == (600.0, SERVER)
    # the client's default (600 s) against the server's default (600 s): the client gives
    # up first, so the deadline ends a second before it
    default = request_deadline({"x-stainless-read-timeout": "600.0"}, 600.0, stream=False)
    assert (default.timeout_s, default.source) == (599.0, CLIENT)


def test_the_read_timeout_is_no_deadline_for_streams_and_garbage_is_ignored() -> None:
    stream = request_deadline({"x-stainless-read-timeout": "2.0"}, 600.0, stream=True)
    assert (stream.timeout_s, stream.source) == (600.0, SERVER)
    garbage = request_deadline({"x-stainless-read-timeout": "soon"}, 600.0, stream=False)
    assert (garbage.timeout_s, garbage.source) == (600.0, SERVER)


def test_the_smallest_of_the_three_limits_wins() -> None:
    headers = {"x-request-timeout": "10", "x-stainless-read-timeout": "4"}
    assert request_deadline(headers, 600.0, stream=False).timeout_s == pytest.approx(3.6)
    assert request_deadline(headers, 600.0, stream=True).timeout_s == 10.0
    assert request_deadline(headers, 3.0, stream=False).timeout_s == 3.0


def test_a_passed_deadline_is_a_504_timeout_error_naming_its_limit() -> None:
    error = request_deadline({"x-request-timeout": "2"}, 600.0, stream=False).exceeded()
    assert (error.status, error.type, error.code) == (504, "timeout_error", "deadline_exceeded")
    assert "within 2 s (X-Request-Timeout 2)" in error.message


# ---- the tile queue's bound ----------------------------------------------------------------


def no_vit(pixels: torch.Tensor, with_vir: bool) -> TileFeatures:
    raise AssertionError("these tests never start the batcher")


def submit(batcher: TileBatcher, call: Cancellation, tiles: int) -> None:
    sink: asyncio.Queue = asyncio.Queue()
    batcher.submit(TileRun("r", 0, 0, torch.zeros(tiles, 3, 2, 2), sink, cancellation=call))


def test_the_queue_admits_calls_up_to_its_bound() -> None:
    batcher = TileBatcher(no_vit, max_batch_tiles=4, max_wait_ms=0, max_queued_tiles=10)
    first, second = Cancellation(), Cancellation()
    assert batcher.admit(first, 6)
    submit(batcher, first, 6)
    assert not batcher.admit(second, 5)  # 11: over the bound, and nothing is reserved
    assert batcher.admitted_tiles == 6
    assert batcher.admit(second, 4)  # 10: at the bound
    assert not batcher.admit(Cancellation(), 1)
    submit(batcher, second, 4)
    assert batcher.queued_tiles == batcher.admitted_tiles == 10


def test_room_is_reserved_while_a_call_is_being_tiled() -> None:
    batcher = TileBatcher(no_vit, max_batch_tiles=4, max_wait_ms=0, max_queued_tiles=10)
    tiling, late = Cancellation(), Cancellation()
    assert batcher.admit(tiling, 8)  # counted from headers; nothing queued yet
    assert batcher.queued_tiles == 0 and batcher.admitted_tiles == 8
    assert not batcher.admit(late, 3)  # its 8 tiles are on their way
    submit(batcher, tiling, 5)  # image by image: the reservation turns into queued tiles
    assert (batcher.queued_tiles, batcher.admitted_tiles) == (5, 8)
    submit(batcher, tiling, 3)
    assert (batcher.queued_tiles, batcher.admitted_tiles) == (8, 8)
    assert batcher.admit(late, 2)


def test_a_call_alone_is_admitted_however_large() -> None:
    batcher = TileBatcher(no_vit, max_batch_tiles=4, max_wait_ms=0, max_queued_tiles=10)
    big = Cancellation()
    assert batcher.admit(big, 26)  # an empty queue: it could never run otherwise
    submit(batcher, big, 13)
    assert not batcher.admit(Cancellation(), 1)  # others wait for it to drain
    assert batcher.admitted_tiles == 26


def test_withdrawn_and_cancelled_tiles_stop_counting() -> None:
    batcher = TileBatcher(no_vit, max_batch_tiles=4, max_wait_ms=0, max_queued_tiles=10)
    gone, kept, newcomer = Cancellation(), Cancellation(), Cancellation()
    assert batcher.admit(gone, 8)
    submit(batcher, gone, 5)
    assert batcher.admit(kept, 2)
    submit(batcher, kept, 2)
    assert not batcher.admit(newcomer, 3)
    assert batcher.withdraw(gone) == 5  # its queued tiles, and its 3 reserved ones go
    assert batcher.withdraw(gone) == 0  # idempotent
    assert batcher.admitted_tiles == 2 and batcher.admit(newcomer, 8)
    kept.cancelled = True  # ended, not yet withdrawn: no longer counted either
    assert batcher.queued_tiles == 0 and batcher.admitted_tiles == 8


def test_a_zero_bound_admits_everything_and_a_negative_one_is_refused() -> None:
    batcher = TileBatcher(no_vit, max_batch_tiles=4, max_wait_ms=0, max_queued_tiles=0)
    assert batcher.admit(Cancellation(), 1000)
    assert batcher.admit(Cancellation(), 1000)
    with pytest.raises(ValueError, match="max_queued_tiles"):
        TileBatcher(no_vit, max_batch_tiles=4, max_wait_ms=0, max_queued_tiles=-1)


@pytest.mark.parametrize(
    ("size", "tiles"), [((448, 448), 1), ((896, 448), 3), ((1344, 896), 7), ((1024, 768), 13)]
)
def test_tiles_are_counted_from_the_header_as_tiling_cuts_them(
    size: tuple[int, int], tiles: int
) -> None:
    from tests.images import png_bytes
    from vision_server.tiling import decode_image, tile_count, tile_image

    data = png_bytes(*size)
    assert tile_count(data, 448, 1, 12, True) == tiles
    assert tile_image(decode_image(data, 10**8), 448, 1, 12, True).num_tiles == tiles
    assert tile_count(data, 448, 1, 12, False) == max(1, tiles - 1)
    assert tile_count(b"not an image", 448, 1, 12, True) == 1  # decoding will report it


# ---- the language server's waiting room ----------------------------------------------------


def test_the_waiting_room_refuses_one_more_than_its_limit_until_a_place_frees() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge

    registry = CollectorRegistry()
    gauge = Gauge("waiting", "", registry=registry)
    refused = Counter("refused", "", registry=registry)
    room = WaitingRoom(2, gauge, refused)
    first, second = room.enter("a"), room.enter("b")
    assert room.waiting == 2 and registry.get_sample_value("waiting") == 2
    with pytest.raises(Overloaded) as full:
        room.enter("c")
    assert "2 requests are waiting" in full.value.message
    assert "--max-waiting-requests" in full.value.message
    assert registry.get_sample_value("refused_total") == 1
    first.leave()
    first.leave()  # idempotent: the first token and the call's end both leave
    assert room.waiting == 1 and not first.waiting and second.waiting
    room.enter("c")
    assert room.waiting == 2


def test_a_waiting_room_without_a_limit_takes_everyone() -> None:
    room = WaitingRoom(0)
    places = [room.enter(str(i)) for i in range(1000)]
    assert room.waiting == 1000
    for place in places:
        place.leave()
    assert room.waiting == 0
    with pytest.raises(ValueError):
        WaitingRoom(-1)


# ---- flags and defaults --------------------------------------------------------------------


def test_vision_queue_bound_defaults_to_batches_and_reads_its_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vision_server.cli import register
    from vision_server.config import QUEUED_BATCHES, VisionServerConfig

    assert VisionServerConfig(model="m").queued_tiles_bound == QUEUED_BATCHES * 32
    assert VisionServerConfig(model="m", max_batch_tiles=8).queued_tiles_bound == 8 * 8
    assert VisionServerConfig(model="m", max_queued_tiles=0).queued_tiles_bound == 0
    with pytest.raises(ValueError, match="max_queued_tiles"):
        VisionServerConfig(model="m", max_queued_tiles=-1)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["vision"]).max_queued_tiles is None
    assert parser.parse_args(["vision", "--max-queued-tiles", "64"]).max_queued_tiles == 64
    monkeypatch.setenv("DVD_VISION_MAX_QUEUED_TILES", "0")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["vision"]).max_queued_tiles == 0


def test_language_waiting_bound_defaults_to_twice_the_batch_and_reads_its_flag() -> None:
    from language_server.cli import config_from_args, register
    from language_server.config import LanguageServerConfig

    assert LanguageServerConfig(model="m").waiting_bound == 2 * 64
    assert LanguageServerConfig(model="m", max_num_seqs=8).waiting_bound == 16
    assert LanguageServerConfig(model="m", max_waiting_requests=0).waiting_bound == 0
    with pytest.raises(ValueError, match="max_waiting_requests"):
        LanguageServerConfig(model="m", max_waiting_requests=-1)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["language", "--model", "m", "--max-waiting-requests", "5"])
    assert config_from_args(args).waiting_bound == 5
    args = parser.parse_args(["language", "--model", "m", "--max-num-seqs", "3"])
    assert config_from_args(args).waiting_bound == 6
