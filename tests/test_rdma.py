"""The rdma transport against the FAKE verbs of dvd/transport/rdma/fake_verbs.py.

No RDMA device exists where these tests run, so the queue pairs, registrations and writes
are the in-process fake's; the gRPC RdmaConnect between receiver and sender is real (a
grpc.aio server on 127.0.0.1). What the real pyverbs path does here, where there is no
device, is tested too: it refuses with a clear error. benchmarks/rdma_check.sh is the check
for a host with a device.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import torch

from dvd.features import FEATURES_NAME, wire_dtype
from dvd.transport import grpc_stream, rdma, receiver_class, sender_class
from dvd.transport.base import Emission, Reception, RequestShape
from dvd.transport.first_fit import ALIGNMENT, FirstFit
from dvd.transport.rdma import fake_verbs
from dvd.transport.rdma.fake_verbs import FakeFabric, FakeQpState
from dvd.transport.rdma.verbs import Endpoint, RdmaUnavailable, WcStatus
from dvd.v1 import common_pb2, vision_pb2, vision_pb2_grpc

HIDDEN = 64
TILE_ROWS = 256
ROW_BYTES = HIDDEN * 2  # bf16
CAPACITY = 4 * TILE_ROWS * ROW_BYTES  # room for 4 tiles per image
CHUNK_BYTES = 100 * ROW_BYTES  # chunks cut across tile boundaries


class _RdmaServicer(vision_pb2_grpc.VisionServiceServicer):
    """Just the RdmaConnect of vision_server/service.py, in front of a Sender."""

    def __init__(self, sender: rdma.Sender) -> None:
        self.sender = sender

    async def RdmaConnect(
        self, request: vision_pb2.RdmaConnectRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.RdmaConnectResponse:
        try:
            return self.sender.connect(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rdma connect: {exc}")
            raise


@asynccontextmanager
async def vision_server(
    sender: rdma.Sender,
) -> AsyncIterator[tuple[str, vision_pb2_grpc.VisionServiceStub]]:
    server = grpc.aio.server()
    vision_pb2_grpc.add_VisionServiceServicer_to_server(_RdmaServicer(sender), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        yield address, vision_pb2_grpc.VisionServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


@pytest.fixture
def fabric() -> FakeFabric:
    """A fabric of its own per test (fake_verbs.FABRIC is the process-wide one)."""
    return FakeFabric()


@pytest.fixture
def receiver(fabric: FakeFabric) -> Iterator[rdma.Receiver]:
    r = rdma.Receiver(buffer_bytes=2**20, open_device=fabric.open_device)
    yield r
    r.close()


@pytest.fixture
def sender(fabric: FakeFabric) -> Iterator[rdma.Sender]:
    s = rdma.Sender(open_device=fabric.open_device)
    yield s
    s.close()


def features(tiles: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tiles * TILE_ROWS, HIDDEN, generator=generator).to(torch.bfloat16)


def shape(connection_id: str, images: int = 2, request_id: str = "r1") -> RequestShape:
    return RequestShape(request_id, [CAPACITY] * images, HIDDEN, torch.bfloat16, connection_id)


def request_for(reception: Reception, images: int) -> vision_pb2.EncodeRequest:
    request = vision_pb2.EncodeRequest(
        request_id="r1", images=[vision_pb2.ImageInput(data=b"img")] * images
    )
    if reception.destination is not None:
        request.destination.CopyFrom(reception.destination)
    return request


def plan(index: int, tiles: int) -> vision_pb2.ImagePlan:
    return vision_pb2.ImagePlan(
        image_index=index, num_tiles=tiles, tokens_per_tile=[TILE_ROWS] * tiles, hidden_size=HIDDEN
    )


def tile_chunks(
    emission: Emission, index: int, rows: torch.Tensor
) -> Iterable[vision_pb2.FeatureChunk]:
    """What the vision server does: each tile's rows as soon as its batch is done."""
    for first in range(0, rows.shape[0], TILE_ROWS):
        yield from emission.chunks(index, first, rows[first : first + TILE_ROWS], CHUNK_BYTES)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int16)


async def transfer(
    receiver: rdma.Receiver, sender: rdma.Sender, connection_id: str, images: list[torch.Tensor]
) -> tuple[Reception, list[vision_pb2.FeatureChunk]]:
    """One request end to end; returns the settled reception and the chunks that carried it."""
    reception = receiver.open(shape(connection_id, len(images)))
    emission = sender.open(request_for(reception, len(images)))
    sent = []
    for index, rows in enumerate(images):
        reception.on_plan(plan(index, rows.shape[0] // TILE_ROWS))
        for chunk in tile_chunks(emission, index, rows):
            reception.on_chunk(chunk)
            sent.append(chunk)
    emission.close()
    await reception.settle(5.0)
    return reception, sent


def test_registry_names_the_rdma_backend() -> None:
    assert receiver_class("rdma") is rdma.Receiver
    assert sender_class("rdma") is rdma.Sender


def test_round_trip_is_bit_identical(
    fabric: FakeFabric, receiver: rdma.Receiver, sender: rdma.Sender
) -> None:
    images = [features(3, seed=1), features(3, seed=2)]  # 2 images x 3 tiles x 256 rows

    async def scenario() -> None:
        async with vision_server(sender) as (address, stub):
            connection_id = await receiver.attach(address, stub)
        assert connection_id in sender.peers
        reception, sent = await transfer(receiver, sender, connection_id, images)
        got = reception.features()
        assert [t.shape for t in got] == [(3 * TILE_ROWS, HIDDEN)] * 2
        for image, tensor in zip(images, got, strict=True):
            assert torch.equal(bits(image), bits(tensor))
        # Only completions travelled in the stream; every chunk was one RDMA write.
        assert all(not c.data and c.written.length for c in sent)
        assert max(c.written.length for c in sent) <= CHUNK_BYTES
        assert fabric.writes == len(sent) and not fabric.errors
        reception.release()

    asyncio.run(scenario())


def test_concurrent_requests_on_one_connection_get_their_own_rows(
    receiver: rdma.Receiver, sender: rdma.Sender
) -> None:
    async def scenario() -> None:
        async with vision_server(sender) as (address, stub):
            connection_id = await receiver.attach(address, stub)
        a_rows, b_rows = features(2, seed=3), features(1, seed=4)
        a = receiver.open(shape(connection_id, 1, "a"))
        b = receiver.open(shape(connection_id, 1, "b"))
        a_emission = sender.open(request_for(a, 1))
        b_emission = sender.open(request_for(b, 1))
        a.on_plan(plan(0, 2))
        b.on_plan(plan(0, 1))
        # Interleaved, as two Encode streams would be; b's chunks arrive before a's.
        a_chunks = list(tile_chunks(a_emission, 0, a_rows))
        for chunk in tile_chunks(b_emission, 0, b_rows):
            b.on_chunk(chunk)
        for chunk in a_chunks:
            a.on_chunk(chunk)
        await asyncio.gather(a.settle(5.0), b.settle(5.0))
        assert torch.equal(bits(a.features()[0]), bits(a_rows))
        assert torch.equal(bits(b.features()[0]), bits(b_rows))
        a.release()
        b.release()

    asyncio.run(scenario())


def test_a_chunk_announced_before_its_write_lands_waits_for_it(
    receiver: rdma.Receiver, sender: rdma.Sender
) -> None:
    rows = features(1, seed=5)

    async def scenario() -> None:
        async with vision_server(sender) as (address, stub):
            connection_id = await receiver.attach(address, stub)
        reception = receiver.open(shape(connection_id, 1))
        emission = sender.open(request_for(reception, 1))
        reception.on_plan(plan(0, 1))
        chunks = list(emission.chunks(0, 0, rows, CHUNK_BYTES))  # written, not yet polled
        assert isinstance(reception, rdma.RdmaReception)
        # Take the completions away as if they had not arrived, announce, then give them back.
        link = reception.link
        held = link.qp.poll(rdma.RECV_DEPTH)
        assert len(held) == len(chunks)
        for chunk in chunks:
            reception.on_chunk(chunk)
        assert len(reception.announced) == len(chunks)
        for completion in held:
            link.qp.post_receive(completion.wr_id)
            assert completion.imm is not None
            reception.on_landed(link, completion.imm, completion.byte_len)
        await reception.settle(1.0)
        assert torch.equal(bits(reception.features()[0]), bits(rows))
        reception.release()

    asyncio.run(scenario())


def test_settle_times_out_when_a_write_never_lands(
    receiver: rdma.Receiver, sender: rdma.Sender
) -> None:
    async def scenario() -> None:
        async with vision_server(sender) as (address, stub):
            connection_id = await receiver.attach(address, stub)
        reception = receiver.open(shape(connection_id, 1))
        reception.on_plan(plan(0, 1))
        destination = reception.destination
        assert destination is not None
        offset = destination.rdma.image_offsets[0]
        # The stream announces rows that no RDMA write ever carried.
        reception.on_chunk(
            vision_pb2.FeatureChunk(
                image_index=0,
                row_offset=0,
                descriptor=_descriptor(TILE_ROWS),
                written=vision_pb2.RegionWrite(offset=offset, length=TILE_ROWS * ROW_BYTES),
            )
        )
        with pytest.raises(ValueError, match="did not complete within"):
            await reception.settle(0.05)
        with pytest.raises(ValueError, match="settle"):
            reception.features()
        reception.release()

    asyncio.run(scenario())


def _descriptor(rows: int) -> common_pb2.TensorDescriptor:
    return common_pb2.TensorDescriptor(
        name=FEATURES_NAME, dtype=wire_dtype(torch.bfloat16), shape=[rows, HIDDEN]
    )


def test_receiver_rejects_chunks_outside_their_rows(
    receiver: rdma.Receiver, sender: rdma.Sender
) -> None:
    async def scenario() -> None:
        async with vision_server(sender) as (address, stub):
            connection_id = await receiver.attach(address, stub)
        reception = receiver.open(shape(connection_id, 1))
        destination = reception.destination
        assert destination is not None
        offset = destination.rdma.image_offsets[0]
        with pytest.raises(ValueError, match="more than its region holds"):
            reception.on_plan(plan(0, 5))  # 5 tiles > the 4 the region holds
        with pytest.raises(ValueError, match="unknown image"):
            reception.on_plan(plan(1, 1))
        reception.on_plan(plan(0, 1))

        def chunk(row_offset: int, rows: int, at: int) -> vision_pb2.FeatureChunk:
            return vision_pb2.FeatureChunk(
                image_index=0,
                row_offset=row_offset,
                descriptor=_descriptor(rows),
                written=vision_pb2.RegionWrite(offset=at, length=rows * ROW_BYTES),
            )

        with pytest.raises(ValueError, match="written outside its rows"):
            reception.on_chunk(chunk(0, 10, offset + ROW_BYTES))
        with pytest.raises(ValueError, match="written outside its rows"):
            reception.on_chunk(chunk(0, 10, receiver.size))  # past the buffer
        with pytest.raises(ValueError, match="exceed image 0"):
            reception.on_chunk(chunk(TILE_ROWS - 5, 10, offset + (TILE_ROWS - 5) * ROW_BYTES))
        with pytest.raises(ValueError, match="before its plan"):
            reception.on_chunk(vision_pb2.FeatureChunk(image_index=3, descriptor=_descriptor(1)))
        reception.release()

    asyncio.run(scenario())


def test_sender_rejects_bad_destinations(receiver: rdma.Receiver, sender: rdma.Sender) -> None:
    async def scenario() -> None:
        async with vision_server(sender) as (address, stub):
            connection_id = await receiver.attach(address, stub)
        reception = receiver.open(shape(connection_id, 1))
        good = request_for(reception, 1)

        unknown = vision_pb2.EncodeRequest()
        unknown.CopyFrom(good)
        unknown.destination.rdma.connection_id = "nope"
        with pytest.raises(rdma.UnknownConnection, match="unknown rdma connection"):
            sender.open(unknown)  # a ValueError: the service answers INVALID_ARGUMENT

        two_images = vision_pb2.EncodeRequest()
        two_images.CopyFrom(good)
        two_images.images.append(vision_pb2.ImageInput(data=b"img"))
        with pytest.raises(ValueError, match="one region per image"):
            sender.open(two_images)

        too_far = vision_pb2.EncodeRequest()
        too_far.CopyFrom(good)
        too_far.destination.rdma.image_offsets[0] = 2**32
        with pytest.raises(ValueError, match="outside any receive buffer"):
            sender.open(too_far)

        emission = sender.open(good)
        with pytest.raises(ValueError, match="overflow their region"):
            list(emission.chunks(0, 3 * TILE_ROWS, features(2, seed=6), CHUNK_BYTES))
        with pytest.raises(ValueError, match="no region for image 1"):
            list(emission.chunks(1, 0, features(1, seed=6), CHUNK_BYTES))
        reception.release()

    asyncio.run(scenario())


def test_unknown_connection_on_the_receiver(receiver: rdma.Receiver) -> None:
    with pytest.raises(ValueError, match="unknown rdma connection"):
        receiver.open(shape("never-attached"))


def test_connect_rejects_bad_endpoints_and_replaces_a_connection(
    fabric: FakeFabric, receiver: rdma.Receiver, sender: rdma.Sender
) -> None:
    async def scenario() -> None:
        async with vision_server(sender) as (address, stub):
            bad = vision_pb2.RdmaConnectRequest(
                connection_id="x", endpoint=vision_pb2.RdmaEndpoint(gid=b"short", qpn=5)
            )
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.RdmaConnect(bad)
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "gid" in (failure.value.details() or "")

            connection_id = await receiver.attach(address, stub)
            first = sender.peers[connection_id].qp
            # The same id again (what a reconnect does) replaces the vision server's side.
            device = fabric.open_device()
            qp = device.create_qp(1, 1)
            again = vision_pb2.RdmaConnectRequest(
                connection_id=connection_id, endpoint=rdma.endpoint_to_wire(qp.endpoint)
            )
            await stub.RdmaConnect(again)
            assert isinstance(first, fake_verbs.FakeQueuePair)
            assert first.state is FakeQpState.DESTROYED
            assert sender.peers[connection_id].qp is not first
            qp.close()

    asyncio.run(scenario())


def test_the_fabric_refuses_writes_outside_the_buffer(
    fabric: FakeFabric, receiver: rdma.Receiver, sender: rdma.Sender
) -> None:
    async def scenario() -> None:
        async with vision_server(sender) as (address, stub):
            connection_id = await receiver.attach(address, stub)
        reception = receiver.open(shape(connection_id, 1))
        forged = request_for(reception, 1)
        forged.destination.rdma.image_offsets[0] = receiver.size  # just past the buffer
        emission = sender.open(forged)  # the sender cannot know the buffer's size...
        chunks = list(emission.chunks(0, 0, features(1, seed=7), CHUNK_BYTES))
        # ...but the fabric checks the region like a NIC would: nothing was written, the
        # queue pair failed, and the rows went into the stream instead.
        assert fabric.writes == 0
        assert any("REM_ACCESS_ERR" in error for error in fabric.errors)
        assert sender.peers[connection_id].broken
        assert all(c.data and not c.HasField("written") for c in chunks)
        reception.release()

    asyncio.run(scenario())


def test_a_failed_queue_pair_falls_back_to_the_stream_then_reconnects(
    fabric: FakeFabric, receiver: rdma.Receiver, sender: rdma.Sender
) -> None:
    rows = features(2, seed=8)

    async def scenario() -> None:
        async with vision_server(sender) as (address, stub):
            connection_id = await receiver.attach(address, stub)
            old_peer = sender.peers[connection_id]
            old_peer.qp.close()  # e.g. its NIC port went down; the next write fails
            reception, sent = await transfer(receiver, sender, connection_id, [rows])
            assert all(c.data for c in sent)  # the rows came in the stream...
            assert torch.equal(bits(reception.features()[0]), bits(rows))  # ...and are right
            reception.release()

            # The next request goes over grpc while the queue pair is set up again.
            fallback = receiver.open(shape(connection_id, 1))
            assert isinstance(fallback, grpc_stream.StreamReception)
            fallback.release()
            connection = receiver.connections[connection_id]
            for _ in range(100):
                if connection.reconnecting is None and not connection.stale:
                    break
                await asyncio.sleep(0.02)
            assert not connection.stale
            assert sender.peers[connection_id] is not old_peer

            writes = fabric.writes
            reception, sent = await transfer(receiver, sender, connection_id, [rows])
            assert all(c.written.length and not c.data for c in sent)
            assert fabric.writes == writes + len(sent)
            assert torch.equal(bits(reception.features()[0]), bits(rows))
            reception.release()

    asyncio.run(scenario())


def test_release_frees_regions_and_a_full_buffer_falls_back_to_grpc(
    receiver: rdma.Receiver, sender: rdma.Sender, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with vision_server(sender) as (address, stub):
            connection_id = await receiver.attach(address, stub)
        held: list[Reception] = []
        while True:
            reception = receiver.open(shape(connection_id, 2, f"r{len(held)}"))
            if isinstance(reception, grpc_stream.StreamReception):
                assert reception.destination is None  # bytes travel in the Encode stream
                break
            assert reception.destination is not None
            held.append(reception)
        assert len(held) == receiver.size // (2 * CAPACITY)
        for reception in held:
            await reception.settle(1.0)  # nothing announced: settles at once
            reception.release()
            reception.release()  # idempotent
        assert receiver.allocator.allocated == 0
        again = receiver.open(shape(connection_id, 2))
        assert isinstance(again, rdma.RdmaReception)

        # A request released before it settled may still be written to: its regions
        # come back only after the quarantine.
        again.release()
        assert receiver.allocator.allocated == 2 * CAPACITY
        assert receiver.open(shape(connection_id, 2)).destination is not None  # other space
        monkeypatch.setattr("dvd.transport.rdma.receiver.QUARANTINE_S", 0.0)
        receiver.quarantine = [(0.0, regions) for _, regions in receiver.quarantine]
        receiver.open(shape(connection_id, 1)).release()  # open() ends due quarantines
        assert receiver.allocator.allocated == 2 * CAPACITY + CAPACITY  # the held + new ones

    asyncio.run(scenario())


def test_first_fit_allocator_coalesces() -> None:
    page = ALIGNMENT
    space = FirstFit(8 * page)
    a, b, c = space.allocate(page), space.allocate(3 * page), space.allocate(4 * page)
    assert (a, b, c) == (0, page, 4 * page)
    assert space.allocate(1) is None
    space.free(page, 3 * page)
    space.free(0, page)
    assert space.allocate(4 * page) == 0
    space.free(0, 4 * page)
    space.free(4 * page, 4 * page)
    assert space.allocate(8 * page) == 0


def test_the_fake_checks_access_bounds_and_sequence_numbers(fabric: FakeFabric) -> None:
    import ctypes
    import mmap

    a, b = fabric.open_device(), fabric.open_device()
    source, target = mmap.mmap(-1, 4096), mmap.mmap(-1, 4096)
    src = a.register(rdma.buffer_address(source), 4096, remote_write=False)
    readonly = b.register(rdma.buffer_address(target), 2048, remote_write=False)
    writable = b.register(rdma.buffer_address(target) + 2048, 2048, remote_write=True)

    def pair(psn_offset: int = 0) -> tuple[fake_verbs.FakeQueuePair, fake_verbs.FakeQueuePair]:
        qa, qb = a.create_qp(4, 4), b.create_qp(4, 4)
        assert isinstance(qa, fake_verbs.FakeQueuePair) and isinstance(qb, fake_verbs.FakeQueuePair)
        wrong = Endpoint(qa.endpoint.gid, qa.endpoint.qpn, (qa.endpoint.psn + psn_offset) % 2**24)
        qa.connect(qb.endpoint)
        qb.connect(wrong)
        qb.post_receive(1)
        return qa, qb

    ctypes.memmove(rdma.buffer_address(source), b"hello", 5)
    qa, qb = pair()
    qa.post_write_with_imm(7, src, 0, 5, writable.address, writable.rkey, imm=42)
    assert [c.status for c in qa.poll(4)] == [WcStatus.SUCCESS]
    landed = qb.poll(4)
    assert (landed[0].imm, landed[0].byte_len) == (42, 5)
    assert target[2048:2053] == b"hello"

    for region, length, local_offset, status in [
        (readonly, 5, 0, WcStatus.REM_ACCESS_ERR),  # no remote write access
        (writable, 4096, 0, WcStatus.REM_ACCESS_ERR),  # past the region's end
        (writable, 5, 4095, WcStatus.LOC_PROT_ERR),  # local bytes past their region
    ]:
        qa, qb = pair()
        qa.post_write_with_imm(1, src, local_offset, length, region.address, region.rkey, imm=0)
        assert [c.status for c in qa.poll(4)] == [status]
        assert qa.state is FakeQpState.ERROR
        qa.post_write_with_imm(2, src, 0, 1, writable.address, writable.rkey, imm=0)
        assert [c.status for c in qa.poll(4)] == [WcStatus.WR_FLUSH_ERR]
    qa, qb = pair(psn_offset=1)  # the receiver expects another sequence number
    qa.post_write_with_imm(1, src, 0, 5, writable.address, writable.rkey, imm=0)
    assert [c.status for c in qa.poll(4)] == [WcStatus.RETRY_EXC_ERR]
    assert target[2048:2053] == b"hello"  # no failed write touched the memory
    for region in (src, readonly, writable):
        region.close()


def test_the_real_receiver_says_why_it_cannot_run_here() -> None:
    """On this machine pyverbs is missing or finds no device: a clear error, no fake."""
    try:
        receiver = rdma.Receiver(buffer_bytes=2**20)
    except RdmaUnavailable as exc:
        assert "pyverbs" in str(exc) or "no RDMA device" in str(exc)
        return
    receiver.close()
    pytest.skip("this host has an RDMA device: run benchmarks/rdma_check.sh instead")


def test_missing_pyverbs_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyverbs", None)
    monkeypatch.setitem(sys.modules, "pyverbs.device", None)
    with pytest.raises(RdmaUnavailable, match="apt install python3-pyverbs"):
        rdma.Sender()


DEBIAN_PYVERBS = Path("/usr/lib/python3/dist-packages")


@pytest.mark.skipif(
    not (DEBIAN_PYVERBS / "pyverbs").is_dir(), reason="Debian's python3-pyverbs not installed"
)
def test_debian_pyverbs_without_a_device_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", [*sys.path, str(DEBIAN_PYVERBS)])
    try:
        import pyverbs.device
    except ImportError as exc:
        pytest.skip(f"Debian's pyverbs does not import into this Python: {exc}")
    try:
        pyverbs.device.get_device_list()
    except Exception:
        pass
    else:
        pytest.skip("this host lists RDMA devices")
    with pytest.raises(RdmaUnavailable, match="no RDMA device"):
        rdma.Receiver(buffer_bytes=2**20)
