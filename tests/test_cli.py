"""`tilemesh serve` as a user runs it: https with a kept self-signed certificate, clear errors."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tilemesh import cli
from tilemesh.server import netinfo

REPO = Path(__file__).resolve().parent.parent


def test_parse_ice_servers():
    assert cli._parse_ice(["stun:stun.example:3478", "turn:t.example:3478|u|p"]) == [
        {"urls": ["stun:stun.example:3478"]},
        {"urls": ["turn:t.example:3478"], "username": "u", "credential": "p"},
    ]
    with pytest.raises(SystemExit):
        cli._parse_ice(["turn:x|onlyuser"])


def test_loopback_detection():
    assert netinfo.is_loopback("127.0.0.1") and netinfo.is_loopback("localhost") and netinfo.is_loopback("::1")
    assert not netinfo.is_loopback("0.0.0.0") and not netinfo.is_loopback("192.168.1.4")
    assert netinfo.public_host("192.168.1.4") == "192.168.1.4"


def test_serve_refuses_without_assets(tmp_path, capsys):
    rc = cli.main(["serve", "--host", "127.0.0.1", "--port", "1", "--static-dir", str(tmp_path)])
    assert rc == 2
    assert "tilemesh setup" in capsys.readouterr().err


def test_serve_https_prints_url_and_fingerprint(tmp_path):
    static = REPO / "static"
    if not (static / "vendor" / "pyodide" / "pyodide.js").exists():
        pytest.fail("assets missing: run `python -m tilemesh.server.assets` first (make test does)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tilemesh.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--https",
         "--state-dir", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "tilemesh is running" in line:
                break
        out = "".join(lines)
        assert f"https://127.0.0.1:{port}/" in out, out
        assert "fingerprint" in out
        # The certificate the server keeps is the one it serves: verify the TLS handshake against it.
        ctx = ssl.create_default_context(cafile=str(tmp_path / "tilemesh-cert.pem"))
        for _ in range(50):
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=ctx, timeout=2) as r:
                    assert r.status == 200
                    break
            except (ConnectionError, urllib.error.URLError):
                time.sleep(0.1)
        else:
            pytest.fail("https server did not answer")
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def test_default_route_interface_is_read_from_the_routing_table(tmp_path):
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway\tFlags\n"
        "docker0\t000011AC\t00000000\t0001\n"
        "wlan0\t00000000\t0101A8C0\t0003\n"
        "wlan0\t0001A8C0\t00000000\t0001\n"
    )
    assert netinfo.default_route_interfaces(table) == {"wlan0"}
    assert netinfo.default_route_interfaces(tmp_path / "missing") == set()
