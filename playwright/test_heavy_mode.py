"""Heavy mode in a real room: a phone picks "Heavy (448 px)" on the AR page, the room plans on the model's
448-px variant and two browsers split each frame; the labels are onnxruntime's top-1 for the camera's photo at
448 px (the ONNX file itself, its input declared 448x448, on the card's heavy preprocessing).

Inside a network namespace (WebRTC needs a real interface): the server without an edge, a phone Chromium whose
fake camera shows a photo, and a laptop Chromium."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import skimage.data
from browsers import CHROMIUM, CHROMIUM_ARGS, REPO
from roomkit import get_json, netns_server
from test_distributed import READY, centre_square, frames, wait_frames

from bench.media import write_y4m
from tilemesh.models.card import load_card
from tilemesh.runtime.preprocess import Preprocessing, preprocess, top_k

pytestmark = [pytest.mark.browser, pytest.mark.netns]


def heavy_top1(img: np.ndarray) -> tuple[str, str]:
    """onnxruntime's top-1 at the heavy variant's size and at the served size (they may differ)."""
    path = REPO / "static/model/mobilenet_v2.onnx"
    labels = json.loads((REPO / "static/model/labels.json").read_text())
    card = load_card(path, (1, 3, 224, 224), 1000)
    v = card.variant("heavy")
    m = onnx.load(path)
    for d, n in zip(m.graph.input[0].type.tensor_type.shape.dim, (1, 3, v.preprocess.crop, v.preprocess.crop),
                    strict=True):
        d.Clear()
        d.dim_value = n
    heavy = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    normal = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sq = centre_square(img)
    pre = Preprocessing(v.preprocess.resize_shorter_side, v.preprocess.crop, v.preprocess.mean, v.preprocess.std)
    x_heavy, x_normal = preprocess(sq, pre=pre), preprocess(sq)
    assert x_heavy.shape == (1, 3, 448, 448)
    return (top_k(heavy.run(None, {"input": x_heavy})[0][0], labels, 1)[0][1],
            top_k(normal.run(None, {"input": x_normal})[0][0], labels, 1)[0][1])


def test_phone_picks_heavy_mode_and_two_browsers_split_it(tmp_path: Path, pw):
    photo = skimage.data.coffee()
    cam = write_y4m(tmp_path / "coffee.y4m", photo)
    expected, _ = heavy_top1(photo)
    with netns_server() as srv:
        in_ns = srv.ns.chromium_wrapper(CHROMIUM)
        args = [*CHROMIUM_ARGS, "--ignore-certificate-errors"]
        b_phone = pw.chromium.launch(executable_path=in_ns, args=[*args, f"--use-file-for-fake-video-capture={cam}"])
        b_laptop = pw.chromium.launch(executable_path=in_ns, args=args)
        pages = []
        try:
            room = get_json(srv, "/api/rooms", {})["room"]
            phone = b_phone.new_context(ignore_https_errors=True).new_page()
            phone.goto(f"{srv.url}/join/{room}?kind=phone")
            laptop = b_laptop.new_context(ignore_https_errors=True).new_page()
            laptop.goto(f"{srv.url}/join/{room}?kind=laptop")
            pages = [phone, laptop]
            for pg in pages:
                pg.wait_for_function(READY, timeout=180_000)
            ids = [pg.evaluate("window.tilemesh.peerId") for pg in pages]
            phone.wait_for_function("() => Object.keys(window.tilemesh.signaling.lastState.profile.links || {})"
                                    ".length >= 1", timeout=60_000)
            phone.click("#start-ar")
            wait_frames(phone, 2)
            # The picker offers the served model and its heavy variant.
            options = phone.eval_on_selector_all("#ar-mode option", "os => os.map((o) => [o.value, o.text])")
            assert options == [["", "Normal (224 px)"], ["fast160", "Fast (160 px)"], ["fast192", "Fast (192 px)"],
                               ["heavy", "Heavy (448 px)"]], options
            phone.select_option("#ar-mode", "heavy")
            # Both browsers in: every frame split between them (the planner's own choice is printed, not forced).
            phone.wait_for_function("() => window.tilemesh.engine.plan?.variant === 'heavy'", timeout=60_000)
            own = phone.evaluate("window.tilemesh.engine.plan")
            print(f"heavy mode, the planner chose: {own['label']} (predicted {own['predicted_ms']:.0f} ms)")
            phone.evaluate("() => { window.tilemesh.ar.engine.strategy = 'equal_split';"
                           " window.tilemesh.engine.plan = null; }")
            phone.wait_for_function("() => { const p = window.tilemesh.engine.plan;"
                                    " return p?.strategy === 'equal_split' && p.variant === 'heavy'; }",
                                    timeout=60_000)
            plan = phone.evaluate("window.tilemesh.engine.plan")
            assert sorted(plan["devices"]) == sorted(ids) and plan["spec"]["variant"] == "heavy"
            start = frames(phone)
            wait_frames(phone, start + 3)
            assert phone.locator("#labels").get_attribute("data-top1") == expected
            assert phone.locator("#stats").get_attribute("data-devices") == "2"
            assert "Heavy (448 px)" in phone.locator("#stats").inner_text()
            for pg, pid in zip(pages, ids, strict=True):
                tasks = pg.evaluate("(id) => window.tilemesh.engine.tasksRun[id] || 0", plan["plan_id"])
                assert tasks > 0, f"{pid} computed nothing under heavy plan {plan['plan_id']}"
            # The laptop adopted the heavy plan on the 448-px graph (its input is the variant's).
            shape = laptop.evaluate("() => window.tilemesh.runtime.call('tilemesh.runtime.session', 'state', [])"
                                    ".then((s) => s.last_plan.spec.variant)")
            assert shape == "heavy"
            # Back to normal: the next plan has no variant, frames are 256 px again, and the labels go on.
            phone.select_option("#ar-mode", "")
            phone.wait_for_function("() => { const p = window.tilemesh.engine.plan; return p && !p.variant; }",
                                    timeout=60_000)
            wait_frames(phone, frames(phone) + 2)
            assert phone.locator("#labels").get_attribute("data-top1") == expected  # espresso at both sizes
            assert phone.evaluate("window.tilemesh.engine.errors") == []
        except Exception:
            for pg in pages:
                print(pg.url, pg.evaluate("({errors: window.tilemesh?.engine?.errors, stats: "
                                          "document.getElementById('stats')?.textContent})"))
            raise
        finally:
            for pg in pages:
                pg.context.close()
            b_phone.close()
            b_laptop.close()
