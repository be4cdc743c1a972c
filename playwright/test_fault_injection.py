"""Faults in a real room: a device that lies, then one that vanishes mid-stream.

Inside a network namespace: the server (no edge), a host page, a phone whose camera shows a real photo, and a
tablet, all three in the plan (equal split). The tablet starts returning wrong tiles (a page-side hook into its
worker's session, `corrupt_for_test`: every tensor its engine returns, overlap regions included). With spot
checks off on every device, the overlap cross-checks alone (digests of the halo rows neighbours both compute,
sent over the data channels, tilemesh.runtime.overlap) must catch it before any wrong answer is shown, and the
host page must name it. Then spot checks run at the default rate again, a new plan without the liar comes, and
the host's page closes mid-stream. Every frame must carry onnxruntime's top-1; the latency spikes are printed
against a normal frame.
"""

from __future__ import annotations

import statistics

import pytest
import skimage.data
from browsers import CHROMIUM, CHROMIUM_ARGS, start_room
from roomkit import decode_qr, netns_server
from test_distributed import READY, expected_top1, wait_frames

from bench.media import write_y4m
from tilemesh.runtime import overlap, recovery

pytestmark = [pytest.mark.browser, pytest.mark.netns]

SESSION = "tilemesh.runtime.session"
# Every frame the phone shows, with its latency and who answered it (the room's plan or the phone alone).
RECORD = """() => {
  const ar = window.tilemesh.ar.engine;
  if (ar.recorded) return;
  ar.recorded = [];
  const classify = ar.classify.bind(ar);
  ar.classify = async (frame) => {
    const t0 = performance.now();
    const r = await classify(frame);
    if (r.skipped) return r;  // no lane could take it in order yet: no answer (the loop grabs another frame)
    ar.recorded.push({ top1: r.top[0].label, ms: performance.now() - t0, by: ar.name });
    return r;
  };
}"""


def recorded(page) -> list[dict]:
    return page.evaluate("window.tilemesh.ar.engine.recorded")


def test_a_lying_device_is_caught_and_a_vanishing_one_costs_no_frame(tmp_path, pw):
    photo = skimage.data.coffee()
    cam = write_y4m(tmp_path / "coffee.y4m", photo)
    expected = expected_top1(photo)
    with netns_server() as srv:
        in_ns = srv.ns.chromium_wrapper(CHROMIUM)
        args = [*CHROMIUM_ARGS, "--ignore-certificate-errors"]
        browser = pw.chromium.launch(executable_path=in_ns, args=[*args, f"--use-file-for-fake-video-capture={cam}"])
        pages = []
        try:
            host = browser.new_context(ignore_https_errors=True).new_page()
            start_room(host, srv.url)
            join_url = decode_qr(host)
            phone = browser.new_context(ignore_https_errors=True).new_page()
            phone.goto(join_url + "?kind=phone&strategy=equal_split")
            tablet = browser.new_context(ignore_https_errors=True).new_page()
            tablet.goto(join_url + "?kind=tablet")
            pages = [host, phone, tablet]
            for pg in pages:
                pg.wait_for_function(READY, timeout=180_000)
            ids = [pg.evaluate("window.tilemesh.peerId") for pg in pages]

            phone.click("#start-ar")
            phone.wait_for_function("() => window.tilemesh.ar?.engine", timeout=60_000)
            phone.evaluate(RECORD)
            wait_frames(phone, 3)
            plan = phone.evaluate("window.tilemesh.engine.plan")
            assert sorted(plan["devices"]) == sorted(ids), plan
            normal = statistics.median(f["ms"] for f in recorded(phone))

            # Honest so far: the digests of numpy-free engines (onnxruntime-web on every page) agree within tolerance.
            honest = phone.evaluate("(s) => window.tilemesh.runtime.call(s, 'state', [])", SESSION)["overlap"]
            print(f"\nhonest overlap digests (onnxruntime-web): {honest}")
            assert honest and all(v["max_err"] <= overlap.DIGEST_RTOL for v in honest.values()), honest

            # The tablet lies; no device spot-checks: only the overlap cross-checks can see it.
            for pg in pages:
                pg.evaluate("(s) => window.tilemesh.runtime.call(s, 'set_check_rate', [0.0])", SESSION)
            tablet.evaluate("(s) => window.tilemesh.runtime.call(s, 'corrupt_for_test', [0.5])", SESSION)
            host.wait_for_selector(f".wrong-result[data-device='{ids[2]}']", timeout=60_000)
            phone.wait_for_function("(liar) => { const p = window.tilemesh.engine.plan;"
                                    " return p && !p.devices.includes(liar); }", arg=ids[2], timeout=60_000)
            faults = phone.evaluate("(s) => window.tilemesh.runtime.call(s, 'state', [])", SESSION)["faults"]
            assert faults["overlap_mismatches"] >= 1, faults
            for pg in pages:
                pg.evaluate("([s, r]) => window.tilemesh.runtime.call(s, 'set_check_rate', [r])",
                            [SESSION, recovery.CHECK_RATE])
            lied = len(recorded(phone))
            wait_frames(phone, int(phone.locator("#labels").get_attribute("data-frames")) + 2)

            # The host's tab closes mid-stream (it is in the plan: equal split over phone and host now).
            plan = phone.evaluate("window.tilemesh.engine.plan")
            assert ids[0] in plan["devices"], plan
            host.context.close()
            pages.remove(host)
            closed = len(recorded(phone))
            wait_frames(phone, int(phone.locator("#labels").get_attribute("data-frames")) + 4)

            frames = recorded(phone)
            # The overlap checks hold each answer until its digests agree: no wrong answer before the conviction
            # either.
            before = [f for f in frames[:lied] if f["top1"] != expected]
            wrong = [f for f in frames[lied:] if f["top1"] != expected]
            spike_lie = max((f["ms"] for f in frames[:lied + 1]), default=0.0)
            spike_close = max((f["ms"] for f in frames[closed:closed + 3]), default=0.0)
            print(f"\nframes {len(frames)}: normal {normal:.0f} ms; while the liar was caught up to "
                  f"{spike_lie:.0f} ms ({spike_lie / normal:.1f}x); after a device closed up to {spike_close:.0f} ms "
                  f"({spike_close / normal:.1f}x); wrong top-1 before the conviction: {len(before)} of {lied}; "
                  f"answered by: {sorted({f['by'] for f in frames})}")
            assert not before and not wrong, (before, wrong)
            errors = phone.evaluate("window.tilemesh.engine.errors")
            assert not [e for e in errors if "refused" in e], errors
        except Exception:
            for pg in pages:
                print(pg.url, pg.evaluate("({errors: window.tilemesh?.engine?.errors, state: "
                                          "window.tilemesh?.signaling?.lastState})"))
                st = pg.evaluate("(s) => window.tilemesh.runtime.call(s, 'state', [])", SESSION)
                print({k: st.get(k) for k in ("faults", "excluded", "plans", "waiting", "stream", "errors")})
            raise
        finally:
            for pg in pages:
                pg.context.close()
            browser.close()
