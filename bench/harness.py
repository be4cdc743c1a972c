"""`tilemesh bench`: every planner strategy on the same emulated room, interleaved, measured end to end.

    sudo .venv/bin/python -m bench.harness [default | bench/scenarios/X.toml] [--frames N] [--repeats R]

A scenario (bench/scenario.py, bench/scenarios/*.toml) lists the devices. The harness
(bench/env.py) gives each its own network namespace with a shaped link and its own CPU cgroup, starts
`tilemesh serve --https [--edge]` in the edge's namespace (the server's aiortc peer is the edge device), and
one headless Chromium per phone or laptop, each opening the room's join page; the source's camera shows a
photo (Chromium's fake capture). Once every device has measured itself and its links, the source starts the
product's AR loop (`#start-ar`) and the harness switches the loop's strategy (the `?strategy=` mechanism),
round-robin with the order rotated every repeat. A gate around the loop's `classify` pauses it between
measurements, so the CPU counters (cgroup cpuacct of the phone; /proc/<pid>/stat of the server) are read
with no frame in flight and cover exactly the measured frames.

Per strategy: median and p90 latency, frames per second of the continuous stream, bytes sent per frame (from
the devices' frame reports), phone and edge CPU seconds per frame, the plan's share of MACs on the edge, and
the planner's predicted latency. Results go to results/<time>-<scenario>/ (results.md, results.json, PNG
plots of cost-model predictions from this run's measured profiles, README-performance.md), and the default
scenario's README-performance.md is copied to results/ for the README.
Edge-based strategies (offload, partition_offload) run only when the edge peer reports a compute profile.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import report as bench_report
from bench.env import CpuGroup, StarNet, process_cpu_seconds, unavailable_reason
from bench.linkbench import http_json, wait_up
from bench.scenario import Scenario, ScenarioError, load_scenario

REPO = Path(__file__).resolve().parent.parent
PORT = 8443
EDGE_STRATEGIES = ("offload", "partition_offload")
READY = "() => window.tilemesh && window.tilemesh.signaling.lastState?.state === 'ready'"
# Ready, and done refining what it measured while others booted (profile, thread count, links taken again).
SETTLED = "() => window.tilemesh.signaling.lastState?.state === 'ready' && !window.tilemesh.signaling.lastState.detail"

# Installed on the source page once the AR loop runs: records every frame the loop classifies and lets the
# harness pause the loop between frames (the gate sits before the room engine is called).
INSTRUMENT = """() => {
  if (window.__bench) return;
  const app = window.tilemesh, ar = app.ar.engine;
  const b = window.__bench = { frames: [], broadcasts: [], paused: false, idle: false, wake: [], budget: 0,
    inflight: 0 };
  // budget: frames the loop may still start before it pauses itself, so a window is exactly N frames. The
  // loop may keep several frames in flight: every waiter at the gate is woken, and the loop counts as idle
  // only when no frame is in flight.
  b.resume = (budget) => { b.budget = budget ?? Infinity; b.paused = false; b.idle = false;
    const w = b.wake; b.wake = []; w.forEach((f) => f()); };
  const classify = ar.classify.bind(ar);
  ar.classify = async (...args) => {  // (frame, size): every argument passes through
    if (b.budget <= 0) b.paused = true;
    while (b.paused) { b.idle = b.inflight === 0; await new Promise((r) => { b.wake.push(r); }); }
    b.idle = false;
    b.budget -= 1;
    b.inflight += 1;
    const t0 = performance.now();
    let r;
    try { r = await classify(...args); } finally { b.inflight -= 1; if (b.paused && b.inflight === 0) b.idle = true; }
    // A stream's camera frame no lane could take yet (tilemesh.runtime.stream pacing): not a frame, not counted.
    if (r && r.skipped) { b.budget += 1; return r; }
    const t1 = performance.now();
    b.frames.push({ t0, t1, strategy: r.plan ? r.plan.strategy : null, plan_id: r.plan ? r.plan.plan_id : null,
      top1: r.top && r.top[0] ? r.top[0].label : null, report: r.report || null });
    return r;
  };
  app.signaling.on("broadcast", (m) => {
    const d = m.data || {};
    if (d.kind === "frame_report") b.broadcasts.push({ from: m.from, plan_id: d.plan_id, report: d.report });
  });
}"""
# On every browser device: its own report of every frame it finished (the room shares only every 4th).
DEVICE_REPORTS = """() => {
  if (window.__benchReports) return;
  window.__benchReports = [];
  window.tilemesh.engine.addEventListener("timings", (e) => window.__benchReports.push(e.detail));
}"""
PAUSE = "() => { window.__bench.paused = true; }"
IDLE = "() => window.__bench.idle"
SWITCH = """([s, devices]) => { const b = window.__bench, ar = window.tilemesh.ar.engine;
  ar.strategy = s; ar.devices = devices; ar.planning = null; window.tilemesh.engine.plan = null;
  b.frames.length = 0; b.broadcasts.length = 0; b.resume(Infinity); }"""
PLAN_SEEN = """([s, n]) => { const f = window.__bench.frames; const i = f.findIndex((x) => x.strategy === s);
  return i >= 0 && f.length - i >= n; }"""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _http_json(url: str, body: dict | None = None, timeout: float = 30) -> dict:
    # The server's own self-signed certificate, inside the namespaces.
    return http_json(url, ssl._create_unverified_context(), body, timeout)


def _wait_up(url: str, timeout: float = 60) -> None:
    wait_up(url, ssl._create_unverified_context(), timeout)


def source_state() -> dict:
    """The commit measured and what differed from it (the work tree is shared: say what ran)."""
    def git(*args: str) -> str:
        res = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return res.stdout.rstrip() if res.returncode == 0 else "?"

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "modified": [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]}


def refresh_runtime() -> None:
    """Re-pack tilemesh.runtime into static/wheels/tilemesh_runtime.zip: browsers import that zip, not the sources,
    and it goes stale whenever tilemesh.runtime changes after setup last ran (the benchmark must run this code)."""
    from tilemesh.server import assets  # noqa: PLC0415

    if assets.main(["--steps", "runtime"]) != 0:
        raise SystemExit("tilemesh bench: packing tilemesh.runtime for the browsers failed")


def machine_info(chromium_version: str = "?") -> dict:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "chromium": chromium_version, "load_avg_at_start": os.getloadavg()[0]}


def expected_top1(photo, variant: str | None = None) -> str:
    """onnxruntime's top-1 for the photo as the camera frames it (the room must give the same answer); for a
    variant of the model, the ONNX file with its input declared at the variant's size, on its preprocessing."""
    import onnx  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    from tilemesh.models.card import load_card  # noqa: PLC0415
    from tilemesh.runtime.preprocess import Preprocessing, preprocess, top_k  # noqa: PLC0415

    h, w = photo.shape[:2]
    s = min(h, w)
    sq = photo[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    path = REPO / "static/model/mobilenet_v2.onnx"
    labels = json.loads((REPO / "static/model/labels.json").read_text())
    v = load_card(path, (1, 3, 224, 224), len(labels)).variant(variant)
    model = onnx.load(path)
    pre = None
    if v is not None:
        p = v.preprocess
        pre = Preprocessing(p.resize_shorter_side, p.crop, p.mean, p.std)
        for d, n in zip(model.graph.input[0].type.tensor_type.shape.dim, (1, 3, p.crop, p.crop), strict=True):
            d.Clear()
            d.dim_value = n
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return top_k(sess.run(None, {"input": preprocess(sq, pre=pre)})[0][0], labels, 1)[0][1]


def window_from_frames(strategy: str, frames: list[dict], broadcasts: list[dict], plan: dict | None,
                       names: dict[str, str], edge_id: str | None) -> dict:
    """One measurement window's numbers from the frames the source recorded (pure: tested)."""
    ours = [f for f in frames if f["strategy"] == strategy]
    lat = [f["t1"] - f["t0"] for f in ours]
    w: dict = {"strategy": strategy, "ok": bool(ours), "latencies_ms": lat,
               "fallback_frames": len(frames) - len(ours), "top1": [f["top1"] for f in ours],
               "wall_ms": (frames[-1]["t1"] - frames[0]["t0"]) if frames else 0.0}
    if not ours:
        w["error"] = "every frame fell back to the phone alone (no plan)"
        return w
    plan_id = ours[-1]["plan_id"]
    # More than one id: the room replanned mid-window (the device session re-measures a device whose compute drifts 2x).
    w["plan_ids"] = sorted({f["plan_id"] for f in ours})
    # Bytes: the source reports every frame; the others every 4th (room_engine REPORT_EVERY). A device's mean
    # over its reports under this plan stands for each of its frames: a plan's transfers do not vary by frame.
    seen: dict[tuple[str, int], int] = {}
    compute: dict[tuple[str, int], float] = {}
    reports = [f["report"] for f in ours if f.get("report") and f["plan_id"] == plan_id]
    reports += [b["report"] for b in broadcasts if b.get("plan_id") == plan_id and b.get("report")]
    frame_ids = {r["frame"] for r in reports if r["device"] == (plan or {}).get("source")}
    for r in reports:
        if not frame_ids or r["frame"] in frame_ids:  # the same report may come from a page and a broadcast
            seen[(r["device"], int(r["frame"]))] = int(r["bytes_sent"])
            if r.get("compute_ms") is not None:
                compute[(r["device"], int(r["frame"]))] = float(r["compute_ms"])
    per_dev: dict[str, list[int]] = {}
    for (dev, _), nbytes in sorted(seen.items()):
        per_dev.setdefault(dev, []).append(nbytes)
    w["bytes_sent_by_device"] = {names.get(d, d): sum(v) / len(v) for d, v in per_dev.items()}
    w["reports_seen"] = {names.get(d, d): len(v) for d, v in per_dev.items()}
    w["reports_raw"] = len(reports)
    w["bytes_per_frame"] = sum(w["bytes_sent_by_device"].values())
    # Each device's compute per frame (its tasks' run times, as it reported them): the rest of a frame's latency
    # is waiting for input, halos and the gather, and the glue around each message.
    per_dev_ms: dict[str, list[float]] = {}
    for (dev, _), ms in sorted(compute.items()):
        per_dev_ms.setdefault(dev, []).append(ms)
    w["compute_ms_by_device"] = {names.get(d, d): sum(v) / len(v) for d, v in per_dev_ms.items()}
    if plan:
        devs = (plan.get("timeline") or {}).get("devices", {})
        macs = {d: v.get("macs", 0) for d, v in devs.items()}
        total = sum(macs.values())
        w["predicted_compute_ms_by_device"] = {names.get(d, d): 1e3 * v.get("compute_s", 0.0) for d, v in devs.items()}
        w.update(plan_id=plan.get("plan_id"), label=plan.get("label"), predicted_ms=plan.get("predicted_ms"),
                 devices=[names.get(d, d) for d in plan.get("devices", [])],
                 predicted_bytes_per_frame=sum(v.get("bytes_sent", 0) for v in devs.values()),
                 macs_by_device={names.get(d, d): m for d, m in macs.items()},
                 edge_mac_share=(macs.get(edge_id, 0) / total) if edge_id and total else (0.0 if total else None))
        missing = [names.get(d, d) for d in plan.get("devices", []) if d not in per_dev and macs.get(d)]
        if missing:
            w["bytes_missing_devices"] = missing
        if w["label"]:
            for pid, name in names.items():
                w["label"] = w["label"].replace(pid, name)
    return w


class Run:
    """One benchmark run: the emulated room, its browsers, and the measurement loop."""

    def __init__(self, scenario: Scenario, out_dir: Path, frame_timeout_s: float = 20.0,
                 edge_transport: str = "relay"):
        self.sc = scenario
        self.edge_transport = edge_transport
        self.out_dir = out_dir
        self.frame_timeout_s = frame_timeout_s
        self.groups: dict[str, CpuGroup] = {}
        self.pages: dict[str, object] = {}
        self.ids: dict[str, str] = {}      # device name -> peer id
        self.names: dict[str, str] = {}    # peer id -> device name
        self.server: subprocess.Popen | None = None
        self.notes: list[str] = []

    # ------------------------------------------------------------------ setup

    def _links(self) -> dict[str, tuple[float, float]]:
        links = {d.name: (d.mbps, d.delay_ms) for d in self.sc.devices}
        if self.sc.edge is None:
            links["server"] = (1000.0, 0.0)  # the server still needs a home; without --edge it only signals
        return links

    def _start_server(self, net: StarNet, state: str) -> str:
        home = self.sc.edge.name if self.sc.edge else "server"
        group = self.groups.get(home)
        addr = net.addr[home]
        argv = [sys.executable, "-m", "tilemesh.cli", "serve", "--host", addr, "--port", str(PORT), "--https",
                "--state-dir", state, *(["--edge", "--edge-transport", self.edge_transport] if self.sc.edge else [])]
        self.server_log = open(Path(state) / "server.log", "w+")  # noqa: SIM115 (closed in run())
        self.server = subprocess.Popen([net.launcher(home, argv, group)], cwd=REPO, stdout=self.server_log,
                                       stderr=subprocess.STDOUT)
        base = f"https://{addr}:{PORT}"
        net.call_in_hub(_wait_up, base + "/healthz", 90)
        return base

    def _roster(self) -> list[dict]:
        return self.pages[self.sc.source].evaluate(
            "() => window.tilemesh.signaling.peers.map((p) => ({id: p.id, name: p.name, kind: p.kind,"
            " state: p.state, profile: p.profile}))")

    def _wait_edge_profile(self, timeout_s: float) -> str | None:
        """The edge peer's id once it reports a compute profile; None (with a note) if it never does."""
        deadline = time.monotonic() + timeout_s
        seen = False
        while time.monotonic() < deadline:
            for p in self._roster():
                if p["kind"] == "edge":
                    seen = True
                    self.ids[self.sc.edge.name] = p["id"]
                    self.names[p["id"]] = self.sc.edge.name
                    if p["state"] in ("ready", "busy") and isinstance((p.get("profile") or {}).get("compute"), dict):
                        return p["id"]
            time.sleep(1.0)
        self.notes.append(("the edge peer joined the room but never reported a compute profile" if seen else
                           "the edge peer never joined the room") + f" within {timeout_s:.0f} s: "
                          "offload and partition_offload were skipped")
        return None

    # ------------------------------------------------------------------ measurement

    def _read_counters(self) -> dict:
        c = {"t": time.monotonic(), "cpu": {n: g.usage_seconds() for n, g in self.groups.items()}}
        if self.sc.edge is not None and self.server is not None:
            c["edge_proc"] = process_cpu_seconds(self.server.pid)
        return c

    def _pause(self, pg, timeout_ms: float) -> None:
        pg.evaluate(PAUSE)
        pg.wait_for_function(IDLE, timeout=timeout_ms)

    def measure(self, strategy: str, repeat: int, name: str | None = None,
                devices: tuple[str, ...] | None = None) -> dict:
        """One window of `strategy` (recorded as `name`), planned over `devices` (names) or every device."""
        name = name or strategy
        pg = self.pages[self.sc.source]
        per_frame_ms = self.frame_timeout_s * 1e3
        try:
            pg.evaluate(SWITCH, [strategy, [self.ids[d] for d in devices] if devices else None])
            pg.wait_for_function(PLAN_SEEN, arg=[strategy, max(1, self.sc.warmup)],
                                 timeout=per_frame_ms * (self.sc.warmup + 3) + 30_000)
            self._pause(pg, per_frame_ms)
            plan = pg.evaluate("() => window.tilemesh.engine.plan")
            start = pg.evaluate("() => window.__bench.frames.length")
            for dp in self.pages.values():
                dp.evaluate("() => { window.__benchReports.length = 0; }")
            c0 = self._read_counters()
            pg.evaluate("(n) => window.__bench.resume(n)", self.sc.frames)
            # The loop pauses itself after its budget: wait for it to sit at the gate again.
            pg.wait_for_function("(n) => window.__bench.frames.length >= n && window.__bench.idle",
                                 arg=start + self.sc.frames, timeout=per_frame_ms * self.sc.frames + 10_000)
            c1 = self._read_counters()
            got = pg.evaluate("(k) => ({frames: window.__bench.frames.slice(k),"
                              " broadcasts: window.__bench.broadcasts})", start)
            for dp in self.pages.values():
                got["broadcasts"] += dp.evaluate("() => window.__benchReports")
        except Exception as exc:  # noqa: BLE001 (one strategy failing must not lose the others' numbers)
            with contextlib.suppress(Exception):
                self._pause(pg, per_frame_ms)
            errs = pg.evaluate("() => [window.tilemesh.ar.engine.lastError, ...window.tilemesh.engine.errors]")
            log(f"{name}: failed: {str(exc).splitlines()[0]} {errs}")
            return {"strategy": name, "repeat": repeat, "ok": False, "latencies_ms": [],
                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}; page: {errs[:3]}"}
        w = window_from_frames(strategy, got["frames"], got["broadcasts"], plan, self.names,
                               self.ids.get(self.sc.edge.name) if self.sc.edge else None)
        n = len(w["latencies_ms"])
        w["strategy"], w["repeat"] = name, repeat
        w["cpu_s_by_device"] = {d: c1["cpu"][d] - c0["cpu"][d] for d in c0["cpu"]}
        w["source_cpu_s"] = w["cpu_s_by_device"][self.sc.source] * n / max(1, len(got["frames"]))
        if "edge_proc" in c0:
            w["edge_cpu_s"] = (c1["edge_proc"] - c0["edge_proc"]) * n / max(1, len(got["frames"]))
        w["elapsed_s"] = c1["t"] - c0["t"]
        if w["ok"]:
            log(f"{name:<18} repeat {repeat}: median {sorted(w['latencies_ms'])[n // 2]:.0f} ms over {n} frames, "
                f"predicted {w.get('predicted_ms') or 0:.0f} ms, phone CPU {w['source_cpu_s'] / n:.3f} s/frame "
                f"({w.get('label')}); compute ms/frame measured "
                + ", ".join(f"{d} {v:.0f}" for d, v in w.get("compute_ms_by_device", {}).items())
                + " predicted " + ", ".join(f"{d} {v:.0f}" for d, v in
                                            (w.get("predicted_compute_ms_by_device") or {}).items()))
        return w

    # ------------------------------------------------------------------ the whole run

    def run(self) -> dict:
        import skimage.data  # noqa: PLC0415
        from playwright.sync_api import sync_playwright  # noqa: PLC0415

        from bench.chromium import CHROMIUM, CHROMIUM_ARGS  # noqa: PLC0415
        from bench.media import write_y4m  # noqa: PLC0415

        sc = self.sc
        photo = skimage.data.coffee()
        top1 = expected_top1(photo, sc.variant)
        windows: list[dict] = []
        result: dict = {"scenario": sc.to_dict(), "expected_top1": top1, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "source": source_state()}
        net = StarNet(self._links())
        browsers = []
        with net, tempfile.TemporaryDirectory() as state, sync_playwright() as p:
            try:
                for d in sc.devices:
                    self.groups[d.name] = CpuGroup(f"tmb{net.tag}-{d.name}", d.cores).create()
                cam = write_y4m(Path(state) / "coffee.y4m", photo)
                base = self._start_server(net, state)
                room = net.call_in_hub(_http_json, base + "/api/rooms", {})["room"]
                log(f"room {room} at {base}; shaping: {net.shaping}; starting {len(sc.browsers)} browsers")
                first = sc.strategies[0]
                for d in sc.browsers:
                    args = [*CHROMIUM_ARGS, "--ignore-certificate-errors"]
                    query = f"kind={d.kind}&strategy={first}"
                    query += f"&ort_threads={sc.ort_threads}" if sc.ort_threads else ""
                    if d.name == sc.source:
                        args.append(f"--use-file-for-fake-video-capture={cam}")
                        query += f"&variant={sc.variant}" if sc.variant else ""
                        query += f"&depth={sc.depth}" if sc.depth else ""
                    b = p.chromium.launch(executable_path=net.launcher(d.name, [CHROMIUM], self.groups[d.name]),
                                          args=args)
                    browsers.append(b)
                    pg = b.new_context(ignore_https_errors=True).new_page()
                    for attempt in range(3):
                        try:
                            pg.goto(f"{base}/join/{room}?{query}", timeout=120_000)
                            break
                        except Exception as exc:  # noqa: BLE001
                            # A namespace's link coming up can reach Chromium as a network change mid-navigation.
                            if "ERR_NETWORK_CHANGED" not in str(exc) or attempt == 2:
                                raise
                            time.sleep(1.0)
                    self.pages[d.name] = pg
                result["machine"] = machine_info(browsers[0].version)
                result["edge_transport"] = self.edge_transport if self.sc.edge else None
                t0 = time.monotonic()
                for name, pg in self.pages.items():
                    pg.wait_for_function(READY, timeout=600_000)
                    self.ids[name] = pg.evaluate("window.tilemesh.peerId")
                    self.names[self.ids[name]] = name
                log(f"browsers ready after {time.monotonic() - t0:.0f} s")
                for pg in self.pages.values():
                    with contextlib.suppress(Exception):  # a device still refining plans on its first figures
                        pg.wait_for_function(SETTLED, timeout=120_000)
                log(f"browsers settled after {time.monotonic() - t0:.0f} s")
                nb = len(self.pages)
                for pg in self.pages.values():
                    with contextlib.suppress(Exception):  # planner falls back to its default link if one is missing
                        pg.wait_for_function(
                            "(n) => Object.keys(window.tilemesh.signaling.lastState.profile.links || {}).length >= n",
                            arg=nb - 1, timeout=60_000)
                edge_id = self._wait_edge_profile(90) if sc.edge else None
                usable = [w for w in sc.windows() if w[1] not in EDGE_STRATEGIES or sc.edge is None or edge_id]
                skipped = [w[0] for w in sc.windows() if w not in usable]
                src = self.pages[sc.source]
                src.click("#start-ar")
                src.wait_for_function("() => window.tilemesh.ar && window.tilemesh.ar.engine", timeout=60_000)
                src.evaluate(INSTRUMENT)
                for pg in self.pages.values():
                    pg.evaluate(DEVICE_REPORTS)
                self._pause(src, self.frame_timeout_s * 1e3)
                for r in range(sc.repeats):
                    # Round robin, rotated every repeat: no strategy always runs first (warmest) or last.
                    order = usable[r % len(usable):] + usable[:r % len(usable)]
                    for name, s, devs in order:
                        windows.append(self.measure(s, r, name, devs))
                for s in skipped:
                    windows.append({"strategy": s, "repeat": 0, "ok": False, "latencies_ms": [],
                                    "error": "edge peer has no compute profile (not ready): skipped"})
                result["roster"] = self._roster()
            finally:
                for b in browsers:
                    with contextlib.suppress(Exception):
                        b.close()
                if self.server is not None:
                    self.server.terminate()
                    try:
                        self.server.wait(15)
                    except subprocess.TimeoutExpired:
                        self.server.kill()
                    self.server_log.seek(0)
                    result["server_log_tail"] = self.server_log.read()[-4000:]
                    self.server_log.close()
                for g in self.groups.values():
                    g.remove()
        result["shaping"] = net.shaping
        result["windows"] = windows
        result["summary"] = bench_report.summarize(windows, top1)
        result["ratios"] = bench_report.ratios(result["summary"])
        result["notes"] = self.notes
        result["emulation_notes"] = emulation_notes(sc, net.shaping)
        return result


def emulation_notes(sc: Scenario, shaping: str) -> list[str]:
    quotas = ", ".join(f"{d.name} {d.cores:g}" for d in sc.devices)
    out = [f"CPU: one cgroup v1 cpu quota per device (cores: {quotas}); the machine's cores are shared with "
           "everything else running on it, so a device can get less than its quota, never more."]
    if shaping == "netem":
        out.append("Links: each device in its own network namespace on a bridge, `tc netem rate/delay` on both "
                   "ends of its veth (uplink and downlink); A->B crosses A's uplink and B's downlink.")
    else:
        out.append("Links: each device in its own network namespace on a bridge, `tc tbf rate` on both ends of its "
                   "veth (uplink and downlink; sustained TCP reaches 96% of the rate, while tbf's 96 KiB bucket lets a "
                   "short burst through faster). This kernel has no sch_netem, so the scenario's delays were NOT "
                   "emulated: no delay is added to the browsers' and aiortc's own processing time.")
    out.append("Edge: the server process (`tilemesh serve --edge`, native onnxruntime or numpy, whichever it "
               "profiled faster) in its own namespace and cgroup; "
               "its CPU time includes signaling and the planner's work for the plans made during the run "
               "(planning happens outside the measured windows).")
    out.append("Latency curves in the PNGs are the cost model's predictions from this run's measured device "
               "profiles and links, not measurements; crosses mark this run's measured medians.")
    return out


def load_scenario_dict(d: dict) -> Scenario:
    from bench.scenario import parse_scenario  # noqa: PLC0415

    return parse_scenario(d, "results.json")


def predicted_sweeps(result: dict, strategies: list[str]) -> dict:
    """Cost-model latency vs number of devices and vs link rate, from the profiles measured in this run."""
    from tilemesh.planning import planner  # noqa: PLC0415

    roster = [p for p in result.get("roster", []) if isinstance((p.get("profile") or {}).get("compute"), dict)]
    names = {p["id"]: p for p in roster}
    sc = result["scenario"]
    order = [d["name"] for d in sc["devices"]]
    by_name: dict[str, dict] = {}
    for p in roster:
        name = next((n for n, pid in result.get("ids", {}).items() if pid == p["id"]), p["name"])
        by_name[name] = p
    profiles = {n: by_name[n]["profile"]["compute"] for n in order if n in by_name}
    id_to_name = {by_name[n]["id"]: n for n in profiles}
    links = {}
    for n in profiles:
        for other, link in (by_name[n]["profile"].get("links") or {}).items():
            if other in id_to_name and float(link.get("mbps", 0)) > 0:
                links[(n, id_to_name[other])] = {"rtt_ms": float(link["rtt_ms"]), "mbps": float(link["mbps"])}
    if sc["source"] not in profiles:
        return {}
    graph = planner.cli_graph(None)  # the demo model setup built (what the run served)
    if sc.get("variant"):
        from tilemesh.server import model as model_mod  # noqa: PLC0415

        static = REPO / "static"
        graph = model_mod.prepare(model_mod.default_model(static), static).graph(sc["variant"])
    edge = next((d["name"] for d in sc["devices"] if d["kind"] == "edge" and d["name"] in profiles), None)
    src = sc["source"]
    devs = [src] + [n for n in profiles if n != src]
    out: dict = {"profiles_from": sorted(profiles), "unused_ids": sorted(set(names) - set(id_to_name))}
    xs, pred = [], {s: [] for s in strategies}
    for k in range(1, len(devs) + 1):
        sub = {n: profiles[n] for n in devs[:k]}
        xs.append(k)
        for s in strategies:
            e = edge if edge in sub else None
            pred[s].append(planner.make_plan(s, graph, sub, links, src, edge=e).predicted_s * 1e3)
    out["devices"] = {"x": xs, "names": devs, "predicted_ms": pred}
    rtts = sorted(v["rtt_ms"] for v in links.values()) or [4.0]
    rtt = rtts[len(rtts) // 2]
    bws = [5, 10, 20, 50, 100, 200, 500, 1000]
    pred = {s: [] for s in strategies}
    for bw in bws:
        flat = {"*": {"rtt_ms": rtt, "mbps": float(bw)}}
        for s in strategies:
            pred[s].append(planner.make_plan(s, graph, profiles, flat, src, edge=edge).predicted_s * 1e3)
    out["bandwidth"] = {"x": bws, "rtt_ms": rtt, "predicted_ms": pred}
    return out


def write_results(result: dict, out_dir: Path, plots: bool = True) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = ["results.json", "results.md"]
    if plots:
        try:
            # Windows over the first N devices ("tilemesh@3") are the strategy's own curve in the sweep.
            measured = list(dict.fromkeys(s.split("@")[0] for s, v in result["summary"].items() if "median_ms" in v))
            result["sweeps"] = predicted_sweeps(result, measured)
            written += bench_report.plot_predictions(result["sweeps"], result["summary"], out_dir)
        except Exception as exc:  # noqa: BLE001 (plots are extras: never lose the measured numbers to them)
            result.setdefault("notes", []).append(f"plots skipped: {type(exc).__name__}: {exc}")
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "results.md").write_text(bench_report.render_markdown(result))
    perf = bench_report.performance_section(result)
    (out_dir / "README-performance.md").write_text(perf)
    written.append("README-performance.md")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tilemesh bench", description=__doc__.splitlines()[0])
    ap.add_argument("scenario", nargs="?", default="default",
                    help="a scenario name from bench/scenarios/ or a .toml/.json path (default: default)")
    ap.add_argument("--frames", type=int, help="measured frames per strategy and repeat (overrides the scenario)")
    ap.add_argument("--repeats", type=int, help="repeats (overrides the scenario)")
    ap.add_argument("--strategies", help="comma-separated subset of strategies (overrides the scenario)")
    ap.add_argument("--edge-transport", choices=("relay", "webrtc"), default="relay",
                    help="how browsers reach the edge (tilemesh serve --edge-transport; default: relay)")
    ap.add_argument("--results", default=str(REPO / "results"), help="results folder (default: results/)")
    ap.add_argument("--no-plots", action="store_true", help="skip the cost-model sweeps and PNG plots")
    ap.add_argument("--check", action="store_true", help="only validate the scenario and print it")
    ap.add_argument("--render", metavar="DIR", help="only re-render results.md, plots and README-performance.md "
                    "from DIR/results.json (a finished run)")
    args = ap.parse_args(argv)
    # A stopped run (Ctrl-C, kill) must still delete its namespaces, veths and cgroups: SIGTERM ends Python
    # without running `finally` blocks unless it is turned into an exception.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.render:
        out_dir = Path(args.render)
        result = json.loads((out_dir / "results.json").read_text())
        result["summary"] = bench_report.summarize(result["windows"], result.get("expected_top1"))
        result["ratios"] = bench_report.ratios(result["summary"])
        result["emulation_notes"] = emulation_notes(load_scenario_dict(result["scenario"]), result.get("shaping", ""))
        print(f"wrote {', '.join(write_results(result, out_dir, plots=not args.no_plots))} to {out_dir}")
        if result["scenario"]["name"] == "default":
            (out_dir.parent / "README-performance.md").write_text((out_dir / "README-performance.md").read_text())
        return 0
    try:
        sc = load_scenario(args.scenario).with_overrides(
            args.frames, args.repeats, args.strategies.split(",") if args.strategies else None)
    except ScenarioError as exc:
        print(f"tilemesh bench: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps(sc.to_dict(), indent=1))
        return 0
    reason = unavailable_reason()
    if reason:
        print(f"tilemesh bench: {reason}", file=sys.stderr)
        return 2
    if not (REPO / "static" / "model" / "mobilenet_v2.json").exists():
        print("tilemesh bench: browser assets missing: run `python -m tilemesh.server.assets` first", file=sys.stderr)
        return 2
    refresh_runtime()
    results = Path(args.results)
    out_dir = results / f"{time.strftime('%Y%m%d-%H%M%S')}-{sc.name}"
    if sc.streams is not None:  # live camera streams: frames per second and latency per room size
        from bench import streams  # noqa: PLC0415

        return streams.run(sc, out_dir, log)
    run = Run(sc, out_dir, edge_transport=args.edge_transport)
    result = run.run()
    result["ids"] = run.ids
    written = write_results(result, out_dir, plots=not args.no_plots)
    if sc.name == "default":  # the README's Performance section describes the default room
        (results / "README-performance.md").write_text((out_dir / "README-performance.md").read_text())
    print("\n".join(bench_report.ratio_lines(result["summary"])))
    line = bench_report.prediction_line(result["summary"])
    if line:
        print(line)
    load = result.get("machine", {}).get("load_avg_at_start")
    print(f"load average {load if load is not None else '?':.4} at start, {os.getloadavg()[0]:.1f} at the end "
          f"({os.cpu_count()} cores, shared)")
    print()
    print(bench_report.markdown_table(result["summary"]))
    for note in result.get("notes", []):
        print(f"note: {note}")
    print(f"\nwrote {', '.join(written)} to {out_dir}")
    ok = any("median_ms" in s for s in result["summary"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
