"""The local stack's test certificate authority and the broker's TLS server certificate.

Owns ``data_dir/tls/ca.crt`` and ``ca.key`` (a CA made for this one stack, created once by
``up`` and kept until ``down --purge``) and ``data_dir/mosquitto/tls/server.crt`` and
``server.key`` (issued by that CA for ``127.0.0.1`` and ``localhost``, issued again when missing,
close to expiry or not signed by the current CA). Clients of the stack's TLS listener trust
``ca.crt`` and nothing else.

These certificates exist so that devices, ingest and tests exercise the TLS path locally; they
are never a deployment's certificates (docs/mqtt.md, "TLS", says how a deployment brings its own).
Nothing here is committed: it all lives in the stack's data directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vigil_tools.stack.process import write_file
from vigil_tools.stack.settings import StackSettings

# The names a client on this machine may use for the loopback-only listener; a client checks the
# name it dialled against these, so both must be in the certificate.
SERVER_DNS_NAMES: Final = ("localhost",)
SERVER_IPS: Final = (ipaddress.ip_address("127.0.0.1"),)

CA_LIFETIME: Final = timedelta(days=10 * 365)
# 397 days is the longest server lifetime browsers and many TLS stacks accept.
SERVER_LIFETIME: Final = timedelta(days=397)
# Issued again at the next `up` once this little validity is left, so a stack that is restarted
# now and then never serves an expired certificate.
RENEW_BEFORE: Final = timedelta(days=30)
# Tolerates a client whose clock is a little behind the machine that issued the certificate.
BACKDATE: Final = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where the stack's TLS material is."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def ca_cert_file(settings: StackSettings) -> Path:
    return settings.tls_dir / "ca.crt"


def ca_key_file(settings: StackSettings) -> Path:
    return settings.tls_dir / "ca.key"


def server_cert_file(settings: StackSettings) -> Path:
    # Inside mosquitto_dir, which the stack hands to the broker's user when it runs as root, so
    # the broker can read its key after dropping privileges.
    return settings.mosquitto_dir / "tls" / "server.crt"


def server_key_file(settings: StackSettings) -> Path:
    return settings.mosquitto_dir / "tls" / "server.key"


def tls_files(settings: StackSettings) -> TlsFiles:
    return TlsFiles(
        ca_cert=ca_cert_file(settings),
        server_cert=server_cert_file(settings),
        server_key=server_key_file(settings),
    )


def ensure_certificates(settings: StackSettings, now: datetime) -> TlsFiles:
    """Create the CA and the server certificate unless usable ones exist; returns their paths.

    ``now`` (timezone-aware) decides what "close to expiry" means. A new CA always comes with a
    new server certificate. Safe to call from two processes at once.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    settings.tls_dir.mkdir(parents=True, exist_ok=True)
    with _lock(settings.tls_dir / ".lock"):
        ca = _load_ca(settings, now)
        if ca is None:
            ca = _issue_ca(now)
            write_file(ca_key_file(settings), _key_pem(ca.key), mode=0o600)
            write_file(ca_cert_file(settings), _cert_pem(ca.cert), mode=0o644)
        if not _server_usable(settings, ca.cert, now):
            key, cert = _issue_server(ca, now)
            # Key first: a crash between the two leaves no certificate, which is re-issued.
            write_file(server_key_file(settings), _key_pem(key), mode=0o600)
            write_file(server_cert_file(settings), _cert_pem(cert), mode=0o644)
    return tls_files(settings)


@dataclass(frozen=True, slots=True)
class _Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    # Two `up`s on one data dir must not mint two CAs, leaving clients with the wrong one.
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _valid_at(cert: x509.Certificate, moment: datetime) -> bool:
    return cert.not_valid_before_utc <= moment and cert.not_valid_after_utc > moment


def _load_ca(settings: StackSettings, now: datetime) -> _Authority | None:
    try:
        cert = x509.load_pem_x509_certificate(ca_cert_file(settings).read_bytes())
        key = serialization.load_pem_private_key(ca_key_file(settings).read_bytes(), None)
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    if cert.public_key() != key.public_key():
        return None
    if not _valid_at(cert, now + RENEW_BEFORE):
        return None
    return _Authority(key=key, cert=cert)


def _server_usable(settings: StackSettings, ca_cert: x509.Certificate, now: datetime) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(server_cert_file(settings).read_bytes())
        key = serialization.load_pem_private_key(server_key_file(settings).read_bytes(), None)
    except (FileNotFoundError, ValueError):
        return False
    if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.public_key() != key.public_key():
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return _valid_at(cert, now + RENEW_BEFORE)


def _issue_ca(now: datetime) -> _Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Vigil local stack (test only)"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Vigil local test CA"),
        ]
    )
    skid = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        # pathlen 0: this CA signs the broker's certificate and no other CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(skid, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(skid), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return _Authority(key=key, cert=cert)


def _issue_server(
    ca: _Authority, now: datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_skid = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_after = min(now + SERVER_LIFETIME, ca.cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Vigil local stack (test only)"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    *(x509.DNSName(name) for name in SERVER_DNS_NAMES),
                    *(x509.IPAddress(ip) for ip in SERVER_IPS),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_skid),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return key, cert


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
