"""Starting and stopping real `dvd` processes on loopback for integration tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


@dataclass
class Stack:
    process: subprocess.Popen[bytes]
    port: int
    vision_port: int
    language_port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM to `dvd up` (which stops its children), then SIGKILL to the whole group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()


def start_stack(model: Path | None, workdir: Path, *extra: str, wait: bool = True) -> Stack:
    """Runs `dvd up` on free loopback ports; model None serves the embedded default."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, vision_port, language_port = free_port(), free_port(), free_port()
    log_path = workdir / f"dvd-up-{port}.log"
    ports = ["--port", str(port), "--vision-port", str(vision_port)]
    ports += ["--language-port", str(language_port)]
    model_args = ["--model", str(model)] if model is not None else []
    sizes = ["--kv-cache-gib", "0.25", "--max-model-len", "8192"]
    argv = [sys.executable, "-m", "dvd", "up", *model_args, *ports, *sizes, *extra]
    env = {**os.environ, "DVD_CACHE_DIR": str(workdir / "cache"), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    stack = Stack(process, port, vision_port, language_port, log_path)
    if wait:
        wait_ready(stack)
    return stack


def wait_ready(stack: Stack, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stack.process.poll() is not None:
            raise RuntimeError(
                f"dvd up exited with {stack.process.returncode}:\n{stack.log_tail()}"
            )
        if http_status(stack.base_url + "/ready") == 200:
            return
        time.sleep(0.5)
    stack.stop()
    raise RuntimeError(f"stack not ready after {timeout_s} s:\n{stack.log_tail()}")


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
