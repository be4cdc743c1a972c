"""Helpers for tests of whole rooms inside a network namespace: the server, browsers, the QR code, diagnostics.

WebRTC needs a real interface (Chromium ignores loopback), so the server (https with its self-signed
certificate: http on 10.99.N.1 is not a secure context) and every Chromium run inside a namespace the test
creates; Playwright drives Chromium over pipes, which cross namespaces, and the test reaches the server over
the veth's outer end.
"""

from __future__ import annotations

import contextlib
import io
import json
import ssl
import tempfile
import urllib.request

import pytest
from browsers import ServerProcess, require_browser_assets, wait_http

from bench.netns import NetNS, unavailable_reason


@contextlib.contextmanager
def netns_server(extra: list[str] | None = None, port: int = 8443):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    require_browser_assets()
    with NetNS() as ns, tempfile.TemporaryDirectory() as state:
        # --diagnostics: these tests read the edge's links and make it send test tensors (/diag/mesh*).
        srv = ServerProcess(ns.inner, port, prefix=ns.wrap([]),
                            extra=["--https", "--diagnostics", "--state-dir", state, *(extra or [])])
        srv.url = f"https://{ns.inner}:{port}"
        srv.ns = ns
        srv.insecure = ssl._create_unverified_context()  # our own self-signed certificate, inside the namespace
        try:
            wait_http(srv.url + "/healthz", timeout=30, context=srv.insecure)
            yield srv
        finally:
            log = srv.stop()
            print(log[-6000:])


def get_json(srv, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(srv.url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60, context=srv.insecure) as r:  # noqa: S310 (namespace server)
        return json.loads(r.read())


def decode_qr(page) -> str:
    """The join URL, read from the host page's QR code as a phone's camera would."""
    import zxingcpp  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    png = page.locator("#qr").screenshot()
    found = zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))
    assert found, "no QR code found on the host page"
    return found[0].text


class StarRoom:
    """A room whose devices each have a namespace of their own around a bridge (`bench.env.StarNet`), so one
    device's network can be cut without touching the others'. The server lives in namespace "server"."""

    def __init__(self, net, srv, room: str):
        self.net, self.srv, self.room = net, srv, room
        self.url = srv.url
        self.join_url = f"{srv.url}/join/{room}"

    def launcher(self, device: str, group=None) -> str:
        """A Chromium that starts in `device`'s namespace (and CPU group), for Playwright's executable_path."""
        from browsers import CHROMIUM  # noqa: PLC0415

        return self.net.launcher(device, [CHROMIUM], group)

    def get_json(self, path: str, body: dict | None = None) -> dict:
        return self.net.call_in_hub(get_json, self.srv, path, body)


@contextlib.contextmanager
def star_room(devices: list[str], port: int = 8443):
    """A StarNet with `devices` and the server (unshaped links), the server started, one room made (by POST, as
    the front page's button does)."""
    from bench.env import StarNet  # noqa: PLC0415
    from bench.env import unavailable_reason as star_unavailable  # noqa: PLC0415

    reason = star_unavailable()
    if reason:
        pytest.skip(reason)
    require_browser_assets()
    with StarNet({"server": None, **dict.fromkeys(devices)}) as net, tempfile.TemporaryDirectory() as state:
        addr = net.addr["server"]
        srv = ServerProcess(addr, port, prefix=net.wrap("server", []),
                            extra=["--https", "--state-dir", state])
        srv.url = f"https://{addr}:{port}"
        srv.insecure = ssl._create_unverified_context()  # our own self-signed certificate, inside the namespace
        try:
            net.call_in_hub(lambda: wait_http(srv.url + "/healthz", timeout=30, context=srv.insecure))
            room = net.call_in_hub(get_json, srv, "/api/rooms", {})["room"]
            yield StarRoom(net, srv, room)
        finally:
            log = srv.stop()
            print(log[-6000:])
