"""Join to ready with several browsers booting at once, on one machine, as a first visit (empty caches).

    sudo .venv/bin/python -m bench.join_ready [--browsers 3] [--rounds 2] [--compare REF]

The server (`tilemesh serve --https`, no edge) and N headless Chromiums run in one network namespace (WebRTC
needs a real interface), no CPU quota and no link shaping: the machine as it is. Each round opens N join pages
of a new room at once, each in a fresh browser (nothing cached: the runtime's ~31 MB download included), and
each page records when its device became *ready* in the room (booted, model loaded, onnxruntime-web's session,
a first profile, links measured), and when it had *refined* what it measured while the others booted (the
thread count chosen, profile and links measured again once no device boots): milliseconds since its navigation
started. Rounds alternate the
default (thread count chosen by measurement once the room settles) with `?ort_threads=2` (pinned: no thread
trial), so the trial's cost shows in one run; with `--compare REF` they alternate this code with git ref REF's
(its own server and runtime zip, the same browser assets), before/after in one run. A script, not a test: the
machine is shared (load printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from bench.chromium import CHROMIUM_ARGS
from bench.netns import NetNS, unavailable_reason

REPO = Path(__file__).resolve().parents[1]

# Records the moment the page's device turns ready (installed before any page script runs).
# Also keeps each step the page reports on its way (`state.detail`), with its time, to show where joining goes.
WATCH = """(() => { window.__steps = []; let last = ''; const t = setInterval(() => {
  const s = window.tilemesh && window.tilemesh.signaling && window.tilemesh.signaling.lastState;
  const step = s ? `${s.state}: ${s.detail || ''}` : '';
  if (step && step !== last) { last = step; window.__steps.push([Math.round(performance.now()), step]); }
  if (s && s.state === 'ready' && window.__readyAt === undefined) {
    window.__readyAt = performance.now();
    window.__firstMeasure = ((s.profile || {}).compute || {}).measure_ms || null;  // where the first profile went
  }
  if (s && s.state === 'ready' && !s.detail) { window.__settledAt = performance.now(); clearInterval(t); } }, 25);
})();"""


# Runs `tilemesh.cli` from the current directory's package even where this checkout is installed in editable mode
# (setuptools' editable finder sits on sys.meta_path, ahead of sys.path).
OLD_LAUNCHER = [sys.executable, "-c", "import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if "
                "'__editable__' not in getattr(f, '__module__', '')]; sys.path.insert(0, '.'); "
                "sys.argv[0] = 'tilemesh'; runpy.run_module('tilemesh.cli', run_name='__main__')"]


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def old_checkout(ref: str, tmp: Path) -> Path:
    """The code of git ref `ref` in `tmp` (its `tilemesh` package and a static folder whose runtime zip is packed
    from that code; the browser assets are this checkout's, and its server converts the model itself)."""
    archive = subprocess.run(["git", "archive", ref, "tilemesh"], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    static = tmp / "static"
    static.mkdir()
    for name in ("vendor", "model"):  # hard links where they can be (aiohttp serves no symlinks), else copies
        shutil.copytree(REPO / "static" / name, static / name, copy_function=_link_or_copy)
    shutil.copyfile(REPO / "static" / "manifest.json", static / "manifest.json")
    pack = OLD_LAUNCHER[-1].replace("tilemesh.cli", "tilemesh.server.assets")
    subprocess.run([*OLD_LAUNCHER[:-1], pack, "--steps", "runtime", "--static-dir", str(static)], cwd=tmp, check=True,
                   capture_output=True)
    return static


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.join_ready", description=__doc__.split("\n\n")[0])
    ap.add_argument("--browsers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compare", metavar="REF", help="alternate rounds with the code of git ref REF (e.g. main)")
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
    # Each round's mode: this code with the thread count chosen / pinned to 2, or (--compare) this code and REF's,
    # alternating, so both meet the same machine.
    modes = ["chosen", args.compare] if args.compare else ["chosen", "pinned 2"]
    with NetNS() as ns, tempfile.TemporaryDirectory() as state, tempfile.TemporaryDirectory() as old, \
            sync_playwright() as pw:
        servers = {m: ServerProcess(ns.inner, 8443, prefix=ns.wrap([]), extra=["--https", "--state-dir", state])
                   for m in modes if m != args.compare}
        urls = {m: f"https://{ns.inner}:8443" for m in servers}
        if args.compare:
            static = old_checkout(args.compare, Path(old))
            servers[args.compare] = ServerProcess(
                ns.inner, 8444, prefix=ns.wrap([]), cwd=Path(old), launcher=OLD_LAUNCHER,
                extra=["--https", "--state-dir", state, "--static-dir", str(static)])
            urls[args.compare] = f"https://{ns.inner}:8444"
        try:
            for url in urls.values():
                wait_http(url + "/healthz", timeout=120, context=insecure)
            if args.compare:  # the other server really serves REF's code
                want = subprocess.run(["git", "show", f"{args.compare}:tilemesh/web/runtime_worker.js"], cwd=REPO,
                                      check=True, capture_output=True).stdout
                with urllib.request.urlopen(urls[args.compare] + "/web/runtime_worker.js", timeout=30,  # noqa: S310
                                            context=insecure) as resp:
                    if resp.read() != want:
                        raise SystemExit(f"bench.join_ready: the server for {args.compare} does not serve its code")
            for r in range(args.rounds):
                mode = modes[r % 2]
                url = urls[mode]
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
                    # Ready devices refine what they measured while others booted (profile, thread count, links)
                    settled = []
                    for pg in pages:
                        pg.wait_for_function("() => window.__settledAt !== undefined", timeout=300_000)
                        settled.append(pg.evaluate("window.__settledAt"))
                    reasons = [pg.evaluate("() => (window.tilemesh.engine.compute || {}).engine_reason")
                               for pg in pages]
                    steps = [pg.evaluate("window.__steps") for pg in pages]
                    marks = [pg.evaluate("() => (window.tilemesh.bootInfo || {}).marks || null") for pg in pages]
                    first = [pg.evaluate("() => window.__firstMeasure || null") for pg in pages]
                    speeds = [pg.evaluate("() => (window.tilemesh.engine.compute || {}).model_ms || null")
                              for pg in pages]
                finally:
                    for b in browsers:
                        b.close()
                rows.append({"mode": mode, "ready_ms": ready, "settled_ms": settled, "reasons": reasons,
                             "steps": steps})
                print(f"[join_ready] {mode}: ready {[round(x) for x in ready]} ms, settled "
                      f"{[round(x) for x in settled]} ms; {reasons[0]}", file=sys.stderr, flush=True)
                print(f"[join_ready]   whole model once settled (ms, equal browsers): "
                      f"{[round(x, 1) if x else None for x in speeds]}", file=sys.stderr, flush=True)
                worst = max(range(len(ready)), key=ready.__getitem__)
                print("[join_ready]   slowest page's steps (ms: state: detail): "
                      + "; ".join(f"{ms}: {step}" for ms, step in steps[worst]), file=sys.stderr, flush=True)
                if first[worst]:
                    print(f"[join_ready]   its first profile took (ms): {first[worst]}", file=sys.stderr, flush=True)
                if marks[worst]:
                    print("[join_ready]   its worker's marks (ms since the worker started): "
                          + ", ".join(f"{k} {v}" for k, v in marks[worst].items()), file=sys.stderr, flush=True)
        finally:
            for srv in servers.values():
                srv.stop()
    print(f"\nload average {load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {args.browsers} "
          "browsers joining one room at once, first visit, no quota, no shaping; ms from navigation to ready "
          "(settled: measured again once no device boots)")
    medians = {}
    for mode in modes:
        rs = [x for row in rows if row["mode"] == mode for x in row["ready_ms"]]
        ss = [x for row in rows if row["mode"] == mode for x in row["settled_ms"]]
        if rs:
            medians[mode] = statistics.median(rs)
            print(f"  {mode:<10} ready median {medians[mode]:7.0f} ms, slowest {max(rs):7.0f} ms ({len(rs)} joins); "
                  f"settled median {statistics.median(ss):7.0f} ms, slowest {max(ss):7.0f} ms")
    if len(medians) == 2:
        print(f"  {modes[0]} / {modes[1]} median join-to-ready: {medians[modes[0]] / medians[modes[1]]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
