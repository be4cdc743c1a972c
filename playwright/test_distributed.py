"""The product, end to end: phones and a laptop in a room classify camera frames together.

Inside a network namespace: the server with its aiortc edge peer, a host page, a phone page whose camera shows
a real photo (Chromium's fake capture from a Y4M file) and a third browser device in its own Chromium slowed by
a cgroup CPU quota. The phone
opens the camera; its frames are computed by the room with the planner's plan, and then with every device
forced in (equal split). The overlay must show onnxruntime's top-1 for that photo, and every device must
have computed part of the frame. Then the slow device's page closes mid-stream: the phone must keep labelling
and get a plan without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import skimage.data
from browsers import CHROMIUM, CHROMIUM_ARGS, REPO, start_room
from roomkit import decode_qr, get_json, netns_server

from bench.env import CpuGroup
from bench.env import unavailable_reason as emulation_unavailable
from bench.media import write_y4m
from tilemesh.runtime.preprocess import preprocess, top_k

pytestmark = [pytest.mark.browser, pytest.mark.netns]

READY = "() => window.tilemesh && window.tilemesh.signaling.lastState?.state === 'ready'"
SETTLED = "() => window.tilemesh.signaling.lastState?.state === 'ready' && !window.tilemesh.signaling.lastState.detail"


def centre_square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    return img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def expected_top1(img: np.ndarray) -> str:
    sess = ort.InferenceSession(str(REPO / "static/model/mobilenet_v2.onnx"), providers=["CPUExecutionProvider"])
    labels = json.loads((REPO / "static/model/labels.json").read_text())
    return top_k(sess.run(None, {"input": preprocess(centre_square(img))})[0][0], labels, 1)[0][1]


def frames(page) -> int:
    return int(page.locator("#labels").get_attribute("data-frames") or 0)


def wait_frames(page, n: int, timeout_ms: int = 120_000) -> None:
    page.wait_for_function(
        "(n) => { const l = document.getElementById('labels');"
        " return l.dataset.state === 'error' || Number(l.dataset.frames || 0) >= n; }",
        arg=n, timeout=timeout_ms)
    assert page.locator("#labels").get_attribute("data-state") == "running", page.locator("#error").inner_text()


@contextlib.contextmanager
def cpu_group(name: str, cores: float):
    group = CpuGroup(name, cores).create()
    try:
        yield group
    finally:
        group.remove()


def slowed(executable: str, group: CpuGroup, tmp_path: Path) -> str:
    """A wrapper that starts `executable` inside the CPU group: a whole Chromium, Workers included, slowed."""
    script = tmp_path / f"in-{group.name}"
    script.write_text("#!/bin/sh\n" + group.join_lines() + f'exec {executable} "$@"\n')
    script.chmod(0o755)
    return str(script)


def test_room_classifies_camera_frames_together(tmp_path: Path, pw):
    if emulation_unavailable():
        pytest.skip(emulation_unavailable())

    photo = skimage.data.coffee()
    cam = write_y4m(tmp_path / "coffee.y4m", photo)
    expected = expected_top1(photo)
    with cpu_group(f"tm-test-{os.getpid()}-{tmp_path.name[-12:]}", 0.5) as slow_cpu, netns_server(["--edge"]) as srv:
        in_ns = srv.ns.chromium_wrapper(CHROMIUM)
        args = [*CHROMIUM_ARGS, "--ignore-certificate-errors"]
        fast = pw.chromium.launch(executable_path=in_ns, args=[*args, f"--use-file-for-fake-video-capture={cam}"])
        slow = pw.chromium.launch(executable_path=slowed(in_ns, slow_cpu, tmp_path), args=args)
        pages = []
        try:
            host = fast.new_context(ignore_https_errors=True).new_page()
            start_room(host, srv.url)
            join_url = decode_qr(host)
            phone = fast.new_context(ignore_https_errors=True).new_page()
            console: list[str] = []  # the camera phone's page and worker, printed if the test fails
            phone.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            phone.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            phone.goto(join_url + "?kind=phone")
            laptop = slow.new_context(ignore_https_errors=True).new_page()
            laptop.goto(join_url + "?kind=laptop")
            pages = [host, phone, laptop]
            for pg in pages:
                pg.wait_for_function(READY, timeout=180_000)
            # Ready devices then refine what they measured while the others booted (thread count, profile, links):
            # this test's plans and counts are about a settled room (the edge on this same machine would otherwise
            # compute while the browsers measure, drift, and replan mid-check).
            for pg in pages:
                pg.wait_for_function(SETTLED, timeout=180_000)
            ids = [pg.evaluate("window.tilemesh.peerId") for pg in pages]
            room = host.url.rsplit("/", 1)[-1]
            edge = get_json(srv, f"/diag/mesh/edge/{room}")
            assert edge["joined"], edge
            deadline = time.monotonic() + 60
            while not get_json(srv, f"/diag/mesh/edge/{room}")["compute"]["ready"] and time.monotonic() < deadline:
                time.sleep(0.5)
            # Every device measured itself and its links to the others before reporting ready.
            for pg in pages:
                prof = pg.evaluate("window.tilemesh.signaling.lastState.profile")
                assert prof["compute"]["sec_per_mac"]["conv_pointwise"] > 0
                assert len(prof["links"]) >= 1
                # Browsers compute on onnxruntime-web (chosen by profiling it against numpy, ~5x apart here).
                assert prof["compute"]["backend"] == "ort-wasm", prof["compute"].get("engine_reason")
            roster = host.evaluate("window.tilemesh.signaling.peers")
            edge_prof = next(p["profile"] for p in roster if p["kind"] == "edge")
            assert edge_prof["compute"]["backend"] == "onnxruntime", edge_prof["compute"].get("engine_reason")
            # The host page's roster shows each device's engine.
            host.wait_for_function("() => document.querySelectorAll('li.peer[data-backend]').length >= 4",
                                   timeout=20_000)
            shown = host.eval_on_selector_all("li.peer[data-backend]", "els => els.map((e) => [e.dataset.kind,"
                                              " e.dataset.backend, e.querySelector('.speed').textContent])")
            assert sorted(b for _, b, _ in shown) == ["onnxruntime", "ort-wasm", "ort-wasm", "ort-wasm"], shown
            assert all(b in text for _, b, text in shown), shown
            # The server's edge is reached through the signaling socket (relay), the browsers over WebRTC.
            assert [("via the server's socket" in text) for kind, _, text in shown if kind == "edge"] == [True]
            edge_id = edge["peer_id"]
            for pg in pages:
                kinds = pg.evaluate("(edge) => [...window.tilemesh.mesh.links.values()].map((l) =>"
                                    " [l.remote === edge, l.relay === true])", edge_id)
                assert sorted(kinds) == [[False, False], [False, False], [True, True]], kinds

            phone.click("#start-ar")
            wait_frames(phone, 3)
            assert phone.locator("#labels").get_attribute("data-top1") == expected
            chosen = phone.evaluate("window.tilemesh.engine.plan")
            assert chosen is not None and chosen["source"] == ids[1], phone.locator("#stats").inner_text()
            assert chosen["predicted_ms"] > 0
            # The host page saw the same plan the phone runs.
            host.wait_for_function("(id) => window.tilemesh.engine.lastPlan?.plan_id === id",
                                   arg=chosen["plan_id"], timeout=10_000)

            # Every device in: each must compute a share of the frame, and the answer must not change.
            phone.evaluate("() => { window.tilemesh.ar.engine.strategy = 'equal_split';"
                           " window.tilemesh.engine.plan = null; }")
            phone.wait_for_function("() => window.tilemesh.engine.plan?.strategy === 'equal_split'", timeout=30_000)
            plan_id = phone.evaluate("window.tilemesh.engine.plan.plan_id")
            start = frames(phone)
            wait_frames(phone, start + 3)
            # Frames in flight on the stream's lanes finish there (by design), so the first results after the
            # switch may come from the old plan: wait for one computed by all four devices.
            phone.wait_for_function("() => document.getElementById('stats').dataset.devices === '4'",
                                    timeout=60_000)
            assert phone.locator("#labels").get_attribute("data-top1") == expected
            for pg, pid in zip(pages, ids, strict=True):
                tasks = pg.evaluate("(id) => window.tilemesh.engine.tasksRun[id] || 0", plan_id)
                assert tasks > 0, (f"{pid} ({pg.url}) computed nothing under plan {plan_id}: "
                                   f"{pg.evaluate('window.tilemesh.engine.tasksRun')}")
            edge_tasks = get_json(srv, f"/diag/mesh/edge/{room}")["compute"]["tasks_run"]
            assert edge_tasks.get(str(plan_id), 0) > 0, f"the edge computed nothing under plan {plan_id}"
            assert phone.evaluate("window.tilemesh.engine.errors") == []

            # A device vanishes mid-stream: frames in flight fail over to the phone alone, the room replans
            # without it, and the labels keep coming.
            laptop.context.close()
            pages.remove(laptop)
            start = frames(phone)
            wait_frames(phone, start + 4)
            phone.wait_for_function("(gone) => { const p = window.tilemesh.engine.plan;"
                                    " return p && !p.devices.includes(gone); }", arg=ids[2], timeout=30_000)
            wait_frames(phone, frames(phone) + 2)
            assert phone.locator("#labels").get_attribute("data-top1") == expected
        except Exception:
            for pg in pages:
                print(pg.url, pg.evaluate("({errors: window.tilemesh?.engine?.errors, state: "
                                          "window.tilemesh?.signaling?.lastState?.state, "
                                          "ar: window.tilemesh?.ar?.engine?.lastError})"))
            print("\n".join(console[-40:]))
            raise
        finally:
            for pg in pages:
                pg.context.close()
            fast.close()
            slow.close()
