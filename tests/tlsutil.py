"""A throwaway certificate authority for tests: a CA, leaf certificates, PEMs and client contexts.

Built with ``cryptography`` (installed with pyjwt[crypto]). The CA plays Let's Encrypt for
Tailscale's ``*.ts.net`` names: the fake tailscaled serves its leaves, clients trust only
this CA. Reused by the TLS functional tests and the Chromium e2e test.
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DOMAIN",
    "CA",
    "Leaf",
    "client_context",
    "make_ca",
    "make_leaf",
    "peer_serial",
    "write_pems",
]

# The node name the issue asks for (a Tailscale MagicDNS name with HTTPS certificates on).
DOMAIN = "web01.tail4c3a9.ts.net"

_PEM = serialization.Encoding.PEM
_PKCS8 = serialization.PrivateFormat.PKCS8
_NOENC = serialization.NoEncryption()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(_PEM)


@dataclass(frozen=True)
class Leaf:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()  # intermediates after the leaf

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    @property
    def key_pem(self) -> bytes:
        # tailscaled answers an "EC PRIVATE KEY" PEM; PKCS#8 loads the same way in OpenSSL.
        return self.key.private_bytes(_PEM, serialization.PrivateFormat.TraditionalOpenSSL, _NOENC)

    @property
    def cert_pem(self) -> bytes:
        """The certificate chain PEM: the leaf first, then any intermediates."""
        return b"".join(c.public_bytes(_PEM) for c in (self.cert, *self.chain))

    @property
    def pair_pem(self) -> bytes:
        """What ``/localapi/v0/cert/<domain>?type=pair`` answers: key PEM, then chain."""
        return self.key_pem + self.cert_pem


def make_ca(name: str = "clawgate test CA") -> CA:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CA(key, cert)


def make_leaf(
    ca: CA,
    names: list[str] | tuple[str, ...] = (DOMAIN,),
    not_after: dt.datetime | None = None,
    *,
    not_before: dt.datetime | None = None,
    serial: int | None = None,
) -> Leaf:
    """A server certificate for ``names`` signed by ``ca``; 90 days (like ACME) by default."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(hours=1))
        .not_valid_after(not_after or now + dt.timedelta(days=90))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Leaf(key, cert)


def write_pems(directory: Path, leaf: Leaf, *, stem: str = "server") -> tuple[Path, Path]:
    """Write ``<stem>.crt`` (chain) and ``<stem>.key`` (mode 0600); return (cert, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(leaf.cert_pem)
    key_path.touch(mode=0o600)
    key_path.write_bytes(leaf.key_pem)
    return cert_path, key_path


def client_context(ca: CA, *, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A client context that trusts only ``ca`` (hostname checked), fresh per call so no
    session is resumed across calls."""
    ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


def peer_serial(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> int:
    """The serial number of the certificate the server presented."""
    der = ssl_object.getpeercert(binary_form=True)
    assert der is not None, "no peer certificate"
    return x509.load_der_x509_certificate(der).serial_number
