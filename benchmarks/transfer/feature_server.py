"""A VisionService with no ViT: it streams prepared features through the real senders.

Benchmarks only. The EncodeRequest's single image carries, instead of image bytes, the
ASCII text "<tiles>x<hidden>" naming the features to send; the rows are random bf16 made
per shape. Everything after that (the transport's Emission, chunking, gRPC) is the
code the vision server runs, and the calls arrive as the language server sends them: on an
EncodeSession, or on Encode RPCs for the grpc transport.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from collections.abc import AsyncGenerator
from typing import Any

import grpc
import torch

from benchmarks.transfer.ceilings import COLD_BYTES
from dvd.deadline import Deadline
from dvd.grpc_options import MAX_CHUNK_BYTES
from dvd.grpc_server import bind, new_server
from dvd.transport import DESTINATION_KINDS, FeatureSender, parse_names, sender_class
from dvd.v1 import vision_pb2, vision_pb2_grpc
from vision_server.session import EncodeServicer, Sessions

ROWS_PER_TILE = 256


class FeatureServer(EncodeServicer):
    def __init__(self, senders: dict[str, FeatureSender]) -> None:
        self.senders = senders
        self._shape: tuple[int, int] | None = None
        self._cold = torch.empty(0)
        self._turn = 0
        self.sessions = Sessions(self.run_call)

    def _rows(self, tiles: int, hidden: int) -> torch.Tensor:
        """The features to send, taken in turn from COLD_BYTES of copies: fresh features
        are not in the cache, and the ceilings' bytes are not either."""
        rows = tiles * ROWS_PER_TILE
        if self._shape != (tiles, hidden):  # one shape at a time: the last one's copies go
            generator = torch.Generator().manual_seed(0)
            pattern = torch.randn(rows, hidden, generator=generator).to(torch.bfloat16)
            self._cold = torch.empty(0)  # free the last shape's copies first
            self._cold = pattern.repeat(max(2, COLD_BYTES // pattern.nbytes), 1)
            self._shape = (tiles, hidden)
        copies = self._cold.shape[0] // rows
        start = self._turn % copies * rows
        self._turn += 1
        return self._cold[start : start + rows]

    async def run_call(
        self, request: vision_pb2.EncodeRequest, deadline: Deadline
    ) -> AsyncGenerator[vision_pb2.EncodeResponse, None]:
        tiles, hidden = (int(x) for x in request.images[0].data.decode().split("x"))
        rows = self._rows(tiles, hidden)
        kind = request.destination.WhichOneof("kind")
        emission = self.senders[DESTINATION_KINDS[kind] if kind else "grpc"].open(request)
        try:
            yield vision_pb2.EncodeResponse(
                plan=vision_pb2.ImagePlan(
                    image_index=0,
                    num_tiles=tiles,
                    tokens_per_tile=[ROWS_PER_TILE] * tiles,
                    hidden_size=hidden,
                )
            )
            max_chunk = request.max_chunk_bytes or MAX_CHUNK_BYTES
            async for chunk in emission.achunks(0, 0, rows, max_chunk):  # as the vision server
                yield vision_pb2.EncodeResponse(chunk=chunk)
            yield vision_pb2.EncodeResponse(
                done=vision_pb2.EncodeDone(num_tiles=tiles, num_tokens=rows.shape[0])
            )
        finally:
            emission.close()

    async def RdmaConnect(
        self, request: vision_pb2.RdmaConnectRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.RdmaConnectResponse:
        return self.senders["rdma"].connect(request)


async def _serve(
    transports: str,
    ready: mp.connection.Connection,
    servicer_class: type[FeatureServer],
    servicer_args: tuple[Any, ...],
) -> None:
    senders = {name: sender_class(name)() for name in parse_names(transports)}
    server = new_server()
    servicer = servicer_class(senders, *servicer_args)
    vision_pb2_grpc.add_VisionServiceServicer_to_server(servicer, server)
    port = bind(server, "127.0.0.1:0")
    await server.start()
    ready.send(port)
    await server.wait_for_termination()


def serve(
    transports: str,
    ready: mp.connection.Connection,
    servicer_class: type[FeatureServer] = FeatureServer,
    servicer_args: tuple[Any, ...] = (),
) -> None:
    """Entry point of the server process: `servicer_class(senders, *servicer_args)` on a
    free loopback port, sent through `ready`."""
    asyncio.run(_serve(transports, ready, servicer_class, servicer_args))
