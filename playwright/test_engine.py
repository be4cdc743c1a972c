"""RoomEngine as the executor of the worker's device session, with no second device: the session's drift rule
(tested purely in tests/test_session.py) reaches the page, which re-measures itself and tells the room."""

from __future__ import annotations

import pytest
from browsers import start_room

pytestmark = pytest.mark.browser

READY = "() => window.tilemesh && window.tilemesh.signaling.lastState?.state === 'ready'"

# Five frame reports 10x slower than the plan predicted, through the worker's own session (the rule's code path),
# whose effects come back as the executor receives them.
DRIFT = """
from tilemesh.runtime import session as S
s = S.session()
lane = {"plan_id": 9, "timeline": {"devices": {"me": {"compute_s": 0.01}}}}
s.slots[9] = S.PlanSlot(9, "cam", frozenset({"me"}), lane, "worker")  # a plan this device runs (its lane)
effects = []
for f in range(S.DRIFT_FRAMES):
    effects += s._on_report(9, {"frame": 4 * f + 2, "device": "me", "compute_ms": 100.0}, 1e9)
del s.slots[9]
import json
json.dumps([S.effect_to_dict(e) for e in effects])
"""


def test_drifting_device_remeasures_and_tells_the_room(page, server):
    start_room(page, server.url)
    page.wait_for_function(READY, timeout=120_000)
    out = page.evaluate(
        """async (code) => {
            const e = window.tilemesh.engine;
            const before = e.compute;
            const sent = [];
            const orig = e.signaling.send.bind(e.signaling);
            e.signaling.send = (type, fields) => { sent.push([type, fields]); orig(type, fields); };
            const drift = new Promise((resolve, reject) => {
                e.addEventListener("drift", (ev) => resolve(ev.detail));
                setTimeout(() => reject(new Error("no drift event")), 20000);
            });
            const effects = JSON.parse(await window.tilemesh.runtime.exec(code));
            for (const eff of effects) e._execute(eff);
            const detail = await drift;
            const changed = () => sent.some(([t, f]) => t === "broadcast" && f.data.kind === "profile_changed");
            for (let i = 0; i < 400 && !changed(); i++) await new Promise((r) => setTimeout(r, 50));
            return { kinds: effects.map((x) => x.do), ratio: detail.ratio, replaced: e.compute !== before,
                     changed: changed(), profile: e.signaling.lastState.profile.compute };
        }""",
        DRIFT,
    )
    assert out["kinds"].count("profile") == 1 and out["kinds"][-1] == "profile"
    assert out["ratio"] == pytest.approx(10.0)
    assert out["replaced"] and out["profile"]["sec_per_mac"]["conv_pointwise"] > 0
    assert out["changed"]
