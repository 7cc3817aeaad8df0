"""The receiving side: the real receivers, timed from the Encode call to usable features."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from benchmarks.transfer.ceilings import MIN_REPEATS, Ceiling
from benchmarks.transfer.feature_server import FeatureServer, serve
from benchmarks.transfer.shapes import Shape
from dvd.encode_session import EncodeSession
from dvd.grpc_options import CHANNEL_OPTIONS
from dvd.transport import FeatureReceiver, receiver_class
from dvd.transport.base import RequestShape
from dvd.v1 import vision_pb2, vision_pb2_grpc


@contextmanager
def feature_server(
    transports: list[str],
    servicer_class: type[FeatureServer] = FeatureServer,
    servicer_args: tuple[Any, ...] = (),
    start_timeout_s: float = 60,
) -> Iterator[str]:
    """A feature server process accepting `transports` (a `servicer_class`, made with
    `servicer_args` after its senders); yields its address."""
    context = mp.get_context("spawn")
    parent, child = context.Pipe()
    arguments = (",".join(transports), child, servicer_class, servicer_args)
    process = context.Process(target=serve, args=arguments, daemon=True)
    process.start()
    try:
        if not parent.poll(start_timeout_s):
            raise RuntimeError(f"the feature server did not start within {start_timeout_s:.0f} s")
        yield f"127.0.0.1:{parent.recv()}"
    finally:
        process.terminate()
        process.join(10)
        if process.is_alive():
            process.kill()


def make_receiver(name: str, arena_bytes: int) -> FeatureReceiver:
    options: dict[str, Any] = {}
    if name == "shm":
        options["arena_bytes"] = arena_bytes
    elif name == "rdma":
        options["buffer_bytes"] = arena_bytes
    return receiver_class(name)(**options)


async def _transfer_once(
    session: EncodeSession,
    receiver: FeatureReceiver,
    connection: str,
    shape: Shape,
) -> float:
    reception = receiver.open(
        RequestShape("bench", [shape.bytes], shape.hidden, torch.bfloat16, connection)
    )
    request = vision_pb2.EncodeRequest(
        request_id="bench",
        images=[vision_pb2.ImageInput(data=f"{shape.tiles}x{shape.hidden}".encode())],
        destination=reception.destination,
    )
    try:
        started = time.perf_counter()
        async for message in await session.call(request):
            kind = message.WhichOneof("kind")
            if kind == "plan":
                reception.on_plan(message.plan)
            elif kind == "chunk":
                reception.on_chunk(message.chunk)
        await reception.settle(60)
        (features,) = reception.features()
        elapsed = time.perf_counter() - started
        if features.shape != (shape.rows, shape.hidden):
            raise RuntimeError(f"received {tuple(features.shape)}, expected {shape}")
        return elapsed
    finally:
        reception.release()


CONTROL_SHAPE = Shape(hidden=8, tiles=1)
"""A transfer of a few KiB: its time is the fixed cost of one Encode call on a session
(the request, and the plan, chunk and done that come back), which every transport pays on
top of moving the bytes."""


@dataclass(frozen=True)
class TransportTimes:
    in_flight: int  # transfers kept in flight at once
    control_s: float  # best time of a lone CONTROL_SHAPE transfer
    best_s: dict[Shape, float]  # best time per transfer, per shape (a round / in_flight)
    ceiling_s: dict[Shape, float]  # best time of the ceiling's rounds, per shape


async def transport_times(
    address: str,
    name: str,
    shapes: list[Shape],
    repeats: int,
    ceiling: Ceiling,
    in_flight: int = 1,
) -> TransportTimes:
    """Best-of-`repeats` time of transport `name` per transfer of each shape, with
    `in_flight` transfers at once (1: one request's latency; more: the steady stream of a
    busy language server, where one call's fixed cost overlaps another's bytes); its fixed
    cost; and the best time of `ceiling` for the same bytes, its rounds alternating with
    the transport's (at least MIN_REPEATS of them)."""
    largest = max(s.bytes for s in shapes)
    receiver = make_receiver(name, arena_bytes=largest * (in_flight + 1))
    ceiling_rounds = -(-MIN_REPEATS // repeats)  # per transport round
    try:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            connection = await receiver.attach(address, stub)
            session = EncodeSession(stub)

            async def transfer(shape: Shape) -> float:
                return await _transfer_once(session, receiver, connection, shape)

            async def round_(shape: Shape) -> float:
                started = time.perf_counter()
                await asyncio.gather(*(transfer(shape) for _ in range(in_flight)))
                return (time.perf_counter() - started) / in_flight

            try:
                await transfer(CONTROL_SHAPE)  # warm-up
                control = min([await transfer(CONTROL_SHAPE) for _ in range(max(repeats, 10))])
                best: dict[Shape, float] = {}
                ceiling_best: dict[Shape, float] = {}
                for shape in shapes:
                    await round_(shape)  # warm-up
                    times, ceiling_times = [], []
                    for _ in range(repeats):
                        ceiling_times += [ceiling.once(shape.bytes) for _ in range(ceiling_rounds)]
                        times.append(await round_(shape))
                    best[shape], ceiling_best[shape] = min(times), min(ceiling_times)
            finally:
                await session.close()
            return TransportTimes(in_flight, control, best, ceiling_best)
    finally:
        receiver.close()


def measure_transport(
    address: str, name: str, shapes: list[Shape], repeats: int, ceiling: Ceiling, in_flight: int = 1
) -> TransportTimes:
    return asyncio.run(transport_times(address, name, shapes, repeats, ceiling, in_flight))
