"""Starting and stopping the systems a benchmark measures, as real processes on loopback.

Every system is one process group started from an argv, ready when an HTTP path answers
200, and stopped with SIGTERM then SIGKILL of the whole group, so nothing outlives a run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dvd.ports import free_port  # re-exported: the benchmarks and tests pick ports with it


def bench_checkpoint(model: str | None, preset: str, work: Path) -> Path:
    """`model` when given, else a random-weight checkpoint of `preset` made under `work`."""
    if model:
        return Path(model)
    from dvd.checkpoint import make_checkpoint

    return make_checkpoint(work / f"internvl3_5-{preset}-random", preset=preset)


def scalar_metric(metrics_url: str, name: str) -> float:
    """The value of an unlabelled series on a Prometheus /metrics page (0 when absent)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found[1]) if found else 0.0


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Running:
    name: str
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def launch(
    name: str,
    argv: list[str],
    base_url: str,
    log_path: Path,
    ready_path: str = "/ready",
    timeout_s: float = 600.0,
    env: dict[str, str] | None = None,
) -> Running:
    """Starts `argv` in its own process group and waits until base_url+ready_path is 200."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    running = Running(name, process, base_url, log_path)
    try:
        _wait_ready(running, ready_path, timeout_s)
    except BaseException:  # not ready, Ctrl-C, anything: nothing may be left running
        running.stop()
        raise
    return running


def _wait_ready(running: Running, ready_path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            raise RuntimeError(
                f"{running.name} exited with {running.process.returncode}:\n{running.log_tail()}"
            )
        if http_ok(running.base_url + ready_path):
            return
        time.sleep(0.5)
    raise RuntimeError(
        f"{running.name} was not ready after {timeout_s:.0f} s:\n{running.log_tail()}"
    )


def dvd_up_argv(model: Path, port: int, *extra: str) -> list[str]:
    """`dvd up` on free internal ports, sized for a benchmark on this machine."""
    return [
        sys.executable,
        "-m",
        "dvd",
        "up",
        "--model",
        str(model),
        "--port",
        str(port),
        "--vision-port",
        str(free_port()),
        "--language-port",
        str(free_port()),
        *extra,
    ]


@contextlib.contextmanager
def running(
    name: str, argv: list[str], base_url: str, log_path: Path, **kwargs: object
) -> Iterator[Running]:
    system = launch(name, argv, base_url, log_path, **kwargs)  # type: ignore[arg-type]
    try:
        yield system
    finally:
        system.stop()
