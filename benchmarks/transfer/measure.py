"""The receiving side: the real receivers, timed from the Encode call to usable features."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import torch

from benchmarks.transfer.feature_server import serve
from benchmarks.transfer.shapes import Shape
from dvd.grpc_options import CHANNEL_OPTIONS
from dvd.transport import FeatureReceiver, receiver_class
from dvd.transport.base import RequestShape
from dvd.v1 import vision_pb2, vision_pb2_grpc


@contextmanager
def feature_server(transports: list[str]) -> Iterator[str]:
    """A feature server process accepting `transports`; yields its address."""
    context = mp.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=serve, args=(",".join(transports), child), daemon=True)
    process.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the feature server did not start")
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
    stub: vision_pb2_grpc.VisionServiceStub,
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
        async for message in stub.Encode(request, timeout=120):
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


async def transport_gib_per_s(
    address: str, name: str, shapes: list[Shape], repeats: int
) -> dict[Shape, float]:
    """Best-of-`repeats` throughput of transport `name` for each shape."""
    receiver = make_receiver(name, arena_bytes=max(s.bytes for s in shapes) * 2)
    try:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            connection = await receiver.attach(address, stub)
            results = {}
            for shape in shapes:
                await _transfer_once(stub, receiver, connection, shape)  # warm-up
                best = min(
                    [
                        await _transfer_once(stub, receiver, connection, shape)
                        for _ in range(repeats)
                    ]
                )
                results[shape] = shape.bytes / best / 2**30
            return results
    finally:
        receiver.close()


def measure_transport(
    address: str, name: str, shapes: list[Shape], repeats: int
) -> dict[Shape, float]:
    return asyncio.run(transport_gib_per_s(address, name, shapes, repeats))
