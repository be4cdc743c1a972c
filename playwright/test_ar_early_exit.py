"""Early exit in a real room: the camera phone answers an easy photo alone with its cheap pass (160 px), and sends
a hard one to the room at full resolution.

Inside a network namespace (WebRTC needs a real interface): the server without an edge, a phone Chromium whose
fake camera alternates between two photos (a cup of espresso, which the 160 px pass is sure of, and gravel,
which it is not) and a laptop Chromium; the phone's plan is forced to an equal split, so every frame the room
computes moves tensors to the laptop and back. Every frame shown is recorded with the bytes the phone's mesh had
sent and the room frames it had started: an exit frame moved neither. Exit frames show onnxruntime's top-1 for
the photo at 160 px (what the cheap pass ran), room frames onnxruntime's top-1 at 224 px.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
from browsers import CHROMIUM, CHROMIUM_ARGS
from roomkit import get_json, netns_server
from skimage.transform import resize
from test_distributed import READY

from bench.harness import expected_top1
from bench.media import write_y4m_frames

pytestmark = [pytest.mark.browser, pytest.mark.netns]

# Every shown frame, with the phone's mesh bytes sent and room frames started at that moment.
RECORD = """() => {
  window.__frames = [];
  document.getElementById("ar").addEventListener("tilemesh-frame", (e) => {
    window.__frames.push({ ...e.detail, sent: window.tilemesh.mesh.sent, roomFrames: window.tilemesh.engine.frameId,
      source: document.getElementById("labels").dataset.source, stats: document.getElementById("stats").textContent });
  });
}"""


def square(img: np.ndarray, side: int = 480) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    sq = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return np.clip(np.rint(resize(sq, (side, side), anti_aliasing=True) * 255), 0, 255).astype(np.uint8)


def test_easy_photo_exits_on_the_phone_and_hard_one_goes_to_the_room(tmp_path: Path, pw):
    easy, hard = square(skimage.data.coffee()), square(skimage.data.gravel()[..., None].repeat(3, axis=2))
    # The camera: 2 s of the espresso, 2 s of gravel, in a loop.
    cam = write_y4m_frames(tmp_path / "easy_hard.y4m", [easy] * 20 + [hard] * 20, fps=10)
    easy_cheap, easy_full = expected_top1(easy, "fast160"), expected_top1(easy)
    hard_cheap, hard_full = expected_top1(hard, "fast160"), expected_top1(hard)
    assert easy_cheap != hard_cheap
    with netns_server() as srv:
        in_ns = srv.ns.chromium_wrapper(CHROMIUM)
        args = [*CHROMIUM_ARGS, "--ignore-certificate-errors"]
        b_phone = pw.chromium.launch(executable_path=in_ns, args=[*args, f"--use-file-for-fake-video-capture={cam}"])
        b_laptop = pw.chromium.launch(executable_path=in_ns, args=args)
        pages = []
        try:
            room = get_json(srv, "/api/rooms", {})["room"]
            phone = b_phone.new_context(ignore_https_errors=True).new_page()
            phone.goto(f"{srv.url}/join/{room}?kind=phone&exit=1&depth=1&strategy=equal_split")
            laptop = b_laptop.new_context(ignore_https_errors=True).new_page()
            laptop.goto(f"{srv.url}/join/{room}?kind=laptop")
            pages = [phone, laptop]
            for pg in pages:
                pg.wait_for_function(READY, timeout=180_000)
            phone.wait_for_function("() => Object.keys(window.tilemesh.signaling.lastState.profile.links || {})"
                                    ".length >= 1", timeout=60_000)
            phone.click("#start-ar")
            phone.wait_for_function("() => window.tilemesh.ar && document.getElementById('ar-exit').checked",
                                    timeout=60_000)
            phone.evaluate(RECORD)
            phone.wait_for_function(
                "() => { const f = window.__frames; return f.filter((x) => x.exit).length >= 3 &&"
                " f.filter((x) => !x.exit && x.stats.includes('plan')).length >= 3 &&"
                " f.some((x) => !x.exit && x.label !== f.find((y) => y.exit).label); }", timeout=90_000)
            phone.click("#ar-close")  # stops the loop: no frame after this is recorded as shown
            rec = phone.evaluate("window.__frames")
            exits = [r for r in rec if r["exit"]]
            room_frames = [r for r in rec if not r["exit"]]  # the room's plan, or alone before the first plan
            print(f"{len(rec)} frames: {len(exits)} exits ({sorted({r['label'] for r in exits})}), "
                  f"{len(room_frames)} to the room ({sorted({r['label'] for r in room_frames})}); last stats: "
                  f"{rec[-1]['stats']}")
            # Exits show the cheap pass's answer for the espresso (onnxruntime's at 160 px), marked as such.
            assert {r["label"] for r in exits} == {easy_cheap}
            assert all(r["source"] == "exit" and r["entropy"] <= 0.05 for r in exits)
            # The room answered the hard photo with onnxruntime's 224 px top-1 (and nothing but the two photos').
            assert hard_full in {r["label"] for r in room_frames}
            assert {r["label"] for r in room_frames} <= {easy_full, hard_full}
            assert all(r["source"] == "room" for r in room_frames)
            # No plan traffic for an exit frame: the phone started no room frame and its mesh sent no byte since
            # the frame before it; every room frame did both (equal split: the laptop computes half of it).
            for prev, r in zip(rec, rec[1:], strict=False):
                if r["exit"]:
                    assert (r["roomFrames"], r["sent"]) == (prev["roomFrames"], prev["sent"]), (prev, r)
                elif "plan" in r["stats"]:
                    assert r["roomFrames"] == prev["roomFrames"] + 1 and r["sent"] > prev["sent"], (prev, r)
                else:  # no plan yet: the full model on the phone alone (the frame still is not an exit)
                    assert "this device alone" in r["stats"] and r["roomFrames"] == prev["roomFrames"], (prev, r)
            assert "early exit" in rec[-1]["stats"] and "threshold 0.05" in rec[-1]["stats"]
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


def test_a_frame_rate_target_picks_a_variant_and_the_page_shows_it(tmp_path: Path, pw):
    """Context-aware scaling in the AR page: with a frame-rate target the room cannot reach on the full model,
    the planner picks a lower-resolution variant, the page says which, and the labels are onnxruntime's top-1 at
    that variant's size; without a target the model as served runs again."""
    photo = square(skimage.data.coffee())
    cam = write_y4m_frames(tmp_path / "coffee.y4m", [photo] * 2)
    with netns_server() as srv:
        in_ns = srv.ns.chromium_wrapper(CHROMIUM)
        args = [*CHROMIUM_ARGS, "--ignore-certificate-errors", f"--use-file-for-fake-video-capture={cam}"]
        b_phone = pw.chromium.launch(executable_path=in_ns, args=args)
        page = None
        try:
            room = get_json(srv, "/api/rooms", {})["room"]
            page = b_phone.new_context(ignore_https_errors=True).new_page()
            page.goto(f"{srv.url}/join/{room}?kind=phone&depth=1")
            page.wait_for_function(READY, timeout=180_000)
            page.click("#start-ar")
            page.wait_for_function("() => window.tilemesh.ar && Number(document.getElementById('labels')"
                                   ".dataset.frames || 0) >= 2", timeout=60_000)
            full = page.evaluate("window.tilemesh.engine.plan")
            assert not full.get("variant")
            # A target 10x the full model's predicted rate: nothing meets it, the fastest variant runs.
            fps = round(10 * 1e3 / full["predicted_ms"], 1)
            page.evaluate("(v) => { const s = document.getElementById('ar-target');"
                          " s.append(new Option('test', v)); s.value = v; s.dispatchEvent(new Event('change')); }",
                          f"fps:{fps}")
            page.wait_for_function("() => window.tilemesh.engine.plan?.scaling", timeout=60_000)
            plan = page.evaluate("window.tilemesh.engine.plan")
            print("scaling:", plan["scaling"])
            assert plan["variant"] == plan["scaling"]["chosen"] == "fast160" and not plan["scaling"]["met"]
            page.wait_for_function("() => document.getElementById('stats').dataset.variant === 'fast160'",
                                   timeout=60_000)
            stats = page.locator("#stats").inner_text()
            assert "Fast (160 px)" in stats and f"target {fps:g} fps" in stats, stats
            assert page.locator("#labels").get_attribute("data-top1") == expected_top1(photo, "fast160")
            # No target: the model as served again.
            page.select_option("#ar-target", "")
            page.wait_for_function("() => { const p = window.tilemesh.engine.plan; return p && !p.variant; }",
                                   timeout=60_000)
            page.wait_for_function("() => document.getElementById('stats').dataset.variant === ''", timeout=60_000)
            assert page.locator("#labels").get_attribute("data-top1") == expected_top1(photo)
            assert page.evaluate("window.tilemesh.engine.errors") == []
        finally:
            if page is not None:
                page.context.close()
            b_phone.close()
