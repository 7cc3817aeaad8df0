#!/usr/bin/env python3
"""`dvd-healthcheck`: asks a running dvd server whether it is alive or ready; exit 0 if so.

Container probes call this: the vision and language servers answer the `Health` RPC of
package `dvd.v1` (not the standard grpc.health.v1 service, so Kubernetes' native gRPC
probes cannot ask them), and the gateway answers GET /ready and /health.

    dvd-healthcheck vision              # ready: Health says STATUS_SERVING
    dvd-healthcheck language --live     # alive: Health answers at all (a language server
                                        # whose vision servers are all down is alive, not ready)
    dvd-healthcheck gateway             # ready: GET /ready is 200, i.e. at least one
                                        # language server is serving (/health with --live)
    dvd-healthcheck                     # the role and port of the dvd process found in /proc

The port is the one the server itself reads: --port, else DVD_<ROLE>_PORT, else the CLI's
default. The host is DVD_<ROLE>_HOST unless that is a wildcard (then 127.0.0.1).

TLS: a vision or language server started with --tls-cert (or DVD_<ROLE>_TLS_CERT) is asked
over TLS with the server's own files, read the same way: its certificate and key as the
probe's client identity (a mutual-TLS server takes it, its CA signed it), its --tls-ca to
check the server. The name checked is --tls-server-name, else the first name in the
server's own certificate (a DNS name, else an IP address), whatever address is dialled.
--tls-cert/--tls-key/--tls-ca given here replace the server's files (then the name checked
is --tls-server-name, else the host dialled):

    dvd-healthcheck vision --tls-ca ca.crt --tls-cert client.crt --tls-key client.key

Exit codes: 0 healthy, 1 not healthy, 2 usage error. Stdlib, grpc, and cryptography to
read a certificate's names.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import grpc

ROLES = ("vision", "language", "gateway", "up")
DEFAULT_PORTS = {"vision": 50051, "language": 50061, "gateway": 8000, "up": 8000}
"""The `--port` defaults of `dvd vision|language|gateway|up` (a test checks they match)."""
WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvd-healthcheck",
        description="Exit 0 when the dvd server of ROLE is ready (or alive, with --live).",
    )
    parser.add_argument(
        "role",
        nargs="?",
        choices=ROLES,
        help="server to ask; default: the dvd process running in this container",
    )
    parser.add_argument("--host", help="address to ask; default DVD_<ROLE>_HOST or 127.0.0.1")
    parser.add_argument("--port", type=int, help="port to ask; default DVD_<ROLE>_PORT")
    parser.add_argument(
        "--live", action="store_true", help="only check that the server answers (liveness)"
    )
    parser.add_argument("--timeout-s", type=float, default=4.0, help="deadline of the check")
    parser.add_argument("--tls-cert", help="client certificate; default: the server's own")
    parser.add_argument("--tls-key", help="key of --tls-cert; default: the server's own")
    parser.add_argument("--tls-ca", help="CA the server's certificate is checked against")
    parser.add_argument(
        "--tls-server-name",
        help="name the server's certificate must carry; default: the first name in the "
        "server's own certificate, or with --tls-* given here the host dialled",
    )
    return parser


def dvd_role(argv: Sequence[str]) -> str | None:
    """The server role in a command line such as `dvd vision ...` or `python -m dvd up`."""
    for i, word in enumerate(argv[:-1]):
        if os.path.basename(word) == "dvd" and argv[i + 1] in ROLES:
            return argv[i + 1]
    return None


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of `--flag V` or `--flag=V` in argv (the last one wins, as in argparse)."""
    value = None
    for i, word in enumerate(argv):
        if word == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(flag + "="):
            value = word.split("=", 1)[1]
    return value


def command_lines() -> Iterable[list[str]]:
    """Command lines of the processes in /proc, lowest pid first."""
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        if raw:
            yield [part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")]


def find_server() -> tuple[str, list[str]] | None:
    """(role, argv) of the first dvd server process in this PID namespace."""
    for argv in command_lines():
        role = dvd_role(argv)
        if role is not None:
            return role, argv
    return None


def target(role: str, host: str | None, port: int | None, argv: Sequence[str] = ()) -> str:
    """host:port the server of `role` listens on, as the server itself works it out."""
    prefix = f"DVD_{role.upper()}_"
    if port is None:
        flag = flag_value(argv, "--port")
        raw = flag if flag is not None else os.environ.get(prefix + "PORT")
        port = int(raw) if raw else DEFAULT_PORTS[role]
    if host is None:
        host = flag_value(argv, "--host") or os.environ.get(prefix + "HOST", "")
        if role == "up" or host in WILDCARDS:
            host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class TlsFiles(NamedTuple):
    """The server's --tls-cert, --tls-key and --tls-ca ("" where unset)."""

    cert: str
    key: str
    ca: str


def tls_files(role: str, argv: Sequence[str] = ()) -> TlsFiles | None:
    """The server's TLS files as it reads them (flag, else DVD_<ROLE>_TLS_*); None when it
    listens in plaintext (no certificate)."""
    prefix = f"DVD_{role.upper()}_TLS_"
    found = {
        part: flag_value(argv, f"--tls-{part}") or os.environ.get(prefix + part.upper(), "")
        for part in ("cert", "key", "ca")
    }
    return TlsFiles(**found) if found["cert"] else None


def certificate_name(path: str) -> str:
    """The first subject alternative name in a PEM certificate (DNS, else IP), else its
    common name."""
    from cryptography import x509

    with open(path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    try:
        alternative = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        alternative = x509.SubjectAlternativeName([])
    dns = alternative.get_values_for_type(x509.DNSName)
    ips = alternative.get_values_for_type(x509.IPAddress)
    if dns or ips:
        return str((dns or ips)[0])
    common = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(common[0].value) if common else ""


def open_channel(address: str, tls: TlsFiles | None, server_name: str | None) -> grpc.Channel:
    """A channel to the server: plaintext, or TLS with `tls`, checking `server_name` (None:
    the first name in tls.cert, the server's own certificate)."""
    import grpc

    # A proxy from the environment must not stand between the probe and its own pod.
    options: list[tuple[str, int | str]] = [("grpc.enable_http_proxy", 0)]
    if tls is None:
        return grpc.insecure_channel(address, options=options)

    def read(path: str) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(read(tls.ca), read(tls.key), read(tls.cert))
    name = server_name if server_name is not None else certificate_name(tls.cert)
    options.append(("grpc.ssl_target_name_override", name))
    return grpc.secure_channel(address, credentials, options=options)


def check_grpc(
    role: str,
    address: str,
    live: bool,
    timeout_s: float,
    tls: TlsFiles | None = None,
    server_name: str | None = None,
) -> tuple[bool, str]:
    import grpc

    from dvd.v1 import common_pb2, language_pb2_grpc, vision_pb2_grpc

    try:
        channel = open_channel(address, tls, server_name)
    except (OSError, ValueError) as exc:
        return False, f"{role} {address}: cannot read its TLS files: {exc}"
    with channel:
        stub = (
            vision_pb2_grpc.VisionServiceStub(channel)
            if role == "vision"
            else language_pb2_grpc.LanguageServiceStub(channel)
        )
        try:
            reply = stub.Health(common_pb2.HealthRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{role} {address}: Health failed: {exc.code().name} {exc.details()}"
    status = common_pb2.HealthResponse.Status.Name(reply.status)
    serving = reply.status == common_pb2.HealthResponse.STATUS_SERVING
    detail = f"{role} {address}: {status}" + (f" ({reply.detail})" if reply.detail else "")
    return live or serving, detail


def check_http(address: str, live: bool, timeout_s: float) -> tuple[bool, str]:
    url = f"http://{address}/{'health' if live else 'ready'}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            return response.status == 200, f"{url}: {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    role, server_argv = args.role, list[str]()
    if role is None:
        found = find_server()
        if found is None:
            print("dvd-healthcheck: no dvd server process found", file=sys.stderr)
            return 1
        role, server_argv = found
    address = target(role, args.host, args.port, server_argv)
    if role in ("vision", "language"):
        tls, name = tls_files(role, server_argv), args.tls_server_name
        if args.tls_cert or args.tls_key or args.tls_ca:  # files of our own, not the server's
            tls = TlsFiles(args.tls_cert or "", args.tls_key or "", args.tls_ca or "")
            name = name or address.rpartition(":")[0].strip("[]")
        ok, detail = check_grpc(role, address, args.live, args.timeout_s, tls, name)
    else:
        ok, detail = check_http(address, args.live, args.timeout_s)
    print(detail)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
