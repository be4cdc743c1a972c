"""Wrong results: how soon each kind of liar is caught, how many wrong answers the user sees first, false
convictions across engines, and what each check costs, over the fake room.

    python -m bench.verify [--model FILE.onnx] [--trials 3] [--frames 20]

The room is `bench.faults`'s (camera phone, laptop, tablet; three segments: rows over all three, rows over laptop
and tablet, the head on the tablet; fake clock, compute timed from MACs). The laptop lies, in one of these ways,
on every tile its engine returns (its outputs and the overlap regions it computes, unless said otherwise):

- random: every value replaced by noise of the tile's mean and spread;
- zeros: every value 0;
- scale 1.01 / scale 1.1: every value multiplied (a subtly wrong engine);
- one channel: channel 0 of every tensor shifted by 1.0 (class 0's score, for logits);
- 10% of frames: noise as "random", in a random tenth of the frames;
- interior only: +0.25 on its output tiles, while the overlap regions it computes (what the checks compare) stay
  honest: an adversary that knows the check.

Each liar runs under three settings: spot checks alone at 5% (the code before overlap checks), overlap checks +
spot checks at 5% (the default), and the same with the first frame of every plan audited (`audit_first`).
"Wrong" counts shown answers whose top-1 differs from single-device inference; "off" those whose top-5 indices or
probabilities (> 1e-4) differ. A trial stops at the liar's conviction (or after `--frames`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from bench.faults import DEVICES, RATE, Bench, plan3
from tilemesh.runtime import overlap
from tilemesh.runtime import recovery as R
from tilemesh.runtime.classify import LocalClassifier
from tilemesh.runtime.peer import plan_from_spec

KINDS = ("random", "zeros", "scale 1.01", "scale 1.1", "one channel", "10% of frames", "interior only")
MODES = (("spot checks 5%", dict(overlap=False, audit_first=False)),
         ("overlap + spot 5% (default)", dict(overlap=True, audit_first="uncovered")),
         ("overlap + spot 5% + every first frame audited", dict(overlap=True, audit_first=True)))
# Offload: the frame whole on the laptop. No two devices compute the same cells, so no overlap check exists; the
# default audits the first frame of such a plan (audit_first="uncovered").
OFFLOAD_MODES = (("spot checks 5%", dict(overlap=True, audit_first=False)),
                 ("spot 5% + first frame audited (default)", dict(overlap=True, audit_first="uncovered")))


def offload(predicted_ms=None, plan_id=3):
    spec = {"plan_id": plan_id, "source": "phone", "cuts": [],
            "splits": [{"devices": [["laptop"]], "row_shares": None, "col_shares": None}]}
    msg = {"plan_id": plan_id, "source": "phone", "devices": ["phone", "laptop"], "spec": spec, "timeline": {}}
    if predicted_ms is not None:
        msg["predicted_ms"] = predicted_ms
    return msg


class Liar:
    """A tamper function for `FakeRoom.tamper`: corrupts what the device's engine returns. The bench sets
    `frame` before each frame (frames run one at a time)."""

    def __init__(self, kind: str, seed: int, checked: set[str]):
        self.kind, self.seed, self.checked, self.frame = kind, seed, checked, 0
        self.rng = np.random.default_rng(seed)

    def lies_now(self) -> bool:
        if self.kind != "10% of frames":
            return True
        return np.random.default_rng((self.seed, self.frame)).random() < 0.1

    def corrupt(self, v: np.ndarray) -> np.ndarray:
        k = self.kind
        if k in ("random", "10% of frames"):
            return (self.rng.standard_normal(v.shape) * float(v.std()) + float(v.mean())).astype(v.dtype)
        if k == "zeros":
            return np.zeros_like(v)
        if k.startswith("scale"):
            return (v * np.float32(float(k.split()[1]))).astype(v.dtype)
        if k == "one channel":
            w = v.copy()
            w[:, 0] += np.float32(1.0)
            return w
        return (v + np.float32(0.25)).astype(v.dtype)

    def __call__(self, outputs: dict) -> dict:
        if not self.lies_now():
            return outputs
        return {k: self.corrupt(v) if v.ndim in (2, 4) and not (self.kind == "interior only" and k in self.checked)
                else v for k, v in outputs.items()}


def checked_tensors(b: Bench, msg) -> set[str]:
    plan = plan_from_spec(b.g, msg["spec"])
    return {c.tensor for c in overlap.checks(b.g, plan)}


def liar_table(b: Bench, trials: int, frames: int, msg=None, modes=MODES, kinds=KINDS) -> list[str]:
    msg = msg or plan3(b.g, predicted_ms=100)
    checked = checked_tensors(b, msg)
    lines = ["| liar | checks | caught (of trials) | frames to conviction, median | wrong top-1 shown before | "
             "answers off shown before | honest devices convicted |", "|---|---|---|---|---|---|---|"]
    for kind in kinds:
        for mode, kw in modes:
            caught, when, wrong, off, false = 0, [], [], [], 0
            for trial in range(trials):
                r = b.room(msg, check_rate=R.CHECK_RATE, seed=200 + trial, **kw)
                liar = Liar(kind, 1000 + trial, checked)
                r.tamper["laptop"] = liar
                n_wrong = n_off = 0
                for f in range(1, frames + 1):
                    liar.frame = f
                    _, _, _, right, is_off = b.run_frame(r, f, 500 + 7 * trial + f)
                    n_wrong += not right
                    n_off += is_off
                    excluded = set(r.sessions["phone"].excluded)
                    false += len(excluded - {"laptop"})
                    if "laptop" in excluded:
                        caught += 1
                        when.append(f)
                        break
                wrong.append(n_wrong)
                off.append(n_off)
            lines.append(f"| {kind} | {mode} | {caught}/{trials} within {frames} | "
                         f"{statistics.median(when) if when else '-'} | {sum(wrong) / trials:.1f} | "
                         f"{sum(off) / trials:.1f} | {false} |")
    return lines


def engines_table(b: Bench, frames: int) -> list[str]:
    """Honest rooms of mixed engines (numpy kernels, native onnxruntime): the largest digest difference seen
    against the tolerance, and any mismatch, audit or conviction (all must be none)."""
    from tilemesh.runtime.backend import OnnxRuntimeBackend

    msg = plan3(b.g, predicted_ms=100)
    ort = OnnxRuntimeBackend(b.g)
    lines = ["| honest room (engines) | pairs compared | largest digest difference / tolerance "
             f"({overlap.DIGEST_RTOL:g}) | overlap mismatches | audits | convictions | every answer right |",
             "|---|---|---|---|---|---|---|"]
    for label, backends in (("all numpy", {}), ("laptop on onnxruntime", {"laptop": ort}),
                            ("laptop + tablet on onnxruntime", {"laptop": ort, "tablet": ort}),
                            ("phone on onnxruntime", {"phone": ort})):
        r = b.room(msg, check_rate=R.CHECK_RATE, seed=7, backends=backends)
        right = True
        for f in range(1, frames + 1):
            _, _, _, ok, _ = b.run_frame(r, f, 700 + f)
            right = right and ok
        phone = r.sessions["phone"]
        run = phone.runtime.runners[msg["plan_id"]]
        audits = sum(1 for d, n in r.notices if n.what == "audit")
        lines.append(f"| {label} | {run.digest_pairs} | {run.digest_max_err:.2e} "
                     f"({run.digest_max_err / overlap.DIGEST_RTOL:.3f}x) | {phone.faults['overlap_mismatches']} | "
                     f"{audits} | {phone.faults['caught']} | {'yes' if right else 'NO'} |")
    return lines


def cost_table(b: Bench, frames: int) -> list[str]:
    """What each check costs in an honest room: bytes and messages on the wire, digest time, latency."""
    msg = plan3(b.g, predicted_ms=100)
    plan = plan_from_spec(b.g, msg["spec"])
    checks = overlap.checks(b.g, plan)
    lines = []
    # Overlap checks: bytes and messages per frame, extra engine output, digest time on this machine.
    r_off = b.room(msg, overlap=False, seed=9)
    r_on = b.room(msg, overlap=True, seed=9)
    lat = {}
    for name, r in (("off", r_off), ("on", r_on)):
        lat[name] = [b.run_frame(r, f, 800 + f)[1] for f in range(1, frames + 1)]
    sent = sum(run.digest_bytes for s in r_on.sessions.values() for run in s.runtime.runners.values())
    msgs = sum(run.digests_sent for s in r_on.sessions.values() for run in s.runtime.runners.values())
    extra = sum(2 * 4 * b.g.shapes[c.tensor][1] * c.region.area for c in checks)  # both devices' copies
    # digest time: every check's region digested twice (both devices), native numpy here
    region = {c: np.random.default_rng(0).standard_normal((1, b.g.shapes[c.tensor][1], c.region.rows,
                                                           c.region.cols)).astype(np.float32) for c in checks}
    t0 = time.perf_counter()
    reps = 50
    for _ in range(reps):
        for c in checks:
            overlap.digest(region[c])
            overlap.digest(region[c])
    digest_ms = (time.perf_counter() - t0) / reps * 1e3
    # the devices' own task compute on the same kernels, for scale
    from tilemesh.runtime.tiling import simulate

    x = np.random.default_rng(1).standard_normal(tuple(b.g.shapes[b.g.input])).astype(np.float32)
    t0 = time.perf_counter()
    simulate(b.g, plan, x)
    tasks_ms = (time.perf_counter() - t0) * 1e3
    held = r_on.sessions["phone"].faults["held_for_digests"]
    named = ", ".join(f"seg {c.segment} {c.devices[0]}/{c.devices[1]} {c.tensor} {c.region.rows}x{c.region.cols}"
                      for c in checks)
    lines += [f"overlap checks: {len(checks)} per frame in this plan ({named})",
              f"- wire: {sent / frames:.0f} bytes and {msgs / frames:.1f} messages per frame to the phone "
              f"(tensor payload between devices: {_link_bytes(r_off) / frames:.0f} bytes per frame without checks)",
              f"- engines hand out {extra / 1e3:.1f} kB more per frame (both copies of each overlap region)",
              f"- digests: {digest_ms:.2f} ms per frame on native numpy here, against {tasks_ms:.0f} ms for the "
              f"frame's tasks on the same numpy kernels ({100 * digest_ms / tasks_ms:.2f}%)",
              f"- frames held for a digest after their answer: {held} of {frames}; modelled latency with / without: "
              f"{statistics.median(lat['on']) / statistics.median(lat['off']):.3f}x "
              f"({statistics.median(lat['on']):.0f} vs {statistics.median(lat['off']):.0f} ms)"]
    # Spot checks at the default rate, and audits.
    r_spot = b.room(msg, check_rate=R.CHECK_RATE, overlap=False, seed=9)
    spot = [b.run_frame(r_spot, f, 800 + f)[1] for f in range(1, frames + 1)]
    r_aud = b.room(msg, audit_first=True, overlap=False, seed=9)
    aud = [b.run_frame(r_aud, f, 800 + f)[1] for f in range(1, frames + 1)]
    off = offload(predicted_ms=100)
    r_off1, r_off2 = b.room(off, audit_first=False, seed=9), b.room(off, audit_first="uncovered", seed=9)
    o1 = [b.run_frame(r_off1, f, 800 + f)[1] for f in range(1, frames + 1)]
    o2 = [b.run_frame(r_off2, f, 800 + f)[1] for f in range(1, frames + 1)]
    base = statistics.median(lat["off"])
    spot_ratio = statistics.mean(spot) / statistics.mean(lat["off"])
    lines += [f"spot checks at {R.CHECK_RATE:.2f}: mean modelled latency {spot_ratio:.3f}x no checks over {frames} "
              f"frames ({r_spot.reference_runs.get('phone', 0)} reference runs on the phone, "
              f"{r_spot.sessions['phone'].faults['checks']} pieces checked)",
              f"audit of a plan's first frame (audit_first): that frame {aud[0] / base:.2f}x a normal frame "
              f"({aud[0]:.0f} vs {base:.0f} ms), later frames {statistics.median(aud[1:]) / base:.2f}x",
              f"offload plan (the frame whole on the laptop): its first frame audited "
              f"{o2[0] / statistics.median(o1):.2f}x a normal frame ({o2[0]:.0f} vs {statistics.median(o1):.0f} ms; "
              f"the phone alone "
              f"{b.model_macs * RATE['phone'] * 1e3:.0f} ms), later frames "
              f"{statistics.median(o2[1:]) / statistics.median(o1[1:]):.2f}x"]
    return lines


def _link_bytes(r) -> float:
    return float(sum(n.detail["report"].get("bytes_sent", 0) for _, n in r.notices if n.what == "timings"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="ONNX or compact .json model (default: the demo model from setup)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--only", choices=("liars", "offload", "engines", "cost"), help="one table")
    args = ap.parse_args(argv)
    from tilemesh.planning.planner import cli_graph

    graph = cli_graph(args.model)
    b = Bench(LocalClassifier(graph, [str(i) for i in range(graph.shapes[graph.output][-1])]))
    print(f"room: {', '.join(DEVICES)} at {', '.join(f'{1 / RATE[d] / 1e9:.1f}' for d in DEVICES)} GMAC/s; "
          f"the laptop lies")
    if args.only in (None, "cost"):
        print("\n".join(cost_table(b, args.frames)), "\n")
    if args.only in (None, "engines"):
        print("\n".join(engines_table(b, args.frames)), "\n")
    if args.only in (None, "liars"):
        print("\n".join(liar_table(b, args.trials, args.frames)), "\n")
    if args.only in (None, "offload"):
        print("offload plan: the frame whole on the laptop (no overlap to check)")
        print("\n".join(liar_table(b, args.trials, args.frames, offload(predicted_ms=100), OFFLOAD_MODES,
                                   ("random", "scale 1.01", "10% of frames"))))


if __name__ == "__main__":
    main()
