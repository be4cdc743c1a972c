"""Every time the browser hands the device session comes from one clock (`tilemesh/web/clock.js`).

The page timed frames and ticks with its `performance.now()`, the Worker timed compute results with its own, and a
Worker's time origin is its creation: the two disagreed by the Worker's start-up delay, so a frame finished before it
started (a negative lane latency crashed the stream scheduler's tick) and pieces looked older than they were (false
stalls). `playwright/test_clock.py` checks the clock itself in Chromium, page and Worker.
"""

from __future__ import annotations

import re
from pathlib import Path

WEB = Path(__file__).resolve().parents[1] / "tilemesh" / "web"


def test_every_time_handed_to_the_session_is_read_on_that_clock():
    """The page's events and the Worker's compute results (`handle`, `computed`, `computed_numpy`) carry
    `sessionNow()`, never a context's own `performance.now()`."""
    calls = {}
    for path in WEB.glob("*.js"):
        for m in re.finditer(r'"handle", \[event, [^\]]*\]|bridge\.computed(?:_numpy)?\(.*?\)\.destroy\(\)',
                             path.read_text(), re.S):
            calls.setdefault(path.name, []).append(m.group(0))
    assert set(calls) == {"room_engine.js", "ort_engine.js"}, calls
    assert len(calls["ort_engine.js"]) == 3 and len(calls["room_engine.js"]) == 1, calls
    assert all("sessionNow()" in c and "performance.now()" not in c for cs in calls.values() for c in cs), calls
