"""API keys on the gateway: 401 in OpenAI's shape, open probes, key ids in logs and metrics,
the official openai client, and a key file re-read on SIGHUP by a real `dvd gateway` process.

Gateways run in front of the fake language server of tests/test_gateway.py, on loopback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.systems import free_port
from gateway.auth import ApiKeys, key_id
from gateway.config import GatewayConfig
from tests.test_gateway import (
    MODEL,
    FakeLanguage,
    assert_openai_error,
    chat,
    fake_language,  # noqa: F401  (a fixture)
    serve,
    wait_healthy,
)

pytestmark = pytest.mark.timeout(90)

KEYS = ("sk-first-0123456789", "sk-second-abcdefghij")
ROOT = Path(__file__).resolve().parent.parent


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(fake_language: tuple[str, FakeLanguage]) -> Iterator[str]:  # noqa: F811
    config = GatewayConfig(language_addresses=(fake_language[0],), api_keys=KEYS)
    with serve(config) as url:
        yield url


def test_v1_needs_a_key_and_probes_stay_open(keyed: str) -> None:
    with httpx.Client(base_url=keyed, timeout=10) as client:
        for headers in ({}, bearer("sk-wrong"), {"authorization": KEYS[0]}, bearer(KEYS[0][:-1])):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
                response = client.request(method, path, headers=headers, json=chat("hi"))
                error = assert_openai_error(response, 401)
                assert error["code"] == "invalid_api_key"
                assert error["type"] == "authentication_error"
                assert response.headers["www-authenticate"] == "Bearer"
                assert KEYS[0] not in response.text
        for key in KEYS:
            assert client.get("/v1/models", headers=bearer(key)).json()["data"][0]["id"] == MODEL
        for path in ("/health", "/ready", "/metrics"):
            assert client.get(path).status_code == 200, path


def test_key_ids_not_keys_in_logs_and_metrics(keyed: str, caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.INFO, logger="dvd.gateway"),
        httpx.Client(base_url=keyed, timeout=10) as client,
    ):
        assert client.post(
            "/v1/chat/completions", json=chat("hi"), headers=bearer(KEYS[1])
        ).is_success
        assert client.post("/v1/chat/completions", json=chat("hi")).status_code == 401
        metrics = client.get("/metrics").text
    lines = [r.getMessage() for r in caplog.records if "/v1/chat/completions" in r.getMessage()]
    assert any(f"key={key_id(KEYS[1])} status=200" in line for line in lines), lines
    assert any("key=none status=401" in line for line in lines), lines
    assert f'dvd_gateway_key_requests_total{{key_id="{key_id(KEYS[1])}",status="200"}}' in metrics
    assert 'key_id="none",status="401"' in metrics
    for key in KEYS:
        assert key not in metrics and all(key not in line for line in lines)
        assert key not in repr(GatewayConfig(api_keys=KEYS))


def test_protected_metrics(fake_language: tuple[str, FakeLanguage]) -> None:  # noqa: F811
    config = GatewayConfig(
        language_addresses=(fake_language[0],), api_keys=KEYS, protect_metrics=True
    )
    with serve(config) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert_openai_error(client.get("/metrics"), 401)
        assert client.get("/metrics", headers=bearer(KEYS[0])).status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200


def test_no_key_configured_is_open(fake_language: tuple[str, FakeLanguage]) -> None:  # noqa: F811
    with serve(GatewayConfig(language_addresses=(fake_language[0],))) as url:
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 200


def test_api_keys_match_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# rotated monthly\nsk-file-1\n\n  sk-file-2  \n")
    keys = ApiKeys(["sk-flag"], str(path))
    assert keys.required
    assert keys.match("sk-flag") == key_id("sk-flag")
    assert keys.match("sk-file-2") == key_id("sk-file-2")
    assert keys.match("# rotated monthly") is None and keys.match("") is None
    path.write_text("sk-file-3\n")
    keys.reload()
    assert keys.match("sk-file-1") is None and keys.match("sk-file-3") is not None
    path.unlink()
    keys.reload()  # unreadable: the old keys stay
    assert keys.match("sk-file-3") is not None
    assert not ApiKeys().required
    assert len(key_id("x")) == 8 and key_id("x") != key_id("y")


def test_config_refuses_bad_keys_without_showing_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="api_keys: key 2") as info:
        GatewayConfig(api_keys=("sk-good", "sk bad"))
    assert "sk bad" not in str(info.value)
    with pytest.raises(ValueError, match="api_key_file"):
        GatewayConfig(api_key_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="protect_metrics"):
        GatewayConfig(protect_metrics=True)


def test_cli_and_up_pass_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dvd.placement import Placement
    from dvd.up import child_env
    from dvd.up import register as register_up
    from gateway.cli import config_from_args, register

    monkeypatch.setenv("DVD_GATEWAY_API_KEY", "sk-env")
    parser = argparse.ArgumentParser(prog="dvd")
    register(parser.add_subparsers())
    args = parser.parse_args(["gateway", "--api-key", "sk-a", "--api-key", "sk-b"])
    config = config_from_args(args)
    assert config.api_keys == ("sk-env", "sk-a", "sk-b") and not config.protect_metrics

    up_parser = argparse.ArgumentParser(prog="dvd")
    register_up(up_parser.add_subparsers())
    up_args = up_parser.parse_args(["up", "--api-key", "sk-up"])
    unplaced = Placement()
    env = child_env("gateway", up_args, unplaced)
    assert env is not None and env["DVD_GATEWAY_API_KEY"] == "sk-up"
    assert child_env("language", up_args, unplaced) is None


def test_real_gateway_process_openai_client_and_sighup(
    fake_language: tuple[str, FakeLanguage],  # noqa: F811
    tmp_path: Path,
) -> None:
    openai = pytest.importorskip("openai")
    key_file = tmp_path / "keys"
    key_file.write_text("sk-file-old\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DVD_GATEWAY_PORT": str(port), "DVD_GATEWAY_API_KEY": "sk-env"}
    argv = [sys.executable, "-m", "dvd", "gateway", "--language", fake_language[0]]
    argv += ["--api-key-file", str(key_file), "--log-level", "info"]
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=out)
    try:
        wait_healthy(url, process)
        messages: Any = chat("describe")["messages"]
        for key in ("sk-env", "sk-file-old"):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
            reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
            assert reply.choices[0].message.content == "Hello world!"
            stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            wrong.models.list()
        assert info.value.code == "invalid_api_key"

        key_file.write_text("sk-file-new\n")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/v1/models", headers=bearer("sk-file-new")).status_code != 200:
            assert time.monotonic() < deadline, "SIGHUP did not reload the key file"
            time.sleep(0.1)
        assert httpx.get(f"{url}/v1/models", headers=bearer("sk-file-old")).status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=bearer("sk-env")).status_code == 200
        assert process.poll() is None, "SIGHUP must not stop the gateway"
    finally:
        process.terminate()
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    text = log.read_text()
    assert f"key={key_id('sk-env')}" in text, text[-2000:]
    for key in ("sk-env", "sk-file-old", "sk-file-new", "sk-wrong"):
        assert key not in text
