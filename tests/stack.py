"""Starting and stopping real `dvd` processes on loopback for integration tests."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks.systems import Running, free_port, launch

READY_TIMEOUT_S = 300.0
__all__ = ["Stack", "free_port", "http_status", "start_stack"]


def http_status(url: str) -> int:
    """The status a GET answers with; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


@dataclass
class Stack:
    """A running `dvd up` and the loopback ports of its three processes."""

    running: Running
    vision_port: int
    language_port: int

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.running.process

    @property
    def base_url(self) -> str:
        return self.running.base_url

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    @property
    def log_path(self) -> Path:
        return self.running.log_path

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM to `dvd up` (which stops its children), then SIGKILL to the whole group."""
        self.running.stop(timeout_s)
        return self.process.returncode


def start_stack(model: Path | None, workdir: Path, *extra: str) -> Stack:
    """Runs `dvd up` on free loopback ports and waits until it is ready; model None serves
    the embedded default."""
    port, vision_port, language_port = free_port(), free_port(), free_port()
    ports = ["--port", str(port), "--vision-port", str(vision_port)]
    ports += ["--language-port", str(language_port)]
    model_args = ["--model", str(model)] if model is not None else []
    sizes = ["--kv-cache-gib", "0.25", "--max-model-len", "8192"]
    argv = [sys.executable, "-m", "dvd", "up", *model_args, *ports, *sizes, *extra]
    running = launch(
        "dvd up",
        argv,
        f"http://127.0.0.1:{port}",
        workdir / f"dvd-up-{port}.log",
        timeout_s=READY_TIMEOUT_S,
        env={"DVD_CACHE_DIR": str(workdir / "cache")},
    )
    return Stack(running, vision_port, language_port)


def generate(port: int, messages: list, max_tokens: int = 12) -> tuple[list[int], object]:
    """Calls a language server's Generate directly; returns (token ids, usage)."""
    import grpc

    from dvd.grpc_options import CHANNEL_OPTIONS
    from dvd.v1 import language_pb2, language_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        stub = language_pb2_grpc.LanguageServiceStub(channel)
        request = language_pb2.GenerateRequest(
            request_id="test",
            messages=messages,
            sampling=language_pb2.SamplingOptions(max_tokens=max_tokens, temperature=0.0),
        )
        replies = list(stub.Generate(request, timeout=120))
    return [t for r in replies for t in r.token_ids], replies[-1].usage


def chat_message(text: str, images: list[bytes] = (), role: str = "user"):  # type: ignore[assignment]
    from dvd.v1 import language_pb2

    parts = [language_pb2.ContentPart(image=i) for i in images]
    parts.append(language_pb2.ContentPart(text=text))
    return language_pb2.ChatMessage(role=role, content=parts)
