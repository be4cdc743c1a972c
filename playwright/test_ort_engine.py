"""onnxruntime-web in the peer runtime's Worker (tilemesh/web/ort_engine.js), headless Chromium, 1 and 2 threads.

Against the numpy reference in the same Pyodide: the whole demo model on real photos (same top-5 as native
onnxruntime, probabilities within 1e-4), and every task of plans with border and interior tiles (a 2x2 grid and
uneven row bands fused over the first blocks) computed through the device session's events (the worker's
`handle`, as a room fires them) within 1e-4.
"""

from __future__ import annotations

import base64
import json
import random

import numpy as np
import onnxruntime as ort
import pytest
import skimage.data
from browsers import REPO

from tilemesh.runtime import session as S
from tilemesh.runtime.classify import LocalClassifier
from tilemesh.runtime.deps import cut_candidates
from tilemesh.runtime.peer import plan_from_spec
from tilemesh.runtime.preprocess import preprocess, top_k

pytestmark = pytest.mark.browser

LOAD_MODEL = """
from pyodide.http import pyfetch
import os
os.makedirs('/model', exist_ok=True)
for name in ('graph.json', 'graph.bin', 'labels.json', 'card.json'):
    resp = await pyfetch('/model/' + name)
    open('/model/' + name, 'wb').write(await resp.bytes())
"""

CLASSIFY = """async ([b64, h, w]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    return await window.tilemeshRuntime.call("tilemesh.runtime.session", "classify_local", [bytes, h, w, 5],
                                             [bytes.buffer]);
}"""

# The page side of a room whose other devices live in this test process: one session event to the worker, as
# room_engine.js fires it (`handle`, through the engine: compute requests run in the worker before the effects
# come back); chunk and frame bytes as base64 both ways.
HANDLE = """async (event) => {
    const b64 = (u8) => { let s = ""; for (let i = 0; i < u8.length; i += 32768)
        s += String.fromCharCode(...u8.subarray(i, i + 32768)); return btoa(s); };
    const bytes = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
    const transfer = [];
    if (event.on === "chunk" || event.on === "frame") {
        event.data = bytes(event.data);
        transfer.push(event.data.buffer);
    }
    const effects = await window.tilemeshRuntime.call("tilemesh.runtime.session", "handle",
                                                      [event, performance.now() / 1e3], transfer);
    return effects.map((e) => (e.do === "send" ? { ...e, chunks: e.chunks.map(b64) } : e));
}"""

# ort_engine.js counts each event's tasks run on onnxruntime-web and on numpy (`engine_runs`, `numpy_runs`) on
# the bridge's reply, and hands only the effects back to the page: this keeps every reply so the test can read
# the counters written on them.
COUNT_RUNS = """
from tilemesh.runtime import engine_bridge as _bridge
_replies = []
_bridge_handle = _bridge.handle
def _counted_handle(event, now):
    reply = _bridge_handle(event, now)
    _replies.append(reply)
    return reply
_bridge.handle = _counted_handle
None
"""
RUNS = """
import json
_runs = json.dumps({k: sum(int(r.get(k, 0)) for r in _replies) for k in ("engine_runs", "numpy_runs")})
_replies.clear()
_runs
"""


def runs(page) -> dict:
    """Tasks this page ran on onnxruntime-web and on numpy since the last call (ort_engine.js's counters)."""
    return json.loads(page.evaluate("(c) => window.tilemeshRuntime.exec(c)", RUNS))


def plan_msg(spec: dict, devices) -> dict:
    """The server's `plan` message around a spec (what `PlanIn` / `{on: "plan"}` carries)."""
    return {"type": "plan", "plan_id": spec["plan_id"], "source": spec["source"], "devices": list(devices),
            "spec": spec}


def of(effects, do: str, what: str | None = None) -> list[dict]:
    return [e for e in effects if e["do"] == do and (what is None or e.get("what") == what)]


def demo_classifier() -> LocalClassifier:
    """The served demo model as the pages get it (its bundle: compact graph, labels, card), on numpy."""
    from tilemesh.server.model import prepare

    d = prepare(REPO / "static/model/mobilenet_v2.onnx", REPO / "static").dir
    return LocalClassifier.from_files(d / "graph.json", d / "labels.json", d / "card.json")


def boot(page, server, threads: int, query: str = ""):
    page.goto(f"{server.url}/runtime?ort_threads={threads}{query}")
    page.wait_for_function("document.getElementById('info').dataset.state !== 'booting'", timeout=90_000)
    assert page.locator("#info").get_attribute("data-state") == "ready"
    page.evaluate("(code) => window.tilemeshRuntime.exec(code)", LOAD_MODEL)
    return page.evaluate("() => window.tilemeshRuntime.call('tilemesh.runtime.session', 'load', "
                         "['/model/graph.json', '/model/labels.json', '/model/card.json'])")


@pytest.mark.parametrize("threads", [1, 2])
def test_whole_model_on_ort_wasm_matches_onnxruntime_top5(page, server, threads):
    info = boot(page, server, threads)
    engine = info["engine"]
    assert engine["engine"] == "ort-wasm", engine
    assert engine["threads"] == threads and engine["cross_origin_isolated"] is True
    assert engine["session_ms"] > 0
    sess = ort.InferenceSession(str(REPO / "static/model/mobilenet_v2.onnx"), providers=["CPUExecutionProvider"])
    labels = json.loads((REPO / "static/model/labels.json").read_text())
    for photo in (skimage.data.chelsea(), skimage.data.coffee()):
        img = np.ascontiguousarray(photo)
        got = page.evaluate(CLASSIFY, [base64.b64encode(img.tobytes()).decode(), *img.shape[:2]])
        assert got["engine"] == "ort-wasm"
        want = top_k(sess.run(None, {"input": preprocess(img)})[0][0], labels, 5)
        assert [t["index"] for t in got["top"]] == [i for i, _, _ in want]
        np.testing.assert_allclose([t["p"] for t in got["top"]], [p for _, _, p in want], atol=1e-4)
    assert not [r for r in page.requests if not r.startswith(server.url)]
    # The 14 MB wasm is fetched once, at boot with progress, and handed to onnxruntime-web.
    assert len([r for r in page.requests if "ort-wasm-simd-threaded.wasm" in r]) == 1, page.requests


def test_thread_count_is_chosen_by_measurement(page, server):
    """Without ?ort_threads the worker times the whole model on its default thread count and, on a second
    onnxruntime-web instance, on one thread, keeps the faster, and says so; results stay the reference's."""
    page.goto(f"{server.url}/runtime")
    page.wait_for_function("document.getElementById('info').dataset.state !== 'booting'", timeout=90_000)
    page.evaluate("(code) => window.tilemeshRuntime.exec(code)", LOAD_MODEL)
    info = page.evaluate("() => window.tilemeshRuntime.call('tilemesh.runtime.session', 'load', "
                         "['/model/graph.json', '/model/labels.json', '/model/card.json'])")["engine"]
    trial = info["thread_trial_ms"]
    assert set(trial) == {"1", "2"} and all(v > 0 for v in trial.values()), info  # 2 cores here
    assert info["threads"] == int(min(trial, key=trial.get)), info
    assert "chosen by measurement" in info["reason"]
    img = np.ascontiguousarray(skimage.data.chelsea())
    got = page.evaluate(CLASSIFY, [base64.b64encode(img.tobytes()).decode(), *img.shape[:2]])
    assert got["engine"] == "ort-wasm" and got["top"][0]["index"] == 285  # Egyptian cat, as numpy says
    print(f"\nthreads chosen: {info['threads']} ({trial})")


def test_numpy_when_turned_off(page, server):
    page.goto(f"{server.url}/runtime?ort=off")
    page.wait_for_function("document.getElementById('info').dataset.state !== 'booting'", timeout=90_000)
    page.evaluate("(code) => window.tilemeshRuntime.exec(code)", LOAD_MODEL)
    info = page.evaluate("() => window.tilemeshRuntime.call('tilemesh.runtime.session', 'load', "
                         "['/model/graph.json', '/model/labels.json', '/model/card.json'])")
    assert info["engine"]["engine"] == "numpy" and "ort=off" in info["engine"]["reason"]
    img = np.ascontiguousarray(skimage.data.chelsea())
    got = page.evaluate(CLASSIFY, [base64.b64encode(img.tobytes()).decode(), *img.shape[:2]])
    assert "engine" not in got and got["top"][0]["index"] == 285  # numpy's classify_local: Egyptian cat


@pytest.mark.parametrize("threads", [1, 2])
def test_room_tiles_on_ort_wasm_equal_numpy(page, server, threads):
    """The browser is device `a` of a four-device room (the others: numpy device sessions in this process). Its
    tasks (a border tile of a fused 2x2 grid, then the whole rest) run on onnxruntime-web in sessions made at plan
    adoption; the frame's top-5 equals single-device numpy within 1e-4."""
    room_tiles_equal_numpy(page, server, threads, "", "ort-wasm")


def room_tiles_equal_numpy(page, server, threads: int, query: str, engine_name: str, atol: float = 1e-4):
    """The body of the room-tiles test, for any engine the page's query selects (`engine_name`)."""
    info = boot(page, server, threads, query)
    assert info["engine"]["engine"] == engine_name, info["engine"]
    page.evaluate("(c) => window.tilemeshRuntime.exec(c)", COUNT_RUNS)
    clf = demo_classifier()
    cut = cut_candidates(clf.graph)[3]
    grid = {"devices": [["a", "b"], ["c", "d"]], "row_shares": [3, 2], "col_shares": [2, 3]}
    spec = {"plan_id": 5, "source": "a", "cuts": [cut],
            "splits": [grid, {"devices": [["a"]], "row_shares": None, "col_shares": None}]}
    plan = plan_from_spec(clf.graph, spec)
    first = plan.device_plan("a").tasks[0]
    pads = [s.pads for s in first.deps.steps if s.pads]
    assert any(p[0] and p[1] and not p[2] and not p[3] for p in pads)  # border top/left, halo bottom/right
    devices = "abcd"
    msg = plan_msg(spec, devices)
    others = {d: S.DeviceSession(clf) for d in "bcd"}
    results, queue = [], []

    def execute(src, effects):
        for e in effects:
            if e["do"] == "send":
                queue.extend((src, e["dst"], base64.b64decode(c) if isinstance(c, str) else bytes(c))
                             for c in e["chunks"])
            elif e["do"] == "frame_done":
                results.append(e["result"])
            elif e["do"] == "frame_failed" or (e["do"] == "notice" and e["what"] == "error"):
                raise AssertionError(e)

    def fire(dst, event):
        """One event to a device: the browser's session through its worker, the others' in this process."""
        if dst == "a":
            return page.evaluate(HANDLE, event)
        return [S.effect_to_dict(e) for e in others[dst].handle(S.event_from_dict(event), 0.0)]

    # Links open first (as in a room), each end learning the other's max message size; probes are not answered.
    for d in devices:
        for peer in devices:
            if peer != d:
                fire(d, {"on": "link_opened", "peer": peer, "max_message": 256 * 1024})
    for d in "bcd":
        execute(d, fire(d, {"on": "plan", "msg": msg, "me": d}))
    adopted = fire("a", {"on": "plan", "msg": msg, "me": "a"})
    execute("a", adopted)
    (engine,) = [e["detail"] for e in of(adopted, "notice", "engine")]
    assert engine["engine"] == engine_name and engine["plan_id"] == 5, engine
    assert engine["sessions_ms"] > engine["warmup_ms"] > 0 and engine["tasks"] == 2 and engine["on_numpy"] == 0
    (role,) = [e["detail"]["role"] for e in of(adopted, "notice", "plan")]
    assert role["role"] == "source" and role["tasks"] == 2
    frame = np.random.default_rng(11).integers(0, 256, (256, 256, 4), dtype=np.uint8)
    start = fire("a", {"on": "frame", "frame": 1, "data": base64.b64encode(frame.tobytes()).decode(),
                       "height": 256, "width": 256})
    execute("a", start)
    tasks_run = [e["detail"]["tasks_run"] for e in of(start, "notice", "tasks_run")]
    rng = random.Random(threads)
    while queue:
        src, dst, chunk = queue.pop(rng.randrange(len(queue)))
        effects = fire(dst, {"on": "chunk", "peer": src,
                             "data": base64.b64encode(chunk).decode() if dst == "a" else chunk})
        execute(dst, effects)
        if dst == "a":
            tasks_run += [e["detail"]["tasks_run"] for e in of(effects, "notice", "tasks_run")]
    assert [r["frame"] for r in results] == [1]
    local = clf.classify(frame.tobytes(), 256, 256)
    assert [t["index"] for t in results[0]["top"]] == [t["index"] for t in local["top"]]
    np.testing.assert_allclose([t["p"] for t in results[0]["top"]], [t["p"] for t in local["top"]], atol=atol)
    assert [t["segment"] for t in results[0]["report"]["tasks"]] == [0, 1]
    assert tasks_run[-1] == 2  # the session's count of tasks this device computed under plan 5
    assert runs(page) == {"engine_runs": 2, "numpy_runs": 0}
    assert page.evaluate("() => window.tilemeshRuntime.call('tilemesh.runtime.session', 'state', [])")["errors"] == []


@pytest.mark.parametrize("threads", [1, 2])
def test_profile_chooses_the_faster_engine(page, server, threads):
    """The device times the profile's probes on numpy and on onnxruntime-web and reports the faster one's
    profile (how close predictions come is for bench/backends.py to print, not for a test to assert)."""
    boot(page, server, threads)
    prof = page.evaluate("() => window.tilemeshRuntime.call('tilemesh.runtime.session', 'profile', [{numpy: true}])")
    engines = prof["engines"]
    assert set(engines) == {"ort-wasm", "numpy"}, prof
    assert prof["backend"] == min(engines, key=engines.get) == "ort-wasm", engines  # about 3-6x apart here
    assert f"{threads} thread" in prof["engine_reason"]
    # Calibrated on the measured whole model (a lone node's session also copies its input and output).
    assert engines["ort-wasm"] == pytest.approx(prof["model_ms"], rel=0.05)
    assert prof["chain"]["calibrated"] == "whole model"
    print(f"\n{threads} thread(s): predicted whole model numpy {engines['numpy']:.1f} ms, ort-wasm "
          f"{engines['ort-wasm']:.1f} ms, measured {prof['model_ms']:.1f} ms")
    # Frames now go to onnxruntime-web: the local classifier says so.
    img = np.ascontiguousarray(skimage.data.chelsea())
    got = page.evaluate(CLASSIFY, [base64.b64encode(img.tobytes()).decode(), *img.shape[:2]])
    assert got["engine"] == "ort-wasm"


def test_tasks_without_a_session_fall_back_to_numpy(page, server):
    """A plan adopted while the device was on numpy has no sessions; if the engine is switched on afterwards,
    each task runs on numpy instead (counted, never lost) and the frame still gets the reference answer."""
    boot(page, server, 1)
    page.evaluate("(c) => window.tilemeshRuntime.exec(c)", COUNT_RUNS)
    clf = demo_classifier()
    whole = {"devices": [["a"]], "row_shares": None, "col_shares": None}
    spec = {"plan_id": 3, "source": "a", "cuts": [cut_candidates(clf.graph)[5]], "splits": [whole, whole]}
    page.evaluate("(c) => window.tilemeshRuntime.exec(c)",
                  "from tilemesh.runtime import engine_bridge as b; b.use_engine('numpy', False, 'test'); None")
    adopted = page.evaluate(HANDLE, {"on": "plan", "msg": plan_msg(spec, "a"), "me": "a"})
    (role,) = [e["detail"]["role"] for e in of(adopted, "notice", "plan")]
    assert role["role"] == "source" and role["tasks"] == 2
    assert not of(adopted, "notice", "engine")  # no sessions made for this plan
    page.evaluate("(c) => window.tilemeshRuntime.exec(c)",
                  "from tilemesh.runtime import engine_bridge as b; b.use_engine('ort-wasm', True, 'test'); None")
    frame = np.random.default_rng(12).integers(0, 256, (256, 256, 4), dtype=np.uint8)
    effects = page.evaluate(HANDLE, {"on": "frame", "frame": 1, "data": base64.b64encode(frame.tobytes()).decode(),
                                     "height": 256, "width": 256})
    assert runs(page) == {"engine_runs": 0, "numpy_runs": 2}
    assert [e["detail"]["tasks_run"] for e in of(effects, "notice", "tasks_run")][-1] == 2
    (done,) = of(effects, "frame_done")
    local = clf.classify(frame.tobytes(), 256, 256)
    assert [t["index"] for t in done["result"]["top"]] == [t["index"] for t in local["top"]]
    np.testing.assert_allclose([t["p"] for t in done["result"]["top"]], [t["p"] for t in local["top"]], atol=1e-4)


def test_roster_says_why_a_device_is_on_numpy(browser, server):
    """A device without onnxruntime-web (here turned off) still joins and computes on numpy, and every roster
    shows its engine and the reason on its line."""
    from browsers import start_room
    from roomkit import decode_qr

    host = browser.new_context().new_page()
    other = browser.new_context().new_page()
    try:
        start_room(host, server.url)
        ready = "() => window.tilemesh && window.tilemesh.signaling.lastState?.state === 'ready'"
        host.wait_for_function(ready, timeout=120_000)
        other.goto(decode_qr(host) + "?kind=laptop&ort=off")
        other.wait_for_function(ready, timeout=120_000)
        me = other.evaluate("window.tilemesh.peerId")
        row = f"li.peer[data-peer-id='{me}'][data-backend]"
        host.wait_for_function("(sel) => document.querySelector(sel)?.textContent.includes('numpy (')",
                               arg=row + " .speed", timeout=20_000)
        assert host.get_attribute(row, "data-backend") == "numpy"
        assert "numpy (onnxruntime-web turned off" in host.inner_text(row + " .speed")
        assert host.evaluate("document.querySelector('li.peer.self').dataset.backend") == "ort-wasm"
    finally:
        host.context.close()
        other.context.close()
