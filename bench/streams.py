"""Stream benchmarks: frames per second and latency of live camera streams in emulated rooms, in one run.

`tilemesh bench streams_phones` (or any scenario with a `[streams]` table, bench/scenario.py) measures, for each
room size k, a fresh room of the scenario's first k browsers: each in its own network namespace (tc-shaped link)
and cgroup CPU quota, the server without an edge peer. The cameras open the AR overlay (a stream, "most frames/s"),
stream for `warmup_s` seconds (boot, plans, onnxruntime-web sessions, re-divisions settle), then every result the
camera's loop gets during `window_s` seconds is recorded: shown or dropped late, from the room or from the phone
alone (a fallback). Per camera: frames shown per second from the room, p50/p90 latency of those frames, the
planner's predicted figures, lanes, late and fallback counts. Ratios are against the one-phone room of the same
run (throughput goal: fps >= 0.85 k x one phone's with p90 <= 1.3x), and, with several cameras, each stream's
share of the room's total.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.scenario import Scenario

READY = "() => window.tilemesh && window.tilemesh.signaling.lastState?.state === 'ready'"
# Installed on a camera's page once its AR loop runs: every result the loop gets, with when it started and ended.
RECORD = """() => {
  if (window.__streamBench) return;
  const ar = window.tilemesh.ar.engine;
  const b = window.__streamBench = { frames: [], compute: [] };
  const classify = ar.classify.bind(ar);
  ar.classify = async (...args) => {
    const t0 = performance.now();
    const r = await classify(...args);
    b.frames.push({ t0, t1: performance.now(), shown: r.shown !== false, skipped: Boolean(r.skipped),
      room: Boolean(r.plan), plan_id: r.plan ? r.plan.plan_id : null });
    return r;
  };
  // The camera device's own compute per frame (its engine's task runs), from the session's timings notices.
  window.tilemesh.engine.addEventListener("timings", (e) => {
    const rep = e.detail.report || {};
    const tasks = rep.tasks || [];
    b.compute.push({ t: performance.now(), plan_id: e.detail.plan_id, ms: rep.compute_ms || 0,
      span: tasks.length ? Math.max(...tasks.map((x) => x.end_ms)) : 0,
      first: tasks.length ? Math.min(...tasks.map((x) => x.start_ms)) : 0 });
  });
}"""


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def window_figures(frames: list[dict], seconds: float) -> dict:
    """One camera's window (pure: tested): room results shown per second and their latency quantiles."""
    room = [f for f in frames if f["room"] and not f["skipped"]]
    shown = [f for f in room if f["shown"]]
    lat = [f["t1"] - f["t0"] for f in shown]
    return {"fps": len(shown) / seconds if seconds > 0 else 0.0, "shown": len(shown),
            "p50_ms": quantile(lat, 0.5), "p90_ms": quantile(lat, 0.9),
            "mean_ms": sum(lat) / len(lat) if lat else None, "in_flight": in_flight(room, seconds),
            "dropped_late": sum(1 for f in room if not f["shown"]),
            "fallback": sum(1 for f in frames if not f["room"] and not f["skipped"]),
            "plans": sorted({f["plan_id"] for f in room})}


def in_flight(frames: list[dict], seconds: float) -> float | None:
    """Share of the window during which the camera had at least one room frame in flight (pure: tested). With
    one frame in flight, 1 - this is the pacing gap: time between a result and the next frame's start (grab,
    display, waits) that no plan can use."""
    if seconds <= 0 or not frames:
        return None
    spans = sorted((f["t0"], f["t1"]) for f in frames)
    lo = spans[0][0]
    busy, start, end = 0.0, *spans[0]
    for a, b in spans[1:]:
        if a > end:
            busy, start, end = busy + end - start, a, b
        else:
            end = max(end, b)
    busy += end - start
    return busy / max(seconds * 1e3, end - lo)


def vs_planned(fig: dict) -> dict:
    """The cost model against the window (pure: tested): measured / planned frame rate and mean latency."""
    fps, ms = fig.get("predicted_fps"), fig.get("predicted_ms")
    return {"fps_vs_planned": fig["fps"] / fps if fps else None,
            "ms_vs_planned": fig["mean_ms"] / ms if ms and fig.get("mean_ms") else None}


def ratios(rooms: list[dict]) -> list[str]:
    """The goals' ratios, against the one-phone room of the same run."""
    out = []
    one = next((r for r in rooms if r["size"] == 1 and len(r["cameras"]) == 1), None)
    for r in rooms:
        cams = list(r["cameras"].values())
        if len(cams) == 1 and one is not None:
            c, base = cams[0], next(iter(one["cameras"].values()))
            fps = c["fps"] / base["fps"] if base["fps"] else float("nan")
            p90 = (c["p90_ms"] / base["p90_ms"]) if c["p90_ms"] and base["p90_ms"] else float("nan")
            out.append(f"{r['size']} phone(s): {c['fps']:.2f} fps = {fps:.2f}x one phone ({fps / r['size']:.2f} of "
                       f"{r['size']}x; goal >= 0.85), p90 {c['p90_ms'] or 0:.0f} ms = {p90:.2f}x (goal <= 1.3)")
        elif len(cams) > 1:
            total = sum(c["fps"] for c in cams)
            shares = ", ".join(f"{name} {c['fps']:.2f} fps ({c['fps'] / total if total else 0:.0%})"
                               for name, c in r["cameras"].items())
            out.append(f"{r['size']} phones, {len(cams)} cameras: total {total:.2f} fps; {shares} (goal: each >= 40%)")
    return out


def markdown(rooms: list[dict]) -> str:
    rows = ["| room | camera | lanes (last plan) | planned fps | planned ms | fps | p50 ms | p90 ms | mean ms "
            "| fps / planned | mean ms / planned | in flight | late | fallback |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def x(v):
        return f"{v:.2f}x" if v else "-"

    for r in rooms:
        for name, c in r["cameras"].items():
            rows.append(f"| {r['size']} phone(s) | {name} | {c.get('lanes', '?')} | {c.get('predicted_fps') or 0:.1f} "
                        f"| {c.get('predicted_ms') or 0:.0f} | {c['fps']:.2f} | {c['p50_ms'] or 0:.0f} "
                        f"| {c['p90_ms'] or 0:.0f} | {c.get('mean_ms') or 0:.0f} | {x(c.get('fps_vs_planned'))} "
                        f"| {x(c.get('ms_vs_planned'))} | {c.get('in_flight') or 0:.0%} | {c['dropped_late']} "
                        f"| {c['fallback']} |")
    return "\n".join(rows)


def measure_room(sc: Scenario, size: int, log) -> dict:
    """One fresh room of the scenario's first `size` browsers; every camera among them streams."""
    import skimage.data  # noqa: PLC0415
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    from bench.chromium import CHROMIUM, CHROMIUM_ARGS  # noqa: PLC0415
    from bench.env import CpuGroup, StarNet  # noqa: PLC0415
    from bench.harness import PORT, _http_json, _wait_up  # noqa: PLC0415
    from bench.media import write_y4m  # noqa: PLC0415

    st = sc.streams
    devices = sc.browsers[:size]
    cameras = [c for c in st.cameras if c in {d.name for d in devices}]
    links = {d.name: (d.mbps, d.delay_ms) for d in devices} | {"server": (1000.0, 0.0)}
    photos = [skimage.data.coffee(), skimage.data.chelsea(), skimage.data.astronaut(), skimage.data.rocket()]
    net = StarNet(links)
    groups: dict[str, CpuGroup] = {}
    browsers, pages, server = [], {}, None
    out: dict = {"size": size, "devices": [d.__dict__ for d in devices], "cameras": {}}
    with net, tempfile.TemporaryDirectory() as state, sync_playwright() as p:
        try:
            for d in devices:
                groups[d.name] = CpuGroup(f"tms{net.tag}-{d.name}", d.cores).create()
            addr = net.addr["server"]
            server_log = open(Path(state) / "server.log", "w+")  # noqa: SIM115 (closed below)
            argv = [sys.executable, "-m", "tilemesh.cli", "serve", "--host", addr, "--port", str(PORT), "--https",
                    "--state-dir", state]
            server = subprocess.Popen([net.launcher("server", argv)], stdout=server_log, stderr=subprocess.STDOUT,
                                      cwd=Path(__file__).resolve().parent.parent)
            base = f"https://{addr}:{PORT}"
            net.call_in_hub(_wait_up, base + "/healthz", 90)
            room = net.call_in_hub(_http_json, base + "/api/rooms", {})["room"]
            for d in devices:
                args = [*CHROMIUM_ARGS, "--ignore-certificate-errors"]
                if d.name in cameras:
                    cam = write_y4m(Path(state) / f"{d.name}.y4m", photos[cameras.index(d.name) % len(photos)])
                    args.append(f"--use-file-for-fake-video-capture={cam}")
                b = p.chromium.launch(executable_path=net.launcher(d.name, [CHROMIUM], groups[d.name]), args=args)
                browsers.append(b)
                pg = b.new_context(ignore_https_errors=True).new_page()
                for attempt in range(3):
                    try:
                        bound = f"&bound={st.latency_factor:g}" if st.latency_factor else ""
                        bound += f"&ort_threads={sc.ort_threads}" if sc.ort_threads else ""  # as bench.harness
                        pg.goto(f"{base}/join/{room}?kind={d.kind}{bound}", timeout=120_000)
                        break
                    except Exception as exc:  # noqa: BLE001 (a namespace link coming up: ERR_NETWORK_CHANGED)
                        if "ERR_NETWORK_CHANGED" not in str(exc) or attempt == 2:
                            raise
                        time.sleep(1.0)
                pages[d.name] = pg
            t0 = time.monotonic()
            for pg in pages.values():
                pg.wait_for_function(READY, timeout=600_000)
            for pg in pages.values():
                with contextlib.suppress(Exception):
                    pg.wait_for_function("(n) => Object.keys(window.tilemesh.signaling.lastState.profile.links"
                                         " || {}).length >= n", arg=len(pages) - 1, timeout=60_000)
            log(f"{size} phone(s): ready after {time.monotonic() - t0:.0f} s; cameras {cameras}")
            for c in cameras:
                pages[c].click("#start-ar")
            for c in cameras:
                pages[c].wait_for_function("() => window.tilemesh.ar && window.tilemesh.ar.engine", timeout=60_000)
                pages[c].evaluate(RECORD)
            time.sleep(st.warmup_s)
            marks = {c: pages[c].evaluate("() => window.__streamBench.frames.length") for c in cameras}
            time.sleep(st.window_s)
            for c in cameras:
                frames = pages[c].evaluate("(k) => window.__streamBench.frames.slice(k)", marks[c])
                plan = pages[c].evaluate("() => window.tilemesh.engine.plan") or {}
                fig = window_figures(frames, st.window_s)
                compute = pages[c].evaluate("(k) => window.__streamBench.compute.filter((x) => x.t >= k)",
                                            frames[0]["t0"] if frames else 0)
                fig["camera_compute_ms"] = quantile([x["ms"] for x in compute], 0.5)
                fig["camera_span_ms"] = quantile([x["span"] for x in compute], 0.5)  # runner's frame start -> last task
                fig["camera_first_ms"] = quantile([x["first"] for x in compute], 0.5)
                stream = plan.get("stream") or {}
                fig.update(predicted_fps=stream.get("predicted_fps"), predicted_ms=stream.get("predicted_ms"),
                           lanes=" + ".join(lane.get("label", "?") for lane in plan.get("lanes", [])) or "?",
                           errors=pages[c].evaluate("() => window.tilemesh.engine.errors.slice(-5)"))
                ids = {pg.evaluate("window.tilemesh.peerId"): n for n, pg in pages.items()}
                for pid, name in ids.items():
                    fig["lanes"] = fig["lanes"].replace(pid, name)
                out["cameras"][c] = fig
                out["plans"] = out.get("plans", {}) | {c: plan}
                fig.update(vs_planned(fig))
                log(f"{size} phone(s), camera {c}: {fig['fps']:.2f} fps, p50 {fig['p50_ms'] or 0:.0f} ms, "
                    f"p90 {fig['p90_ms'] or 0:.0f} ms, mean {fig['mean_ms'] or 0:.0f} ms, late {fig['dropped_late']}, "
                    f"fallback {fig['fallback']}; planned {fig['predicted_fps'] or 0:.1f} fps "
                    f"{fig['predicted_ms'] or 0:.0f} ms (measured/planned: fps {fig['fps_vs_planned'] or 0:.2f}x, "
                    f"mean latency {fig['ms_vs_planned'] or 0:.2f}x); {fig['lanes']}")
                log(f"  pacing: a frame in flight {fig['in_flight'] or 0:.0%} of the window; the camera's own "
                    f"compute p50 {fig['camera_compute_ms'] or 0:.0f} ms per frame (first task at "
                    f"{fig['camera_first_ms'] or 0:.0f} ms, last done {fig['camera_span_ms'] or 0:.0f} ms after its "
                    f"runner took the frame)")
            # What the planner saw (profiles and links), to check its predictions against these measurements.
            with contextlib.suppress(Exception):
                out["roster"] = pages[cameras[0]].evaluate(
                    "() => window.tilemesh.signaling.peers.map((p) => ({id: p.id, name: p.name, profile: p.profile}))")
        finally:
            for b in browsers:
                with contextlib.suppress(Exception):
                    b.close()
            if server is not None:
                server.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.wait(15)
                if server.poll() is None:
                    server.kill()
                server_log.seek(0)
                out["server_log_tail"] = server_log.read()[-3000:]
                server_log.close()
            for g in groups.values():
                g.remove()
    return out


def run(sc: Scenario, out_dir: Path, log) -> int:
    rooms = []
    for size in sc.streams.sizes:
        try:
            rooms.append(measure_room(sc, size, log))
        except Exception as exc:  # noqa: BLE001 (one room failing must not lose the others' numbers)
            log(f"{size} phone(s): failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            rooms.append({"size": size, "cameras": {}, "error": f"{type(exc).__name__}: {exc}"[:400]})
    measured = [r for r in rooms if r["cameras"]]
    lines = ratios(measured)
    table = markdown(measured)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "streams.json").write_text(json.dumps({"scenario": sc.to_dict(), "rooms": rooms,
                                                      "ratios": lines}, indent=1, default=str))
    (out_dir / "streams.md").write_text(table + "\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    print("\n".join(lines))
    print()
    print(table)
    with contextlib.suppress(Exception):  # the planner's view needs the served model's graph
        from tilemesh.planning import planner as planner_mod  # noqa: PLC0415

        graph = planner_mod.cli_graph(None)
        print("\nWhat the planner saw (profiles reported at join; lanes planned from them):")
        for room in measured:
            print("\n".join(planner_view(graph, room)))
    print(f"\nwrote streams.json, streams.md to {out_dir}")
    return 0 if measured else 1


def planner_view(graph, room: dict, factors=(1.2, 1.5, 2.0)) -> list[str]:
    """What the stream planner saw in one measured room (pure: tested): each device's profiled time for one
    frame whole (and relative to the camera phone's: equal phones should read about 1.0x), its link from the
    camera, the lanes it planned, and what it would plan under other latency bounds."""
    from tilemesh.planning import planner as planner_mod  # noqa: PLC0415
    from tilemesh.planning import streams as streams_mod  # noqa: PLC0415

    roster = [p for p in room.get("roster", []) if isinstance((p.get("profile") or {}).get("compute"), dict)]
    if not roster:
        return []
    profiles = {p["id"]: p["profile"]["compute"] for p in roster}
    names = {p["id"]: p["name"] for p in roster}
    links = {(p["id"], o): {"rtt_ms": float(v["rtt_ms"]), "mbps": float(v["mbps"])}
             for p in roster for o, v in (p["profile"].get("links") or {}).items() if o in profiles}

    def named(text: str) -> str:
        for pid, name in names.items():
            text = text.replace(pid, name)
        return text

    costs = planner_mod._Costs(graph, profiles)
    out = []
    for camera, plan in (room.get("plans") or {}).items():
        src = plan.get("source")
        if src not in profiles:
            continue
        own = costs.whole(src)
        devs = []
        for d in profiles:
            link = links.get((src, d))
            via = f", link {link['mbps']:.0f} Mbit/s" if link else ""
            devs.append(f"{names[d]} {costs.whole(d) * 1e3:.0f} ms ({costs.whole(d) / own:.2f}x{via})")
        out.append(f"{room['size']} phone(s), camera {camera}: profiled frame alone: {'; '.join(devs)}")
        lanes = [f"{named(ln.get('label', '?'))} ({ln.get('predicted_ms') or 0:.0f} ms, depth {ln.get('depth')},"
                 f" weight {ln.get('weight', 0):.2f})" for ln in plan.get("lanes", [])]
        stream = plan.get("stream") or {}
        out.append(f"  planned: {'; '.join(lanes) or '?'} -> {stream.get('predicted_fps') or 0:.1f} fps, "
                   f"{stream.get('predicted_ms') or 0:.0f} ms (bound {stream.get('bound_ms') or 0:.0f} ms = "
                   f"{(stream.get('bound_ms') or 0) / max(stream.get('single_ms') or 1, 1e-9):.1f}x the fastest "
                   f"single device, {stream.get('single_ms') or 0:.0f} ms)")
        for f in factors:
            sp = streams_mod.plan_stream(graph, profiles, links, src, options={"latency_factor": f})
            out.append(f"  with bound {f}x: {sp.fps:.1f} fps, {sp.latency_s * 1e3:.0f} ms: "
                       f"{named('; '.join(lane.choice.label for lane in sp.lanes))}")
    return out


def explain(path: Path, factors=(1.2, 1.5, 2.0)) -> None:
    """`planner_view` of every room of a streams.json."""
    from tilemesh.planning import planner as planner_mod  # noqa: PLC0415

    graph = planner_mod.cli_graph(None)
    for room in json.loads(Path(path).read_text())["rooms"]:
        print("\n".join(planner_view(graph, room, factors)))


if __name__ == "__main__":
    explain(Path(sys.argv[1]))
