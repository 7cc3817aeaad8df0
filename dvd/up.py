"""`dvd up`: the whole stack on one machine, as three supervised processes.

Starts a vision server, a language server and a gateway (or, with --coupled, a language
server with the vision model inside and a gateway), waits until the gateway reports ready,
and then watches them: Ctrl-C or SIGTERM stops all of them; a child that exits on its own
is reported with its exit code and the rest are stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dvd.env import cache_dir
from dvd.flags import add_flag

COMMAND = "up"
DEFAULT_PRESET = "tiny"
log = logging.getLogger("dvd.up")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        COMMAND,
        help="start the whole stack (vision, language, gateway) on this machine",
        description="Starts a vision server, a language server and an OpenAI-compatible "
        "gateway as three processes and supervises them. Without --model it serves a tiny "
        "random-weight checkpoint created once in the cache folder (DVD_CACHE_DIR).",
    )
    add_flag(
        parser,
        COMMAND,
        "--model",
        None,
        "checkpoint folder; default: a tiny random-weight checkpoint",
    )
    add_flag(parser, COMMAND, "--host", "127.0.0.1", "gateway address")
    add_flag(parser, COMMAND, "--port", 8000, "gateway HTTP port")
    add_flag(parser, COMMAND, "--vision-port", 50051, "vision server gRPC port (on 127.0.0.1)")
    add_flag(parser, COMMAND, "--language-port", 50061, "language server gRPC port (on 127.0.0.1)")
    add_flag(
        parser,
        COMMAND,
        "--coupled",
        False,
        "run the vision model inside the language server (the baseline), no vision server",
    )
    add_flag(
        parser,
        COMMAND,
        "--transport",
        "grpc",
        "how features travel from the vision to the language server: grpc, shm or tcp",
    )
    add_flag(parser, COMMAND, "--dtype", "bfloat16", "model dtype: bfloat16 or float32")
    add_flag(parser, COMMAND, "--max-model-len", 0, "context length; 0: the model's, capped")
    add_flag(parser, COMMAND, "--kv-cache-gib", 2.0, "KV cache size in GiB")
    add_flag(parser, COMMAND, "--served-model-name", None, "model name clients use")
    add_flag(parser, COMMAND, "--ready-timeout-s", 600.0, "how long to wait for the stack")
    add_flag(
        parser,
        COMMAND,
        "--vision-cpus",
        "",
        "CPU ids the vision server may run on, e.g. 0 or 0-3,8 (default: any)",
    )
    add_flag(
        parser,
        COMMAND,
        "--language-cpus",
        "",
        "CPU ids the language server (and its vLLM engine) may run on (default: any)",
    )
    add_flag(parser, COMMAND, "--log-level", "info", "logging level of every process")
    parser.set_defaults(func=run)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]


def default_checkpoint() -> Path:
    """The embedded default: the tiny preset, made once and reused."""
    from dvd.checkpoint import make_checkpoint

    path = Path(cache_dir()) / "checkpoints" / f"internvl3_5-{DEFAULT_PRESET}-random"
    if not (path / "config.json").exists():
        log.info("creating the default %s checkpoint in %s", DEFAULT_PRESET, path)
        make_checkpoint(path, preset=DEFAULT_PRESET)
    log.warning(
        "serving %s: its weights are RANDOM, so its answers are gibberish. "
        "Use --model PATH to serve a real InternVL3.5 checkpoint.",
        path,
    )
    return path


def commands(args: argparse.Namespace, model: Path) -> list[tuple[str, list[str]]]:
    dvd = [sys.executable, "-m", "dvd"]
    common = ["--model", str(model), "--dtype", args.dtype, "--log-level", args.log_level]
    vision_addr = f"127.0.0.1:{args.vision_port}"
    language = [
        *dvd,
        "language",
        *common,
        "--port",
        str(args.language_port),
        "--max-model-len",
        str(args.max_model_len),
        "--kv-cache-gib",
        str(args.kv_cache_gib),
    ]
    if args.served_model_name:
        language += ["--served-model-name", args.served_model_name]
    if args.coupled:
        language += ["--mode", "coupled"]
    else:
        language += ["--mode", "dvd", "--vision", vision_addr, "--transport", args.transport]
    gateway = [
        *dvd,
        "gateway",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--language",
        f"127.0.0.1:{args.language_port}",
        "--log-level",
        args.log_level,
    ]
    procs = [("language", language), ("gateway", gateway)]
    if not args.coupled:
        vision = [*dvd, "vision", *common, "--port", str(args.vision_port)]
        accepted = "grpc" if args.transport == "grpc" else f"grpc,{args.transport}"
        procs.insert(0, ("vision", [*vision, "--transport", accepted]))
    return procs


def _die_with_parent() -> None:
    """Children get SIGTERM if `dvd up` itself is killed (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def parse_cpus(text: str) -> set[int]:
    """ "0-3,8" -> {0, 1, 2, 3, 8}; empty means no pinning."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        try:
            cpus.update(range(int(low), int(high or low) + 1))
        except ValueError:
            raise ValueError(f"CPU list {text!r}: {part!r} is not N or N-M") from None
    return cpus


def start(name: str, argv: list[str], cpus: set[int] | None = None) -> Child:
    """Starts a child that dies with us and, when `cpus` is given, runs only on them
    (its own children, e.g. vLLM's engine processes, inherit the affinity)."""
    log.info("starting %s%s: %s", name, f" on CPUs {sorted(cpus)}" if cpus else "", " ".join(argv))

    def prepare() -> None:
        _die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return Child(name, subprocess.Popen(argv, preexec_fn=prepare))


def stop_all(children: list[Child], timeout_s: float = 20.0) -> None:
    for child in reversed(children):
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in reversed(children):
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", child.name)
            child.process.kill()
            child.process.wait()


def gateway_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def first_dead(children: list[Child]) -> Child | None:
    return next((c for c in children if c.process.poll() is not None), None)


def supervise(children: list[Child], ready_url: str, ready_timeout_s: float) -> int:
    deadline = time.monotonic() + ready_timeout_s
    announced = False
    while True:
        dead = first_dead(children)
        if dead is not None:
            log.error(
                "%s exited with code %s; stopping the others", dead.name, dead.process.returncode
            )
            return 1
        if not announced:
            if gateway_ready(ready_url):
                announced = True
                log.info("dvd-serve is ready: %s", ready_url.rsplit("/", 1)[0] + "/v1")
            elif time.monotonic() > deadline:
                log.error("the stack was not ready after %.0f s", ready_timeout_s)
                return 1
        time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    from dvd.grpc_server import setup_logging

    setup_logging(args.log_level)
    model = Path(args.model) if args.model else default_checkpoint()
    if not (model / "config.json").exists():
        raise SystemExit(f"dvd up: {model} has no config.json; is it a checkpoint folder?")
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    children: list[Child] = []
    code = 0
    try:
        pinning = {
            "vision": parse_cpus(args.vision_cpus),
            "language": parse_cpus(args.language_cpus),
        }
        for name, argv in commands(args, model):
            children.append(start(name, argv, pinning.get(name)))
        code = supervise(children, f"http://{args.host}:{args.port}/ready", args.ready_timeout_s)
    except KeyboardInterrupt:
        log.info("stopping dvd-serve")
    finally:
        stop_all(children)
    return code if not stopping else 0
