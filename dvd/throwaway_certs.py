"""A throwaway CA and certificates for local runs (`dvd up --tls auto`) and tests.

Keys are ECDSA P-256 (made in milliseconds). Every certificate is good as a server and as
a client (extended key usage serverAuth + clientAuth), since each dvd process listens and
calls with one identity (dvd.tls), and names localhost, 127.0.0.1 and ::1, which is where
`dvd up` runs its children. Nothing here is meant to outlive the run that made it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dvd.tls import TlsConfig

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
VALID_FOR = datetime.timedelta(days=7)


@dataclass(frozen=True)
class Authority:
    """A CA's key and certificate, able to sign leaf certificates."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, common_name: str = "dvd-serve throwaway CA") -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(
        self, common_name: str, names: Sequence[str] = LOCAL_NAMES
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A key and a certificate for `common_name`, naming `names` (DNS names and IP
        addresses) as subject alternative names."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        alternative: list[x509.GeneralName] = []
        for name in names:
            try:
                alternative.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alternative.append(x509.DNSName(name))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return key, cert

    def write(self, folder: Path) -> Path:
        """Writes ca.crt (the CA's key is not written: it signs only in this process)."""
        path = folder / "ca.crt"
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def write_identity(
        self, folder: Path, name: str, names: Sequence[str] = LOCAL_NAMES
    ) -> tuple[Path, Path]:
        """Issues `name`'s certificate and writes NAME.crt and NAME.key (mode 0600)."""
        key, cert = self.issue(name, names)
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return cert_path, key_path


def local_identities(folder: Path, roles: Sequence[str]) -> dict[str, TlsConfig]:
    """A fresh CA in `folder` and one identity per role signed by it: role -> its flags."""
    folder.mkdir(parents=True, exist_ok=True)
    authority = Authority.create()
    ca = authority.write(folder)
    configs = {}
    for role in roles:
        cert, key = authority.write_identity(folder, role)
        configs[role] = TlsConfig(cert=str(cert), key=str(key), ca=str(ca))
    return configs
