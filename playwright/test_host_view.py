"""The host page's plan, live timeline and roster speeds, drawn from real message shapes.

A real `plan` message comes from the server's own `Inference.choose` over a room of three devices with scaled
measured profiles; real `DeviceRunner.report` dicts come from running that plan's spec in-process over a FIFO
fake mesh (as in tests/test_runner.py). They reach the page the way signaling delivers them (`plan`, `broadcast`
and `roster` events, the engine's `report` event), on a small fixture page served on the test server's origin,
and once on the real host page. No WebRTC: the views only draw messages.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections import deque

import numpy as np
import pytest
from browsers import REPO

from tilemesh.runtime.deps import node_macs
from tilemesh.runtime.peer import plan_from_spec
from tilemesh.runtime.preprocess import centre_crop_u8
from tilemesh.runtime.profile import OP_CLASSES, op_class, predict_graph_seconds, scaled_profile
from tilemesh.runtime.regions import Region, plane
from tilemesh.runtime.runner import DeviceRunner
from tilemesh.server.inference import Inference
from tilemesh.server.model import default_model, prepare
from tilemesh.server.signaling import protocol, rooms
from tilemesh.server.signaling.ids import PeerId, ResumeToken

FIXTURE_PATH = "/__test__/host_view"
FIXTURE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/web/style.css"></head>
<body><main class="page host">
<ul id="roster"></ul><div id="plan" class="panel"></div><div id="live" class="panel"></div>
</main>
MODEL_ELEMENT
<script type="module">
import { HostView, pageModel, modelSeconds, effectiveGflops } from "/web/host_view.js";
import { RoomView } from "/web/room_view.js";
import { DEVICE_COLOURS } from "/web/ar.js";
// Signaling's event surface only: on(type, handler) gets the message, as SignalingClient passes it.
class FakeSignaling extends EventTarget {
  on(type, handler) { this.addEventListener(type, (e) => handler(e.detail)); }
  emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }
}
const signaling = new FakeSignaling();
const engine = new EventTarget();
const view = new RoomView(document.getElementById("roster"));
const host = new HostView({ planEl: document.getElementById("plan"), liveEl: document.getElementById("live") });
host.onColours = (c) => view.setColours(c);
host.attach(signaling, engine);
signaling.on("roster", ({ peers }) => view.update(peers, window.t.selfId));
window.t = { signaling, engine, view, host, pageModel, modelSeconds, effectiveGflops, DEVICE_COLOURS, selfId: null,
  report: (detail) => engine.dispatchEvent(new CustomEvent("report", { detail })) };
</script></body></html>
"""

NAMES = {"phone": "Pixel phone", "fast": "Work laptop", "slow": "Old laptop"}
SPEEDS = {"phone": 0.02, "fast": 0.1, "slow": 0.07}  # x native: browser-like, so splitting the frame pays
# Native numpy on a laptop core, roughly (tests/test_planner.py's Pyodide LAPTOP x 10).
NATIVE = {"version": 1, "overhead_s": 3e-6, "chain_factor": 1.0,
          "sec_per_mac": {"conv_dense": 2e-10, "conv_pointwise": 3e-11, "conv_depthwise": 1e-10,
                          "elementwise": 3e-11, "gemm": 3e-11}}


def fmt_ms(ms: float) -> str:
    """What the page prints for a duration (web/host_view.js fmtMs)."""
    if ms >= 10000:
        return f"{ms / 1000:.1f} s"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    return f"{round(ms)} ms" if ms >= 10 else f"{ms:.1f} ms"


def fmt_bytes(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.0f} kB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
    return f"{n} B"


@pytest.fixture(scope="module")
def room_data():
    """(plan message, {frame: {device: report}}, roster peers, the Python graph) for three devices."""
    inference = Inference(prepare(default_model(REPO / "static"), REPO / "static"))
    graph = inference.graph
    base = NATIVE  # fixed, not timed: a profile measured on a busy machine can make splitting not pay
    ids = {k: PeerId("p" + k.ljust(11, "x")) for k in NAMES}
    links = {("phone", "fast"): (6.0, 150.0), ("phone", "slow"): (9.0, 90.0), ("fast", "slow"): (2.0, 400.0)}
    peers = []
    for k, name in NAMES.items():
        mine = {}
        for (a, b), (rtt, mbps) in links.items():
            if k in (a, b):
                mine[ids[b if k == a else a]] = {"rtt_ms": rtt, "mbps": mbps}
        profile = {"compute": scaled_profile(base, SPEEDS[k]), "links": mine, "cores": 4}
        peers.append(rooms.Member(id=ids[k], name=name, kind="phone" if k == "phone" else "laptop",
                                token=ResumeToken.new(), joined_at=1.0, state="ready", progress=1.0, profile=profile))
    room = rooms.Room(id="r" * 22, created_at=0.0, peers=tuple(peers))
    msg = protocol.plan(inference.choose(room, ids["phone"], protocol.PlanRequest()))
    msg = json.loads(json.dumps(msg))  # exactly what crosses the socket

    plan = plan_from_spec(graph, msg["spec"])
    runners = {d: DeviceRunner(graph, plan.device_plan(d), msg["plan_id"], msg["source"]) for d in plan.devices}
    reports = {}
    rng = np.random.default_rng(0)
    for frame in (1, 5):
        queue: deque = deque()

        def post(src, outs, queue=queue):
            for o in outs:
                queue.extend((src, o.dst, c) for c in o.chunks)

        pixels = centre_crop_u8(rng.integers(0, 256, (256, 256, 4), dtype=np.uint8))
        post(msg["source"], runners[msg["source"]].start_frame(frame, pixels))
        while queue:
            src, dst, chunk = queue.popleft()
            post(dst, runners[dst].on_chunk(src, chunk))
        assert runners[msg["source"]].result(frame) is not None
        reports[frame] = {d: json.loads(json.dumps(r.report(frame))) for d, r in runners.items()}
    roster = [json.loads(json.dumps(p.public())) for p in peers]
    return msg, reports, roster, graph


@pytest.fixture
def fixture_page(page, server):
    # The served model's summary as the server renders it into its real pages.
    html = urllib.request.urlopen(server.url + "/runtime", timeout=10).read().decode()
    element = re.search(r'<script type="application/json" id="tilemesh-model">.*?</script>', html, re.S).group(0)
    body = FIXTURE.replace("MODEL_ELEMENT", element)
    page.route(server.url + FIXTURE_PATH, lambda route: route.fulfill(body=body, content_type="text/html"))
    page.goto(server.url + FIXTURE_PATH)
    page.wait_for_function("() => window.t && window.t.host")
    return page


def feed(page, msg, reports, roster, frames=(1, 5)):
    """Roster, the plan, then every device's frame reports: the source's own through its engine's `report`
    event (broadcasts never come back to their sender), the others as `broadcast` events."""
    page.evaluate("(peers) => window.t.signaling.emit('roster', {peers})", roster)
    page.evaluate("(msg) => window.t.signaling.emit('plan', msg)", msg)
    for frame in frames:
        for device, report in reports[frame].items():
            data = {"kind": "frame_report", "plan_id": msg["plan_id"], "report": report}
            if device == msg["source"]:
                page.evaluate("(d) => window.t.report(d)", {**data, "from": device})
            else:
                page.evaluate("(b) => window.t.signaling.emit('broadcast', b)", {"from": device, "data": data})


def test_plan_shows_strategy_shares_candidates_and_predicted_timeline(fixture_page, room_data):
    page = fixture_page
    msg, reports, roster, graph = room_data
    names = {p["id"]: p["name"] for p in roster}
    assert page.locator("#plan").get_attribute("data-state") == "none"
    feed(page, msg, reports, roster, frames=())
    plan = page.locator("#plan")
    assert plan.get_attribute("data-state") == "shown"
    assert plan.get_attribute("data-plan-id") == str(msg["plan_id"])
    assert page.locator("#plan .strategy").inner_text().lower() == msg["strategy"]
    # Peer ids in the planner's label are shown as the devices' names.
    label = page.locator("#plan .label").inner_text()
    for pid, name in names.items():
        assert pid not in label
        if pid in msg["label"]:
            assert name in label
    predicted = page.locator("#plan .predicted-ms").inner_text()
    assert predicted == fmt_ms(msg["predicted_ms"])

    # One legend entry per device with its share of the MACs as the prediction has it, in the AR colours.
    tl = msg["timeline"]["devices"]
    total = sum(d["macs"] for d in tl.values())
    items = page.locator("#plan .shares li")
    shown = {items.nth(i).get_attribute("data-device"): items.nth(i) for i in range(items.count())}
    assert set(shown) == set(msg["devices"]) | {msg["source"]}
    for d, li in shown.items():
        assert float(li.get_attribute("data-macs-share")) == pytest.approx(tl[d]["macs"] / total, abs=1e-4)
        assert names[d] in li.inner_text()
    workers = [d for d in tl if tl[d]["macs"] > 0]
    assert len(workers) >= 2, "the scenario should split the frame"
    # The frame map: the first segment's split, in the colours the AR overlay uses for its map (row-major).
    first = msg["spec"]["splits"][0]
    flat = [d for row in first["devices"] for d in row]
    colours = page.evaluate("() => window.t.DEVICE_COLOURS")
    rects = page.locator("#plan .map-figure rect")
    assert rects.count() == len(flat)
    for i, d in enumerate(flat):
        assert rects.nth(i).get_attribute("data-device") == d
        assert rects.nth(i).get_attribute("fill") == colours[i]
    shares = np.array(first["row_shares"]) / sum(first["row_shares"])
    heights = [float(rects.nth(i).get_attribute("height")) for i in range(len(flat))]
    np.testing.assert_allclose(heights, shares, atol=1e-6)
    assert page.locator("#plan .mini-maps svg").count() == len(msg["spec"]["splits"])
    # The roster rows of the plan's devices carry the same colours.
    for i, d in enumerate(flat):
        assert page.locator(f'#roster li[data-peer-id="{d}"]').get_attribute("data-colour") == colours[i]

    # Candidates: best first (the chosen plan's prediction), sorted, and the baselines are among them.
    cands = page.locator("#plan .candidates li")
    ms = [float(cands.nth(i).get_attribute("data-ms")) for i in range(cands.count())]
    assert 3 <= len(ms) <= 8 and ms == sorted(ms)
    assert ms[0] == pytest.approx(min(c["predicted_s"] for c in msg["candidates"]) * 1e3, abs=0.06)
    texts = page.locator("#plan .candidates").inner_text()
    assert not any(pid in texts for pid in names)
    assert page.locator("#plan .candidates li.best").count() == 1
    # "source alone" is listed: from the message, or else predicted from the camera device's roster profile.
    alone = page.locator('#plan .candidates li:has-text("source alone")')
    assert alone.count() == 1
    if not any(c["label"] == "source alone" for c in msg["candidates"]):
        src = next(p for p in roster if p["id"] == msg["source"])
        want = predict_graph_seconds(src["profile"]["compute"], graph) * 1e3
        assert float(alone.get_attribute("data-ms")) == pytest.approx(want, abs=0.06)

    # The predicted Gantt: one row per device, one bar per interval of the cost model's timeline.
    for d, info in tl.items():
        row = page.locator(f'#plan svg.predicted-gantt g.row[data-device="{d}"]')
        assert row.count() == 1
        for kind in ("compute", "send", "wait"):
            want = sum(1 for iv in info["timeline"] if iv["kind"] == kind)
            assert row.locator(f'[data-kind="{kind}"]').count() == want, (d, kind)
    src_sends = page.locator(f'#plan svg.predicted-gantt g.row[data-device="{msg["source"]}"] [data-kind="send"]')
    assert src_sends.count() >= 1  # the camera ships its input pieces
    end_label = page.locator("#plan svg.predicted-gantt .end-label").text_content()
    assert end_label == f"result at {predicted}"


def test_live_timeline_from_frame_reports(fixture_page, room_data):
    page = fixture_page
    msg, reports, roster, _ = room_data
    names = {p["id"]: p["name"] for p in roster}
    assert page.locator("#live").get_attribute("data-state") == "none"
    feed(page, msg, reports, roster, frames=(1,))
    live = page.locator("#live")
    assert live.get_attribute("data-frame") == "1"
    feed(page, msg, reports, roster, frames=(5,))
    assert live.get_attribute("data-frame") == "5"
    assert live.get_attribute("data-plan-id") == str(msg["plan_id"])
    assert "frame 5" in live.locator(".live-head").inner_text()
    assert "clocks" in live.inner_text()  # device clocks are not aligned: said on screen
    tl = msg["timeline"]["devices"]
    for d, rep in reports[5].items():
        row = live.locator(f'tr[data-device="{d}"]')
        assert float(row.get_attribute("data-compute-ms")) == pytest.approx(rep["compute_ms"], abs=0.01)
        assert float(row.get_attribute("data-predicted-ms")) == pytest.approx(tl[d]["compute_s"] * 1e3, abs=0.01)
        text = row.inner_text()
        assert names[d] in text
        assert f"{fmt_bytes(rep['bytes_sent'])} / {fmt_bytes(rep['bytes_received'])}" in text
        bars = live.locator(f'svg.live-gantt g.row[data-device="{d}"] [data-kind="compute"]')
        assert bars.count() == len(rep["tasks"])
        for i, task in enumerate(rep["tasks"]):
            assert bars.nth(i).get_attribute("data-segment") == str(task["segment"])
    # A late report of an older frame does not replace the newer one on screen.
    old = reports[1][msg["source"]]
    page.evaluate("(d) => window.t.report(d)", {"plan_id": msg["plan_id"], "report": old, "from": old["device"]})
    assert live.get_attribute("data-frame") == "5"


def test_roster_shows_speed_and_links(fixture_page, room_data):
    page = fixture_page
    msg, _, roster, graph = room_data
    # The model totals the server renders into the page are the served model's, and the JS time formula is
    # predict_graph_seconds.
    totals = {c: 0 for c in OP_CLASSES}
    for n in graph.nodes:
        c = op_class(graph, n)
        if c:
            totals[c] += node_macs(n, graph, Region.full(*plane(graph.shapes[n.output])))
    model = page.evaluate("() => window.t.pageModel()")
    assert model["nodes"] == len(graph.nodes) and model["macs"] == totals
    page.evaluate("(peers) => window.t.signaling.emit('roster', {peers})", roster)
    names = {p["id"]: p["name"] for p in roster}
    for p in roster:
        compute = p["profile"]["compute"]
        secs = predict_graph_seconds(compute, graph)
        assert page.evaluate("(c) => window.t.modelSeconds(c)", compute) == pytest.approx(secs, rel=1e-9)
        gflops = 2 * (sum(totals.values()) - totals["elementwise"]) / secs / 1e9
        li = page.locator(f'#roster li[data-peer-id="{p["id"]}"]')
        assert float(li.get_attribute("data-gflops")) == pytest.approx(gflops, rel=1e-3)
        assert "GFLOP/s" in li.locator(".speed").inner_text()
        links = li.locator(".link")
        assert links.count() == 2
        for i in range(2):
            other = links.nth(i).get_attribute("data-peer")
            link = p["profile"]["links"][other]
            text = links.nth(i).inner_text()
            assert names[other] in text and f"{link['mbps']:.0f} Mbit/s" in text and f"{link['rtt_ms']:.1f} ms" in text
    # The faster device shows the higher speed; a peer that left is not listed as a link.
    speed = {p["name"]: float(page.locator(f'#roster li[data-peer-id="{p["id"]}"]').get_attribute("data-gflops"))
             for p in roster}
    assert speed["Work laptop"] > speed["Old laptop"] > speed["Pixel phone"]
    page.evaluate("(peers) => window.t.signaling.emit('roster', {peers})", roster[:2])
    assert page.locator(f'#roster li[data-peer-id="{roster[0]["id"]}"] .link').count() == 1
    # A booting device without a profile shows no speed line.
    booting = {**roster[2], "id": "pbootingxxxx", "state": "booting", "profile": {"cores": 2}}
    page.evaluate("(peers) => window.t.signaling.emit('roster', {peers})", [*roster[:2], booting])
    assert page.locator('#roster li[data-peer-id="pbootingxxxx"] .speed').inner_text() == ""


def test_real_host_page_draws_injected_plan_and_reports(page, server, room_data):
    """The host template wires HostView to its own signaling client and engine."""
    msg, reports, _, _ = room_data
    import urllib.request

    req = urllib.request.Request(server.url + "/api/rooms", method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310 (local test server)
        host_url = json.loads(r.read())["host_url"]
    page.goto(server.url + host_url)
    page.wait_for_function("() => window.tilemesh && window.tilemesh.hostView && window.tilemesh.peerId")
    assert "No plan yet" in page.locator("#plan").inner_text()
    page.evaluate("(m) => window.tilemesh.signaling._emit('plan', m)", msg)
    for device, report in reports[5].items():
        data = {"kind": "frame_report", "plan_id": msg["plan_id"], "report": report}
        page.evaluate("(b) => window.tilemesh.signaling._emit('broadcast', b)", {"from": device, "data": data})
    assert page.locator("#plan").get_attribute("data-plan-id") == str(msg["plan_id"])
    assert page.locator("#plan svg.predicted-gantt g.row").count() == len(msg["timeline"]["devices"])
    assert page.locator("#live").get_attribute("data-frame") == "5"
    assert page.locator("#live tbody tr").count() == len(reports[5])
