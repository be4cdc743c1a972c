"""The AR loop's pipeline depth: a new plan is tried with one and two frames in flight; two stays only if faster."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser

# Feeds the tuner finish times as a loop would see them: `gap1` ms apart at depth 1, `gap2` ms at depth 2.
RUN = """async ([gap1, gap2]) => {
    const { DepthTuner } = await import("/web/ar.js");
    const engine = { key: null, pipelineKey() { return this.key; } };
    const tuner = new DepthTuner(engine);
    const seen = [];
    let t = 0;
    seen.push(tuner.depth());                 // no room plan: one frame at a time
    engine.key = 7;                           // a plan shared with other devices arrives
    for (let i = 0; i < 30; i++) {
        const d = tuner.depth();
        seen.push(d);
        t += d === 1 ? gap1 : gap2;
        tuner.done(t);
    }
    const settled = tuner.depth();
    engine.key = 8;                           // a new plan is tried afresh
    return { seen, settled, afterReplan: tuner.depth(), phase: tuner.phase };
}"""


def test_two_frames_in_flight_only_when_that_is_faster(page, server):
    page.goto(server.url + "/runtime")
    faster = page.evaluate(RUN, [100, 60])
    assert faster["seen"][0] == 1
    assert faster["seen"][1:8] == [1] * 7 and 2 in faster["seen"][8:16]
    assert faster["settled"] == 2
    assert faster["afterReplan"] == 1 and faster["phase"] == "one"
    saturated = page.evaluate(RUN, [100, 95])
    assert saturated["settled"] == 1
    assert page.evaluate(RUN, [100, 80])["settled"] == 1  # +25% frames/s does not pay for the latency
