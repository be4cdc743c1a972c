"""RoomEngine behaviour that needs no second device: profile drift triggers a re-measure and a replan notice."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser

READY = "() => window.tilemesh && window.tilemesh.signaling.lastState?.state === 'ready'"


def test_drifting_device_remeasures_and_tells_the_room(page, server):
    page.goto(server.url + "/")
    page.wait_for_function(READY, timeout=120_000)
    out = page.evaluate(
        """async () => {
            const e = window.tilemesh.engine;
            const me = window.tilemesh.peerId;
            const before = e.compute;
            const sent = [];
            const orig = e.signaling.broadcast.bind(e.signaling);
            e.signaling.broadcast = (data) => { sent.push(data); orig(data); };
            const drift = new Promise((resolve, reject) => {
                e.addEventListener("drift", (ev) => resolve(ev.detail));
                setTimeout(() => reject(new Error("no drift event")), 20000);
            });
            e.lastPlan = { plan_id: 9, timeline: { devices: { [me]: { compute_s: 0.01 } } } };
            e.lastMeasured = -Infinity;  // performance.now() starts at page load
            // Four reports 10x slower than predicted are not enough; the fifth is.
            for (let i = 0; i < 4; i++) e._checkDrift(9, { frame: i, compute_ms: 100 });
            const early = e.driftRatios.length;
            e._checkDrift(9, { frame: 5, compute_ms: 100 });
            const detail = await drift;
            for (let i = 0; i < 400 && !sent.some((d) => d.kind === "profile_changed"); i++) {
                await new Promise((r) => setTimeout(r, 50));
            }
            return { early, ratio: detail.ratio, replaced: e.compute !== before,
                     kinds: sent.map((d) => d.kind), profile: e.signaling.lastState.profile.compute };
        }"""
    )
    assert out["early"] == 4
    assert out["ratio"] == pytest.approx(10.0)
    assert out["replaced"] and out["profile"]["sec_per_mac"]["conv_pointwise"] > 0
    assert "profile_changed" in out["kinds"]
    # Within the predicted range nothing happens.
    quiet = page.evaluate(
        """() => {
            const e = window.tilemesh.engine;
            const me = window.tilemesh.peerId;
            e.lastPlan = { plan_id: 10, timeline: { devices: { [me]: { compute_s: 0.1 } } } };
            e.lastMeasured = -Infinity;  // performance.now() starts at page load
            let fired = false;
            e.addEventListener("drift", () => { fired = true; });
            for (let i = 0; i < 8; i++) e._checkDrift(10, { frame: i, compute_ms: 120 });
            return fired;
        }"""
    )
    assert quiet is False
