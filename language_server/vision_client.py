"""DvD mode: features come from vision servers over gRPC.

Each request goes to the vision server with the fewest images in flight from this
language server (ties: round robin). A request that fails with UNAVAILABLE before any
response arrived is retried once on another server; after the first response it is not.
"""

from __future__ import annotations

import itertools
import logging
import time

import grpc
import torch

from dvd.errors import DvdError, InvalidInput, Unavailable
from dvd.features import FeatureAssembler, wire_dtype
from dvd.grpc_options import CHANNEL_OPTIONS
from dvd.v1 import common_pb2, vision_pb2, vision_pb2_grpc
from language_server.image_features import EncodedImages

log = logging.getLogger(__name__)


class VisionServer:
    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = vision_pb2_grpc.VisionServiceStub(self.channel)
        self.images_in_flight = 0


class VisionPool:
    def __init__(self, addresses: list[str], dtype: torch.dtype, timeout_s: float) -> None:
        if not addresses:
            raise ValueError("DvD mode needs at least one vision server address")
        self.servers = [VisionServer(a) for a in addresses]
        self.dtype = dtype
        self.timeout_s = timeout_s
        self._turn = itertools.count()

    def _pick(self, exclude: VisionServer | None = None) -> VisionServer:
        candidates = [s for s in self.servers if s is not exclude] or self.servers
        start = next(self._turn) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        return min(rotated, key=lambda s: s.images_in_flight)

    async def encode(self, request_id: str, images: list[bytes]) -> EncodedImages:
        request = vision_pb2.EncodeRequest(
            request_id=request_id,
            images=[vision_pb2.ImageInput(data=d) for d in images],
            feature_dtype=wire_dtype(self.dtype),
        )
        server = self._pick()
        try:
            return await self._encode_on(server, request)
        except _RetryableError:
            other = self._pick(exclude=server)
            if other is server:
                raise Unavailable(f"vision server {server.address} is unavailable") from None
            log.warning(
                "request %s: vision server %s unavailable, retrying on %s",
                request_id,
                server.address,
                other.address,
            )
            try:
                return await self._encode_on(other, request)
            except _RetryableError:
                raise Unavailable("no vision server is available") from None

    async def _encode_on(
        self, server: VisionServer, request: vision_pb2.EncodeRequest
    ) -> EncodedImages:
        count = len(request.images)
        server.images_in_flight += count
        call = server.stub.Encode(request, timeout=self.timeout_s)
        progress = _Progress()
        try:
            return await self._receive(call, server.address, count, progress)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and not progress.started:
                raise _RetryableError() from None
            raise _from_rpc_error(exc, server.address) from None
        finally:
            server.images_in_flight -= count
            call.cancel()  # no-op when finished; stops the encode when we were cancelled

    async def _receive(
        self, call: grpc.aio.UnaryStreamCall, address: str, count: int, progress: _Progress
    ) -> EncodedImages:
        assemblers: list[FeatureAssembler | None] = [None] * count
        first_ns = last_ns = 0
        async for message in call:
            progress.started = True
            last_ns = time.monotonic_ns()
            first_ns = first_ns or last_ns
            kind = message.WhichOneof("kind")
            if kind == "plan":
                plan = message.plan
                assemblers[plan.image_index] = FeatureAssembler(
                    sum(plan.tokens_per_tile), plan.hidden_size, self.dtype
                )
            elif kind == "chunk":
                chunk = message.chunk
                assembler = assemblers[chunk.image_index]
                if assembler is None:
                    raise DvdError(f"vision server {address} sent features before the plan")
                assembler.add(chunk.row_offset, chunk.descriptor, chunk.data)
            elif kind == "done":
                return _finish(assemblers, message.done.timings, last_ns - first_ns, address)
        raise DvdError(f"vision server {address} ended the stream without finishing")

    async def healthy(self) -> list[tuple[str, bool]]:
        results = []
        for server in self.servers:
            try:
                reply = await server.stub.Health(common_pb2.HealthRequest(), timeout=2.0)
                ok = reply.status == common_pb2.HealthResponse.STATUS_SERVING
            except grpc.aio.AioRpcError:
                ok = False
            results.append((server.address, ok))
        return results

    async def close(self) -> None:
        for server in self.servers:
            await server.channel.close()


class _Progress:
    started = False


class _RetryableError(Exception):
    """The server could not be reached before it sent anything."""


def _from_rpc_error(exc: grpc.aio.AioRpcError, address: str) -> Exception:
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"vision server {address} went away: {exc.details()}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(exc.details() or "invalid image")
    return DvdError(f"vision server {address}: {exc.details()}", code=code)


def _finish(
    assemblers: list[FeatureAssembler | None],
    timings: vision_pb2.EncodeTimings,
    transfer_ns: int,
    address: str,
) -> EncodedImages:
    features = []
    for index, assembler in enumerate(assemblers):
        if assembler is None or not assembler.complete:
            raise DvdError(f"vision server {address} finished with image {index} incomplete")
        features.append(assembler.tensor)
    return EncodedImages(
        features,
        preprocess_ns=timings.preprocess_ns,
        queue_ns=timings.queue_ns,
        encode_ns=timings.encode_ns,
        transfer_ns=max(transfer_ns, timings.transfer_ns),
        server=address,
    )
