"""`dvd up` supervises its three processes: clean stop on Ctrl-C, a dead child is reported."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.stack import Stack, http_status, start_stack

pytestmark = pytest.mark.integration


def children_by_role(pid: int) -> dict[str, psutil.Process]:
    roles = {}
    for child in psutil.Process(pid).children():
        cmdline = child.cmdline()
        for role in ("vision", "language", "gateway"):
            if role in cmdline[3:5]:
                roles[role] = child
    return roles


def assert_placed_by_default(roles: dict[str, psutil.Process], log: str) -> None:
    """Each child runs where and at the priority dvd.placement's default plan for this
    machine gives it, vLLM's engine processes inherit both, and the log says so."""
    from dvd.placement import available_cpus, plan
    from dvd.up import gpu_count

    placed = plan(["vision"], available_cpus(), gpu_host=gpu_count() > 0)
    assert f"CPU placement: {placed.how}" in log
    for role, process in roles.items():
        want = placed.cpus.get(role) or available_cpus()
        assert set(process.cpu_affinity()) == want, role
        nice = psutil.Process().nice() + placed.nice.get(role, 0)
        assert process.nice() == nice, role
        for descendant in process.children(recursive=True):
            # within the child's CPUs: vLLM's engine may bind itself to fewer of them
            assert set(descendant.cpu_affinity()) <= want, (role, descendant.cmdline())
            assert descendant.nice() == nice, (role, descendant.cmdline())
        ours = os.environ.get("OMP_NUM_THREADS")
        want_threads = placed.env(role).get("OMP_NUM_THREADS", ours)
        assert process.environ().get("OMP_NUM_THREADS") == want_threads, role


def test_default_model_then_ctrl_c_stops_all_three(tmp_path: Path) -> None:
    stack = start_stack(None, tmp_path)
    process, port = stack.process, stack.port
    try:
        text = stack.log_path.read_text()
        assert "RANDOM" in text
        assert (tmp_path / "cache" / "checkpoints").is_dir()
        descendants = psutil.Process(process.pid).children(recursive=True)
        roles = children_by_role(process.pid)
        assert set(roles) == {"vision", "language", "gateway"}
        assert_placed_by_default(roles, text)
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
        assert http_status(f"http://127.0.0.1:{port}/health") == 0
    finally:
        stack.stop(timeout_s=5)


def test_a_child_that_dies_is_reported_and_the_rest_stopped(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    stack = start_stack(tiny_checkpoint, tmp_path)
    process, log = stack.process, stack.log_path
    try:
        roles = children_by_role(process.pid)
        descendants = psutil.Process(process.pid).children(recursive=True)
        roles["vision"].kill()
        assert process.wait(60) == 1
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert not alive
        deadline = time.monotonic() + 5
        while "vision exited with code -9" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "vision exited with code -9" in log.read_text()
    finally:
        stack.stop(timeout_s=5)


def test_help_names_every_command_and_its_environment_variables() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dvd", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for command in ("up", "vision", "language", "gateway", "make-checkpoint"):
        assert command in result.stdout
    for command, variable in (
        ("up", "DVD_UP_PORT"),
        ("vision", "DVD_VISION_MAX_BATCH_TILES"),
        ("language", "DVD_LANGUAGE_VISION"),
        ("gateway", "DVD_GATEWAY_MAX_IMAGE_BYTES"),
    ):
        sub = subprocess.run(
            [sys.executable, "-m", "dvd", command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert variable in sub.stdout


def test_bad_configuration_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dvd", "up", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "config.json" in result.stderr


def arenas(owner_pid: int) -> set[str]:
    """The shm arenas a language server with this pid created (other tests, running in
    parallel, have arenas of their own)."""
    return {path.name for path in Path("/dev/shm").glob(f"dvd-arena-{owner_pid}-*")}


def test_shm_arenas_do_not_outlive_processes_killed_with_sigkill(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    first = start_stack(tiny_checkpoint, tmp_path / "first", "--transport", "shm")
    first_language = children_by_role(first.process.pid)["language"]
    second_language = None
    try:
        owned = arenas(first_language.pid)
        assert len(owned) == 1
        first_language.kill()  # SIGKILL: no clean-up
        assert first.process.wait(60) == 1
        assert owned == arenas(first_language.pid)
        second = start_stack(tiny_checkpoint, tmp_path / "second", "--transport", "shm")
        try:
            second_language = children_by_role(second.process.pid)["language"]
            assert not arenas(first_language.pid), (
                "the restarted language server removes stale arenas"
            )
            assert len(arenas(second_language.pid)) == 1
            children_by_role(second.process.pid)["vision"].kill()  # the writer side dies
            assert second.process.wait(60) == 1
        finally:
            second.stop(timeout_s=5)
    finally:
        first.stop(timeout_s=5)
    assert not arenas(first_language.pid)
    if second_language is not None:
        assert not arenas(second_language.pid)


def test_vision_replicas_serve_as_one_pool(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """`--vision-replicas 2`: two `dvd vision` children, both in the language server's pool,
    and image requests are encoded on both."""
    import grpc
    import openai

    from dvd.v1 import common_pb2, language_pb2_grpc
    from tests.images import data_url, png_bytes

    stack = start_stack(
        tiny_checkpoint, tmp_path, "--vision-replicas", "2", "--vision-routing", "least-loaded"
    )
    try:
        visions = [
            child.cmdline()
            for child in psutil.Process(stack.process.pid).children()
            if "vision" in child.cmdline()[3:5]
        ]
        ports = {str(stack.vision_port), str(stack.vision_port + 1)}
        assert {argv[argv.index("--port") + 1] for argv in visions} == ports
        addresses = {f"127.0.0.1:{port}" for port in ports}
        with grpc.insecure_channel(f"127.0.0.1:{stack.language_port}") as channel:
            stub = language_pb2_grpc.LanguageServiceStub(channel)
            info = stub.Info(common_pb2.InfoRequest(), timeout=30)
        assert set(info.vision_addresses) == addresses
        api = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)
        model = api.models.list().data[0].id
        for seed in range(4):  # one at a time: an idle least-loaded pool takes turns
            image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(448, 448, seed))}}
            reply = api.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": [image, {"type": "text", "text": "?"}]}],
                max_tokens=2,
            )
            assert reply.usage is not None and reply.usage.prompt_tokens > 256
        log = stack.log_path.read_text()
        for address in addresses:
            assert f"on vision server {address}" in log, address
    finally:
        stack.stop(timeout_s=5)


def test_one_scrape_of_the_gateway_shows_every_process(dvd_stack: Stack) -> None:
    """`dvd up` opens each process's metrics port and the gateway's /metrics appends their
    series: one valid exposition with the vision and language families, each named once."""
    import openai
    from prometheus_client.parser import text_string_to_metric_families

    from tests.images import data_url, png_bytes

    log = dvd_stack.log_path.read_text()
    urls = re.findall(r"(?:vision|language) metrics: (http://\S+/metrics)", log)
    assert len(urls) == 2, log
    for url in urls:
        assert http_status(url) == 200
    api = openai.OpenAI(base_url=dvd_stack.base_url + "/v1", api_key="unused", max_retries=0)
    image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(448, 448, 7))}}
    api.chat.completions.create(
        model=api.models.list().data[0].id,
        messages=[{"role": "user", "content": [image, {"type": "text", "text": "?"}]}],
        max_tokens=2,
    )
    with urllib.request.urlopen(dvd_stack.base_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    families = list(text_string_to_metric_families(text))
    names = [family.name for family in families]
    assert len(names) == len(set(names)), "a family is named twice"
    samples = {(s.name, s.labels.get("source")): s.value for f in families for s in f.samples}
    sources = {url.split("/")[2] for url in urls}
    vision = {src for (name, src) in samples if name.startswith("dvd_vision_")}
    language = {src for (name, src) in samples if name.startswith("dvd_language_")}
    assert len(vision) == 1 and len(language) == 1 and vision | language == sources
    images = [v for (name, _), v in samples.items() if name == "dvd_vision_images_total"]
    assert images and images[0] >= 1
    assert any(name == "dvd_language_requests_total" for name, _ in samples)
    assert any(name.startswith("dvd_gateway_member_calls") for name, _ in samples)
