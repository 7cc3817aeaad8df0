"""`dvd up`: the whole stack on one machine, as three supervised processes.

Starts a vision server, a language server and a gateway (or, with --coupled, a language
server with the vision model inside and a gateway), waits until the gateway reports ready,
and then watches them: Ctrl-C or SIGTERM stops all of them; a child that exits on its own
is reported with its exit code and the rest are stopped.

`--tls auto` makes a throwaway CA and one certificate per process in a temporary folder
(removed at exit) and gives every child `--tls-cert/--tls-key/--tls-ca`: every gRPC hop and
the tcp transport's data port is then mutual TLS. Files of your own (`--tls-cert`, ...)
go to every child instead.

`--vision-replicas N` starts N vision servers on consecutive ports from --vision-port, one
per GPU on a GPU host (or per device listed in --vision-device), one per share of
--vision-cpus on a CPU host; the language server balances over all of them (one pool).

Every process serves Prometheus metrics (`--vision-metrics-port`, `--language-metrics-port`,
free ports by default, logged at start), and the gateway's /metrics appends the vision and
language series (`dvd gateway --scrape-metrics`), so one scrape of the gateway sees the
whole stack.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dvd import placement
from dvd.env import cache_dir, env_name
from dvd.flags import add_flag, add_repeated_flag, add_tls_flags, tls_from_args
from dvd.ports import free_ports
from language_server.cli import ENGINE_FLAGS, add_engine_flags

if TYPE_CHECKING:
    from dvd.tls import TlsConfig

COMMAND = "up"
DEFAULT_PRESET = "tiny"
TLS_MODES = ("off", "auto")
TLS_ROLES = ("vision", "language", "gateway", "client")
"""Identities `--tls auto` makes: one per process kind, and one for your own gRPC clients."""
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
    add_flag(
        parser,
        COMMAND,
        "--vision-port",
        50051,
        "vision server gRPC port (on 127.0.0.1); replica i listens on this port + i",
    )
    add_flag(
        parser,
        COMMAND,
        "--vision-replicas",
        1,
        "vision servers to start, in one pool the language server balances over",
    )
    add_flag(
        parser,
        COMMAND,
        "--vision-device",
        "auto",
        "torch device of the vision servers: auto (with several replicas: one GPU each, "
        "round robin, on a GPU host), cpu, cuda:N, or a comma-separated list, one per replica",
    )
    add_flag(parser, COMMAND, "--language-port", 50061, "language server gRPC port (on 127.0.0.1)")
    add_flag(
        parser,
        COMMAND,
        "--vision-metrics-port",
        0,
        "vision server Prometheus port (on 127.0.0.1); replica i uses this port + i; 0: free "
        "ports, logged at start (the gateway's /metrics shows these series too)",
    )
    add_flag(
        parser,
        COMMAND,
        "--language-metrics-port",
        0,
        "language server Prometheus port (on 127.0.0.1); 0: a free port, logged at start",
    )
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
        "--vision-routing",
        "cache-affine",
        "which vision replica gets a request: cache-affine (by its first image, so repeats "
        "hit one encoder cache) or least-loaded",
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
    add_engine_flags(parser, COMMAND)  # forwarded to the language server
    add_flag(parser, COMMAND, "--served-model-name", None, "model name clients use")
    add_repeated_flag(
        parser,
        COMMAND,
        "--api-key",
        "API key the gateway requires on /v1/* (repeatable); passed to it in its environment, "
        "not on its command line, so it shows in no process list or log",
        metavar="KEY",
    )
    add_flag(parser, COMMAND, "--ready-timeout-s", 600.0, "how long to wait for the stack")
    add_flag(
        parser,
        COMMAND,
        "--vision-cpus",
        "",
        "CPU ids the vision servers run on, e.g. 0 or 0-3,8, split among replicas in equal "
        "consecutive shares; replaces the default placement (see --cpu-placement)",
    )
    add_flag(
        parser,
        COMMAND,
        "--language-cpus",
        "",
        "CPU ids the language server (and its vLLM engine) runs on; replaces the default "
        "placement (see --cpu-placement)",
    )
    add_flag(
        parser,
        COMMAND,
        "--cpu-placement",
        "auto",
        "auto: on a CPU host, the vision servers may use every CPU this process may use "
        "(thread pools sized to match) and the language server the last half of them at a "
        "lower CPU priority, so the ViT that a waiting request's first token needs goes "
        "first where the two meet (printed at start); off: every server on any CPU with "
        "its libraries' default threads. Not applied with --coupled, on a GPU host, or "
        "when --vision-cpus / --language-cpus are given",
        choices=placement.MODES,
    )
    add_flag(
        parser,
        COMMAND,
        "--tls",
        "off",
        "auto: a throwaway CA and certificates (localhost, 127.0.0.1) in a temporary folder, "
        "removed at exit, and mutual TLS on every gRPC hop and the tcp data port; off: "
        "plaintext, unless --tls-cert/--tls-key/--tls-ca are given, which every process "
        "then uses",
        choices=TLS_MODES,
    )
    add_tls_flags(parser, COMMAND, "the stack's servers")
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


def engine_arguments(args: argparse.Namespace) -> list[str]:
    """The language server's engine flags, as `dvd up` was given them."""
    argv: list[str] = []
    for flag in ENGINE_FLAGS:
        argv += [flag, str(getattr(args, flag.lstrip("-").replace("-", "_")))]
    if args.enable_prefix_caching is not None:
        argv.append(
            "--enable-prefix-caching"
            if args.enable_prefix_caching
            else "--no-enable-prefix-caching"
        )
    argv.append("--enforce-eager" if args.enforce_eager else "--no-enforce-eager")
    for item in args.engine_arg:
        argv += ["--engine-arg", item]
    return argv


def vision_names(replicas: int) -> list[str]:
    """Child names: "vision" alone, "vision-1".."vision-N" for several."""
    return ["vision"] if replicas == 1 else [f"vision-{i + 1}" for i in range(replicas)]


def vision_devices(text: str, replicas: int) -> list[str]:
    """The --device of each vision replica. "auto" with several replicas puts one on each
    GPU of a GPU host (round robin when there are more replicas than GPUs)."""
    devices = [d.strip() for d in text.split(",") if d.strip()] or ["auto"]
    if len(devices) == 1:
        if devices[0] == "auto" and replicas > 1:
            gpus = gpu_count()
            if gpus:
                return [f"cuda:{i % gpus}" for i in range(replicas)]
        return devices * replicas
    if len(devices) != replicas:
        raise ValueError(
            f"vision_device: {len(devices)} devices listed for {replicas} vision replicas"
        )
    return devices


def gpu_count() -> int:
    """CUDA devices this process sees (torch is imported only to count them)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def metrics_ports(args: argparse.Namespace) -> tuple[list[int], int]:
    """The metrics port of each vision server (none when coupled) and of the language
    server: the flags' ports, or free ones where a flag is 0."""
    replicas = 0 if args.coupled else args.vision_replicas
    free = iter(free_ports(replicas * (not args.vision_metrics_port) + 1))
    if args.vision_metrics_port:
        vision = [args.vision_metrics_port + i for i in range(replicas)]
    else:
        vision = [next(free) for _ in range(replicas)]
    language = args.language_metrics_port or next(free)
    if language in vision:
        raise ValueError(f"language_metrics_port: {language} is a vision server's metrics port")
    return vision, language


def metrics_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics"


def stack_tls(args: argparse.Namespace) -> tuple[dict[str, TlsConfig], Path | None]:
    """Each process kind's TLS files (none: plaintext), and the temporary folder `--tls
    auto` made them in (None otherwise), which the caller removes at exit."""
    if args.tls == "auto":
        if args.tls_cert or args.tls_key or args.tls_ca:
            raise ValueError(
                "--tls auto makes its own certificates: drop --tls-cert/--tls-key/--tls-ca, "
                "or leave --tls off to use yours"
            )
        from dvd.throwaway_certs import local_identities

        folder = Path(tempfile.mkdtemp(prefix="dvd-tls-"))
        identities = local_identities(folder, TLS_ROLES)
        if args.tls_server_name:
            identities = {
                role: dataclasses.replace(config, server_name=args.tls_server_name)
                for role, config in identities.items()
            }
        log.info(
            "TLS (auto): mutual TLS between every process; throwaway CA and certificates in "
            "%s, removed at exit (call the gRPC ports with ca.crt, client.crt and client.key "
            "from there)",
            folder,
        )
        return identities, folder
    given = tls_from_args(args)  # ValueError for a certificate without its key
    if not given.enabled:
        return {}, None
    given.check_listener("dvd up")
    return dict.fromkeys(TLS_ROLES, given), None


def tls_arguments(config: TlsConfig | None) -> list[str]:
    """A child's TLS flags."""
    if config is None:
        return []
    argv = []
    for flag, value in (
        ("--tls-cert", config.cert),
        ("--tls-key", config.key),
        ("--tls-ca", config.ca),
        ("--tls-server-name", config.server_name),
    ):
        if value:
            argv += [flag, value]
    return argv


def commands(
    args: argparse.Namespace, model: Path, tls: dict[str, TlsConfig] | None = None
) -> list[tuple[str, list[str]]]:
    """Every child's name and command line; `tls`: process kind -> its TLS files."""
    tls = tls or {}
    dvd = [sys.executable, "-m", "dvd"]
    common = ["--model", str(model), "--dtype", args.dtype, "--log-level", args.log_level]
    vision_ports = [args.vision_port + i for i in range(args.vision_replicas)]
    vision_metrics, language_metrics = metrics_ports(args)
    language = [
        *dvd,
        "language",
        *common,
        "--port",
        str(args.language_port),
        "--metrics-port",
        str(language_metrics),
        "--max-model-len",
        str(args.max_model_len),
        *engine_arguments(args),
        *tls_arguments(tls.get("language")),
    ]
    if args.served_model_name:
        language += ["--served-model-name", args.served_model_name]
    if args.coupled:
        language += ["--mode", "coupled"]
    else:
        pool = ",".join(f"127.0.0.1:{port}" for port in vision_ports)
        language += ["--mode", "dvd", "--vision", pool, "--transport", args.transport]
        language += ["--vision-routing", args.vision_routing]
    gateway = [
        *dvd,
        "gateway",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--language",
        f"127.0.0.1:{args.language_port}",
        "--scrape-metrics",
        ",".join(metrics_url(port) for port in [*vision_metrics, language_metrics]),
        "--log-level",
        args.log_level,
        *tls_arguments(tls.get("gateway")),
    ]
    procs = [("language", language), ("gateway", gateway)]
    if not args.coupled:
        accepted = "grpc" if args.transport == "grpc" else f"grpc,{args.transport}"
        names = vision_names(args.vision_replicas)
        devices = vision_devices(args.vision_device, args.vision_replicas)
        visions = []
        for name, port, device, metrics in zip(
            names, vision_ports, devices, vision_metrics, strict=True
        ):
            argv = [*dvd, "vision", *common, "--port", str(port), "--transport", accepted]
            argv += ["--metrics-port", str(metrics), *tls_arguments(tls.get("vision"))]
            if device != "auto":
                argv += ["--device", device]
            visions.append((name, argv))
        procs[:0] = visions
    return procs


def child_env(
    name: str, args: argparse.Namespace, placed: placement.Placement
) -> dict[str, str] | None:
    """Ours, plus the thread counts of `name`'s placement where ours sets none (thread
    counts you exported yourself win); the gateway's also carries `--api-key` (argv is
    logged and world-readable). None: ours unchanged."""
    extra = {key: value for key, value in placed.env(name).items() if key not in os.environ}
    if name == "gateway" and args.api_key:
        extra[env_name("gateway", "--api-key")] = shlex.join(args.api_key)
    return {**os.environ, **extra} if extra else None


def place(args: argparse.Namespace) -> placement.Placement:
    """Where each child runs (see dvd.placement); a GPU is looked for only when it matters."""
    visions = [] if args.coupled else vision_names(args.vision_replicas)
    vision_cpus = placement.parse_cpus(args.vision_cpus)
    language_cpus = placement.parse_cpus(args.language_cpus)
    explicit = bool(vision_cpus or language_cpus)
    # vLLM computes on a GPU whenever it sees one, so any GPU turns CPU placement off.
    on_gpu = not explicit and args.cpu_placement == "auto" and not args.coupled
    on_gpu = on_gpu and (
        any(d.startswith("cuda") for d in vision_devices(args.vision_device, args.vision_replicas))
        or gpu_count() > 0
    )
    return placement.plan(
        visions,
        placement.available_cpus(),
        mode=args.cpu_placement,
        vision_cpus=vision_cpus,
        language_cpus=language_cpus,
        coupled=args.coupled,
        gpu_host=on_gpu,
    )


def check_language(argv: list[str]) -> None:
    """Builds the language server's config from its command line as `dvd language` will,
    and checks its engine argument names: a bad setting fails here, before any child has
    started (and before a vision server has loaded its model for nothing)."""
    from dvd.cli import build_parser
    from language_server.cli import config_from_args
    from language_server.engine_args import check_names

    language_args = build_parser().parse_args(argv[argv.index("language") :])
    check_names(config_from_args(language_args).engine_args)


def _die_with_parent() -> None:
    """Children get SIGTERM if `dvd up` itself is killed (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start(
    name: str,
    argv: list[str],
    cpus: frozenset[int] | None = None,
    env: dict[str, str] | None = None,
    nice: int = 0,
) -> Child:
    """Starts a child that dies with us, runs only on `cpus` when given, and at `nice`
    (its own children, e.g. vLLM's engine processes, inherit both)."""
    log.info("starting %s%s: %s", name, f" on CPUs {sorted(cpus)}" if cpus else "", " ".join(argv))

    def prepare() -> None:
        _die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)
        if nice:
            os.nice(nice)

    return Child(name, subprocess.Popen(argv, preexec_fn=prepare, env=env))


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
                base = ready_url.rsplit("/", 1)[0]
                log.info("dvd-serve is ready: %s (metrics of all: %s/metrics)", base + "/v1", base)
            elif time.monotonic() > deadline:
                log.error("the stack was not ready after %.0f s", ready_timeout_s)
                return 1
        time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    from dvd.checkpoint.family import require_servable
    from dvd.grpc_server import setup_logging

    setup_logging(args.log_level)
    model = Path(args.model) if args.model else default_checkpoint()
    if not (model / "config.json").exists():
        raise SystemExit(f"dvd up: {model} has no config.json; is it a checkpoint folder?")
    # The family decides which servers start; one this version cannot serve stops here,
    # before any child process is started.
    require_servable(model, COMMAND)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    # Also SIGINT: a process started in the background by a non-interactive shell inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler of its own.
    signal.signal(signal.SIGINT, on_signal)
    children: list[Child] = []
    code = 0
    tls_folder: Path | None = None
    try:
        if args.vision_replicas < 1:
            raise ValueError(f"vision_replicas: must be at least 1, not {args.vision_replicas}")
        placed = place(args)
        log.info("CPU placement: %s", placed.how)
        for line in placed.describe():
            log.info("  %s", line)
        tls, tls_folder = stack_tls(args)
        procs = commands(args, model, tls)
        check_language(dict(procs)["language"])
        for name, argv in procs:
            if name != "gateway":
                port = int(argv[argv.index("--metrics-port") + 1])
                log.info("%s metrics: %s", name, metrics_url(port))
        for name, argv in procs:
            env = child_env(name, args, placed)
            cpus, nice = placed.cpus.get(name), placed.nice.get(name, 0)
            children.append(start(name, argv, cpus, env, nice))
        code = supervise(children, f"http://{args.host}:{args.port}/ready", args.ready_timeout_s)
    except KeyboardInterrupt:
        log.info("stopping dvd-serve")
    finally:
        stop_all(children)
        if tls_folder is not None:
            shutil.rmtree(tls_folder, ignore_errors=True)
    return code if not stopping else 0
