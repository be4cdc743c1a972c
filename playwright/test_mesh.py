"""The full mesh in real browsers: a host page, three join pages and the server's aiortc edge peer.

Everything that speaks WebRTC runs in a network namespace the test creates (Chromium ignores loopback): the
server (`tilemesh serve --edge`, https with its self-signed certificate, since http on 10.99.N.1 is not a
secure context) and Chromium (through a wrapper that runs it under `ip netns exec`; Playwright drives it over
pipes). The test process reaches the server over the veth's outer end. A (64, 56, 56) float32 test pattern
(NaN payloads, infinities, denormals) crosses every ordered pair and is hashed in Pyodide (or CPython, for the
edge) from the numpy array that arrives; then one page closes and must vanish from every other peer.
"""

from __future__ import annotations

import hashlib
import time
from urllib.parse import urlsplit

import pytest
from browsers import CHROMIUM, CHROMIUM_ARGS, start_room
from roomkit import decode_qr, get_json, netns_server

from tilemesh.runtime import wire

pytestmark = [pytest.mark.browser, pytest.mark.netns]

SHAPE = (64, 56, 56)
JOINERS = 3
EDGE_SEED = 100

# Runs in each page's Pyodide worker: reassemble per sender, hash the numpy array that comes out.
PY_HELPERS = """
import hashlib
import numpy as np
from tilemesh.runtime import wire

_inbox = wire.Inbox()

def mesh_feed(peer, chunk):
    got = _inbox.feed(peer, chunk)
    if got is None:
        return None
    a = got.array
    return {"from": peer, "frame": got.header.frame, "tensor": got.header.tensor, "shape": list(a.shape),
            "dtype": str(a.dtype), "ndarray": isinstance(a, np.ndarray), "nan": int(np.isnan(a).sum()),
            "sha256": hashlib.sha256(a.tobytes()).hexdigest()}

def mesh_pattern(seed, shape, frame, tensor, max_message):
    return wire.encode_joined(wire.test_pattern(tuple(shape), seed), frame=frame, tensor=tensor,
                              max_message=max_message)
"""

# Routes the page's mesh (made by web/room_view.js's enterRoom) into test helpers in the Python worker instead of
# the room's inference engine; link-probe messages still go to the engine's probe, which measures links.
ATTACH = """async (helpers) => {
    const app = window.tilemesh;
    await app.joined;
    while (!app.bootInfo) await new Promise((r) => setTimeout(r, 100));
    await app.runtime.exec(helpers);
    app.received = [];
    app.peerEvents = [];
    app.errors = [];
    app.mesh.addEventListener("peer", (e) => app.peerEvents.push({ id: e.detail.peerId, state: e.detail.state,
                                                                   t: Date.now() }));
    app.mesh.onMessage = (from, bytes) => {
        if (app.engine.probe.onMessage(from, bytes)) return;
        app.runtime.call("__main__", "mesh_feed", [from, bytes], [bytes.buffer])
            .then((r) => { if (r) app.received.push(r); })
            .catch((e) => app.errors.push(String(e)));
    };
    return app.signaling.peerId;
}"""

# Starts the sends and returns at once (the test awaits `window.tilemesh.sending` later), so every page's
# transfers run at the same time as everyone else's.
SEND_ALL = """([seed, shape, peers]) => {
    const app = window.tilemesh;
    app.sending = Promise.all(peers.map(async (peer, i) => {
        await app.mesh.waitOpen(peer, 30000);
        const max = app.mesh.maxMessageSize(peer);
        const joined = await app.runtime.call("__main__", "mesh_pattern", [seed, shape, seed, i, max]);
        await app.mesh.sendChunks(peer, joined, max);
        return max;
    }));
}"""


def sha(seed: int) -> str:
    return hashlib.sha256(wire.test_pattern(SHAPE, seed).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def ns_server():
    with netns_server(["--edge"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def ns_browser(ns_server, pw):
    b = pw.chromium.launch(executable_path=ns_server.ns.chromium_wrapper(CHROMIUM),
                           args=[*CHROMIUM_ARGS, "--ignore-certificate-errors"], headless=True)
    yield b
    b.close()


def test_full_mesh_moves_tensors_bit_exact_and_notices_departures(ns_server, ns_browser):
    srv = ns_server
    pages = []
    try:
        ctx = ns_browser.new_context(ignore_https_errors=True)
        host = ctx.new_page()
        room = start_room(host, srv.url)
        assert urlsplit(host.url).path == f"/room/{room}"
        join_url = decode_qr(host)
        assert join_url == host.locator("#join-url").inner_text().strip()
        assert join_url.endswith(f"/join/{room}") and urlsplit(join_url).hostname == srv.ns.inner
        pages.append(host)
        ids = [host.evaluate(ATTACH, PY_HELPERS)]
        for _ in range(JOINERS):
            pg = ns_browser.new_context(ignore_https_errors=True).new_page()
            pg.goto(join_url)
            ids.append(pg.evaluate(ATTACH, PY_HELPERS))
            pages.append(pg)

        edge = get_json(srv, f"/diag/mesh/edge/{room}")
        assert edge["joined"], edge
        edge_id = edge["peer_id"]
        everyone = [*ids, edge_id]

        # Every browser sends its pattern (seed = its index) to every other peer, edge included, all at once.
        for i, pg in enumerate(pages):
            pg.evaluate(SEND_ALL, [i, list(SHAPE), [p for p in everyone if p != ids[i]]])
        for i in range(len(pages)):
            out = get_json(srv, f"/diag/mesh/edge/{room}/send",
                       {"to": ids[i], "seed": EDGE_SEED, "shape": list(SHAPE), "frame": 0, "tensor": i})
            assert out["sha256"] == sha(EDGE_SEED)
            # aiortc advertises its own limit; the edge chunks by what Chromium advertised.
            assert out["max_message"] == 262144
        for i, pg in enumerate(pages):
            # Chunk sizes follow each remote's advertised SCTP maxMessageSize (Chromium: 256 KiB).
            peers = [p for p in everyone if p != ids[i]]
            sizes = dict(zip(peers, pg.evaluate("window.tilemesh.sending"), strict=True))
            assert 16384 <= sizes.pop(edge_id) <= 262144
            assert set(sizes.values()) == {262144}

        expected_seed = {pid: i for i, pid in enumerate(ids)} | {edge_id: EDGE_SEED}
        deadline = time.monotonic() + 60
        for i, pg in enumerate(pages):
            want = len(everyone) - 1
            while len(pg.evaluate("window.tilemesh.received")) < want and time.monotonic() < deadline:
                time.sleep(0.2)
            got = pg.evaluate("window.tilemesh.received")
            assert pg.evaluate("window.tilemesh.errors") == []
            assert sorted(r["from"] for r in got) == sorted(p for p in everyone if p != ids[i]), got
            for r in got:
                assert r["ndarray"] and r["dtype"] == "float32" and r["shape"] == list(SHAPE)
                assert r["nan"] > 0  # NaN payloads arrived as NaNs, and the hash proves their exact bits
                assert r["sha256"] == sha(expected_seed[r["from"]]), (ids[i], r)
        while len(get_json(srv, f"/diag/mesh/edge/{room}")["received"]) < len(pages) and time.monotonic() < deadline:
            time.sleep(0.2)
        at_edge = get_json(srv, f"/diag/mesh/edge/{room}")
        assert sorted(r["from"] for r in at_edge["received"]) == sorted(ids)
        for r in at_edge["received"]:
            assert r["sha256"] == sha(expected_seed[r["from"]]) and r["shape"] == list(SHAPE)
        assert at_edge["wire_errors"] == 0

        # A joiner closes its page: every other browser and the edge drop it within a few seconds.
        leaver = ids[-1]
        t0 = time.time()
        pages.pop().context.close()
        for pg in pages:
            pg.wait_for_function("(id) => window.tilemesh.mesh.state(id) === 'gone'", arg=leaver, timeout=5000)
            gone = [e for e in pg.evaluate("window.tilemesh.peerEvents") if e["id"] == leaver and e["state"] == "gone"]
            assert gone and gone[-1]["t"] / 1000 - t0 < 5
        while leaver in get_json(srv, f"/diag/mesh/edge/{room}")["links"] and time.time() - t0 < 5:
            time.sleep(0.1)
        assert leaver not in get_json(srv, f"/diag/mesh/edge/{room}")["links"]
        # The survivors still talk: one more tensor host -> first joiner after the departure.
        host.evaluate(SEND_ALL, [7, list(SHAPE), [ids[1]]])
        host.evaluate("window.tilemesh.sending")
        pages[1].wait_for_function("window.tilemesh.received.some((r) => r.frame === 7)", timeout=15000)
    except Exception:
        # What each side thought of each link, for the failure report.
        for pg in pages:
            print(pg.evaluate("({id: window.tilemesh.peerId, links: [...(window.tilemesh.mesh?.links.values() || [])]"
                              ".map((l) => [l.remote, l.state, l.pc.connectionState, l.pc.signalingState]),"
                              " events: window.tilemesh.peerEvents})"))
        print(get_json(srv, f"/diag/mesh/edge/{room}"))
        raise
    finally:
        for pg in pages:
            pg.context.close()
