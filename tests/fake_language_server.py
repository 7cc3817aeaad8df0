"""A small LanguageService (grpc.aio) that tests run as a process of its own, to kill it.

    python -m tests.fake_language_server --host 127.0.0.2 --port 50061 --delay-s 0.02

Generate waits `--delay-s`, then answers with one message that names the server
("served by HOST:PORT") and finishes, so a pool test can count who served what, and a
SIGKILL almost always lands before a call's first message (the case a pool retries).
Health is SERVING, Info names the model "fake".

For overload tests: with `--busy` every Generate is refused with RESOURCE_EXHAUSTED and the
busy mark, as a language server at its --max-waiting-requests; `--max-receive-bytes N`
makes gRPC itself refuse a larger request (RESOURCE_EXHAUSTED without the mark). A
request whose last text is "hang" waits until it is cancelled (by its caller, or by gRPC
when its deadline passes); one whose last text is "deadline" is answered with the seconds
left of its gRPC deadline ("remaining 12.345", or "remaining none"). Health's detail
counts the calls: "running N cancelled N expired N" (expired: cancelled because the
deadline passed).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc

from dvd.errors import Overloaded, trailing_metadata
from dvd.v1 import common_pb2, language_pb2, language_pb2_grpc

MODEL = "fake"


class FakeLanguage(language_pb2_grpc.LanguageServiceServicer):
    def __init__(self, name: str, delay_s: float, busy: bool = False) -> None:
        self.name = name
        self.delay_s = delay_s
        self.busy = busy
        self.running = 0
        self.cancelled = 0
        self.expired = 0

    async def Generate(self, request: Any, context: Any) -> Any:
        if self.busy:
            busy = Overloaded(f"{self.name} is busy")
            await context.abort(busy.code, busy.message, trailing_metadata(busy))
        texts = [p.text for m in request.messages for p in m.content if p.HasField("text")]
        self.running += 1
        try:
            await asyncio.sleep(self.delay_s)
            if texts and texts[-1] == "hang":
                await asyncio.Event().wait()
            text = f"served by {self.name}"
            if texts and texts[-1] == "deadline":
                remaining = context.time_remaining()
                text = f"remaining {'none' if remaining is None else f'{remaining:.3f}'}"
            yield language_pb2.GenerateResponse(
                text=text,
                token_ids=[1],
                finish_reason="stop",
                usage=language_pb2.Usage(prompt_tokens=3, completion_tokens=1),
            )
        except asyncio.CancelledError:
            self.cancelled += 1
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0.01:
                self.expired += 1
            raise
        finally:
            self.running -= 1

    async def Info(self, request: Any, context: Any) -> language_pb2.LanguageInfo:
        return language_pb2.LanguageInfo(model=MODEL, max_model_len=4096, mode="dvd")

    async def Health(self, request: Any, context: Any) -> common_pb2.HealthResponse:
        return common_pb2.HealthResponse(
            status=common_pb2.HealthResponse.STATUS_SERVING,
            detail=f"running {self.running} cancelled {self.cancelled} expired {self.expired}",
        )


async def serve(host: str, port: int, delay_s: float, busy: bool, max_receive: int) -> None:
    options = [("grpc.max_receive_message_length", max_receive)] if max_receive else []
    server = grpc.aio.server(options=options)
    name = f"{host}:{port}"
    servicer = FakeLanguage(name, delay_s, busy)
    language_pb2_grpc.add_LanguageServiceServicer_to_server(servicer, server)
    server.add_insecure_port(name)
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-s", type=float, default=0.02)
    parser.add_argument("--busy", action="store_true")
    parser.add_argument("--max-receive-bytes", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.delay_s, args.busy, args.max_receive_bytes))


if __name__ == "__main__":
    main()
