"""The device session's clock (`tilemesh/web/clock.js`) is one timeline in a page and in its Worker.

The session's times come from two contexts: the page (frames, ticks) and the Worker (compute results). Each
`performance.now()` counts from its own context's origin, and a Worker's is its creation: read that way, the two
disagreed by the Worker's start-up delay (a frame finished "before" it started; pieces looked older than they were).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser

CHECK = """async () => {
  const { sessionNow } = await import("/web/clock.js");
  const t0 = performance.now();
  while (performance.now() - t0 < 300) {}  // the Worker starts later than the page, as in the join page
  const before = { session: sessionNow(), raw: performance.now() / 1e3 };
  const src = `import { sessionNow } from "${location.origin}/web/clock.js";
    postMessage({ session: sessionNow(), raw: performance.now() / 1e3 });`;
  const url = URL.createObjectURL(new Blob([src], { type: "text/javascript" }));
  const inWorker = await new Promise((resolve, reject) => {
    const w = new Worker(url, { type: "module" });
    w.onmessage = (e) => { resolve(e.data); w.terminate(); };
    w.onerror = (e) => reject(new Error(e.message));
  });
  return { before, inWorker, after: { session: sessionNow(), raw: performance.now() / 1e3 } };
}"""


def test_the_page_and_its_worker_read_one_clock(page, server):
    page.goto(server.url + "/healthz")
    t = page.evaluate(CHECK)
    print(t)
    # Each context's own clock puts the Worker's reading before the page's earlier one (the check can fail) ...
    assert t["inWorker"]["raw"] < t["before"]["raw"] - 0.2, t
    # ... the session's clock keeps the order of events across both.
    assert t["before"]["session"] <= t["inWorker"]["session"] <= t["after"]["session"], t
