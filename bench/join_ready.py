"""Join to ready with several browsers booting at once, on one machine, as a first visit (empty caches).

    sudo .venv/bin/python -m bench.join_ready [--browsers 3] [--rounds 2]

The server (`tilemesh serve --https`, no edge) and N headless Chromiums run in one network namespace (WebRTC
needs a real interface), no CPU quota and no link shaping: the machine as it is. Each round opens N join pages
of a new room at once, each in a fresh browser (nothing cached: the runtime's ~31 MB download included), and
each page records when its device became *ready* in the room (booted, model loaded, onnxruntime-web's thread
count chosen, profiled, links measured): milliseconds since its navigation started. Rounds alternate the
default (thread count chosen by measurement) with `?ort_threads=2` (pinned: no thread trial), so the trial's
cost on joining shows in one run. A script, not a test: the machine is shared (load printed).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import sys
import tempfile
import urllib.request

from bench.chromium import CHROMIUM_ARGS
from bench.netns import NetNS, unavailable_reason

# Records the moment the page's device turns ready (installed before any page script runs).
# Also keeps each step the page reports on its way (`state.detail`), with its time, to show where joining goes.
WATCH = """(() => { window.__steps = []; let last = ''; const t = setInterval(() => {
  const s = window.tilemesh && window.tilemesh.signaling && window.tilemesh.signaling.lastState;
  const step = s ? `${s.state}: ${s.detail || ''}` : '';
  if (step && step !== last) { last = step; window.__steps.push([Math.round(performance.now()), step]); }
  if (s && s.state === 'ready') { window.__readyAt = performance.now(); clearInterval(t); } }, 25); })();"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.join_ready", description=__doc__.split("\n\n")[0])
    ap.add_argument("--browsers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"bench.join_ready: {reason}", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from bench.harness import refresh_runtime

    refresh_runtime()
    sys.path.insert(0, str(os.path.join(os.path.dirname(__file__), "..", "playwright")))
    from browsers import ServerProcess, wait_http

    insecure = ssl._create_unverified_context()  # our own self-signed certificate, inside the namespace
    load0 = os.getloadavg()[0]
    rows = []
    with NetNS() as ns, tempfile.TemporaryDirectory() as state, sync_playwright() as pw:
        srv = ServerProcess(ns.inner, 8443, prefix=ns.wrap([]), extra=["--https", "--state-dir", state])
        url = f"https://{ns.inner}:8443"
        try:
            wait_http(url + "/healthz", timeout=60, context=insecure)
            for r in range(args.rounds):
                mode = "chosen" if r % 2 == 0 else "pinned 2"
                req = urllib.request.Request(url + "/api/rooms", data=b"{}",
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30, context=insecure) as resp:  # noqa: S310 (namespace)
                    room = json.loads(resp.read())["room"]
                browsers, pages = [], []
                try:
                    for _ in range(args.browsers):
                        b = pw.chromium.launch(executable_path=ns.chromium_wrapper(), headless=True,
                                               args=[*CHROMIUM_ARGS, "--ignore-certificate-errors"])
                        browsers.append(b)
                        pg = b.new_context(ignore_https_errors=True).new_page()
                        pg.add_init_script(WATCH)
                        pages.append(pg)
                    query = "?kind=phone" + ("&ort_threads=2" if mode == "pinned 2" else "")
                    for pg in pages:  # navigations start together; each page times itself from its own start
                        pg.goto(f"{url}/join/{room}{query}", wait_until="commit", timeout=120_000)
                    ready = []
                    for pg in pages:
                        pg.wait_for_function("() => window.__readyAt !== undefined", timeout=300_000)
                        ready.append(pg.evaluate("window.__readyAt"))
                    reasons = [pg.evaluate("() => (window.tilemesh.engine.compute || {}).engine_reason")
                               for pg in pages]
                    steps = [pg.evaluate("window.__steps") for pg in pages]
                finally:
                    for b in browsers:
                        b.close()
                rows.append({"mode": mode, "ready_ms": ready, "reasons": reasons, "steps": steps})
                print(f"[join_ready] {mode}: {[round(x) for x in ready]} ms; {reasons[0]}", file=sys.stderr, flush=True)
                slowest = steps[max(range(len(ready)), key=ready.__getitem__)]
                print("[join_ready]   slowest page's steps (ms: state: detail): "
                      + "; ".join(f"{ms}: {step}" for ms, step in slowest), file=sys.stderr, flush=True)
        finally:
            srv.stop()
    print(f"\nload average {load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {args.browsers} "
          "browsers joining one room at once, first visit, no quota, no shaping; ms from navigation to ready")
    for mode in ("chosen", "pinned 2"):
        rs = [x for row in rows if row["mode"] == mode for x in row["ready_ms"]]
        if rs:
            print(f"  threads {mode:<9} median {statistics.median(rs):7.0f} ms, slowest {max(rs):7.0f} ms "
                  f"({len(rs)} joins)")
    both = [statistics.median([x for row in rows if row["mode"] == m for x in row["ready_ms"]])
            for m in ("chosen", "pinned 2") if any(row["mode"] == m for row in rows)]
    if len(both) == 2:
        print(f"  chosen / pinned median join-to-ready: {both[0] / both[1]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
