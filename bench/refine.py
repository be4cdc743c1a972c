"""Learned allocation on scripted frame reports: how often noise replans, how fast a real change does.

    .venv/bin/python -m bench.refine [--seeds 30] [--noise 0.2]

Three equal devices on the demo model, planned by the real planner with equal splits (every device computes), each
frame report carrying the device's compute: what the plan predicted for it x its true speed against its profile /
the correction the plan was made with x uniform noise (+-`noise`). Per seed: 200 reports of truthful profiles (any
replan is a false one), then one device turns 2x slower for 60 reports (one replan is right, more is flapping),
and a room whose middle phone was profiled 3x too slow (how many reports until the corrected profiles agree
within 10%). A simulation of the rules in `tilemesh.planning.refine`, not a measurement of browsers.
"""

from __future__ import annotations

import argparse
import random
import statistics

from tilemesh.planning import planner as PL
from tilemesh.planning import refine as R
from tilemesh.runtime.profile import predict_graph_seconds, scaled_profile

BASE = {"version": 1, "sec_per_mac": {"conv_dense": 2e-10, "conv_pointwise": 6e-11, "conv_depthwise": 3e-10,
                                      "elementwise": 2e-9, "gemm": 6e-11},
        "overhead_s": 3e-7, "chain_factor": 1.0, "task_s": 2e-5}


def links(devices):
    return {(a, b): {"rtt_ms": 4.0, "mbps": 200.0} for a in devices for b in devices if a != b}


def run(g, picture, reported, truth, frames, noise, rng, plan_id, now):
    lk = links(reported)
    replans = []

    def plan(pid):
        prof, fixed = R.corrected(reported, lk, picture)
        ch = PL.make_plan("equal_split", g, prof, fixed, "a")
        pred = {d: v["compute_s"] for d, v in ch.prediction.to_dict()["devices"].items() if v.get("compute_s")}
        return R.planned(picture, pid, "a", reported, fixed, pred), pred

    picture, pred = plan(plan_id)
    for _ in range(frames):
        now += 1.0
        made = picture.plans[plan_id]
        for d, p in pred.items():
            picture = R.observe(picture, plan_id, d, p * truth[d] / made.factors[d] * rng.uniform(1 - noise, 1 + noise),
                                reported[d])
        picture, why = R.replan_due(picture, plan_id, reported, now)
        if why:
            replans.append(why)
            plan_id += 1
            picture, pred = plan(plan_id)
    return picture, replans, plan_id, now


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.refine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--noise", type=float, default=0.2)
    args = ap.parse_args(argv)
    from tilemesh.paths import default_static_dir  # noqa: PLC0415
    from tilemesh.runtime.graph import load_onnx  # noqa: PLC0415
    from tilemesh.server.model import default_model  # noqa: PLC0415

    g = load_onnx(default_model(default_static_dir()))
    equal = {d: BASE for d in "abc"}
    false, after_change, converge = 0, [], []
    for seed in range(args.seeds):
        rng = random.Random(seed)
        pic, rep, pid, now = run(g, R.Picture(), equal, dict.fromkeys("abc", 1.0), 200, args.noise, rng, 1, 0.0)
        false += len(rep)
        _, rep2, _, _ = run(g, pic, equal, {"a": 1.0, "b": 2.0, "c": 1.0}, 60, args.noise, rng, pid + 1, now)
        after_change.append(len(rep2))
        skewed = {"a": BASE, "b": scaled_profile(BASE, 1 / 3), "c": BASE}
        pic = R.Picture()
        for k in range(1, 41):
            pic, _, _, _ = run(g, pic, skewed, {"a": 1.0, "b": 1 / 3, "c": 1.0}, 1, args.noise, rng, 1000 + k, k)
            prof, _ = R.corrected(skewed, {}, pic)
            ms = [predict_graph_seconds(p, g) for p in prof.values()]
            if max(ms) / min(ms) < 1.1:
                converge.append(k)
                break
        else:
            converge.append(None)
    n = args.seeds
    print(f"{n} seeds, noise +-{args.noise:.0%} per report, 3 equal devices, equal-split plans (every device computes)")
    print(f"  false replans: {false} in {n} x 200 reports x 3 devices")
    print(f"  one device 2x slower for 60 reports: exactly one replan in {after_change.count(1)}/{n}, "
          f"two or more in {sum(1 for x in after_change if x > 1)}/{n}, none in {after_change.count(0)}/{n}")
    got = [k for k in converge if k is not None]
    print(f"  a phone profiled 3x too slow: corrected within 10% of the others after a median of "
          f"{statistics.median(got) if got else float('nan'):.0f} reports (max {max(got) if got else 'n/a'}); "
          f"not within 40 reports in {converge.count(None)}/{n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
