"""A three-view fusion room: three camera phones look at the same photo from different views, the room fuses
their class scores, and every phone and the host page show the fused label, which is the fusion of onnxruntime's
softmax on those three views.

Inside a network namespace: the server (no edge peer), a host page that starts the room with "multi-view
fusion" ticked, and three phones, each in its own Chromium whose fake camera shows its own view of scikit-image's
cat photo (a crop; the same crop with a grey card over its left side; a mirrored, tighter crop with its bottom
covered). onnxruntime's answers on these views: Egyptian cat, Egyptian cat, tiger cat; their average fusion says
Egyptian cat, which is also the model's answer on the clean photo. When the dissenting phone closes its camera,
its view leaves the fusion at once (the room's window is 30 s, so only the `stop` can have removed it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
from browsers import CHROMIUM, CHROMIUM_ARGS
from PIL import Image
from roomkit import decode_qr, netns_server
from test_distributed import READY, centre_square, frames, wait_frames

from bench.media import write_y4m
from tilemesh.runtime.fusion import fuse
from tilemesh.runtime.preprocess import softmax

pytestmark = [pytest.mark.browser, pytest.mark.netns]

# (top, left, bottom, right) as fractions of the photo, mirrored?, (covered side, fraction of the view) or None.
VIEWS = {
    "crop": ((0.0, 0.0, 1.0, 0.7), False, None),
    "covered": ((0.0, 0.0, 1.0, 0.7), False, ("left", 0.35)),
    "mirrored": ((0.1, 0.1, 0.9, 0.9), True, ("bottom", 0.35)),
}
WINDOW_S = 30.0  # wide: under load a phone's frame can take seconds; staleness is tested in tests/test_fusion_room.py


def camera_view(photo: np.ndarray, box, mirror: bool, cover, size: int = 320) -> np.ndarray:
    """One phone's view of the photo: a crop, scaled to `size` square, maybe mirrored, maybe partly covered."""
    h, w = photo.shape[:2]
    top, left, bottom, right = box
    v = photo[int(top * h):int(bottom * h), int(left * w):int(right * w)]
    if mirror:
        v = v[:, ::-1]
    v = np.asarray(Image.fromarray(np.ascontiguousarray(v)).resize((size, size), Image.BILINEAR)).copy()
    if cover:
        side, frac = cover
        n = int(size * frac)
        region = {"left": (slice(None), slice(0, n)), "bottom": (slice(size - n, size), slice(None))}[side]
        v[region] = (90, 90, 90)
    return v


def ort_probs(images: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """onnxruntime's softmax on each image (the served model, the reference preprocessing), and the labels."""
    import json  # noqa: PLC0415

    import onnxruntime as ort  # noqa: PLC0415
    from browsers import REPO  # noqa: PLC0415

    from tilemesh.runtime.preprocess import preprocess  # noqa: PLC0415

    sess = ort.InferenceSession(str(REPO / "static/model/mobilenet_v2.onnx"), providers=["CPUExecutionProvider"])
    labels = json.loads((REPO / "static/model/labels.json").read_text())
    return {k: softmax(sess.run(None, {"input": preprocess(centre_square(im))})[0][0])
            for k, im in images.items()}, labels


def fused_label(page, selector: str) -> tuple[str, int]:
    el = page.locator(selector)
    return el.get_attribute("data-top1"), int(el.get_attribute("data-views") or 0)


def test_three_phones_show_the_fusion_of_their_views(tmp_path: Path, pw):
    photo = skimage.data.chelsea()
    views = {k: camera_view(photo, *spec) for k, spec in VIEWS.items()}
    probs, labels = ort_probs({**views, "clean": photo})
    clean = labels[int(np.argmax(probs.pop("clean")))]
    own = {k: labels[int(np.argmax(p))] for k, p in probs.items()}
    expected = labels[int(np.argmax(fuse(probs, "avg")))]
    expected_two = labels[int(np.argmax(fuse({k: probs[k] for k in ("crop", "covered")}, "avg")))]
    # What the scene is (onnxruntime, before any browser): one view disagrees, the fusion agrees with the clean photo.
    print("clean photo:", clean, "views:", own, "fused (average):", expected)
    assert len(set(own.values())) == 2 and expected == clean

    with netns_server() as srv:
        in_ns = srv.ns.chromium_wrapper(CHROMIUM)
        args = [*CHROMIUM_ARGS, "--ignore-certificate-errors"]
        browsers = {k: pw.chromium.launch(executable_path=in_ns, args=[
            *args, f"--use-file-for-fake-video-capture={write_y4m(tmp_path / f'{k}.y4m', v)}"])
            for k, v in views.items()}
        pages = []
        try:
            host = browsers["crop"].new_context(ignore_https_errors=True).new_page()
            host.goto(srv.url + "/")
            host.check("#new-room-fusion")  # the front page's "multi-view fusion" box
            host.locator("#new-room").click()
            host.wait_for_url("**/room/*")
            host.wait_for_function("() => document.getElementById('fusion').dataset.mode === 'avg'", timeout=30_000)
            host.evaluate("(w) => window.tilemesh.fusionView.request({method: 'avg', window_s: w})", WINDOW_S)
            join_url = decode_qr(host)
            phones = {}
            for k, b in browsers.items():
                phones[k] = b.new_context(ignore_https_errors=True).new_page()
                phones[k].goto(join_url + "?kind=phone")
            pages = [host, *phones.values()]
            for pg in pages:
                pg.wait_for_function(READY, timeout=180_000)
            for pg in phones.values():  # the join page says the room fuses views, before the camera opens
                assert pg.locator("#fusion-note").is_visible()
            ids = {k: pg.evaluate("window.tilemesh.peerId") for k, pg in phones.items()}
            for pg in phones.values():  # every protocol error a phone gets (none may concern its views)
                pg.evaluate("window.protocolErrors = []; window.tilemesh.signaling.on('error', (e) =>"
                            " window.protocolErrors.push(e))")
                pg.click("#start-ar")
            for pg in phones.values():
                wait_frames(pg, 1)

            # Every page shows the fused label over the three views, and each view's own answer.
            three = "(s) => { const e = document.querySelector(s); return e && e.dataset.views === '3'; }"
            host.wait_for_function(three, arg="#fusion", timeout=60_000)
            for pg in phones.values():
                pg.wait_for_function(three, arg="#fused", timeout=60_000)
            assert fused_label(host, "#fusion") == (expected, 3)
            for k, pg in phones.items():
                assert fused_label(pg, "#fused") == (expected, 3), k
                assert pg.locator("#fused").is_visible()
                # Each phone still shows its own view's answer as before.
                assert pg.locator("#labels").get_attribute("data-top1") == own[k], k
            rows = host.locator("#fusion-views li")
            seen = {rows.nth(i).get_attribute("data-peer"): rows.nth(i) for i in range(rows.count())}
            assert set(seen) == set(ids.values())
            for k, peer in ids.items():
                assert seen[peer].get_attribute("data-top1") == own[k], k
            weights = [float(r.get_attribute("data-weight")) for r in seen.values()]
            assert sum(weights) == pytest.approx(1.0, abs=1e-3)
            assert max(weights) < 1.0  # the average: every view weighs in
            print("host:", host.locator("#fusion").inner_text())
            print("phone:", phones["crop"].locator("#fused").inner_text())

            # The dissenting phone closes its camera: its view leaves at once, long before the window ends.
            phones["mirrored"].click("#ar-close")
            two = "(s) => { const e = document.querySelector(s); return e && e.dataset.views === '2'; }"
            host.wait_for_function(two, arg="#fusion", timeout=20_000)
            assert fused_label(host, "#fusion") == (expected_two, 2)
            phones["crop"].wait_for_function(two, arg="#fused", timeout=20_000)
            assert fused_label(phones["crop"], "#fused") == (expected_two, 2)
            assert ids["mirrored"] not in {rows.nth(i).get_attribute("data-peer") for i in range(rows.count())}
            for k in ("crop", "covered"):
                start = frames(phones[k])
                wait_frames(phones[k], start + 1)  # the others keep classifying
            for k, pg in phones.items():  # every view a phone sent was accepted
                assert int(pg.locator("#fused").get_attribute("data-sent")) >= 1, k
                assert [e for e in pg.evaluate("window.protocolErrors") if e.get("ref") in ("view", "fusion")] == [], k
                print(k, "engine notes:", pg.evaluate("window.tilemesh.engine.errors"))
        except Exception:
            for pg in pages:
                print(pg.url, pg.evaluate("({errors: window.tilemesh?.engine?.errors,"
                                          " fused: document.getElementById('fused')?.innerText"
                                          " ?? document.getElementById('fusion')?.innerText,"
                                          " stats: document.getElementById('stats')?.textContent})"))
            raise
        finally:
            for pg in pages:
                pg.context.close()
            for b in browsers.values():
                b.close()
