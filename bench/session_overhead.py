"""What the device session core costs per frame, against driving the plan runtime directly (CPython, one run).

    python -m bench.session_overhead [--frames 20]

Two devices (camera and one helper, the first segment split by rows, the rest on the helper) classify the same
frames two ways, interleaved frame by frame (alternating which goes first) so both see the same machine load:
(a) `peer.PlanRuntime` calls with chunks handed across directly (what the worker did before the session),
(b) `session.DeviceSession` events through the worker's dict boundary (`event_from_dict` / `effect_to_dict`,
as `room_engine.js` drives it). Prints the median milliseconds per frame of each and their ratio. In Pyodide the
boundary's conversions cost more than here; this isolates the core's own bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from tilemesh.runtime import session as S
from tilemesh.runtime.classify import LocalClassifier
from tilemesh.runtime.deps import cut_candidates
from tilemesh.runtime.peer import PlanRuntime


def plan_msg(graph, plan_id: int) -> dict:
    cuts = cut_candidates(graph)
    rows = {"devices": [["phone"], ["laptop"]], "row_shares": [1, 2], "col_shares": None}
    spec = {"plan_id": plan_id, "source": "phone", "cuts": [cuts[len(cuts) // 2]],
            "splits": [rows, {"devices": [["laptop"]], "row_shares": None, "col_shares": None}]}
    return {"plan_id": plan_id, "source": "phone", "devices": ["phone", "laptop"], "spec": spec, "timeline": {}}


def direct(runtimes: dict[str, PlanRuntime], frame: int, data: bytes) -> None:
    queue = [("phone", o["dst"], c) for o in runtimes["phone"].start_frame(frame, data, 256, 256)["out"]
             for c in o["chunks"]]
    done = False
    while queue:
        src, dst, chunk = queue.pop(0)
        res = runtimes[dst].on_chunk(src, chunk)
        queue += [(dst, o["dst"], c) for o in res["out"] for c in o["chunks"]]
        done |= bool(res["results"])
    assert done


def through_sessions(sessions: dict[str, S.DeviceSession], frame: int, data: bytes, now: float) -> None:
    def handle(device: str, event: dict) -> list[dict]:
        return [S.effect_to_dict(e) for e in sessions[device].handle(S.event_from_dict(event), now)]

    queue = [("phone", e) for e in handle("phone", {"on": "frame", "frame": frame, "data": data, "height": 256,
                                                      "width": 256})]
    done = False
    while queue:
        src, e = queue.pop(0)
        if e["do"] == "send":
            for c in e["chunks"]:
                queue += [(e["dst"], x) for x in handle(e["dst"], {"on": "chunk", "peer": src, "data": c})]
        done |= e["do"] == "frame_done"
    assert done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.session_overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--model-dir", default=None, help="a served model bundle (graph.json, labels.json, card.json)")
    args = ap.parse_args(argv)
    from tilemesh.paths import default_static_dir  # noqa: PLC0415
    from tilemesh.server.model import default_model, prepare  # noqa: PLC0415 (bench only: where setup put it)

    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        static = default_static_dir()
        model_dir = prepare(default_model(static), static).dir
    classifier = LocalClassifier.from_files(model_dir / "graph.json", model_dir / "labels.json",
                                            model_dir / "card.json")
    msg = json.loads(json.dumps(plan_msg(classifier.graph, 1)))
    runtimes = {d: PlanRuntime(classifier) for d in ("phone", "laptop")}
    sessions = {d: S.DeviceSession(classifier) for d in ("phone", "laptop")}
    for d in ("phone", "laptop"):
        runtimes[d].set_plan(msg["spec"], d, {"phone": 262144, "laptop": 262144})
        sessions[d].handle(S.LinkOpened("laptop" if d == "phone" else "phone", 262144), 0.0)
        sessions[d].handle(S.PlanIn(msg, d), 0.0)
    rng = np.random.default_rng(0)
    t_direct, t_session = [], []
    for f in range(1, args.frames + 1):
        data = rng.integers(0, 256, (256, 256, 4), dtype=np.uint8).tobytes()
        # Alternate which goes first, so neither always runs on the other's warm caches.
        order = ("direct", "session") if f % 2 else ("session", "direct")
        for name in order:
            t0 = time.perf_counter()
            if name == "direct":
                direct(runtimes, f, data)
            else:
                through_sessions(sessions, f, data, float(f))
            ms = (time.perf_counter() - t0) * 1e3
            if f > 2:  # the first frames warm caches
                (t_direct if name == "direct" else t_session).append(ms)
    a, b = statistics.median(t_direct), statistics.median(t_session)
    print(f"frames: {len(t_direct)} (after 2 warm-up), 2 devices, plan split by rows then gathered")
    print(f"plan runtime driven directly : {a:8.1f} ms/frame (median)")
    print(f"device session, dict boundary: {b:8.1f} ms/frame (median)")
    print(f"session / direct             : {b / a:8.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
