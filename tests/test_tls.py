"""TLS and mutual TLS between tiers (dvd.tls), on loopback.

- the flags' checks: a certificate without its key, a CA alone on a listener, missing,
  non-PEM and mismatched files, each named in the error;
- the tcp transport's data port as a TLS listener in this process: a plaintext sender, one
  without a certificate and one whose certificate another CA signed are refused (and
  logged), a sender with a certificate ours signed gets its bytes through;
- a real `dvd vision` process with mTLS: plaintext, cert-less, other-CA and wrong-name
  clients are refused, ours is served, Encode delivers features over a TLS data port, and
  dvd-healthcheck asks it with the server's own files;
- one `dvd up --tls auto --transport tcp`: a chat through the gateway from the official
  openai client, while plaintext and cert-less clients are refused at the language and
  vision gRPC ports and at the language server's tcp data port; its certificates go when
  it stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from dvd.grpc_options import CHANNEL_OPTIONS
from dvd.throwaway_certs import local_identities
from dvd.tls import MTLS, PLAINTEXT, TLS, TlsConfig
from dvd.transport.base import RequestShape
from dvd.transport.tcp import Receiver, Sender, TcpReception
from dvd.transport.tcp.wire import ConnectionPool, FrameHeader
from dvd.v1 import common_pb2, language_pb2_grpc, vision_pb2, vision_pb2_grpc
from tests.images import data_url, png_bytes
from tests.stack import Stack, free_port, start_stack

ROOT = Path(__file__).resolve().parents[1]
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Pki:
    """Our CA's server and client identities, and clients it should refuse."""

    server: TlsConfig
    client: TlsConfig
    no_certificate: TlsConfig
    """Trusts our CA, presents no certificate."""
    stranger: TlsConfig
    """Trusts our CA, presents a certificate another CA signed."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ours = local_identities(folder / "ours", ("server", "client"))
    theirs = local_identities(folder / "theirs", ("client",))["client"]
    ca = ours["client"].ca
    return Pki(
        server=ours["server"],
        client=ours["client"],
        no_certificate=TlsConfig(ca=ca),
        stranger=TlsConfig(cert=theirs.cert, key=theirs.key, ca=ca),
    )


# --- the flags' checks --------------------------------------------------------------------


def test_a_certificate_and_its_key_go_together() -> None:
    with pytest.raises(ValueError, match="--tls-cert needs --tls-key"):
        TlsConfig(cert="server.crt")
    with pytest.raises(ValueError, match="--tls-key needs --tls-cert"):
        TlsConfig(key="server.key")
    with pytest.raises(ValueError, match="--tls-server-name needs --tls-ca or --tls-cert"):
        TlsConfig(server_name="dvd-vision")


def test_modes_of_listeners_and_clients() -> None:
    assert (TlsConfig().listener_mode, TlsConfig().client_mode) == (PLAINTEXT, PLAINTEXT)
    assert TlsConfig().load() is None
    own = TlsConfig(cert="c", key="k")
    assert (own.listener_mode, own.client_mode) == (TLS, MTLS)
    both = TlsConfig(cert="c", key="k", ca="ca")
    assert (both.listener_mode, both.client_mode) == (MTLS, MTLS)
    trust_only = TlsConfig(ca="ca")  # a gateway may call with no identity of its own
    assert (trust_only.listener_mode, trust_only.client_mode) == (PLAINTEXT, TLS)


def test_servers_need_their_own_certificate_for_tls() -> None:
    from gateway.config import GatewayConfig
    from language_server.config import LanguageServerConfig
    from vision_server.config import VisionServerConfig

    with pytest.raises(ValueError, match="vision server: --tls-ca needs --tls-cert"):
        VisionServerConfig(model="m", tls=TlsConfig(ca="ca.crt"))
    with pytest.raises(ValueError, match="language server: --tls-ca needs --tls-cert"):
        LanguageServerConfig(model="m", tls=TlsConfig(ca="ca.crt"))
    assert GatewayConfig(tls=TlsConfig(ca="ca.crt")).tls.ca == "ca.crt"  # a client only


def test_missing_unreadable_and_wrong_files_are_named(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.crt"
    with pytest.raises(ValueError, match=f"--tls-cert {missing}: cannot read it"):
        TlsConfig(cert=str(missing), key=pki.server.key).load()
    with pytest.raises(ValueError, match=f"--tls-ca {tmp_path}: cannot read it"):
        TlsConfig(ca=str(tmp_path)).load()  # a folder
    text = tmp_path / "notes.txt"
    text.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=f"--tls-ca {text}: not PEM"):
        TlsConfig(ca=str(text)).load()
    with pytest.raises(ValueError, match=f"--tls-key {pki.server.cert}: not PEM"):
        TlsConfig(cert=pki.server.cert, key=pki.server.cert).load()
    with pytest.raises(ValueError, match=r"OpenSSL refuses them.*is the key this certificate's"):
        TlsConfig(cert=pki.server.cert, key=pki.client.key).load()
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(encrypted_copy(Path(pki.server.key)))
    with pytest.raises(ValueError, match=f"--tls-key {encrypted}: an encrypted key"):
        TlsConfig(cert=pki.server.cert, key=str(encrypted)).load()
    tls = pki.server.load()
    assert tls is not None and tls.listener_mode == MTLS


def encrypted_copy(key: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


def test_gateway_reads_its_files_before_it_listens(tmp_path: Path) -> None:
    from gateway.app import create_app
    from gateway.config import GatewayConfig

    missing = tmp_path / "ca.crt"
    with pytest.raises(ValueError, match=f"--tls-ca {missing}: cannot read it"):
        create_app(GatewayConfig(tls=TlsConfig(ca=str(missing))))


def test_dvd_up_gives_every_child_its_certificate() -> None:
    from dvd.cli import build_parser
    from dvd.up import commands, stack_tls

    args = build_parser().parse_args(["up", "--tls", "auto", "--transport", "tcp"])
    tls, folder = stack_tls(args)
    assert folder is not None
    try:
        assert {p.name for p in folder.iterdir()} == {
            f"{role}.{ext}"
            for role in ("vision", "language", "gateway", "client")
            for ext in ("crt", "key")
        } | {"ca.crt"}
        for name, argv in commands(args, Path("/models/x"), tls):
            role = name.split("-")[0]
            cert = argv[argv.index("--tls-cert") + 1]
            assert cert == str(folder / f"{role}.crt")
            assert argv[argv.index("--tls-ca") + 1] == str(folder / "ca.crt")
            assert (folder / f"{role}.key").stat().st_mode & 0o077 == 0
    finally:
        shutil.rmtree(folder)
    plain = build_parser().parse_args(["up"])
    assert stack_tls(plain) == ({}, None)
    assert all("--tls-cert" not in argv for _, argv in commands(plain, Path("/models/x")))
    mixed = build_parser().parse_args(["up", "--tls", "auto", "--tls-ca", "ca.crt"])
    with pytest.raises(ValueError, match="--tls auto makes its own certificates"):
        stack_tls(mixed)


# --- helpers ------------------------------------------------------------------------------


def flags(config: TlsConfig) -> list[str]:
    from dvd.up import tls_arguments

    return tls_arguments(config)


def health(
    address: str,
    tls: TlsConfig | None,
    stub_class: type = vision_pb2_grpc.VisionServiceStub,
    name: str = "127.0.0.1",
) -> grpc.StatusCode:
    """What a Health call from a client with `tls` (None: plaintext) ends with."""
    loaded = tls.load() if tls is not None else None
    if loaded is None:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    else:
        options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", name)]
        channel = grpc.secure_channel(address, loaded.channel_credentials(), options=options)
    with channel:
        try:
            stub_class(channel).Health(common_pb2.HealthRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def wait_for(condition, what: str, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.05)


def refused_by_peer(sock: socket.socket) -> bool:
    """Whether the peer closed the connection (the next read sees EOF or a reset)."""
    sock.settimeout(30)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def rejected(tls: TlsConfig | None, address: str) -> bool:
    """Whether one frame sent over a fresh tcp data connection with `tls` fails at once."""
    context = tls.load().client_context() if tls is not None else None  # type: ignore[union-attr]
    pool = ConnectionPool(address, 1, 10.0, 10.0, context)
    try:
        pool.send(FrameHeader(b"t" * 16, 0, 0, 4).pack(), memoryview(b"1234"))
    except ConnectionError:
        return True
    finally:
        pool.retire()
    return False


REFUSALS = {
    "plaintext": "not TLS, a plaintext sender",
    "no_certificate": "the sender presented no certificate",
    "stranger": "the sender's certificate is not one our --tls-ca signed",
    "client": "the sender refused our certificate",  # it expected another name
}
"""The listener's log line, after "tcp data connection from ADDRESS refused: ", per sender."""


def logged(records: list[logging.LogRecord], who: str) -> bool:
    return any(
        "refused: " + REFUSALS[who] in r.getMessage() for r in records if r.levelname == "WARNING"
    )


# --- the tcp data port in this process ----------------------------------------------------


@pytest.fixture
def tls_receiver(pki: Pki) -> Iterator[Receiver]:
    tls = pki.server.load()
    assert tls is not None
    receiver = Receiver(tls=tls.server_context())
    yield receiver
    receiver.close()


def _reception(receiver: Receiver) -> tuple[TcpReception, vision_pb2.EncodeRequest]:
    reception = receiver.open(RequestShape("r", [4 * 64 * 2], 64, torch.bfloat16))
    assert isinstance(reception, TcpReception)
    request = vision_pb2.EncodeRequest(
        request_id="r",
        images=[vision_pb2.ImageInput(data=b"img")],
        destination=reception.destination,
    )
    return reception, request


def _send(receiver: Receiver, tls: TlsConfig | None, server_name: str = "") -> TcpReception:
    """Sends 4 rows to a fresh request with a sender using `tls`; the reception."""
    reception, request = _reception(receiver)
    loaded = tls.load() if tls is not None else None
    context = loaded.client_context() if loaded is not None else None
    sender = Sender(tls=context, server_name=server_name, connect_timeout_s=10)
    try:
        rows = torch.arange(4 * 64, dtype=torch.float32).view(4, 64).to(torch.bfloat16)
        list(sender.open(request).chunks(0, 0, rows, 1 << 20))
    finally:
        sender.close()
    return reception


def test_data_port_takes_a_sender_whose_certificate_our_ca_signed(
    tls_receiver: Receiver, pki: Pki
) -> None:
    reception = _send(tls_receiver, pki.client)
    wait_for(lambda: reception.landed_bytes == [4 * 64 * 2], "the frame lands")
    reception.release()


def test_tls_connections_are_pooled_and_a_closed_listener_fails_the_send(
    pki: Pki,
) -> None:
    """An idle TLS connection counts as alive (no stray bytes from the listener), so later
    frames reuse it; once the listener has closed, the next frame fails cleanly."""
    server, client = pki.server.load(), pki.client.load()
    assert server is not None and client is not None
    receiver = Receiver(tls=server.server_context())
    sender = Sender(tls=client.client_context(), connections_per_receiver=1)
    rows = torch.ones(4, 64, dtype=torch.bfloat16)
    try:
        for _ in range(3):
            reception, request = _reception(receiver)
            list(sender.open(request).chunks(0, 0, rows, 1 << 20))
            wait_for(lambda r=reception: r.landed_bytes == [4 * 64 * 2], "the frame lands")
            reception.release()
        assert receiver.connections_accepted == 1
        _, request = _reception(receiver)
        receiver.close()
        with pytest.raises(ConnectionError):
            list(sender.open(request).chunks(0, 0, rows, 1 << 20))
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize(
    ("who", "server_name"),
    [("no_certificate", ""), ("stranger", ""), ("client", "dvd-language")],
    ids=["without a certificate", "with another CA's certificate", "expecting another name"],
)
def test_data_port_refuses_tls_senders_it_does_not_take(
    tls_receiver: Receiver,
    pki: Pki,
    who: str,
    server_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with pytest.raises(ConnectionError, match="cannot connect"):
        _send(tls_receiver, getattr(pki, who), server_name)
    wait_for(lambda: logged(caplog.records, who), "the refusal is logged")


def test_data_port_refuses_a_plaintext_sender(
    tls_receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    reception, _ = _reception(tls_receiver)
    host, port = tls_receiver.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(FrameHeader(reception.token, 0, 0, 128).pack() + b"\0" * 128)
        assert refused_by_peer(sock)
    wait_for(lambda: logged(caplog.records, "plaintext"), "the refusal is logged")
    assert reception.landed_bytes == [0]
    reception.release()


# --- a vision server process with mTLS ----------------------------------------------------


@dataclass
class Process:
    process: subprocess.Popen[bytes]
    address: str
    log: Path


@pytest.fixture(scope="module")
def mtls_vision(
    pki: Pki, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Process]:
    """`dvd vision` with our server identity and CA (mTLS), grpc and tcp transports."""
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path_factory.mktemp("mtls-vision") / "vision.log"
    argv = [sys.executable, "-m", "dvd", "vision", "--model", str(tiny_checkpoint)]
    argv += ["--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--device", "cpu"]
    argv += ["--transport", "grpc,tcp", *flags(pki.server)]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    running = Process(process, address, log)
    try:

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"dvd vision exited:\n{log.read_text()}")
            return health(address, pki.client) == grpc.StatusCode.OK

        wait_for(up, "dvd vision answers Health", START_TIMEOUT_S)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("who", "name", "served"),
    [
        (None, "127.0.0.1", False),
        ("no_certificate", "127.0.0.1", False),
        ("stranger", "127.0.0.1", False),
        ("client", "dvd-vision", False),
        ("client", "127.0.0.1", True),
        ("client", "localhost", True),
    ],
    ids=[
        "plaintext",
        "without a certificate",
        "with another CA's certificate",
        "expecting a name its certificate lacks",
        "ours, by address",
        "ours, by name",
    ],
)
def test_mtls_vision_server_serves_only_clients_our_ca_signed(
    mtls_vision: Process, pki: Pki, who: str | None, name: str, served: bool
) -> None:
    tls = getattr(pki, who) if who is not None else None
    code = health(mtls_vision.address, tls, name=name)
    assert code == (grpc.StatusCode.OK if served else grpc.StatusCode.UNAVAILABLE)


@pytest.mark.integration
def test_mtls_vision_server_encodes_into_a_tls_data_port(
    mtls_vision: Process, pki: Pki, tiny_checkpoint: Path
) -> None:
    """The language server's side of DvD in this process (VisionPool, tcp Receiver), both
    with TLS: features come over the TLS data connection the vision process opens."""
    from dvd.checkpoint import load_config
    from language_server.vision_client import VisionPool

    checkpoint = load_config(tiny_checkpoint)
    server_tls, client_tls = pki.server.load(), pki.client.load()
    assert server_tls is not None and client_tls is not None

    async def encode() -> list[torch.Tensor]:
        receiver = Receiver(tls=server_tls.server_context())
        pool = VisionPool(
            [mtls_vision.address],
            torch.bfloat16,
            60.0,
            receiver,
            (checkpoint.max_dynamic_patch + 1) * checkpoint.tokens_per_tile,
            checkpoint.llm_hidden_size,
            tls=client_tls,
        )
        try:
            encoded = await pool.encode("tls-encode", [png_bytes(448, 448, 3)])
            features = [f.clone() for f in encoded.features]
            encoded.release()
            return features
        finally:
            await pool.close()

    (features,) = asyncio.run(encode())
    assert features.shape == (checkpoint.tokens_per_tile, checkpoint.llm_hidden_size)
    assert "tcp transport: data connections mTLS" in mtls_vision.log.read_text()


@pytest.mark.integration
def test_healthcheck_asks_a_tls_server_with_its_own_files_or_ours(
    mtls_vision: Process, pki: Pki
) -> None:
    port = mtls_vision.address.rsplit(":", 1)[1]
    command = [sys.executable, str(HEALTHCHECK), "vision", "--port", port, "--timeout-s", "10"]
    env = {
        "DVD_VISION_TLS_CERT": pki.server.cert,
        "DVD_VISION_TLS_KEY": pki.server.key,
        "DVD_VISION_TLS_CA": pki.server.ca,
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STATUS_SERVING" in result.stdout
    # The README's examples: plaintext and cert-less refused, a client of our CA served.
    ours = ["--tls-ca", pki.client.ca, "--tls-cert", pki.client.cert, "--tls-key", pki.client.key]
    for extra, code in (([], 1), (["--tls-ca", pki.client.ca], 1), (ours, 0)):
        run = subprocess.run(
            [*command, *extra], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert run.returncode == code, (extra, run.stdout + run.stderr)
        assert ("STATUS_SERVING" if code == 0 else "UNAVAILABLE") in run.stdout


# --- a whole stack: dvd up --tls auto --transport tcp -------------------------------------


@dataclass
class TlsStack:
    stack: Stack
    folder: Path
    """Where `dvd up` put the throwaway CA and certificates."""
    data_port: str
    """The language server's tcp data port, host:port."""

    @property
    def client(self) -> TlsConfig:
        return TlsConfig(
            cert=str(self.folder / "client.crt"),
            key=str(self.folder / "client.key"),
            ca=str(self.folder / "ca.crt"),
        )

    @property
    def no_certificate(self) -> TlsConfig:
        return TlsConfig(ca=str(self.folder / "ca.crt"))


@pytest.fixture(scope="module")
def tls_stack(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsStack]:
    workdir = tmp_path_factory.mktemp("tls-stack")
    stack = start_stack(tiny_checkpoint, workdir, "--tls", "auto", "--transport", "tcp")
    try:
        log = stack.log_path.read_text()
        folder = re.search(r"certificates in (\S+), removed at exit", log)
        data = re.search(r"tcp data port listening on (\S+) \(mTLS", log)
        assert folder and data, log
        yield TlsStack(stack, Path(folder.group(1)), data.group(1))
    finally:
        stack.stop()


@pytest.mark.integration
def test_tls_stack_answers_a_chat_through_the_gateway(tls_stack: TlsStack) -> None:
    import openai

    api = openai.OpenAI(base_url=tls_stack.stack.base_url + "/v1", api_key="-", max_retries=0)
    image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(448, 448, 5))}}
    reply = api.chat.completions.create(
        model=api.models.list().data[0].id,
        messages=[{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}],
        max_tokens=3,
    )
    assert reply.usage is not None and reply.usage.prompt_tokens > 256
    log = tls_stack.stack.log_path.read_text()
    for line in (
        r"vision server listening on \S+ \(mTLS",
        r"language server \(dvd\) listening on \S+ \(mTLS",
        r"vision pool: calls vision servers over mTLS",
        r"language pool: calls language servers over mTLS",
        r"tcp transport: data connections mTLS",
    ):
        assert re.search(line, log), line


@pytest.mark.integration
@pytest.mark.parametrize("tier", ["language", "vision"])
def test_tls_stack_refuses_plaintext_and_cert_less_grpc_clients(
    tls_stack: TlsStack, tier: str
) -> None:
    stack = tls_stack.stack
    port = stack.language_port if tier == "language" else stack.vision_port
    address = f"127.0.0.1:{port}"
    stub = (
        language_pb2_grpc.LanguageServiceStub
        if tier == "language"
        else vision_pb2_grpc.VisionServiceStub
    )
    assert health(address, None, stub) == grpc.StatusCode.UNAVAILABLE
    assert health(address, tls_stack.no_certificate, stub) == grpc.StatusCode.UNAVAILABLE
    assert health(address, tls_stack.client, stub) == grpc.StatusCode.OK


@pytest.mark.integration
def test_tls_stack_data_port_refuses_plaintext_and_cert_less_senders(
    tls_stack: TlsStack,
) -> None:
    host, port = tls_stack.data_port.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(FrameHeader(b"t" * 16, 0, 0, 4).pack() + b"1234")
        assert refused_by_peer(sock)
    assert rejected(tls_stack.no_certificate, tls_stack.data_port)
    assert not rejected(tls_stack.client, tls_stack.data_port)  # TLS passes; frame refused

    def both_logged() -> bool:
        log = tls_stack.stack.log_path.read_text()
        return all("refused: " + REFUSALS[who] in log for who in ("plaintext", "no_certificate"))

    wait_for(both_logged, "the language server logs both refusals")


@pytest.mark.integration
def test_tls_stack_removes_its_certificates_when_it_stops(tls_stack: TlsStack) -> None:
    assert (tls_stack.folder / "ca.crt").exists()
    tls_stack.stack.stop()
    assert not tls_stack.folder.exists()
