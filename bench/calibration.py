"""The cost model against measurement for one browser alone: does the device's own profile predict its frames?

    sudo .venv/bin/python -m bench.calibration [--cores 0.35,0.5,1] [--threads 1,2] [--frames 20]

For each CPU quota (a cgroup v1 cpu quota around the whole Chromium, as `tilemesh bench` emulates phones) and each
onnxruntime-web thread count (`?ort_threads=N`), a /runtime page boots, loads the served model, profiles itself
exactly as a joining device does (`tilemesh.runtime.session.profile` through the worker's engine), adopts a
one-device plan and runs frames back to back through the device session (the product's frame path: a 256x256
RGBA frame in, the centre crop, the engine's tasks, top-5 out). Printed per row: the profile's prediction of that
frame (`tilemesh.planning.costmodel.predict_plan`, what the planner uses), the measured median and mean wall time
per frame, measured/predicted, and the runner's own compute time per frame. A script, not a test: the machine is
shared (load average printed), so ratios move by +-20% between runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.backends import CALL, LOAD_MODEL, frame_bytes, specs
from bench.chromium import CHROMIUM, CHROMIUM_ARGS, local_server
from bench.env import CpuGroup, unavailable_reason

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "static" / "model"

# Frames back to back through the device session, timed in the page (what a camera loop would see).
RUN_FRAMES = """async ([first, n, b64]) => {
    const S = "tilemesh.runtime.session";
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const out = [];
    for (let i = 0; i < n; i++) {
        const t0 = performance.now();
        const effects = await window.tilemeshRuntime.call(S, "handle", [
            { on: "frame", frame: first + i, data: bytes.slice(), height: 256, width: 256 }, performance.now() / 1e3]);
        const done = effects.find((e) => e.do === "frame_done");
        out.push({ ms: performance.now() - t0, compute_ms: done ? done.result.report.compute_ms : null });
    }
    return out;
}"""


def launcher(tmp: Path, group: CpuGroup) -> str:
    script = tmp / f"chromium-{group.name}"
    script.write_text("#!/bin/sh\n" + group.join_lines() + f'exec {CHROMIUM} "$@"\n')
    script.chmod(0o755)
    return str(script)


def measure(pw, url: str, tmp: Path, cores: float, threads: int, frames: int) -> dict:
    from tilemesh.planning.costmodel import predict_plan
    from tilemesh.runtime.classify import LocalClassifier
    from tilemesh.runtime.peer import plan_from_spec

    group = CpuGroup(f"tmcal{os.getpid()}-{int(cores * 100)}-{threads}", cores).create()
    try:
        browser = pw.chromium.launch(executable_path=launcher(tmp, group), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(f"{url}/runtime" + (f"?ort_threads={threads}" if threads else ""))
            page.wait_for_function("document.getElementById('info').dataset.state !== 'booting'", timeout=300_000)
            page.evaluate("(code) => window.tilemeshRuntime.exec(code)", LOAD_MODEL)
            info = page.evaluate("() => window.tilemeshRuntime.call('tilemesh.runtime.session', 'load', "
                                 "['/model/graph.json', '/model/labels.json', '/model/card.json'])")
            t0 = time.monotonic()
            prof = page.evaluate(CALL, ["profile", []])
            profile_s = time.monotonic() - t0
            clf = LocalClassifier.from_files(*_bundle_files())
            spec = specs(clf.graph, 1)["whole"]
            plan = plan_from_spec(clf.graph, spec)
            predicted = predict_plan(clf.graph, plan, {"me": prof}, {}, "me").total_s * 1e3
            page.evaluate(CALL, ["set_plan", [spec, "me", {}]])
            import base64

            b64 = base64.b64encode(frame_bytes(1)).decode()
            page.evaluate(RUN_FRAMES, [1, 3, b64])  # warm-up
            got = page.evaluate(RUN_FRAMES, [10, frames, b64])
        finally:
            browser.close()
    finally:
        group.remove()
    ms = [g["ms"] for g in got]
    comp = [g["compute_ms"] for g in got if g["compute_ms"] is not None]
    return {"cores": cores, "threads": threads, "engine": info.get("engine", {}).get("engine"),
            "profile_threads": prof.get("threads"), "predicted_ms": predicted, "median_ms": statistics.median(ms),
            "mean_ms": statistics.fmean(ms), "compute_ms": statistics.median(comp) if comp else None,
            "model_ms": prof.get("model_ms"), "profile_s": profile_s, "backend": prof.get("backend"),
            "engines": prof.get("engines"), "chosen_threads": prof.get("threads"),
            "thread_trial_ms": prof.get("thread_trial_ms"), "frame_s": prof.get("frame_s"),
            "task_s": prof.get("task_s")}


def _bundle_files() -> tuple[Path, Path, Path]:
    from tilemesh.server.model import prepare

    d = prepare(MODEL / "mobilenet_v2.onnx", REPO / "static").dir
    return d / "graph.json", d / "labels.json", d / "card.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.calibration", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cores", default="0.35,0.5,1")
    ap.add_argument("--threads", default="1,2,auto",
                    help="onnxruntime-web thread counts to pin (?ort_threads=N); auto = the product's own choice")
    ap.add_argument("--frames", type=int, default=20)
    args = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"bench.calibration: {reason}", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from bench.harness import refresh_runtime

    refresh_runtime()  # the browsers import the packed runtime: it must be this code
    rows = []
    load0 = os.getloadavg()[0]
    with local_server() as url, sync_playwright() as pw, tempfile.TemporaryDirectory() as tmp:
        for cores in (float(c) for c in args.cores.split(",")):
            for threads in (0 if t == "auto" else int(t) for t in args.threads.split(",")):
                try:
                    row = measure(pw, url, Path(tmp), cores, threads, args.frames)
                except Exception as exc:  # noqa: BLE001 (one row failing must not lose the others)
                    print(f"[calibration] {cores:g} cores, threads {threads}: failed: {exc}", file=sys.stderr)
                    continue
                rows.append(row)
                print(f"[calibration] {row}", file=sys.stderr, flush=True)
    print(f"\nload average {load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; one browser alone, "
          f"{args.frames} frames back to back through the device session, ms per frame")
    print("threads 0 = the device chooses by measurement (the default); 1 or 2 = pinned with ?ort_threads=N")
    print(f"{'cores':>6} {'threads':>8} {'engine':>9} {'predicted':>10} {'median':>8} {'mean':>8} {'med/pred':>9} "
          f"{'compute':>8} {'model_ms':>9} {'frame_s':>8}  threads used (trial ms)")
    for r in rows:
        print(f"{r['cores']:>6g} {r['threads']:>8} {r['backend'] or '?':>9} {r['predicted_ms']:>10.1f} "
              f"{r['median_ms']:>8.1f} {r['mean_ms']:>8.1f} {r['median_ms'] / r['predicted_ms']:>8.2f}x "
              f"{r['compute_ms'] or 0:>8.1f} {r['model_ms'] or 0:>9.1f} {(r['frame_s'] or 0) * 1e3:>8.1f}  "
              f"{r['chosen_threads']} "
              f"({r['thread_trial_ms'] or 'pinned'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
