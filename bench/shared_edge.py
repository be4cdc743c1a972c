"""eDDNN's shared edge: one server CPU is the edge peer of several rooms, each with a camera phone streaming.

eDDNN (and partition-offloading before it) plans for an edge server that several camera streams share, so the
edge's free capacity per stream shrinks as streams start. This benchmark puts K rooms (K = 1, 2, 4, 8), each a
camera phone and the server's edge peer, on one server CPU, and compares for every K:

* partition-offloading (Neurosurgeon: the phone runs the first blocks, the edge the rest; `partition_offload`);
* tilemesh as the product plans it: the camera's stream, "fastest answer" and "most frames/s" objectives
  (`plan_request {objective}`), planned by the server's `Inference` over each room's roster.

on frame latency (p50/p90, camera to label) and on the edge's CPU time per frame, with every camera keeping
`depth` frames in flight (the AR page's loop: a new frame as soon as the stream has a free slot).

It runs the product's code: the server's planner (`tilemesh.server.inference.Inference.choose`) and every
device's session (`tilemesh.runtime.session`, as browsers and the edge run it) over the fake room
(`bench/fakenet.py`), so every frame is really computed and checked against the single-device answer. What is
simulated is time: each task takes the cost model's time for its device's profile (a phone 0.5x the reference
Pyodide laptop, the edge the reference native profile; `tilemesh.planning.planner`), the edges of all rooms
share one CPU (their tasks queue there, one at a time), links are 50 Mbit/s with 5 ms latency. So the figures
are the planner's decisions played out on a fake clock, not a measurement of real devices.

    python -m bench.shared_edge [--rooms 1 2 4 8] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from bench.fakenet import FakeLink, FakeRoom
from tilemesh.planning.costmodel import task_seconds
from tilemesh.planning.planner import NATIVE_EDGE, browser_profile
from tilemesh.runtime import session as S
from tilemesh.runtime.classify import LocalClassifier
from tilemesh.runtime.profile import scaled_profile
from tilemesh.server.inference import Inference
from tilemesh.server.signaling import protocol, rooms
from tilemesh.server.signaling.ids import PeerId, ResumeToken

PHONE = browser_profile(0.5)
LINK = {"rtt_ms": 10.0, "mbps": 50.0}
# (what the camera asks the server for, whether the edge's reported profile is its speed alone or under load)
STRATEGIES = {
    "partition_offload": (protocol.PlanRequest(strategy="partition_offload"), False),
    "tilemesh (fastest answer)": (protocol.PlanRequest(objective="latency"), False),
    "tilemesh (most frames/s)": (protocol.PlanRequest(objective="throughput"), False),
    "tilemesh (most frames/s), edge re-profiled under load": (protocol.PlanRequest(objective="throughput"), True),
}


def room_of(k: int, edge_profile: dict = NATIVE_EDGE) -> tuple[rooms.Room, PeerId, PeerId]:
    """Room k: its camera phone and the server's edge peer, with profiles and links as they report them."""
    cam, edge = PeerId(f"cam{k}".ljust(12, "x")), PeerId(f"edge{k}".ljust(12, "x"))
    members = tuple(
        rooms.Member(id=pid, name=name, kind=kind, token=ResumeToken.new(), joined_at=1.0, state="ready",
                     progress=1.0, relay=kind == "edge",
                     profile={"compute": prof, "links": {other: dict(LINK)}})
        for pid, name, kind, prof, other in ((cam, f"phone {k}", "phone", PHONE, edge),
                                             (edge, "edge", "edge", edge_profile, cam)))
    return rooms.Room(id=f"room{k}".ljust(22, "x"), created_at=0.0, peers=members), cam, edge


def top5(result: dict) -> list[int]:
    return [t["index"] for t in result["top"]]


def frame(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, (n, n, 4), dtype=np.uint8).tobytes()


def run_case(classifier: LocalClassifier, bundle, request: protocol.PlanRequest, k_rooms: int, seconds: float,
             depth: int, loaded: bool = False, compute: bool = False) -> dict:
    """K rooms at once on one server CPU; every camera streams for `seconds` of fake time. `loaded`: the edge
    reports its profile as measured while the K rooms share it (1/K of its speed alone: what its drift rule's
    re-profiling reads under that load), else its speed alone. `compute`: run every task's kernels and check the
    answers (else tasks answer zeros: timing only)."""
    inference = Inference(bundle)
    edge_profile = scaled_profile(NATIVE_EDGE, 1.0 / k_rooms) if loaded else NATIVE_EDGE
    devices, cams, edges, messages = {}, [], [], []
    for k in range(k_rooms):
        room, cam, edge = room_of(k, edge_profile)
        msg = inference.choose(room, cam, request)
        messages.append(msg[0] if isinstance(msg, list) else msg)
        devices |= {cam: PHONE, edge: NATIVE_EDGE}  # the edge computes at its real speed (shared below)
        cams.append(cam)
        edges.append(edge)
    r = FakeRoom({d: S.DeviceSession(classifier, deferred=True, check_rate=0.0) for d in devices},
                 cpu=dict.fromkeys(edges, "server"), zeros=not compute,
                 task_time=lambda d, runner, task: task_seconds(runner.graph, task, devices[d]))
    for (a, b) in list(r.links):
        r.links[(a, b)] = FakeLink(latency=LINK["rtt_ms"] / 2e3, bandwidth=LINK["mbps"] * 1e6 / 8, jitter=0.0005)
    r.open_links()
    for msg in messages:
        for d in devices:
            r.fire(d, S.PlanIn(json.loads(json.dumps(protocol.plan(msg))), d))
    n = classifier.pre.resize_shorter_side
    sent: dict[tuple[str, int], bytes] = {}
    nxt = dict.fromkeys(cams, 1)
    end = r.now + seconds
    while r.now < end:
        for c in cams:
            in_flight = len(r.sessions[c].waiting)
            while in_flight < depth:
                data = frame(hash((c, nxt[c])) % 2**32, n)
                effects = r.fire(c, S.FrameIn(nxt[c], data, n, n))
                if any(isinstance(e, S.FrameFailed) and e.frame == nxt[c] for e in effects):
                    r.failed.get(c, {}).pop(nxt[c], None)
                    break
                sent[(c, nxt[c])] = data
                nxt[c] += 1
                in_flight += 1
        r.run(until=r.now + 0.005)
    done = [(c, f, res) for c in cams for f, res in r.done.get(c, {}).items() if res.get("shown", True)]
    # With `compute`, every answer is checked against the phone alone.
    wrong = sum(1 for c, f, res in done if top5(res) != top5(classifier.classify(sent[(c, f)], n, n))) \
        if compute else None
    lat = sorted(res["ms"] for _, _, res in done)
    edge_s = sum(r.cpu_seconds.get(e, 0.0) for e in edges)
    labels = sorted({m["label"] for m in messages})
    return {"rooms": k_rooms, "frames": len(done), "fps_per_camera": len(done) / seconds / k_rooms,
            "p50_ms": lat[len(lat) // 2] if lat else None, "p90_ms": lat[int(0.9 * len(lat))] if lat else None,
            "mean_ms": statistics.fmean(lat) if lat else None,
            "edge_cpu_ms_per_frame": edge_s / len(done) * 1e3 if done else None,
            "edge_busy": edge_s / seconds, "plans": labels, "wrong": wrong, "failed": sum(map(len, r.failed.values()))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rooms", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--seconds", type=float, default=10.0, help="fake seconds of streaming per case")
    ap.add_argument("--depth", type=int, default=2, help="frames each camera keeps in flight")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    from tilemesh.paths import default_static_dir  # noqa: PLC0415
    from tilemesh.server.model import default_model, prepare  # noqa: PLC0415

    bundle = prepare(default_model(default_static_dir()), default_static_dir())
    classifier = LocalClassifier.from_files(bundle.dir / "graph.json", bundle.dir / "labels.json",
                                            bundle.dir / "card.json")
    t0 = time.perf_counter()
    # The plans are the product's and run through its sessions: first a short run with real kernels, two rooms,
    # every strategy: every answer must equal the phone's own.
    for name, (req, loaded) in STRATEGIES.items():
        check = run_case(classifier, bundle, req, 2, 0.4, args.depth, loaded=loaded, compute=True)
        print(f"check, 2 rooms, {name}: {check['frames']} frames computed for real, {check['wrong']} wrong, "
              f"{check['failed']} failed", flush=True)
        if check["wrong"] or not check["frames"]:
            return 1
    results = []
    for k in args.rooms:
        for name, (req, loaded) in STRATEGIES.items():
            res = run_case(classifier, bundle, req, k, args.seconds, args.depth, loaded=loaded) | {"strategy": name}
            results.append(res)
            print(f"{k} room(s), {name}: {res['fps_per_camera']:.2f} fps/camera, p50 {res['p50_ms']:.0f} ms, "
                  f"p90 {res['p90_ms']:.0f} ms, edge CPU {res['edge_cpu_ms_per_frame']:.1f} ms/frame "
                  f"(edge busy {res['edge_busy']:.0%}); plans {res['plans']}; failed {res['failed']}", flush=True)
    print(f"\n({time.perf_counter() - t0:.0f} s real time)\n")
    print("| rooms on one edge | strategy | fps/camera | p50 ms | p90 ms | edge CPU ms/frame | "
          "p50 vs partition-offload | edge CPU vs partition-offload |")
    print("|---|---|---|---|---|---|---|---|")
    for res in results:
        base = next(b for b in results if b["rooms"] == res["rooms"] and b["strategy"] == "partition_offload")
        print(f"| {res['rooms']} | {res['strategy']} | {res['fps_per_camera']:.2f} | {res['p50_ms']:.0f} | "
              f"{res['p90_ms']:.0f} | {res['edge_cpu_ms_per_frame']:.1f} | "
              f"{base['p50_ms'] / res['p50_ms']:.2f}x | "
              f"{base['edge_cpu_ms_per_frame'] / max(res['edge_cpu_ms_per_frame'], 1e-9):.2f}x |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
