"""TLS and mutual TLS between tiers: one identity per process, for listening and calling.

Every server process takes the same flags (`--tls-cert`, `--tls-key`, `--tls-ca`,
`--tls-server-name`) and uses them on both sides of its connections:

- listening (vision and language gRPC ports, the tcp transport's data port on the language
  server): with a certificate the listener speaks TLS only; with a CA as well it is mTLS
  and refuses a client that presents no certificate, or one the CA did not sign.
- calling (gateway -> language, language -> vision, vision -> the tcp data port): with
  any of the flags set the client speaks TLS, verifies the server's certificate against the
  CA (the system's roots without one) and presents its own certificate when it has one.

No flag set: plaintext everywhere, as before. All tiers of a deployment must agree: a TLS
client does not fall back to plaintext, and a TLS listener takes no plaintext.

Which name a client checks. Pool members are IP addresses (dvd.discovery resolves names
itself), so the name checked against the server's certificate is the name the member
came from: `dns:///dvd-vision:50051` -> "dvd-vision", `10.0.0.5:50051` -> "10.0.0.5" (an
IP SAN), and for the tcp data port the host the language server advertises. The
`--tls-server-name` flag replaces it for every server the process calls: for
certificates that name a service (say `dvd-language`) while the callers dial addresses.

Files are read at start (`load`; the tcp data port's SSL contexts, also built at start, read the
same paths): a renewed certificate takes effect on restart.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # grpc is imported where it is used: configs stay light for `dvd --help`
    import grpc

PLAINTEXT, TLS, MTLS = "plaintext", "TLS", "mTLS"
CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
PRIVATE_KEY = b"PRIVATE KEY-----"  # PKCS#8, or a traditional RSA / EC key


@dataclass(frozen=True)
class TlsConfig:
    """Paths of one process's TLS files ("" where unset) and the server name it checks."""

    cert: str = ""
    """PEM certificate chain (leaf first) the process presents, as server and as client."""
    key: str = ""
    """PEM private key of `cert`."""
    ca: str = ""
    """PEM CA certificate(s): servers' certificates are checked against it, and a listener
    given one requires client certificates it signed (mTLS)."""
    server_name: str = ""
    """Name every called server's certificate must carry; "": the name each was dialled by."""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            given, missing = ("--tls-cert", "--tls-key")
            if not self.cert:
                given, missing = missing, given
            raise ValueError(f"{given} needs {missing}: a certificate and its key go together")
        if self.server_name and not self.enabled:
            raise ValueError("--tls-server-name needs --tls-ca or --tls-cert (TLS is off)")

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.ca)

    @property
    def listener_mode(self) -> str:
        """PLAINTEXT, TLS (no client certificate asked for) or MTLS (one required)."""
        if not self.cert:
            return PLAINTEXT
        return MTLS if self.ca else TLS

    @property
    def client_mode(self) -> str:
        """PLAINTEXT, TLS (server verified) or MTLS (and a client certificate presented)."""
        if not self.enabled:
            return PLAINTEXT
        return MTLS if self.cert else TLS

    def check_listener(self, what: str) -> None:
        """A process that listens needs its own certificate once TLS is on."""
        if self.ca and not self.cert:
            raise ValueError(
                f"{what}: --tls-ca needs --tls-cert and --tls-key (a TLS listener presents "
                "its own certificate)"
            )

    def load(self) -> Tls | None:
        """The files read and checked; None when TLS is off. ValueError names the flag and
        the file when one is missing, unreadable, not PEM, or a key that does not match."""
        return Tls(self) if self.enabled else None


def _read(flag: str, path: str, marker: bytes) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    if marker not in data:
        kind = "BEGIN CERTIFICATE" if marker == CERTIFICATE else "PRIVATE KEY"
        raise ValueError(f"{flag} {path}: not PEM (no '{kind}' block in it)")
    if b"ENCRYPTED" in data:
        raise ValueError(f"{flag} {path}: an encrypted key; give the key without a passphrase")
    return data


class Tls:
    """A TlsConfig's files, read and checked once: gRPC credentials and ssl contexts."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self.cert = _read("--tls-cert", config.cert, CERTIFICATE) if config.cert else None
        self.key = _read("--tls-key", config.key, PRIVATE_KEY) if config.key else None
        self.ca = _read("--tls-ca", config.ca, CERTIFICATE) if config.ca else None
        self._check_with_openssl()

    def _check_with_openssl(self) -> None:
        """OpenSSL's own parse: a broken PEM, a key that is not the certificate's."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.config.cert:
            try:
                # No password: OpenSSL would otherwise prompt on the terminal.
                context.load_cert_chain(self.config.cert, self.config.key, password=b"")
            except ssl.SSLError as exc:
                raise ValueError(
                    f"--tls-cert {self.config.cert} / --tls-key {self.config.key}: OpenSSL "
                    f"refuses them ({exc.reason or exc}); is the key this certificate's?"
                ) from None
        if self.config.ca:
            try:
                context.load_verify_locations(cafile=self.config.ca)
            except ssl.SSLError as exc:
                raise ValueError(
                    f"--tls-ca {self.config.ca}: OpenSSL refuses it ({exc.reason or exc})"
                ) from None

    @property
    def listener_mode(self) -> str:
        return self.config.listener_mode

    @property
    def client_mode(self) -> str:
        return self.config.client_mode

    # gRPC

    def server_credentials(self) -> grpc.ServerCredentials:
        import grpc

        if self.cert is None or self.key is None:
            raise ValueError("a TLS listener needs --tls-cert and --tls-key")
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.ca,
            require_client_auth=self.ca is not None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def server_name(self, dialled: str) -> str:
        """The name the certificate of a server dialled as `dialled` must carry."""
        return self.config.server_name or dialled

    # The tcp transport's data socket

    def server_context(self) -> ssl.SSLContext:
        """The data listener's side: its certificate; client certificates required when a CA
        is given. No session tickets: connections are long-lived, and an unread ticket
        would look like data on the sender's idle connection."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.config.cert, self.config.key)
        if self.config.ca:
            context.load_verify_locations(cafile=self.config.ca)
            context.verify_mode = ssl.CERT_REQUIRED
        context.num_tickets = 0
        return context

    def client_context(self) -> ssl.SSLContext:
        """The sender's side: verifies the listener (CA, else system roots) and its name;
        presents this process's certificate when it has one."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.config.ca:
            context.load_verify_locations(cafile=self.config.ca)
        else:
            context.load_default_certs()
        if self.config.cert:
            context.load_cert_chain(self.config.cert, self.config.key)
        return context


def describe_listener(tls: Tls | None) -> str:
    """For start-up logs: what a listener takes."""
    if tls is None:
        return "plaintext"
    if tls.listener_mode == MTLS:
        return f"mTLS: clients need a certificate signed by {tls.config.ca}"
    return "TLS, no client certificate asked for"


def describe_client(tls: Tls | None) -> str:
    """For logs: how a client calls its servers."""
    if tls is None:
        return "plaintext"
    trust = tls.config.ca or "the system's CA roots"
    name = f"name {tls.config.server_name}" if tls.config.server_name else "the name dialled"
    own = ", presenting " + tls.config.cert if tls.config.cert else ""
    return f"{tls.client_mode}: servers checked against {trust} and {name}{own}"


def open_channel(
    address: str,
    dialled: str,
    tls: Tls | None,
    options: list[tuple[str, int | str]],
) -> grpc.aio.Channel:
    """A channel to one member at `address`; with TLS, its certificate must carry the name
    it was dialled by (`dialled`: the target's host) or --tls-server-name."""
    import grpc

    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    name = tls.server_name(dialled)
    return grpc.aio.secure_channel(
        address,
        tls.channel_credentials(),
        options=[*options, ("grpc.ssl_target_name_override", name)],
    )
