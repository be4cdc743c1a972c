"""A laptop opens a room, a phone joins by scanning the QR code, both boot, and the phone's departure shows at once.

The QR code is read the way a phone would: from pixels (a screenshot of the code on the host page) with
zxing-cpp, not from the page's text, so a code that encodes the wrong URL or does not scan fails the test.
"""

from __future__ import annotations

import io
from urllib.parse import urlsplit

import pytest
from browsers import start_room

pytestmark = pytest.mark.browser

PHONE_UA = ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/126.0.0.0 Mobile Safari/537.36")
BOOT_TIMEOUT_MS = 90_000
READY = "() => window.tilemesh?.signaling?.lastState?.state === 'ready'"
# Ready, and done refining what it measured while others booted (its detail says "refining" until then).
SETTLED = ("() => window.tilemesh?.signaling?.lastState?.state === 'ready'"
           " && !window.tilemesh.signaling.lastState.detail")


def decode_qr(png: bytes) -> str:
    import zxingcpp  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    results = zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))
    codes = [r.text for r in results if r.format == zxingcpp.BarcodeFormat.QRCode]
    assert len(codes) == 1, f"expected one QR code, found {[r.text for r in results]}"
    return codes[0]


def roster_row(page, kind: str):
    return page.locator(f"#roster li.peer[data-kind='{kind}']")


@pytest.fixture
def phone(browser):
    context = browser.new_context(user_agent=PHONE_UA, viewport={"width": 412, "height": 860}, has_touch=True)
    pg = context.new_page()
    pg.console_lines = []  # type: ignore[attr-defined]
    pg.on("console", lambda m: pg.console_lines.append(f"{m.type}: {m.text}"))
    yield pg
    context.close()


def test_phone_joins_by_qr_and_leaves(page, phone, server):
    room_id = start_room(page, server.url)
    assert urlsplit(page.url).path == f"/room/{room_id}"

    join_url = decode_qr(page.locator("#qr svg").screenshot())
    assert join_url == f"{server.url}/join/{room_id}"
    assert page.locator("#join-url").inner_text() == join_url

    # The host page is itself a peer: it shows up in its own roster and boots to ready.
    host_row = roster_row(page, "laptop")
    host_row.wait_for(timeout=10_000)
    assert "this device" in host_row.inner_text()

    phone.goto(join_url)
    phone_row_on_host = roster_row(page, "phone")
    phone_row_on_host.wait_for(timeout=10_000)
    phone_id = phone.evaluate("window.tilemesh.peerId")
    assert phone_id and phone_row_on_host.get_attribute("data-peer-id") == phone_id
    assert phone_row_on_host.locator(".name").inner_text().startswith("Phone ")

    # Booting: the phone reports progress; it ends in ready, seen from the host.
    page.wait_for_function(
        "id => document.querySelector(`#roster li[data-peer-id='${id}']`)?.dataset.state === 'ready'",
        arg=phone_id, timeout=BOOT_TIMEOUT_MS)
    assert phone.locator("#boot").get_attribute("data-stage") == "ready", "\n".join(phone.console_lines)
    assert phone_row_on_host.locator("progress").is_hidden()
    page.wait_for_function("document.querySelector('#roster li[data-kind=laptop]').dataset.state === 'ready'",
                           timeout=BOOT_TIMEOUT_MS)
    # The phone sees the host too, and the server kept the device profile it reported.
    assert roster_row(phone, "laptop").count() == 1
    profile = page.evaluate("id => window.tilemesh.signaling.peer(id).profile", phone_id)
    assert profile["runtime"]["numpy"] == "2.0.2" and "Android" in profile["user_agent"]

    # Ready first, refined after: once no device boots, the phone chooses onnxruntime-web's thread count by
    # measurement (deferred while joining), profiles again, and remembers the count for its next visit, which
    # then joins on it without a trial.
    phone.wait_for_function(SETTLED, timeout=BOOT_TIMEOUT_MS)
    compute = phone.evaluate("window.tilemesh.signaling.lastState.profile.compute")
    assert set(compute["thread_trial_ms"]) == {"1", "2"} and not compute.get("provisional"), compute
    assert "chosen by measurement" in compute["engine_reason"] and compute["threads"] in (1, 2)
    assert compute["measure_ms"]["trial"] > 0
    phone.reload()
    phone.wait_for_function(READY, timeout=BOOT_TIMEOUT_MS)
    again = phone.evaluate("window.tilemesh.signaling.lastState.profile.compute")
    assert again["thread_trial_cached"] is True and again["threads"] == compute["threads"], again
    assert "on an earlier visit" in again["engine_reason"] and not again.get("provisional")
    assert again["measure_ms"]["trial"] == 0
    phone_id = phone.evaluate("window.tilemesh.peerId")
    page.wait_for_function(
        "id => document.querySelector(`#roster li[data-peer-id='${id}']`)?.dataset.state === 'ready'",
        arg=phone_id, timeout=BOOT_TIMEOUT_MS)

    # Closing the tab sends leave on pagehide. The row then shows "gone" for 1.5 s; without the leave it would
    # wait out the 3 s resume grace first, so 3.5 s tells the two paths apart.
    phone.close()
    page.wait_for_function(
        "id => !document.querySelector(`#roster li[data-peer-id='${id}']`)", arg=phone_id, timeout=3_500)
    assert page.evaluate("window.tilemesh.signaling.peers.length") == 1


def test_unknown_room_is_a_clear_404(page, server):
    resp = page.goto(server.url + "/join/" + "x" * 22)
    assert resp.status == 404
    assert "does not exist or has ended" in page.content()
    page.get_by_role("button", name="Start a new room").click()
    page.wait_for_url("**/room/*")
    page.locator("#qr svg").wait_for()


def test_signaling_client_relays_and_resumes_after_a_drop(page, phone, server):
    """What the mesh relies on: signals between pages, and a dropped socket coming back as the same peer."""
    start_room(page, server.url)
    page.wait_for_function("window.tilemesh?.peerId")
    host_id = page.evaluate("window.tilemesh.peerId")
    phone.goto(page.locator("#join-url").inner_text())
    phone.wait_for_function("window.tilemesh?.peerId")
    phone_id = phone.evaluate("window.tilemesh.peerId")

    # Stored on window, not awaited: evaluate() would wait for the promise before the phone could send. The
    # pages' own WebRTC mesh signals too (offers, ICE candidates), so wait for this test's message only.
    page.evaluate("from => { window.got = window.tilemesh.signaling.waitFor('signal',"
                  " (m) => m.from === from && m.data.sdp === 'v=0'); }", phone_id)
    phone.evaluate("to => window.tilemesh.signaling.signal(to, {type: 'offer', sdp: 'v=0'})", host_id)
    assert page.evaluate("window.got") == {"v": 1, "type": "signal", "from": phone_id,
                                           "data": {"type": "offer", "sdp": "v=0"}}

    # Drop the phone's socket without a leave (as a Wi-Fi hiccup would). While it is away, the host's signal
    # is queued by the server; the client reconnects, resumes its identity and receives it.
    phone.evaluate("""() => {
        const s = window.tilemesh.signaling;
        window.statuses = [];
        window.welcomes = [];
        s.on('status', ({status}) => window.statuses.push(status));
        s.on('welcome', (w) => window.welcomes.push(w));
        s.on('signal', (m) => { if (m.data.candidate === 'c1') window.lastSignal = m; });
        s.ws.close();
    }""")
    page.wait_for_function(
        "id => window.tilemesh.signaling.peer(id)?.connected === false", arg=phone_id, timeout=5_000)
    page.evaluate("to => window.tilemesh.signaling.signal(to, {candidate: 'c1'})", phone_id)
    phone.wait_for_function("window.welcomes.length === 1", timeout=10_000)
    welcome = phone.evaluate("window.welcomes[0]")
    assert welcome["resumed"] is True and welcome["peer_id"] == phone_id
    phone.wait_for_function("window.lastSignal?.data?.candidate === 'c1'", timeout=5_000)
    assert phone.evaluate("window.statuses") == ["reconnecting", "open"]
    page.wait_for_function(
        "id => window.tilemesh.signaling.peer(id)?.connected === true", arg=phone_id, timeout=5_000)
    assert page.locator(f"#roster li[data-peer-id='{phone_id}']").count() == 1
