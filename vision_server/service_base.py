"""What every model family's VisionService shares: the transports a call's destination
picks, the image-decoding threads, readiness and draining, RdmaConnect and Health.

InternVL's service (vision_server/service.py: tiles, ViR, the tile batcher) and Qwen3-VL's
(vision_server/qwen3vl/service.py: whole images by patches) differ in how a call is encoded,
not in how its features leave or how the server reports itself.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc

from dvd.errors import DvdError, InvalidInput
from dvd.transport import DESTINATION_KINDS, Emission, FeatureSender, StaleConnection
from dvd.v1 import common_pb2, vision_pb2
from vision_server.config import VisionServerConfig
from vision_server.metrics import VisionMetrics
from vision_server.session import EncodeServicer, Sessions


class VisionServiceBase(EncodeServicer):
    def __init__(
        self,
        config: VisionServerConfig,
        metrics: VisionMetrics,
        senders: dict[str, FeatureSender],
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.senders = senders
        self._preprocess_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        self.sessions = Sessions(self.run_call, metrics.sessions, metrics.session_batch)
        self.ready = True

    def close(self) -> None:
        self._preprocess_pool.shutdown(wait=False, cancel_futures=True)
        for sender in self.senders.values():
            sender.close()

    async def drain(self) -> None:
        """Shutdown has begun: calls in flight finish, new ones go elsewhere."""
        self.ready = False
        await self.sessions.drain()

    def _emission(self, request: vision_pb2.EncodeRequest) -> Emission:
        """The transport the request's destination names (grpc when it names none)."""
        kind = request.destination.WhichOneof("kind")
        name = DESTINATION_KINDS[kind] if kind else "grpc"
        sender = self.senders.get(name)
        if sender is None:
            raise InvalidInput(
                f"transport {name} is not enabled on this vision server "
                f"(enabled: {', '.join(self.senders)})"
            )
        try:
            return sender.open(request)
        except StaleConnection as exc:  # we restarted since the caller connected
            raise DvdError(f"{name}: {exc}", code=grpc.StatusCode.FAILED_PRECONDITION) from None
        except ValueError as exc:
            raise InvalidInput(f"{name} destination: {exc}") from None

    async def RdmaConnect(
        self, request: vision_pb2.RdmaConnectRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.RdmaConnectResponse:
        sender = self.senders.get("rdma")
        if sender is None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "the rdma transport is not enabled on this server"
            )
        try:
            return sender.connect(request)  # type: ignore[union-attr]
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rdma connect: {exc}")
            raise  # abort raises; this keeps type checkers informed

    async def Health(
        self, request: common_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.HealthResponse:
        if self.ready:
            return common_pb2.HealthResponse(status=common_pb2.HealthResponse.STATUS_SERVING)
        return common_pb2.HealthResponse(
            status=common_pb2.HealthResponse.STATUS_NOT_SERVING, detail="draining"
        )
