"""A small LanguageService (grpc.aio) that tests run as a process of its own, to kill it.

    python -m tests.fake_language_server --host 127.0.0.2 --port 50061 --delay-s 0.02

Generate waits `--delay-s`, then answers with one message that names the server
("served by HOST:PORT") and finishes, so a pool test can count who served what, and a
SIGKILL almost always lands before a call's first message (the case a pool retries).
Health is SERVING, Info names the model "fake".
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc

from dvd.v1 import common_pb2, language_pb2, language_pb2_grpc

MODEL = "fake"


class FakeLanguage(language_pb2_grpc.LanguageServiceServicer):
    def __init__(self, name: str, delay_s: float) -> None:
        self.name = name
        self.delay_s = delay_s

    async def Generate(self, request: Any, context: Any) -> Any:
        await asyncio.sleep(self.delay_s)
        yield language_pb2.GenerateResponse(
            text=f"served by {self.name}",
            token_ids=[1],
            finish_reason="stop",
            usage=language_pb2.Usage(prompt_tokens=3, completion_tokens=1),
        )

    async def Info(self, request: Any, context: Any) -> language_pb2.LanguageInfo:
        return language_pb2.LanguageInfo(model=MODEL, max_model_len=4096, mode="dvd")

    async def Health(self, request: Any, context: Any) -> common_pb2.HealthResponse:
        return common_pb2.HealthResponse(status=common_pb2.HealthResponse.STATUS_SERVING)


async def serve(host: str, port: int, delay_s: float) -> None:
    server = grpc.aio.server()
    name = f"{host}:{port}"
    language_pb2_grpc.add_LanguageServiceServicer_to_server(FakeLanguage(name, delay_s), server)
    server.add_insecure_port(name)
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-s", type=float, default=0.02)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.delay_s))


if __name__ == "__main__":
    main()
