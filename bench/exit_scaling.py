"""Early exit and context-aware scaling, four ways, in one run per room.

    sudo .venv/bin/python -m bench.exit_scaling [default|browsers ...] [--repeats 2] [--shots 8]

The harness's emulated room (bench/harness.py: a network namespace, shaped link and CPU cgroup per device, the
server with its edge when the scenario has one, one headless Chromium per browser device); the camera phone's fake
camera plays a stream of augmented real photos (simulated hand-held shots of scikit-image/scikit-learn photos:
a slowly drifting crop with jitter, brightness flicker and occasional blur, `bench.early_exit.shot_frames`) in a
loop. The product's AR loop runs one frame at a time (`?depth=1`) and the bench switches its mode, round robin:

    none      every frame to the room, the model as served (full-model-always)
    exit      early exit on (the card's 160 px cheap pass and its stream rule)
    scaling   the user's target: 2x the full model's predicted frame rate in this room (the issue's goal);
              the planner picks the variant
    both      early exit and that target

Per mode: frames per second of the continuous loop, median latency, room traffic per frame (bytes every device
sent: the browsers' data-channel and relay bytes, and what the edge sent them), the camera phone's CPU per frame
(its cgroup's cpuacct), the share of frames that exited, the variants the room ran, and agreement with the full
model: every frame the loop classifies is also grabbed at 224 px from the same video instant, and native
onnxruntime's top-1 on it is compared with the label the page showed (that extra grab costs the phone the
same in every mode). Ratios are against `none` of the same run. Prints a Markdown table; writes
results/<time>-exit-<room>.json.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import READY, REPO, Run, _http_json, log, machine_info, refresh_runtime, source_state
from bench.scenario import load_scenario

MODES = {"none": (False, False), "exit": (True, False), "scaling": (False, True), "both": (True, True)}

# The loop's classify, gated (the bench pauses it between windows) and recorded: each frame's answer, its
# path, the plan's variant, and the same video instant grabbed at 224 px for the reference.
INSTRUMENT = """async () => {
  if (window.__bench) return;
  const { grabFrame, sizesOf } = await import("/web/camera.js");
  const app = window.tilemesh, ar = app.ar.engine, video = document.getElementById("video");
  const canvas = document.createElement("canvas");
  const b = window.__bench = { frames: [], paused: false, idle: false, wake: [], budget: Infinity, inflight: 0 };
  b.resume = (budget) => { b.budget = budget ?? Infinity; b.paused = false; b.idle = false;
    const w = b.wake; b.wake = []; w.forEach((f) => f()); };
  const classify = ar.classify.bind(ar);
  ar.classify = async (...args) => {
    if (b.budget <= 0) b.paused = true;
    while (b.paused) { b.idle = b.inflight === 0; await new Promise((r) => { b.wake.push(r); }); }
    b.idle = false; b.budget -= 1; b.inflight += 1;
    const ref = grabFrame(video, canvas, sizesOf(null));
    const t0 = performance.now();
    let r;
    try { r = await classify(...args); } finally { b.inflight -= 1; if (b.paused && b.inflight === 0) b.idle = true; }
    const t1 = performance.now();
    if (r.skipped) return r;  // no lane could take it in order yet: no answer (the loop grabs another frame)
    let bin = "";
    for (let i = 0; i < ref.length; i += 0x8000) bin += String.fromCharCode(...ref.subarray(i, i + 0x8000));
    b.frames.push({ t0, t1, exit: Boolean(r.exit), index: r.top[0].index, label: r.top[0].label,
      variant: r.exit ? "exit" : (r.plan ? r.plan.variant || "" : "alone"), plan_id: r.plan ? r.plan.plan_id : null,
      entropy: r.exit ? r.entropy : r.cheap?.entropy ?? null, reason: r.exit ? r.reason : r.cheap?.reason ?? null,
      ref: btoa(bin) });
    return r;
  };
}"""
MODE = """async ([exitOn, target]) => { const ar = window.tilemesh.ar.engine;
  await ar.exit.setOn(exitOn); ar.setTarget(target); window.__bench.frames.length = 0; window.__bench.resume(); }"""
TRAFFIC = """() => ({ sent: window.tilemesh.mesh.sent, received: window.tilemesh.mesh.received || 0 })"""


def camera_frames(shots: int, per_shot: int, seed: int, side: int = 320) -> list[np.ndarray]:
    """Simulated hand-held shots of the photos scikit-image and scikit-learn ship, each frame `side` square."""
    from skimage.transform import resize  # noqa: PLC0415

    from bench.early_exit import photos, shot_frames  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    ims = photos()
    names = sorted(ims)
    out = []
    for _ in range(shots):
        for f in shot_frames(ims[names[rng.integers(len(names))]], rng, per_shot):
            h, w = f.shape[:2]
            s = min(h, w)
            sq = f[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
            out.append(np.clip(np.rint(resize(sq, (side, side), anti_aliasing=True) * 255), 0, 255).astype(np.uint8))
    return out


def reference_top1(refs: list[str]) -> list[int]:
    """Native onnxruntime's top-1 at 224 px on the frames the page grabbed (RGBA 224x224, the card's normalisation
    as the browser does it)."""
    import onnxruntime as ort  # noqa: PLC0415

    from tilemesh.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD  # noqa: PLC0415

    sess = ort.InferenceSession(str(REPO / "static/model/mobilenet_v2.onnx"), providers=["CPUExecutionProvider"])
    out = []
    for r in refs:
        rgba = np.frombuffer(base64.b64decode(r), np.uint8).reshape(224, 224, 4)
        x = ((rgba[..., :3].astype(np.float32) / 255.0 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD))
        out.append(int(np.argmax(sess.run(None, {"input": np.ascontiguousarray(x.transpose(2, 0, 1)[None])})[0])))
    return out


def window_stats(frames: list[dict], ref: list[int], cpu_s: float, traffic: int) -> dict:
    """One mode's window (pure: frames as recorded, the reference top-1 per frame, the phone's CPU seconds and
    the room's bytes over the window)."""
    n = len(frames)
    lat = [f["t1"] - f["t0"] for f in frames]
    wall = (frames[-1]["t1"] - frames[0]["t0"]) / 1e3 if n else 0.0
    variants: dict[str, int] = {}
    for f in frames:
        variants[f["variant"]] = variants.get(f["variant"], 0) + 1
    return {"frames": n, "fps": n / wall if wall else 0.0, "median_ms": statistics.median(lat) if lat else None,
            "bytes_per_frame": traffic / n if n else None, "phone_cpu_ms_per_frame": 1e3 * cpu_s / n if n else None,
            "exit_rate": sum(f["exit"] for f in frames) / n if n else 0.0,
            "agreement": sum(f["index"] == r for f, r in zip(frames, ref, strict=True)) / n if n else None,
            "exit_agreement": (sum(f["index"] == r for f, r in zip(frames, ref, strict=True) if f["exit"])
                               / max(1, sum(f["exit"] for f in frames))),
            "variants": variants}


class ExitRun(Run):
    def run_modes(self, repeats: int, shots: int, seed: int, per_shot: int = 20, fps: int = 10) -> dict:
        from playwright.sync_api import sync_playwright  # noqa: PLC0415

        from bench.chromium import CHROMIUM, CHROMIUM_ARGS  # noqa: PLC0415
        from bench.env import CpuGroup, StarNet  # noqa: PLC0415
        from bench.media import write_y4m_frames  # noqa: PLC0415

        sc = self.sc
        result: dict = {"scenario": sc.to_dict(), "source": source_state(), "windows": [],
                        "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        net = StarNet(self._links())
        browsers = []
        with net, tempfile.TemporaryDirectory() as state, sync_playwright() as p:
            try:
                for d in sc.devices:
                    self.groups[d.name] = CpuGroup(f"tmx{net.tag}-{d.name}", d.cores).create()
                cam = write_y4m_frames(Path(state) / "shots.y4m", camera_frames(shots, per_shot, seed), fps=fps)
                seconds = shots * per_shot / fps
                base = self._start_server(net, state)
                room = net.call_in_hub(_http_json, base + "/api/rooms", {})["room"]
                for d in sc.browsers:
                    args = [*CHROMIUM_ARGS, "--ignore-certificate-errors"]
                    query = f"kind={d.kind}"
                    if d.name == sc.source:
                        args.append(f"--use-file-for-fake-video-capture={cam}")
                        query += "&depth=1&exit=0"
                    b = p.chromium.launch(executable_path=net.launcher(d.name, [CHROMIUM], self.groups[d.name]),
                                          args=args)
                    browsers.append(b)
                    pg = b.new_context(ignore_https_errors=True).new_page()
                    pg.goto(f"{base}/join/{room}?{query}", timeout=120_000)
                    self.pages[d.name] = pg
                result["machine"] = machine_info(browsers[0].version)
                for name, pg in self.pages.items():
                    pg.wait_for_function(READY, timeout=600_000)
                    self.ids[name] = pg.evaluate("window.tilemesh.peerId")
                    self.names[self.ids[name]] = name
                for pg in self.pages.values():
                    with contextlib.suppress(Exception):
                        pg.wait_for_function(
                            "(n) => Object.keys(window.tilemesh.signaling.lastState.profile.links || {}).length >= n",
                            arg=len(self.pages) - 1, timeout=60_000)
                if sc.edge:
                    self._wait_edge_profile(90)
                src = self.pages[sc.source]
                src.click("#start-ar")
                src.wait_for_function("() => window.tilemesh.ar && window.tilemesh.ar.engine", timeout=60_000)
                src.evaluate(INSTRUMENT)
                target = None
                order = list(MODES)
                for r in range(repeats):
                    for mode in order[r % 4:] + order[:r % 4]:
                        w = self._window(mode, r, seconds, target)
                        result["windows"].append(w)
                        if mode == "none" and target is None and w.get("predicted_ms"):
                            # The user's target in the scaling modes: twice the full model's predicted rate here.
                            target = {"kind": "fps", "value": round(2 * 1e3 / w["predicted_ms"], 2)}
                            result["target"] = target
                    if target is None:
                        raise RuntimeError("the full model's plan gave no prediction: no target to scale to")
            finally:
                for b in browsers:
                    with contextlib.suppress(Exception):
                        b.close()
                if self.server is not None:
                    self.server.terminate()
                    with contextlib.suppress(Exception):
                        self.server.wait(15)
                    self.server_log.close()
                for g in self.groups.values():
                    g.remove()
        return result

    def _traffic(self) -> int:
        t = [pg.evaluate(TRAFFIC) for pg in self.pages.values()]
        return sum(x["sent"] + x["received"] for x in t)

    def _window(self, mode: str, repeat: int, seconds: float, target: dict | None) -> dict:
        pg = self.pages[self.sc.source]
        exit_on, scaled = MODES[mode]
        if scaled and target is None:
            return {"mode": mode, "repeat": repeat, "ok": False, "error": "no target yet (none runs first)"}
        pg.evaluate(MODE, [exit_on, target if scaled else None])
        # Warm-up: the mode's plan adopted (a target's plan says how it scaled; planning every variant takes the
        # server a few seconds under load), then a few frames through it (the exit rule's state settles too).
        pg.wait_for_function("(scaled) => { const p = window.tilemesh.engine.plan;"
                             " return p && Boolean(p.scaling) === scaled; }", arg=scaled, timeout=180_000)
        pg.evaluate("() => { window.__bench.frames.length = 0; }")
        pg.wait_for_function("(k) => window.__bench.frames.length >= k", arg=8, timeout=180_000)
        self._pause(pg, 60_000)
        plan = pg.evaluate("() => window.tilemesh.engine.plan")
        start = pg.evaluate("() => window.__bench.frames.length")
        c0, b0 = self._read_counters(), self._traffic()
        # The window lasts one loop of the camera's video (every shot once), however many frames that is.
        pg.evaluate("() => window.__bench.resume()")
        time.sleep(seconds)
        self._pause(pg, 120_000)
        c1, b1 = self._read_counters(), self._traffic()
        frames = pg.evaluate("(k) => window.__bench.frames.slice(k)", start)
        ref = reference_top1([f.pop("ref") for f in frames])
        w = window_stats(frames, ref, c1["cpu"][self.sc.source] - c0["cpu"][self.sc.source], b1 - b0)
        w["frame_log"] = [{**f, "ref": r} for f, r in zip(frames, ref, strict=True)]
        w.update(mode=mode, repeat=repeat, ok=True, plan_label=(plan or {}).get("label"),
                 predicted_ms=(plan or {}).get("predicted_ms"), scaling=(plan or {}).get("scaling"))
        log(f"{self.sc.name} {mode:<8} repeat {repeat}: {w['fps']:.2f} fps, median {w['median_ms']:.0f} ms, "
            f"{w['bytes_per_frame'] / 1e3:.0f} kB/frame, phone {w['phone_cpu_ms_per_frame']:.0f} ms CPU/frame, "
            f"exits {w['exit_rate']:.0%}, agreement {w['agreement']:.0%}, variants {w['variants']}")
        return w


def table(results: list[dict]) -> str:
    lines = ["| room | mode | frames | fps (x none) | median latency | room traffic / frame (x none) | "
             "phone CPU / frame | exits | exits agree | agreement with full model | variants run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        ws = [w for w in res["windows"] if w.get("ok")]
        agg = {}
        for mode in MODES:
            mine = [w for w in ws if w["mode"] == mode]
            if not mine:
                continue
            n = sum(w["frames"] for w in mine)
            fps = statistics.median([w["fps"] for w in mine])
            vs: dict[str, int] = {}
            for w in mine:
                for k, v in w["variants"].items():
                    vs[k] = vs.get(k, 0) + v
            agg[mode] = {"n": n, "fps": fps, "lat": statistics.median([w["median_ms"] for w in mine]),
                         "bytes": sum(w["bytes_per_frame"] * w["frames"] for w in mine) / n,
                         "cpu": sum(w["phone_cpu_ms_per_frame"] * w["frames"] for w in mine) / n,
                         "exit": sum(w["exit_rate"] * w["frames"] for w in mine) / n,
                         "agree": sum(w["agreement"] * w["frames"] for w in mine) / n,
                         "exit_agree": [w["exit_agreement"] for w in mine if w["exit_rate"]],
                         "variants": vs}
        base = agg.get("none")
        for mode, a in agg.items():
            rf = f" ({a['fps'] / base['fps']:.2f}x)" if base and base["fps"] else ""
            # (a room whose plans keep frames on the phone moves ~nothing either way: no ratio of noise)
            rb = f" ({base['bytes'] / a['bytes']:.2f}x less)" if base and min(a["bytes"], base["bytes"]) > 1e3 else ""
            ea = f"{statistics.mean(a['exit_agree']):.0%}" if a["exit_agree"] else "-"
            vs = ", ".join(f"{k or 'full'} {v}" for k, v in sorted(a["variants"].items()))
            lines.append(f"| {res['scenario']['name']} | {mode} | {a['n']} | {a['fps']:.2f}{rf} | {a['lat']:.0f} ms | "
                         f"{a['bytes'] / 1e3:.0f} kB{rb} | {a['cpu']:.0f} ms | {a['exit']:.0%} | {ea} | "
                         f"{a['agree']:.1%} | {vs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rooms", nargs="*", default=["default", "browsers"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shots", type=int, default=8, help="shots of 20 frames (2 s each) in the camera's loop; "
                    "each mode's window lasts one loop")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--render", nargs="+", metavar="JSON", help="only print the table of finished runs' JSON files")
    args = ap.parse_args(argv)
    if args.render:
        print(table([json.loads(Path(f).read_text()) for f in args.render]))
        return 0
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    refresh_runtime()
    results = []
    for name in args.rooms:
        sc = load_scenario(name)
        run = ExitRun(sc, REPO / "results")
        res = run.run_modes(args.repeats, args.shots, args.seed)
        results.append(res)
        out = REPO / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-exit-{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        log(f"wrote {out}")
    print(table(results))
    for res in results:
        print(f"{res['scenario']['name']}: scaling target {res.get('target')}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores, shared)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
