"""The tcp transport over real loopback sockets: exact bytes in either arrival order,
rejected writers, timeouts, late bytes, pooled connections, and a sender in another process
(which also prints the throughput next to a raw socket's)."""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from dvd.features import FEATURES_NAME, wire_dtype
from dvd.transport import receiver_class, sender_class
from dvd.transport.base import RequestShape
from dvd.transport.tcp import Receiver, Sender, TcpEmission, TcpReception
from dvd.transport.tcp.wire import HEADER, ByteRanges, FrameHeader, parse_address
from dvd.v1 import common_pb2, vision_pb2

ROWS_PER_TILE = 256
HIDDEN = 128


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture
def sender() -> Iterator[Sender]:
    sender = Sender()
    yield sender
    sender.close()


def rows_of(seed: int, tiles: int, dtype: torch.dtype, hidden: int = HIDDEN) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tiles * ROWS_PER_TILE, hidden, generator=generator).to(dtype)


def open_request(
    receiver: Receiver,
    tiles: list[int],
    dtype: torch.dtype = torch.bfloat16,
    hidden: int = HIDDEN,
    spare_tiles: int = 1,
) -> tuple[TcpReception, vision_pb2.EncodeRequest]:
    """A reception with room for spare_tiles more than each image needs, and the
    EncodeRequest a language server would send for it."""
    capacity = [(t + spare_tiles) * ROWS_PER_TILE * hidden * dtype.itemsize for t in tiles]
    reception = receiver.open(RequestShape("req", capacity, hidden, dtype))
    assert isinstance(reception, TcpReception)
    request = vision_pb2.EncodeRequest(
        request_id="req",
        images=[vision_pb2.ImageInput(data=b"img") for _ in tiles],
        feature_dtype=wire_dtype(dtype),
        destination=reception.destination,
    )
    return reception, request


def plan(index: int, tiles: int, hidden: int = HIDDEN) -> vision_pb2.ImagePlan:
    return vision_pb2.ImagePlan(
        image_index=index,
        num_tiles=tiles,
        tokens_per_tile=[ROWS_PER_TILE] * tiles,
        hidden_size=hidden,
    )


def announcements(index: int, rows: torch.Tensor, max_chunk: int) -> list[vision_pb2.FeatureChunk]:
    """The chunks a sender yields for rows, made without sending anything."""
    row_bytes = rows.shape[1] * rows.element_size()
    step = max(1, max_chunk // row_bytes)
    return [
        vision_pb2.FeatureChunk(
            image_index=index,
            row_offset=first,
            descriptor=common_pb2.TensorDescriptor(
                name=FEATURES_NAME,
                dtype=wire_dtype(rows.dtype),
                shape=[min(step, rows.shape[0] - first), rows.shape[1]],
            ),
            written=vision_pb2.RegionWrite(
                offset=first * row_bytes, length=min(step, rows.shape[0] - first) * row_bytes
            ),
        )
        for first in range(0, rows.shape[0], step)
    ]


def settle(reception: TcpReception, timeout_s: float = 10.0) -> None:
    asyncio.run(reception.settle(timeout_s))


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().reshape(-1).view(torch.uint8)

    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(raw(a), raw(b))


def raw_frame(token: bytes, image: int, offset: int, payload: bytes) -> bytes:
    return FrameHeader(token, image, offset, len(payload)).pack() + payload


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_registry_names_tcp() -> None:
    assert receiver_class("tcp") is Receiver
    assert sender_class("tcp") is Sender


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_two_images_arrive_bit_identical(
    receiver: Receiver, sender: Sender, dtype: torch.dtype
) -> None:
    tiles = [3, 2]
    reception, request = open_request(receiver, tiles, dtype)
    images = [rows_of(i, t, dtype) for i, t in enumerate(tiles)]
    emission = sender.open(request)
    max_chunk = 100 * HIDDEN * dtype.itemsize  # 100 rows: chunks cut tiles unevenly
    for index, rows in enumerate(images):
        reception.on_plan(plan(index, tiles[index]))
        # Sent in two calls, as the vision server does tile batch by tile batch.
        for first, part in ((0, rows[:ROWS_PER_TILE]), (ROWS_PER_TILE, rows[ROWS_PER_TILE:])):
            chunks = list(emission.chunks(index, first, part, max_chunk))
            assert all(c.written.length <= max_chunk for c in chunks)
            for chunk in chunks:
                reception.on_chunk(chunk)
    emission.close()
    settle(reception)
    got = reception.features()
    assert all(same_bits(g, want) for g, want in zip(got, images, strict=True))
    reception.release()
    with pytest.raises(ValueError):
        reception.features()


def test_async_chunks_send_from_a_worker_thread(receiver: Receiver, sender: Sender) -> None:
    reception, request = open_request(receiver, [2])
    rows = rows_of(9, 2, torch.bfloat16)
    emission = sender.open(request)
    assert isinstance(emission, TcpEmission)
    reception.on_plan(plan(0, 2))

    async def scenario() -> None:
        async for chunk in emission.achunks(0, 0, rows, 64 * 1024):
            reception.on_chunk(chunk)
        await reception.settle(10.0)

    asyncio.run(scenario())
    assert same_bits(reception.features()[0], rows)
    reception.release()


def test_max_frame_bytes_cuts_frames_at_chunk_boundaries(receiver: Receiver) -> None:
    sender = Sender(max_frame_bytes=150 * HIDDEN * 2)  # 2 chunks of 64 rows per frame
    try:
        reception, request = open_request(receiver, [3])
        rows = rows_of(11, 3, torch.bfloat16)
        emission = sender.open(request)
        assert isinstance(emission, TcpEmission)
        frames = emission._frames(0, 0, rows, 64 * HIDDEN * 2)
        assert [len(chunks) for _, _, chunks in frames] == [2] * 6
        reception.on_plan(plan(0, 3))
        for chunk in emission.chunks(0, 0, rows, 64 * HIDDEN * 2):
            reception.on_chunk(chunk)
        settle(reception)
        assert same_bits(reception.features()[0], rows)
        reception.release()
    finally:
        sender.close()


def test_bytes_before_their_announcement(receiver: Receiver, sender: Sender) -> None:
    reception, request = open_request(receiver, [2])
    rows = rows_of(1, 2, torch.bfloat16)
    chunks = list(sender.open(request).chunks(0, 0, rows, 64 * 1024))
    wait_for(lambda: reception.landed_bytes == [rows.numel() * 2])
    reception.on_plan(plan(0, 2))
    for chunk in chunks:
        reception.on_chunk(chunk)
    settle(reception, timeout_s=0.001)  # nothing left to wait for
    assert same_bits(reception.features()[0], rows)
    reception.release()


def test_announcement_before_its_bytes(receiver: Receiver, sender: Sender) -> None:
    reception, request = open_request(receiver, [2])
    rows = rows_of(2, 2, torch.bfloat16)
    announced = announcements(0, rows, 64 * 1024)
    reception.on_plan(plan(0, 2))
    for chunk in announced:
        reception.on_chunk(chunk)

    async def scenario() -> list[vision_pb2.FeatureChunk]:
        waiting = asyncio.create_task(reception.settle(10.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # nothing was sent yet
        ticks = 0

        async def tick() -> None:  # the loop keeps running while settle waits
            nonlocal ticks
            while not waiting.done():
                ticks += 1
                await asyncio.sleep(0.001)

        ticker = asyncio.create_task(tick())
        sent = await asyncio.to_thread(
            lambda: list(sender.open(request).chunks(0, 0, rows, 64 * 1024))
        )
        await waiting
        await ticker
        assert ticks > 0
        return sent

    assert asyncio.run(scenario()) == announced
    assert same_bits(reception.features()[0], rows)
    reception.release()


def test_an_announcement_may_span_frames(receiver: Receiver) -> None:
    reception, _ = open_request(receiver, [1])
    rows = rows_of(10, 1, torch.bfloat16)
    data = rows.reshape(-1).view(torch.uint8).numpy().tobytes()
    split = 100 * HIDDEN * 2
    reception.on_plan(plan(0, 1))
    for chunk in announcements(0, rows, len(data)):  # one chunk for the whole tile
        reception.on_chunk(chunk)
    writer = socket.create_connection(parse_address(receiver.address))
    with writer:
        writer.sendall(raw_frame(reception.token, 0, split, data[split:]))
        wait_for(lambda: reception.landed_bytes == [len(data) - split])
        with pytest.raises(ValueError, match="did not arrive"):
            settle(reception, timeout_s=0.05)  # half of it is still missing
        writer.sendall(raw_frame(reception.token, 0, 0, data[:split]))
        settle(reception)
    assert same_bits(reception.features()[0], rows)
    reception.release()


def test_byte_ranges_merge_and_cover() -> None:
    ranges = ByteRanges()
    for start, end in [(10, 20), (30, 40), (20, 25), (5, 10), (35, 50), (60, 60)]:
        ranges.add(start, end)
    assert ranges.total == 20 + 20
    assert ranges.covers(5, 25) and ranges.covers(30, 50) and ranges.covers(12, 13)
    assert not ranges.covers(4, 6) and not ranges.covers(24, 31) and not ranges.covers(59, 61)


def test_wrong_token_is_rejected_without_harm(receiver: Receiver, sender: Sender) -> None:
    reception, request = open_request(receiver, [1])
    rows = rows_of(3, 1, torch.bfloat16)
    reception.on_plan(plan(0, 1))
    emission = sender.open(request)
    first, rest = rows[:100], rows[100:]
    for chunk in emission.chunks(0, 0, first, 1 << 20):
        reception.on_chunk(chunk)

    intruder = socket.create_connection(parse_address(receiver.address))
    payload = bytes(range(256)) * (rest.numel() * 2 // 256)
    intruder.sendall(raw_frame(b"\x07" * 16, 0, 100 * HIDDEN * 2, payload))
    assert closed_by_peer(intruder)
    intruder.close()

    for chunk in emission.chunks(0, 100, rest, 1 << 20):
        reception.on_chunk(chunk)
    settle(reception)
    assert same_bits(reception.features()[0], rows)
    reception.release()


@pytest.mark.parametrize(
    "image, offset, length, why",
    [
        (1, 0, HIDDEN * 2, "image 1 of 1"),
        (0, 2 * ROWS_PER_TILE * HIDDEN * 2 - HIDDEN * 2, 2 * HIDDEN * 2, "outside"),
        (0, 3, HIDDEN * 2, "whole rows"),
    ],
)
def test_out_of_range_writes_fail_the_request(
    receiver: Receiver, image: int, offset: int, length: int, why: str
) -> None:
    reception, _ = open_request(receiver, [1])  # room for 2 tiles
    other, _ = open_request(receiver, [1])
    reception.on_plan(plan(0, 1))
    for chunk in announcements(0, rows_of(4, 1, torch.bfloat16), 1 << 20):
        reception.on_chunk(chunk)
    writer = socket.create_connection(parse_address(receiver.address))
    writer.sendall(raw_frame(reception.token, image, offset, b"\x01" * length))
    assert closed_by_peer(writer)
    writer.close()
    with pytest.raises(ValueError, match=why):
        settle(reception)
    with pytest.raises(ValueError):
        reception.features()
    reception.release()
    assert other.landed_bytes == [0]  # another request saw nothing
    other.release()


def test_inconsistent_announcements_and_rows_are_refused(
    receiver: Receiver, sender: Sender
) -> None:
    reception, request = open_request(receiver, [1], spare_tiles=0)
    with pytest.raises(ValueError, match="more than its buffer"):
        reception.on_plan(plan(0, 2))
    reception.on_plan(plan(0, 1))
    chunk = announcements(0, rows_of(5, 1, torch.bfloat16), 1 << 20)[0]
    moved = vision_pb2.FeatureChunk()
    moved.CopyFrom(chunk)
    moved.written.offset += HIDDEN * 2
    with pytest.raises(ValueError, match="outside its rows"):
        reception.on_chunk(moved)
    reception.on_chunk(chunk)
    with pytest.raises(ValueError, match="overlap"):
        reception.on_chunk(chunk)
    with pytest.raises(ValueError, match="overflow"):
        list(sender.open(request).chunks(0, 1, rows_of(5, 1, torch.bfloat16), 1 << 20))
    reception.release()


def test_settle_times_out_when_bytes_never_come(receiver: Receiver) -> None:
    reception, _ = open_request(receiver, [1])
    reception.on_plan(plan(0, 1))
    for chunk in announcements(0, rows_of(6, 1, torch.bfloat16), 1 << 20):
        reception.on_chunk(chunk)
    with pytest.raises(ValueError, match="did not arrive"):
        settle(reception, timeout_s=0.2)
    reception.release()


def test_late_bytes_after_release_are_discarded(receiver: Receiver) -> None:
    sender = Sender(connections_per_receiver=1)
    try:
        old, old_request = open_request(receiver, [1])
        old.release()
        # Same capacity: the new request reuses the released buffer.
        new, new_request = open_request(receiver, [1])
        new.on_plan(plan(0, 1))
        late = sender.open(old_request)
        list(late.chunks(0, 0, torch.ones(ROWS_PER_TILE, HIDDEN, dtype=torch.bfloat16), 1 << 20))
        rows = rows_of(7, 1, torch.bfloat16)
        for chunk in sender.open(new_request).chunks(0, 0, rows, 1 << 20):
            new.on_chunk(chunk)
        settle(new)
        # More late bytes after the new request completed, then a third request on the
        # same connection: once it has landed, the late frame was read (and dropped).
        list(late.chunks(0, 0, torch.ones(ROWS_PER_TILE, HIDDEN, dtype=torch.bfloat16), 1 << 20))
        third, third_request = open_request(receiver, [1])
        third.on_plan(plan(0, 1))
        for chunk in sender.open(third_request).chunks(0, 0, rows, 1 << 20):
            third.on_chunk(chunk)
        settle(third)
        assert same_bits(new.features()[0], rows)
        assert receiver.connections_accepted == 1  # the connection survived the late frames
        new.release()
        third.release()
    finally:
        sender.close()


def test_many_concurrent_requests_share_pooled_connections(receiver: Receiver) -> None:
    sender = Sender(connections_per_receiver=3, max_frame_bytes=64 * 1024)
    failures: list[BaseException] = []

    def one_request(seed: int) -> None:
        try:
            tiles = [1 + seed % 3, 2]
            reception, request = open_request(receiver, tiles)
            images = [rows_of(seed * 10 + i, t, torch.bfloat16) for i, t in enumerate(tiles)]
            emission = sender.open(request)
            for index, rows in enumerate(images):
                reception.on_plan(plan(index, tiles[index]))
                for chunk in emission.chunks(index, 0, rows, 32 * 1024):
                    reception.on_chunk(chunk)
            settle(reception)
            got = reception.features()
            if not all(same_bits(g, w) for g, w in zip(got, images, strict=True)):
                raise AssertionError(f"request {seed} got different bytes")
            reception.release()
        except BaseException as exc:
            failures.append(exc)

    try:
        threads = [threading.Thread(target=one_request, args=(s,)) for s in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures
        assert 1 <= receiver.connections_accepted <= 3
    finally:
        sender.close()


def test_sender_refuses_bad_destinations(sender: Sender) -> None:
    good = vision_pb2.TcpDestination(address="127.0.0.1:9", token=b"t" * 16, image_capacities=[8])
    images = [vision_pb2.ImageInput(data=b"img")]
    with pytest.raises(ValueError, match="no tcp destination"):
        sender.open(vision_pb2.EncodeRequest(images=images))
    for bad in (
        vision_pb2.TcpDestination(address="nohost", token=good.token, image_capacities=[8]),
        vision_pb2.TcpDestination(address="h:70000", token=good.token, image_capacities=[8]),
        vision_pb2.TcpDestination(address=good.address, token=b"short", image_capacities=[8]),
        vision_pb2.TcpDestination(address=good.address, token=good.token, image_capacities=[]),
        vision_pb2.TcpDestination(address=good.address, token=good.token, image_capacities=[-1]),
    ):
        request = vision_pb2.EncodeRequest(
            images=images, destination=vision_pb2.FeatureDestination(tcp=bad)
        )
        with pytest.raises(ValueError):
            sender.open(request)


def test_dead_receiver_makes_sends_fail(receiver: Receiver, sender: Sender) -> None:
    reception, request = open_request(receiver, [1])
    rows = rows_of(8, 1, torch.bfloat16)
    emission = sender.open(request)
    list(emission.chunks(0, 0, rows[:10], 1 << 20))  # a pooled connection exists now
    reception.on_plan(plan(0, 1))
    for chunk in announcements(0, rows, 1 << 20):
        reception.on_chunk(chunk)

    async def close_while_settling() -> None:
        waiting = asyncio.create_task(reception.settle(30.0))
        await asyncio.sleep(0.05)
        receiver.close()
        with pytest.raises(ValueError, match="closed"):
            await waiting

    asyncio.run(close_while_settling())
    with pytest.raises(ConnectionError):
        list(emission.chunks(0, 0, rows, 1 << 20))
    reception.release()


def test_a_receiver_that_stops_reading_times_the_send_out() -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never reads
    sender = Sender(send_timeout_s=0.3)
    try:
        destination = vision_pb2.TcpDestination(
            address=f"127.0.0.1:{listener.getsockname()[1]}",
            token=b"t" * 16,
            image_capacities=[2**30],
        )
        request = vision_pb2.EncodeRequest(
            images=[vision_pb2.ImageInput(data=b"img")],
            destination=vision_pb2.FeatureDestination(tcp=destination),
        )
        rows = torch.zeros(2**16, 512, dtype=torch.float32)  # 128 MiB: more than the buffers
        with pytest.raises(ConnectionError, match="took no bytes"):
            list(sender.open(request).chunks(0, 0, rows, 2**30))
    finally:
        sender.close()
        listener.close()


# A sender in its own process. It reads one command per line on stdin: "tcp ADDRESS TOKEN"
# sends the features as one request and prints the chunks it yielded; "raw PORT" sends the
# same bytes, in the same pieces, down a plain socket; "quit" ends it.
_CHILD = r"""
import json, socket, sys
import torch
from dvd.transport.tcp import Sender
from dvd.v1 import vision_pb2
tiles, rows_per_tile, hidden, max_chunk = (int(a) for a in sys.argv[1:5])
rows = torch.randn(tiles * rows_per_tile, hidden, generator=torch.Generator().manual_seed(0))
rows = rows.to(torch.bfloat16)
data = rows.reshape(-1).view(torch.uint8).numpy().data
sender = Sender()
raw = None
for line in sys.stdin:
    verb, *args = line.split()
    if verb == "tcp":
        destination = vision_pb2.TcpDestination(
            address=args[0], token=bytes.fromhex(args[1]), image_capacities=[len(data)]
        )
        request = vision_pb2.EncodeRequest(
            images=[vision_pb2.ImageInput(data=b"img")],
            destination=vision_pb2.FeatureDestination(tcp=destination),
        )
        chunks = list(sender.open(request).chunks(0, 0, rows, max_chunk))
        print(json.dumps([c.SerializeToString().hex() for c in chunks]), flush=True)
    elif verb == "raw":
        raw = raw or socket.create_connection(("127.0.0.1", int(args[0])))
        for start in range(0, len(data), max_chunk):
            raw.sendall(data[start : start + max_chunk])
    else:
        break
sender.close()
"""


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _RawReader:
    """The baseline: a plain socket read with recv_into into one preallocated buffer, by a
    thread that tells an event loop when each round of `size` bytes is in (the way the
    receiver's settle() learns it)."""

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.size = size
        self.buffer = torch.empty(size, dtype=torch.uint8)
        self.loop = loop
        self.rounds: queue.SimpleQueue[asyncio.Future[None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def expect(self) -> asyncio.Future[None]:
        future = self.loop.create_future()
        self.rounds.put(future)
        return future

    def close(self) -> None:
        self.rounds.put(None)
        self.thread.join(timeout=10)

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        buffer = self.buffer.numpy().data
        with conn, self.listener:
            while (future := self.rounds.get()) is not None:
                got = 0
                while got < self.size:
                    n = conn.recv_into(buffer[got:])
                    if not n:
                        return
                    got += n
                self.loop.call_soon_threadsafe(_set_done, future)


@pytest.mark.parametrize("tiles", [13, 4])
def test_sender_in_another_process_at_hidden_4096(receiver: Receiver, tiles: int) -> None:
    """Checks every byte of each round; prints the median time from asking the sender to
    settle() returning, next to the same bytes over a plain socket (rounds alternate, so
    both see the same machine noise)."""
    hidden, max_chunk, rounds = 4096, 2 * 2**20, 20
    expected = rows_of(0, tiles, torch.bfloat16, hidden)
    size = expected.numel() * 2
    announced = announcements(0, expected, max_chunk)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tiles), str(ROWS_PER_TILE), str(hidden), str(max_chunk)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],  # the repo root, where `dvd` imports from
    )
    stdin, stdout = child.stdin, child.stdout
    assert stdin is not None and stdout is not None
    loop = asyncio.new_event_loop()
    raw_reader = _RawReader(size, loop)
    tcp_seconds, raw_seconds = [], []

    def tcp_round(reception: TcpReception) -> None:
        started = time.perf_counter()
        stdin.write(f"tcp {receiver.address} {reception.token.hex()}\n")
        stdin.flush()
        loop.run_until_complete(reception.settle(60))
        tcp_seconds.append(time.perf_counter() - started)

    def raw_round() -> None:
        landed = raw_reader.expect()
        started = time.perf_counter()
        stdin.write(f"raw {raw_reader.port}\n")
        stdin.flush()
        loop.run_until_complete(asyncio.wait_for(landed, 60))
        raw_seconds.append(time.perf_counter() - started)

    try:
        for round_ in range(1 + rounds):  # round 0 warms up connections and buffers
            # The stream's announcements come before the bytes here, as they overlap in a
            # real request; the chunks the child yielded must be the same ones.
            reception, _ = open_request(receiver, [tiles], hidden=hidden, spare_tiles=0)
            reception.on_plan(plan(0, tiles, hidden))
            for chunk in announced:
                reception.on_chunk(chunk)
            if round_ % 2:  # alternate which goes first
                raw_round()
                tcp_round(reception)
            else:
                tcp_round(reception)
                raw_round()
            sent = json.loads(stdout.readline())
            assert [vision_pb2.FeatureChunk.FromString(bytes.fromhex(c)) for c in sent] == announced
            # Both destinations are read back, so both start the next round as cold.
            assert same_bits(reception.features()[0], expected)
            assert same_bits(raw_reader.buffer.view(torch.bfloat16).view(expected.shape), expected)
            reception.release()
        stdin.write("quit\n")
        stdin.flush()
        assert child.wait(timeout=60) == 0
    finally:
        raw_reader.close()
        loop.close()
        if child.poll() is None:
            child.kill()
            child.wait()
        stdin.close()
        stdout.close()
    gib = size / 2**30
    tcp, raw = gib / statistics.median(tcp_seconds[1:]), gib / statistics.median(raw_seconds[1:])
    print(
        f"\n{tiles} tiles x {ROWS_PER_TILE} x {hidden} bf16 ({size / 2**20:.0f} MiB) from "
        f"another process, median of {rounds}: tcp transport {tcp:.2f} GiB/s, raw socket "
        f"recv_into {raw:.2f} GiB/s ({tcp / raw:.2f} of raw)"
    )


def test_header_layout_is_fixed() -> None:
    assert HEADER.size == 44
    header = FrameHeader(b"k" * 16, 3, 1 << 40, 7)
    assert FrameHeader.unpack(header.pack()) == header
    with pytest.raises(ValueError, match="magic"):
        FrameHeader.unpack(b"XXXX" + header.pack()[4:])
