"""Compute backends side by side on this machine: the browser's engines in headless Chromium against native
onnxruntime with the same thread count, whole model and per fused segment, as ratios measured in one run.

    python -m bench.backends [--frames N] [--threads 1,2] [--segments K]

Every figure goes through the product's own path: a one-device plan of K fused segments (cut at the model's
single-tensor cuts, evenly spaced) is adopted by the runtime worker of a /runtime page and frames are run
through it; the runner's report gives each task's compute time (inputs assembled, the engine's run, results
back in Python: what a device pays per frame). Browser engines: `ort-wasm` (onnxruntime-web in the worker,
`?ort_threads=N`) and `numpy` (Pyodide, `?ort=off`; single-threaded, measured once). Native: the same plan
through `tilemesh.runtime.peer.PlanRuntime` with `OnnxRuntimeBackend(threads=N)` (the edge's engine) in this process.
"whole" is the one-segment plan. Medians over the frames after one warm-up frame. Also printed: the device's
own profile prediction of each segment (measured/predicted, the cost model's error for that engine) and the
session creation time at plan adoption. A script, not a test: the machine is shared, ratios move by +-20%.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
from pathlib import Path

import numpy as np

from bench.chromium import CHROMIUM, CHROMIUM_ARGS, local_server
from tilemesh.planning.costmodel import task_seconds
from tilemesh.runtime.backend import OnnxRuntimeBackend
from tilemesh.runtime.classify import LocalClassifier
from tilemesh.runtime.deps import cut_candidates
from tilemesh.runtime.peer import PlanRuntime as Peer
from tilemesh.runtime.peer import plan_from_spec

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "static" / "model"

LOAD_MODEL = """
from pyodide.http import pyfetch
import os
os.makedirs('/model', exist_ok=True)
for name in ('graph.json', 'graph.bin', 'labels.json', 'card.json'):
    resp = await pyfetch('/model/' + name)
    open('/model/' + name, 'wb').write(await resp.bytes())
"""

CALL = """async ([fn, args]) => {
    const S = "tilemesh.runtime.session";
    if (fn === "profile") return await window.tilemeshRuntime.call(S, "profile", []);
    let event;
    if (fn === "set_plan") {
        const spec = args[0];
        const msg = { type: "plan", plan_id: spec.plan_id, source: "me", devices: ["me"], spec };
        event = { on: "plan", me: "me", msg };
    } else {
        event = { on: "frame", frame: args[0], data: Uint8Array.from(atob(args[1]), (c) => c.charCodeAt(0)),
                  height: 256, width: 256 };
    }
    const effects = await window.tilemeshRuntime.call(S, "handle", [event, performance.now() / 1e3]);
    const done = effects.filter((e) => e.do === "frame_done").map((e) => e.result);
    const adopted = effects.find((e) => e.do === "notice" && e.what === "engine");
    return { results: done, sessions_ms: adopted ? adopted.detail.sessions_ms : undefined };
}"""


def specs(graph, k: int) -> dict[str, dict]:
    cuts = cut_candidates(graph)
    picks = [cuts[round(i * (len(cuts) - 1) / k)] for i in range(1, k)] if k > 1 else []
    whole = {"devices": [["me"]], "row_shares": None, "col_shares": None}
    return {"whole": {"plan_id": 1, "source": "me", "cuts": [], "splits": [whole]},
            "segments": {"plan_id": 2, "source": "me", "cuts": picks, "splits": [whole] * (len(picks) + 1)}}


def frame_bytes(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, (256, 256, 4), dtype=np.uint8).tobytes()


def per_task_ms(reports: list[dict]) -> list[float]:
    """Median compute ms of each task over the frames (the first, a warm-up, dropped)."""
    tasks = [r["tasks"] for r in reports[1:]]
    return [statistics.median(t[i]["end_ms"] - t[i]["start_ms"] for t in tasks) for i in range(len(tasks[0]))]


def run_pair(page, clf, spec, threads: int, frames: int) -> tuple[dict, dict]:
    """The browser page and native onnxruntime (same threads) on the same plan, frames interleaved one by one so
    load from other processes on this shared machine hits both alike."""
    # Idle threads not spinning: a spinning pool would steal the cores from the browser's next frame.
    backend = OnnxRuntimeBackend(clf.graph, threads=threads, spinning=False)
    peer = Peer(clf, device="me", backend=backend)
    native_role = peer.set_plan(spec, "me")
    role = page.evaluate(CALL, ["set_plan", [spec, "me", {}]])
    reports, native = [], []
    for f in range(1, frames + 2):
        # Frame ids only grow in a device session: each plan's frames get their own range.
        fid = int(spec["plan_id"]) * 10_000 + f
        out = page.evaluate(CALL, ["start_frame", [fid, base64.b64encode(frame_bytes(f)).decode()]])
        reports.append(out["results"][0]["report"])
        (res,) = peer.start_frame(f, frame_bytes(f), 256, 256)["results"]
        native.append(res["report"])
    return ({"tasks": per_task_ms(reports), "sessions_ms": role.get("sessions_ms")},
            {"tasks": per_task_ms(native), "sessions_ms": native_role["sessions_ms"]})


def open_page(browser, url: str):
    page = browser.new_page()
    page.goto(url)
    page.wait_for_function("document.getElementById('info').dataset.state !== 'booting'", timeout=120_000)
    page.evaluate("(code) => window.tilemeshRuntime.exec(code)", LOAD_MODEL)
    info = page.evaluate("() => window.tilemeshRuntime.call('tilemesh.runtime.session', 'load', "
                         "['/model/graph.json', '/model/labels.json', '/model/card.json'])")
    return page, info["engine"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.backends", description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=15)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--segments", type=int, default=4)
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    from playwright.sync_api import sync_playwright

    from tilemesh.server.model import prepare

    bundle = prepare(MODEL / "mobilenet_v2.onnx", REPO / "static").dir  # what /model/* serves
    clf = LocalClassifier.from_files(bundle / "graph.json", bundle / "labels.json", bundle / "card.json")
    graph = clf.graph
    plans = specs(graph, args.segments)
    seg_plan = plan_from_spec(graph, plans["segments"]).device_plan("me")
    rows: dict[str, dict] = {}
    with local_server() as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        pages = [*((f"ort-wasm x{t}", f"?ort_threads={t}") for t in threads), ("numpy x1", "?ort=off")]
        for engine, query in pages:
            page, info = open_page(browser, url + "/runtime" + query)
            prof = page.evaluate(CALL, ["profile", []])
            row = {"info": info, "profile": prof}
            t = int(engine.rsplit("x", 1)[1])
            native = rows.setdefault(f"native ort x{t}", {}) if engine.startswith("ort") else {}
            for name, spec in plans.items():
                row[name], native_row = run_pair(page, clf, spec, t, args.frames)
                native.setdefault(name, native_row)
                if not engine.startswith("ort"):
                    row[f"{name}:native"] = native_row
            rows[engine] = row
            page.close()
            print(f"[bench] {engine}: {info.get('reason')}", flush=True)
        browser.close()

    def fmt(v):
        return f"{v:8.2f}" if v is not None else "       -"

    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"Demo model (MobileNetV2 224x224), {args.frames} frames each, median compute ms per task as the runner"
          " reports it (inputs assembled, engine run, results back in Python)\n")
    head = f"{'part':<26}" + "".join(f"{k:>16}" for k in rows)
    print(head)
    names = [f"segment {i} ({len(seg_plan.tasks[i].deps.steps)} nodes)" for i in range(len(seg_plan.tasks))]
    for i, label in enumerate(["whole model", *names]):
        key, idx = ("whole", 0) if i == 0 else ("segments", i - 1)
        print(f"{label:<26}" + "".join(f"{fmt(r[key]['tasks'][idx]):>16}" for r in rows.values()))
    engine_only = "".join(f"{fmt(r['profile'].get('model_ms')) if 'profile' in r else fmt(None):>16}"
                          for r in rows.values())
    print(f"{'whole, engine run alone':<26}" + engine_only)
    sessions = "".join(f"{fmt(r['whole']['sessions_ms']):>16}" for r in rows.values())
    print(f"{'sessions at adoption (ms)':<26}" + sessions)
    print("\nRatios, whole model (lower is better; native onnxruntime with the same thread count = 1.00):")
    for t in threads:
        native = rows[f"native ort x{t}"]["whole"]["tasks"][0]
        ort_web = rows[f"ort-wasm x{t}"]["whole"]["tasks"][0]
        line = f"  {t} thread(s): ort-wasm / native = {ort_web / native:5.2f}x"
        if t == 1:
            np_native = rows["numpy x1"]["whole:native"]["tasks"][0]
            line += f";  pyodide numpy / native = {rows['numpy x1']['whole']['tasks'][0] / np_native:5.2f}x"
            line += f";  pyodide numpy / ort-wasm = {rows['numpy x1']['whole']['tasks'][0] / ort_web:5.2f}x"
        print(line)
    print("  per segment, ort-wasm / native: " + "; ".join(
        f"x{t}: " + " ".join(f"{a / b:4.2f}" for a, b in zip(rows[f"ort-wasm x{t}"]["segments"]["tasks"],
                                                           rows[f"native ort x{t}"]["segments"]["tasks"], strict=True))
        for t in threads))
    print("\nCost model: each browser engine's own profile, measured / predicted per segment:")
    for engine, r in rows.items():
        if "profile" not in r:
            continue
        prof = r["profile"]
        preds = [task_seconds(graph, task, prof) * 1e3 for task in seg_plan.tasks]
        ratios = " ".join(f"{m / p:4.2f}" for m, p in zip(r["segments"]["tasks"], preds, strict=True))
        print(f"  {engine:<14} backend {prof.get('backend')}, engines {prof.get('engines')}: {ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
