"""The local stack's test CA and broker certificate, checked on files alone (no broker): what is
issued, that it is kept across starts, and when it is issued again."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from vigil_tools.stack import mosquitto
from vigil_tools.stack.settings import StackSettings
from vigil_tools.stack.tls import RENEW_BEFORE, SERVER_LIFETIME, ensure_certificates

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def settings(tmp_path: Path) -> StackSettings:
    return StackSettings(
        data_dir=tmp_path / "stack",
        mqtt_port=21883,
        kafka_port=29092,
        kafka_controller_port=29093,
        pg_port=25432,
        smtp_port=20025,
    )


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_tls_port_defaults_to_the_mqtt_port_plus_one_and_can_be_set(tmp_path: Path) -> None:
    """Each stack gets its own TLS port from its MQTT port, so the development (11883) and test
    (21883) stacks never share one; an explicit port wins and must not collide."""

    def stack(mqtt_port: int, mqtt_tls_port: int = 0) -> StackSettings:
        return StackSettings(
            data_dir=tmp_path,
            mqtt_port=mqtt_port,
            mqtt_tls_port=mqtt_tls_port,
            kafka_port=29092,
            kafka_controller_port=29093,
            pg_port=25432,
            smtp_port=20025,
        )

    assert stack(21883).mqtt_tls_port == 21884
    assert stack(11883).mqtt_tls_port == 11884
    assert stack(21883, mqtt_tls_port=28883).mqtt_tls_port == 28883
    with pytest.raises(ValueError, match="ports must all differ"):
        stack(21883, mqtt_tls_port=29092)
    with pytest.raises(ValueError, match="MQTT_TLS_PORT"):
        stack(65535)


def test_issued_server_certificate_is_for_loopback_and_chains_to_the_ca(
    settings: StackSettings,
) -> None:
    """The broker's certificate names 127.0.0.1 and localhost, is for server auth only, is not a
    CA, and verifies against the stack's CA; private keys are readable by their owner only."""
    files = ensure_certificates(settings, NOW)
    ca, server = load(files.ca_cert), load(files.server_cert)
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.not_valid_after_utc == NOW + SERVER_LIFETIME
    assert os.stat(files.server_key).st_mode & 0o777 == 0o600
    assert os.stat(settings.tls_dir / "ca.key").st_mode & 0o777 == 0o600
    assert files.ca_cert.parent == settings.tls_dir
    assert settings.mosquitto_dir in files.server_key.parents


def test_python_ssl_accepts_the_pair_as_a_tls_server_and_client_would(
    settings: StackSettings,
) -> None:
    """OpenSSL (through Python's ssl) loads the key pair as a server and the CA as a client trust
    store with hostname checking on: the files are usable, not only well-formed."""
    files = ensure_certificates(settings, datetime.now(UTC))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(files.server_cert, files.server_key)
    client = ssl.create_default_context(cafile=files.ca_cert)
    assert client.check_hostname
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_side = server.wrap_bio(server_in, server_out, server_side=True)
    client_side = client.wrap_bio(client_in, client_out, server_hostname="127.0.0.1")
    for _ in range(10):  # a handshake takes a few round trips; each side moves when it can
        for side in (client_side, server_side):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    client_side.do_handshake()  # raises unless the client verified the server and finished
    assert client_side.version() in {"TLSv1.2", "TLSv1.3"}


def test_certificates_are_kept_across_starts(settings: StackSettings) -> None:
    """A second start reuses the CA and the server certificate byte for byte, so clients that
    copied the CA keep working."""
    first = ensure_certificates(settings, NOW)
    before = {path: path.read_bytes() for path in (first.ca_cert, first.server_cert)}
    second = ensure_certificates(settings, NOW + timedelta(days=1))
    assert {path: path.read_bytes() for path in (second.ca_cert, second.server_cert)} == before


def test_server_certificate_close_to_expiry_is_issued_again_by_the_same_ca(
    settings: StackSettings,
) -> None:
    """Within RENEW_BEFORE of its expiry the server certificate is replaced; the CA stays."""
    first = ensure_certificates(settings, NOW)
    ca_before, server_before = first.ca_cert.read_bytes(), load(first.server_cert)
    later = server_before.not_valid_after_utc - RENEW_BEFORE + timedelta(minutes=1)
    second = ensure_certificates(settings, later)
    assert second.ca_cert.read_bytes() == ca_before
    renewed = load(second.server_cert)
    assert renewed.serial_number != server_before.serial_number
    assert renewed.not_valid_after_utc > later + RENEW_BEFORE
    renewed.verify_directly_issued_by(load(second.ca_cert))


def test_a_lost_ca_key_means_a_new_ca_and_a_new_server_certificate(
    settings: StackSettings,
) -> None:
    """Without its key the CA cannot sign; both are made again and the new server certificate
    chains to the new CA, never to the stale one."""
    first = ensure_certificates(settings, NOW)
    old_ca = load(first.ca_cert)
    (settings.tls_dir / "ca.key").unlink()
    second = ensure_certificates(settings, NOW)
    new_ca = load(second.ca_cert)
    assert new_ca.serial_number != old_ca.serial_number
    load(second.server_cert).verify_directly_issued_by(new_ca)


def test_naive_time_is_refused(settings: StackSettings) -> None:
    """Expiry decisions need a real instant; a naive datetime is a caller bug."""
    with pytest.raises(ValueError, match="timezone-aware"):
        ensure_certificates(settings, datetime(2026, 3, 1))  # noqa: DTZ001 - the case under test


def test_mosquitto_tls_listener_uses_the_issued_files_and_tls_1_2(
    settings: StackSettings,
) -> None:
    """The rendered config opens a second loopback listener on the TLS port with the issued
    certificate and key, TLS 1.2 as the floor, and no listener of its own for passwords or ACLs
    (they are global, so both listeners enforce the same accounts)."""
    text = mosquitto.render_conf(settings)
    lines = [line.strip() for line in text.splitlines() if line.strip()[:1] not in ("", "#")]
    tls_at = lines.index("listener 21884 127.0.0.1")
    next_listener = next(
        (i for i in range(tls_at + 1, len(lines)) if lines[i].startswith("listener ")), len(lines)
    )
    block = lines[tls_at + 1 : next_listener]
    assert f"certfile {settings.mosquitto_dir / 'tls' / 'server.crt'}" in block
    assert f"keyfile {settings.mosquitto_dir / 'tls' / 'server.key'}" in block
    assert "tls_version tlsv1.2" in block
    assert not any(line.startswith("per_listener_settings") for line in lines)
    assert sum(line.startswith("password_file ") for line in lines) == 1
    assert sum(line.startswith("acl_file ") for line in lines) == 1
