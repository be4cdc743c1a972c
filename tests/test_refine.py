"""Learned allocation (`tilemesh.planning.refine`): scripted frame reports against the real planner and cost model.

A device's measured compute under a plan is what the plan predicted for it times (its true speed relative to its
reported profile) / (the correction the plan was made with): the profiles scale every term, so this is exact for
the cost model's compute. Noise is multiplicative and seeded."""

from __future__ import annotations

import random

import pytest
from test_planner import LAPTOP, room

from tilemesh.planning import planner as PL
from tilemesh.planning import refine as R
from tilemesh.runtime.profile import predict_graph_seconds, scaled_profile


@pytest.fixture(scope="module")
def g(demo_graph):
    return demo_graph


def links_of(devices, mbps=200.0, rtt=4.0, **override):
    out = {(a, b): {"rtt_ms": rtt, "mbps": mbps} for a in devices for b in devices if a != b}
    for k, v in override.items():
        a, b = k.split("_")
        out[(a, b)] = {"rtt_ms": rtt, "mbps": v}
    return out


def run_frames(g, picture, reported, truth, links, true_links=None, strategy="tilemesh", frames=12, noise=0.1,
               rng=None, plan_id0=1, now0=0.0, dt=1.0):
    """Plan with the corrected picture, run `frames` scripted reports; returns (picture, plans, replans)."""
    rng = rng or random.Random(0)
    plans, replans = [], []
    plan_id = plan_id0
    now = now0

    def plan():
        nonlocal plan_id
        prof, lk = R.corrected(reported, links, picture)
        ch = PL.make_plan(strategy, g, prof, lk, "a")
        devs = ch.prediction.to_dict()["devices"]
        pred = {d: v["compute_s"] for d, v in devs.items() if v.get("compute_s")}
        plans.append((plan_id, ch))
        return R.planned(picture, plan_id, "a", reported, lk, pred), ch, pred

    picture, ch, pred = plan()
    members = set(reported)
    for _ in range(frames):
        now += dt
        plan_pic = picture.plans[plan_id]
        for d in sorted(members):
            p = pred.get(d, 0.0)
            measured = p * truth[d] / plan_pic.factors[d] * rng.uniform(1 - noise, 1 + noise)
            rx = {}
            for (a, b), mbps in (true_links or {}).items():
                if b == d:
                    rx[a] = {"bytes": 600_000, "seconds": 600_000 * 8 / 1e6 / mbps * rng.uniform(1 - noise, 1 + noise)}
            picture = R.observe(picture, plan_id, d, measured, reported[d], rx)
        picture, why = R.replan_due(picture, plan_id, reported, now)
        if why:
            replans.append((now, why))
            plan_id += 1
            picture, ch, pred = plan()
    return picture, plans, replans


def whole_ms(g, reported, picture):
    prof, _ = R.corrected(reported, {}, picture)
    return {d: predict_graph_seconds(p, g) * 1e3 for d, p in prof.items()}


def test_equal_phones_profiled_3x_apart_converge_to_equal(g):
    """Three equal phones; b profiled 3x too slow, c 1.5x too fast (each profiled while others booted). Frames
    under a plan that uses all three (equal split) teach the server the truth: corrected, all three predict the
    whole model within 10% of each other, and the planner then gives b a full share."""
    reported = {"a": LAPTOP, "b": scaled_profile(LAPTOP, 1 / 3), "c": scaled_profile(LAPTOP, 1.5)}
    truth = {"a": 1.0, "b": 1 / 3, "c": 1.5}  # true time / reported time
    before = whole_ms(g, reported, R.Picture())
    assert max(before.values()) / min(before.values()) == pytest.approx(4.5, rel=0.01)
    picture, _, _ = run_frames(g, R.Picture(), reported, truth, links_of("abc"), strategy="equal_split")
    after = whole_ms(g, reported, picture)
    assert max(after.values()) / min(after.values()) < 1.1, after
    prof, lk = R.corrected(reported, links_of("abc"), picture)
    ch = PL.make_plan("tilemesh", g, prof, lk, "a")
    shares = {d: v["compute_s"] for d, v in ch.prediction.to_dict()["devices"].items()}
    naive = PL.make_plan("tilemesh", g, reported, links_of("abc"), "a")
    assert "b" in shares and shares["b"] > 0.5 * shares["a"], shares  # b now carries its share
    assert ch.predicted_s < naive.predicted_s * 1.05  # and the corrected plan is no worse by its own model


def test_a_slow_link_is_learned_and_replans_once(g):
    """The probe read a->b at 200 Mbit/s; frames move the frame input at 8 Mbit/s. After `MIN_SAMPLES` reports the
    link's figure is the measured one, one replan is due (the reason names the link), and the next plan is made
    with it."""
    reported = room(a=1.0, b=1.0)
    links = links_of("ab")
    picture, plans, replans = run_frames(g, R.Picture(), reported, {"a": 1.0, "b": 1.0}, links,
                                         true_links={("a", "b"): 8.0, ("b", "a"): 8.0}, strategy="offload",
                                         frames=20)
    assert R.link_mbps(picture, "a", "b") == pytest.approx(8.0, rel=0.15)
    assert len(replans) == 1 and "link a->b" in replans[0][1], replans
    _, lk = R.corrected(reported, links, picture)
    assert lk[("a", "b")]["mbps"] == pytest.approx(8.0, rel=0.15) and lk[("a", "b")]["rtt_ms"] == 4.0
    assert plans[-1][0] == 2


def test_noise_never_replans_and_a_real_change_replans_once(g):
    """Truthful profiles with +-20% noise per report: 200 frames, no replan. Then b becomes 2x slower (a
    background app): one replan once a window of reports has seen it, none after."""
    reported = room(a=1.0, b=1.0, c=1.0)
    links = links_of("abc")
    rng = random.Random(7)
    picture, plans, replans = run_frames(g, R.Picture(), reported, {"a": 1.0, "b": 1.0, "c": 1.0}, links,
                                         strategy="equal_split", frames=200, noise=0.2, rng=rng)
    assert replans == []
    picture, plans2, replans2 = run_frames(g, picture, reported, {"a": 1.0, "b": 2.0, "c": 1.0}, links,
                                           strategy="equal_split", frames=60, noise=0.2, rng=rng,
                                           plan_id0=plans[-1][0], now0=200.0)
    assert len(replans2) == 1 and replans2[0][0] <= 200.0 + R.WINDOW and "b computes at" in replans2[0][1], replans2
    assert R.factor(picture, "b", R.fingerprint(reported["b"])) == pytest.approx(2.0, rel=0.15)


def test_a_new_profile_restarts_the_correction_and_bad_reports_are_ignored(g):
    reported = room(a=1.0, b=1.0)
    picture, _, _ = run_frames(g, R.Picture(), reported, {"a": 1.0, "b": 3.0}, links_of("ab"),
                               strategy="equal_split", frames=8, noise=0.0)
    assert R.factor(picture, "b", R.fingerprint(reported["b"])) == pytest.approx(3.0, rel=0.05)
    fresh = scaled_profile(LAPTOP, 1 / 3)  # b measured itself again: its new profile is the truth
    assert R.factor(picture, "b", R.fingerprint(fresh)) == 1.0
    # reports against the old plan (made with b's old profile) do not teach anything about the new one
    pid = max(picture.plans)
    again = R.observe(picture, pid, "b", 1.0, fresh)
    assert again.compute["b"] == picture.compute["b"]
    # unknown plans, zero or malformed figures change nothing
    assert R.observe(picture, 999, "b", 1.0, reported["b"]) == picture
    assert R.observe(picture, pid, "b", 0.0, reported["b"], {"a": {"bytes": "x"}, "c": {}}) == picture
    # the factor stays within its bound whatever comes
    wild = picture
    for _ in range(10):
        wild = R.observe(wild, pid, "b", 1e6, reported["b"])
    assert R.factor(wild, "b", R.fingerprint(reported["b"])) == pytest.approx(R.BOUND[1])


def test_a_device_measuring_itself_again_keeps_what_frames_taught(g):
    """The edge profiled alone reads 5 ms; under frames it takes 12 (it shares the machine). It re-profiles (drift)
    and reads 4 ms again: the learned truth carries over, rescaled to the new profile, instead of starting again
    (and, with no whole-model figures to rescale by, it starts again)."""
    old = room(e=1.0)["e"]
    new = scaled_profile(old, 1.25)  # its second profile reads 1.25x faster
    t_old, t_new = predict_graph_seconds(old, g), predict_graph_seconds(new, g)
    pic = R.planned(R.Picture(), 1, "a", {"e": old}, {}, {"e": 0.005}, model_s={"e": t_old})
    for _ in range(R.MIN_SAMPLES):
        pic = R.observe(pic, 1, "e", 0.012, old, model_s=t_old)
    assert R.factor(pic, "e", R.fingerprint(old), t_old) == pytest.approx(2.4)
    assert R.factor(pic, "e", R.fingerprint(new), t_new) == pytest.approx(2.4 * 1.25)
    assert R.factor(pic, "e", R.fingerprint(new)) == 1.0
    prof, _ = R.corrected({"e": new}, {}, pic, {"e": t_new})
    assert predict_graph_seconds(prof["e"], g) == pytest.approx(2.4 * t_old)  # the same true speed
