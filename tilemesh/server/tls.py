"""HTTPS for the LAN: browsers grant the camera and cross-origin isolation only to secure contexts.

Plain http counts as secure only on localhost, so a phone opening the laptop's LAN address needs https. The
server makes a self-signed certificate on first run (with `cryptography`, no openssl subprocess), keeps it, and
prints its SHA-256 fingerprint so a user can compare it with what the phone's warning shows.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_NAME = "tilemesh-cert.pem"
KEY_NAME = "tilemesh-key.pem"


def _san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_self_signed(cert_path: Path, key_path: Path, hosts: list[str]) -> None:
    """Write a new self-signed certificate valid for `hosts` (IP addresses and names) for ten years."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tilemesh local server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _covers(cert: x509.Certificate, hosts: list[str]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))
    return all(h in have for h in hosts)


def ensure_certificate(state_dir: Path, hosts: list[str]) -> tuple[Path, Path, bool]:
    """Return (cert, key, created). Reuses the kept certificate unless it no longer covers `hosts`.

    Keeping it matters: a phone that accepted the warning once should not see a new fingerprint next time.
    """
    cert_path, key_path = state_dir / CERT_NAME, state_dir / KEY_NAME
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        expired = cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC)
        if _covers(cert, hosts) and not expired:
            return cert_path, key_path, False
    make_self_signed(cert_path, key_path, hosts)
    return cert_path, key_path, True


def fingerprint(cert_path: Path) -> str:
    """SHA-256 fingerprint in the colon-separated form browsers show."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def ssl_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx
