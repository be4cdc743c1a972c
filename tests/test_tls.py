"""Self-signed certificates: made once, kept across runs, remade when the LAN address changes."""

from __future__ import annotations

import re
import ssl

from cryptography import x509

from tilemesh.server import tls


def test_certificate_created_then_kept(tmp_path):
    cert, key, created = tls.ensure_certificate(tmp_path, ["192.168.1.20", "localhost"])
    assert created and cert.exists() and key.exists()
    assert key.stat().st_mode & 0o077 == 0, "private key must not be readable by others"
    first = tls.fingerprint(cert)
    cert2, _, created2 = tls.ensure_certificate(tmp_path, ["localhost", "192.168.1.20"])
    assert not created2 and tls.fingerprint(cert2) == first


def test_certificate_covers_addresses_and_names(tmp_path):
    cert, _, _ = tls.ensure_certificate(tmp_path, ["10.0.0.7", "laptop.local"])
    san = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert san.get_values_for_type(x509.DNSName) == ["laptop.local"]


def test_new_address_gets_new_certificate(tmp_path):
    cert, _, _ = tls.ensure_certificate(tmp_path, ["10.0.0.7"])
    before = tls.fingerprint(cert)
    _, _, created = tls.ensure_certificate(tmp_path, ["10.0.0.8"])
    assert created and tls.fingerprint(cert) != before


def test_fingerprint_format_and_context(tmp_path):
    cert, key, _ = tls.ensure_certificate(tmp_path, ["127.0.0.1"])
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", tls.fingerprint(cert))
    assert isinstance(tls.ssl_context(cert, key), ssl.SSLContext)
