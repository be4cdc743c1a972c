"""Faults within a frame, measured over the fake room: recovery time per fault, the latency spike against a
normal frame, and the detection rate and cost of result checks.

    python -m bench.faults [--model FILE.onnx] [--trials 6] [--frames 30]

A room of three device sessions (`bench/fakenet.py`): the camera phone, a laptop and a tablet, 2 ms / 50 Mbit/s
links, each device's compute timed on the fake clock from its task's multiply-accumulates (phone 0.3, laptop 1,
tablet 0.5 GMAC/s: roughly a phone, a laptop and a tablet on onnxruntime-web). The plan is the tests' three-
segment one (rows over all three, rows over laptop and tablet, the head on the tablet), its prediction set to
the measured normal frame. Every frame's answer is compared with single-device inference.

Rescues on the numpy kernels run inline on the phone and take no fake time, so each faulted frame's latency is
shown measured on the fake clock and "modelled": plus the phone's numpy rescue MACs at its numpy speed
(NUMPY_SLOWDOWN times slower than its engine: Pyodide numpy against onnxruntime-web, README Compute engines). A
reference run on the phone's engine (the whole model keeping every block boundary's tensor) takes fake time: a
whole model at the phone's engine speed. Each fault is measured with rescues on the engine (the product) and
with every rescue on numpy (the code before it), in one run.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from bench.fakenet import FakeRoom
from tilemesh.runtime import recovery as R
from tilemesh.runtime import session as S
from tilemesh.runtime.classify import LocalClassifier
from tilemesh.runtime.deps import cut_candidates
from tilemesh.runtime.regions import Region

DEVICES = ("phone", "laptop", "tablet")
RATE = {"phone": 1 / 0.3e9, "laptop": 1 / 1e9, "tablet": 1 / 0.5e9}
# onnxruntime-web is 5.6x Pyodide numpy on the whole demo model (README, Compute engines: 25.7 vs 143 ms).
NUMPY_SLOWDOWN = 5.6


def plan3(graph, predicted_ms=None, plan_id=3):
    cuts = cut_candidates(graph)
    spec = {"plan_id": plan_id, "source": "phone", "cuts": [cuts[len(cuts) // 3], cuts[2 * len(cuts) // 3]],
            "splits": [{"devices": [["phone"], ["laptop"], ["tablet"]], "row_shares": [1, 1, 1], "col_shares": None},
                       {"devices": [["laptop"], ["tablet"]], "row_shares": [1, 1], "col_shares": None},
                       {"devices": [["tablet"]], "row_shares": None, "col_shares": None}]}
    msg = {"plan_id": plan_id, "source": "phone", "devices": list(DEVICES), "spec": spec, "timeline": {}}
    if predicted_ms is not None:
        msg["predicted_ms"] = predicted_ms
    return msg


def frame(seed):
    return np.random.default_rng(seed).integers(0, 256, (256, 256, 4), dtype=np.uint8).tobytes()


class Bench:
    def __init__(self, classifier):
        self.c = classifier
        self.g = classifier.graph
        self.model_macs = R.rescue_macs(self.g, R.Transfer("tablet", "phone", self.g.output, Region(0, 1, 0, 1)))
        self.refs: dict[int, list] = {}

    def ref(self, seed):
        if seed not in self.refs:
            self.refs[seed] = self.c.classify(frame(seed), 256, 256)["top"]
        return self.refs[seed]

    def room(self, msg, check_rate=0.0, seed=0, tick=0.02, engine=True, audit_first=False, overlap=True,
             backends=None):
        """`engine`: the phone rescues on reference runs of its engine where they pay (else every rescue on numpy);
        its profile says what each engine takes for the whole model. `overlap`: overlap cross-checks on;
        `backends`: a device's compute backend (default numpy), e.g. onnxruntime for a room of mixed engines."""
        sessions = {d: S.DeviceSession(self.c, deferred=True, check_rate=check_rate, seed=seed * 10 + i,
                                       audit_first=audit_first)
                    for i, d in enumerate(DEVICES)}
        for sess in sessions.values():
            sess.runtime.overlap_checks = overlap
        r = FakeRoom(sessions, seed=seed, tick=tick, backends=dict(backends or {}))
        for link in r.links.values():
            link.latency, link.bandwidth, link.jitter = 0.002, 50e6 / 8, 0.0005
        r.sec_per_mac.update(RATE)
        r.open_links()
        alone = self.model_macs * RATE["phone"] * 1e3
        r.fire("phone", S.Profiled({"engines": {"ort-wasm": alone, "numpy": alone * NUMPY_SLOWDOWN}}))
        sessions["phone"].runtime.reference_ok = engine
        for d in DEVICES:
            r.fire(d, S.PlanIn(msg, d))
        return r

    def run_frame(self, r, f, seed, fault=None, span=None):
        """One frame; `fault(r)` is applied at a fifth of the normal latency. Returns (fake ms, modelled ms, rescue
        MACs on the phone, right answer?, off?) where off means any top-5 probability differs by > 1e-4."""
        phone = r.sessions["phone"]
        macs0 = phone.faults["rescue_macs"]
        t0 = r.now
        r.fire("phone", S.FrameIn(f, frame(seed), 256, 256))
        if fault is not None:
            r.run(until=t0 + 0.2 * span)
            fault(r)
        r.run(until=t0 + 5.0)
        res = r.done.get("phone", {}).get(f)
        macs = phone.faults["rescue_macs"] - macs0
        if res is None:
            return None, None, macs, False, True
        ref = self.ref(seed)
        right = res["top"][0]["index"] == ref[0]["index"]
        off = [t["index"] for t in res["top"]] != [t["index"] for t in ref] or max(
            abs(a["p"] - b["p"]) for a, b in zip(res["top"], ref, strict=True)) > 1e-4
        return res["ms"], res["ms"] + macs * RATE["phone"] * NUMPY_SLOWDOWN * 1e3, macs, right, off


def recovery_table(b: Bench) -> list[str]:
    probe = b.room(plan3(b.g))
    normal = [b.run_frame(probe, f, 100 + f)[0] for f in range(1, 6)]
    span_ms = statistics.median(normal)
    msg = plan3(b.g, predicted_ms=span_ms)
    bound = R.stall_bound(msg)
    alone_ms = b.model_macs * RATE["phone"] * 1e3
    lines = [f"normal frame (3 devices, fake clock): {span_ms:.1f} ms median of 5; the phone alone would take "
             f"{alone_ms:.1f} ms on its engine, {alone_ms * NUMPY_SLOWDOWN:.0f} ms on numpy",
             f"stall bound: {bound * 1e3:.0f} ms (3x predicted, 0.3-2 s); a missing piece of level k of n is asked "
             f"for after bound + k x min({R.LEVEL_STEP_S * 1e3:.0f} ms, bound / n)", "",
             "| fault | rescues on | faulted frame ms (fake) | modelled ms (+ numpy rescue on phone) | spike vs normal "
             "| numpy rescue MACs / model | reference runs | next frame ms (modelled) | all frames right |",
             "|---|---|---|---|---|---|---|---|---|"]

    def leave(r):
        r.leave("laptop")

    def cut(r):
        r.cut("laptop")

    def slow(r):
        r.sec_per_mac["laptop"] = RATE["laptop"] * 20

    for name, fault, at_start in (("laptop leaves mid-frame (peer_left)", leave, False),
                                  ("laptop's network cut mid-frame (silent)", cut, False),
                                  ("laptop 20x slower (straggler)", slow, True),
                                  ("tablet leaves mid-frame (holds the head)", lambda r: r.leave("tablet"), False)):
        for engine in (True, False):
            r = b.room(msg, seed=1, engine=engine)
            for f in (1, 2):
                b.run_frame(r, f, 200 + f)
            if at_start:
                fault(r)
            ms, modelled, macs, right, off = b.run_frame(r, 3, 203, None if at_start else fault, span_ms / 1e3)
            runs = r.reference_runs.get("phone", 0)
            nxt = b.run_frame(r, 4, 204)
            ok = right and nxt[3] and not off and not nxt[4]
            lines.append(f"| {name} | {'engine' if engine else 'numpy'} | {ms:.1f} | {modelled:.1f} | "
                         f"{modelled / span_ms:.2f}x | {macs / b.model_macs:.2f} | {runs} | {nxt[1]:.1f} | "
                         f"{'yes' if ok else 'NO'} |")
    return lines


def detection_table(b: Bench, trials: int, frames: int) -> list[str]:
    """Spot checks alone (overlap cross-checks off: `bench.verify` measures them)."""
    msg = plan3(b.g, predicted_ms=100)
    # What one spot check costs the phone, on average over the pieces each device may pick (expected value).
    r = b.room(msg)
    per_check = []
    for d, sess in r.sessions.items():
        run = sess.runtime.runner
        pieces = [t for t in run.incoming.values() if t.src not in (run.source, d)]
        if pieces:
            per_check.append(statistics.mean(R.rescue_macs(b.g, t) for t in pieces) / b.model_macs)
    expected = sum(per_check)
    lines = [f"one spot check costs the phone {min(per_check):.2f}-{max(per_check):.2f} of a whole-model inference "
             f"(the receptive field of the piece checked); expected cost per frame = rate x {expected:.2f}", "",
             "| check rate | caught in (of trials) | frames to conviction, median | frames with a wrong top-1 "
             "before | frames off (top-5 p > 1e-4) before | expected check MACs per frame / model | honest room, "
             "12 frames: numpy check MACs / model, reference runs per frame, modelled latency vs no checks |",
             "|---|---|---|---|---|---|---|"]
    base = None
    for rate in (0.0, 0.02, 0.05, 0.1, 0.25):
        # Honest room: what checks cost.
        r = b.room(msg, check_rate=rate, seed=5, overlap=False)
        lat, macs = [], 0
        for f in range(1, 13):
            ms, modelled, m, right, off = b.run_frame(r, f, 300 + f)
            lat.append(modelled)
            macs += m
            assert right and not off, f"honest room gave a wrong answer at rate {rate}"
        refs = r.reference_runs.get("phone", 0)
        med = statistics.median(lat)
        base = med if base is None else base
        if rate == 0.0:
            continue
        caught, when, wrong, offs = 0, [], [], []
        for trial in range(trials):
            r = b.room(msg, check_rate=rate, seed=100 + trial, overlap=False)
            r.tamper["laptop"] = lambda out: {k: (v + np.float32(0.25)).astype(v.dtype) if v.ndim == 4 else v
                                              for k, v in out.items()}
            n_wrong = n_off = 0
            for f in range(1, frames + 1):
                _, _, _, right, off = b.run_frame(r, f, 400 + f)
                n_wrong += not right
                n_off += off
                if r.sessions["phone"].excluded:
                    caught += 1
                    when.append(f)
                    break
            wrong.append(n_wrong)
            offs.append(n_off)
        lines.append(f"| {rate:.2f} | {caught}/{trials} within {frames} frames | "
                     f"{statistics.median(when) if when else '-'} | {sum(wrong) / trials:.1f} | "
                     f"{sum(offs) / trials:.1f} | {rate * expected:.3f} | {macs / 12 / b.model_macs:.2f}, "
                     f"{refs / 12:.2f}, {med / base:.2f}x |")
    return lines


def first_frame_table(b: Bench, trials: int, frames: int, rate: float = R.CHECK_RATE) -> list[str]:
    """The option `DeviceSession(audit_first=True)`: every plan's first frame audited, beside spot checks at
    `rate`; a liar wrong from the start, and one that turns at frame 5 (which the option cannot see)."""
    msg = plan3(b.g, predicted_ms=100)
    lines = [f"first frame of each plan audited (audit_first), spot checks at {rate:.2f}:", "",
             "| liar | caught (of trials) | frames to conviction, median | wrong top-1 frames before | honest room: "
             "first frame vs normal, later frames vs no audit |", "|---|---|---|---|---|"]
    r0 = b.room(msg, check_rate=rate, seed=5, overlap=False)
    r1 = b.room(msg, check_rate=rate, seed=5, audit_first=True, overlap=False)
    plain = [b.run_frame(r0, f, 300 + f)[1] for f in range(1, 13)]
    audited = [b.run_frame(r1, f, 300 + f)[1] for f in range(1, 13)]
    cost = (f"{audited[0] / statistics.median(plain):.2f}x, "
            f"{statistics.median(audited[1:]) / statistics.median(plain[1:]):.2f}x")
    for start in (1, 5):
        caught, when, wrong = 0, [], []
        for trial in range(trials):
            r = b.room(msg, check_rate=rate, seed=100 + trial, audit_first=True, overlap=False)
            n_wrong = 0
            for f in range(1, frames + 1):
                if f == start:
                    r.tamper["laptop"] = lambda out: {k: (v + np.float32(0.25)).astype(v.dtype) if v.ndim == 4
                                                      else v for k, v in out.items()}
                n_wrong += not b.run_frame(r, f, 400 + f)[3]
                if r.sessions["phone"].excluded:
                    caught += 1
                    when.append(f)
                    break
            wrong.append(n_wrong)
        lines.append(f"| wrong from frame {start} | {caught}/{trials} within {frames} frames | "
                     f"{statistics.median(when) if when else '-'} | {sum(wrong) / trials:.1f} | {cost} |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="ONNX or compact .json model (default: the demo model from setup)")
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--frames", type=int, default=30)
    args = ap.parse_args(argv)
    from tilemesh.planning.planner import cli_graph

    graph = cli_graph(args.model)
    classifier = LocalClassifier(graph, [str(i) for i in range(graph.shapes[graph.output][-1])])
    b = Bench(classifier)
    print("\n".join(recovery_table(b)))
    print()
    print("\n".join(detection_table(b, args.trials, args.frames)))
    print()
    print("\n".join(first_frame_table(b, args.trials, args.frames)))


if __name__ == "__main__":
    main()
