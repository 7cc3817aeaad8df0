"""The rdma transport for real, between two processes: the driver behind rdma_check.sh.

NEVER RUN AGAINST A DEVICE: written where no RDMA device exists (see rdma_check.sh); its
own logic was run once in a single process over the fake verbs, which says nothing about
RDMA. It needs pyverbs and a device (a NIC, or soft-RoCE).

`serve` is the vision side: a gRPC server on 127.0.0.1 whose RdmaConnect is the transport's
Sender.connect and whose Encode sends synthetic BF16 features (seeded, so the other side can
check every bit) through the transport the request's destination names, exactly the way
vision_server/service.py does, without a model. `measure` is the language side: a Receiver
that attaches over a real RdmaConnect, then sends Encode requests with one image of 1, 4
and 13 tiles x 256 rows x hidden 4096, checks the features bit for bit and prints GiB/s per
shape, for rdma and, as the baseline in the same run, for grpc (bytes inside the stream).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import torch

from dvd.features import torch_dtype, wire_dtype
from dvd.grpc_options import CHANNEL_OPTIONS, MAX_CHUNK_BYTES, SERVER_OPTIONS
from dvd.transport import grpc_stream, rdma
from dvd.transport.base import Emission, FeatureReceiver, Reception, RequestShape
from dvd.v1 import vision_pb2, vision_pb2_grpc

TILE_ROWS = 256
HIDDEN = 4096
SHAPES = (1, 4, 13)  # tiles per image


def synthetic(tiles: int, hidden: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tiles * TILE_ROWS, hidden, generator=generator).to(torch.bfloat16)


class CheckServicer(vision_pb2_grpc.VisionServiceServicer):
    """A vision server without a model: its features are synthetic, its transports real."""

    def __init__(self, sender: rdma.Sender, hidden: int) -> None:
        self.senders = {"rdma": sender, "grpc": grpc_stream.Sender()}
        self.hidden = hidden
        self._cache: dict[int, torch.Tensor] = {}

    async def RdmaConnect(
        self, request: vision_pb2.RdmaConnectRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.RdmaConnectResponse:
        try:
            return self.senders["rdma"].connect(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rdma connect: {exc}")
            raise

    async def Encode(
        self, request: vision_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[vision_pb2.EncodeResponse]:
        kind = request.destination.WhichOneof("kind") or "grpc"
        try:
            emission: Emission = self.senders[kind].open(request)
        except (KeyError, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{kind}: {exc}")
            raise
        transfer_ns = 0
        try:
            for index, image in enumerate(request.images):
                tiles = image.max_tiles
                rows = self._cache.setdefault(tiles, synthetic(tiles, self.hidden, seed=tiles))
                yield vision_pb2.EncodeResponse(
                    plan=vision_pb2.ImagePlan(
                        image_index=index,
                        num_tiles=tiles,
                        tokens_per_tile=[TILE_ROWS] * tiles,
                        hidden_size=self.hidden,
                    )
                )
                for tile in range(tiles):  # tile by tile, as ViT batches finish
                    part = rows[tile * TILE_ROWS : (tile + 1) * TILE_ROWS]
                    started = time.monotonic_ns()
                    chunks = list(
                        emission.chunks(index, tile * TILE_ROWS, part, request.max_chunk_bytes)
                    )
                    transfer_ns += time.monotonic_ns() - started
                    for chunk in chunks:
                        yield vision_pb2.EncodeResponse(chunk=chunk)
        finally:
            emission.close()
        yield vision_pb2.EncodeResponse(
            done=vision_pb2.EncodeDone(timings=vision_pb2.EncodeTimings(transfer_ns=transfer_ns))
        )


async def serve(args: argparse.Namespace) -> None:
    sender = rdma.Sender(device=args.device, gid_index=args.gid_index)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    vision_pb2_grpc.add_VisionServiceServicer_to_server(CheckServicer(sender, args.hidden), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    Path(args.port_file).write_text(str(port))
    print(f"vision side: rdma sender on {sender.device.name}, gRPC on 127.0.0.1:{port}", flush=True)
    try:
        await server.wait_for_termination()
    finally:
        sender.close()


async def one_request(
    stub: vision_pb2_grpc.VisionServiceStub,
    receiver: FeatureReceiver,
    connection_id: str,
    tiles: int,
    hidden: int,
    chunk_bytes: int,
    request_id: str,
) -> tuple[list[torch.Tensor], float, int, Reception]:
    """One Encode round trip; returns the features, the wall seconds, the sender's transfer
    ns, and the reception (to release once the features were checked)."""
    capacity = tiles * TILE_ROWS * hidden * 2
    shape = RequestShape(request_id, [capacity], hidden, torch.bfloat16, connection_id)
    reception = receiver.open(shape)
    request = vision_pb2.EncodeRequest(
        request_id=request_id,
        images=[vision_pb2.ImageInput(data=b"synthetic", max_tiles=tiles)],
        feature_dtype=wire_dtype(torch.bfloat16),
        max_chunk_bytes=chunk_bytes,
    )
    if reception.destination is not None:
        request.destination.CopyFrom(reception.destination)
    started = time.perf_counter()
    transfer_ns = 0
    try:
        async for message in stub.Encode(request, timeout=60):
            kind = message.WhichOneof("kind")
            if kind == "plan":
                reception.on_plan(message.plan)
            elif kind == "chunk":
                if torch_dtype(message.chunk.descriptor.dtype) != torch.bfloat16:
                    raise ValueError("unexpected dtype")
                reception.on_chunk(message.chunk)
            elif kind == "done":
                transfer_ns = message.done.timings.transfer_ns
        await reception.settle(30.0)
        features = reception.features()
    except BaseException:
        reception.release()
        raise
    return features, time.perf_counter() - started, transfer_ns, reception


async def measure(args: argparse.Namespace) -> int:
    port = int(Path(args.port_file).read_text())
    address = f"127.0.0.1:{port}"
    receiver = rdma.Receiver(
        device=args.device, buffer_bytes=args.buffer_mib * 2**20, gid_index=args.gid_index
    )
    baseline = grpc_stream.Receiver()
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    stub = vision_pb2_grpc.VisionServiceStub(channel)
    results = []
    failures = 0
    try:
        connection_id = await receiver.attach(address, stub)
        print(f"language side: rdma receiver on {receiver.device.name}, connection {connection_id}")
        for tiles in args.tiles:
            expected = synthetic(tiles, args.hidden, seed=tiles)
            nbytes = expected.numel() * 2
            for name, side, conn in (("rdma", receiver, connection_id), ("grpc", baseline, "")):
                walls, transfers = [], []
                for i in range(args.warmup + args.iterations):
                    got, wall, transfer_ns, reception = await one_request(
                        stub,
                        side,
                        conn,
                        tiles,
                        args.hidden,
                        args.chunk_bytes,
                        f"{name}-{tiles}-{i}",
                    )
                    exact = torch.equal(got[0].view(torch.int16), expected.view(torch.int16))
                    reception.release()
                    if not exact:
                        failures += 1
                        print(f"MISMATCH: {name}, {tiles} tile(s), iteration {i}", flush=True)
                    if i >= args.warmup:
                        walls.append(wall)
                        transfers.append(transfer_ns / 1e9)
                row = {
                    "transport": name,
                    "tiles": tiles,
                    "bytes": nbytes,
                    "median_s": statistics.median(walls),
                    "gib_per_s": nbytes / statistics.median(walls) / 2**30,
                    "sender_gib_per_s": nbytes / max(statistics.median(transfers), 1e-9) / 2**30,
                }
                results.append(row)
                print(
                    f"{name:5s} {tiles:2d} tile(s) {nbytes / 2**20:7.1f} MiB: "
                    f"end to end {row['gib_per_s']:6.2f} GiB/s "
                    f"(median {row['median_s'] * 1e3:7.2f} ms of {args.iterations}), "
                    f"sender side {row['sender_gib_per_s']:6.2f} GiB/s",
                    flush=True,
                )
    finally:
        await channel.close()
        receiver.close()
    report = {
        "host": platform.node(),
        "device": args.device or "(first)",
        "hidden": args.hidden,
        "chunk_bytes": args.chunk_bytes,
        "results": results,
        "mismatches": failures,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["serve", "measure"])
    parser.add_argument("--port-file", required=True, help="serve writes its port here")
    parser.add_argument("--device", default=None, help="RDMA device name (default: the first)")
    parser.add_argument("--gid-index", type=int, default=0, help="GID table index (RoCE)")
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--tiles", type=int, nargs="+", default=list(SHAPES))
    parser.add_argument("--chunk-bytes", type=int, default=MAX_CHUNK_BYTES)
    parser.add_argument("--buffer-mib", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.role == "serve":
        asyncio.run(serve(args))
        return 0
    return asyncio.run(measure(args))


if __name__ == "__main__":
    sys.exit(main())
