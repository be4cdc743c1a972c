"""The planner on heavy mode (the demo model at 448 px, about 4x the work): with N equal phones it splits the
frame, and its rebalancing accounts for when each phone's part of the frame arrives over the camera phone's
uplink (pure functions, no browsers)."""

from __future__ import annotations

import pytest
from test_planner import LAPTOP

from tilemesh.planning import planner as PL
from tilemesh.runtime.profile import scaled_profile


def test_rebalanced_speeds_equalise_finish_times():
    share = {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}
    busy = dict.fromkeys(share, 0.2)  # equal devices: a quarter of the frame in 200 ms each
    # Without arrivals: shares in proportion to speed = share / time, as before.
    busy2 = {**busy, "a": 0.1}
    v = PL.rebalanced_speeds(share, busy2, {})
    assert v["a"] / v["b"] == pytest.approx(2.0) and v["b"] == pytest.approx(v["c"])
    arrival = {"b": 0.03, "c": 0.06, "d": 0.09}  # the source's uplink sends b, c, d one after another
    v = PL.rebalanced_speeds(share, busy, arrival)
    new = {d: x / sum(v.values()) for d, x in v.items()}
    finish = {d: arrival.get(d, 0.0) + new[d] * busy[d] / share[d] for d in share}
    assert max(finish.values()) - min(finish.values()) < 1e-9
    assert new["a"] > new["b"] > new["c"] > new["d"]
    assert max(finish.values()) < 0.2 + 0.09  # better than equal shares (the last one done at 0.29 s)
    # A device whose input would come after everyone is done keeps a small positive share, never zero.
    assert min(PL.rebalanced_speeds(share, busy, {"d": 5.0}).values()) > 0


@pytest.fixture(scope="module")
def heavy(demo_model_dir):
    from tilemesh.runtime.graph import load_onnx

    return load_onnx(demo_model_dir / "mobilenet_v2.onnx", input_shape=(1, 3, 448, 448))


def test_heavy_mode_splits_across_equal_phones(heavy):
    """Equal phones on equal 50 Mbit/s links: the planner splits heavy frames and predicts lower latency with
    every phone added; the camera phone (its pixels already there) takes at least an equal share."""
    phone = scaled_profile(LAPTOP, 1.0)
    link = {"*": {"rtt_ms": 4.0, "mbps": 50.0}}
    alone = PL.make_plan("single", heavy, {"p0": phone}, link, "p0").predicted_s
    last = alone
    for n in (2, 3, 4):
        profiles = {f"p{i}": phone for i in range(n)}
        choice = PL.make_plan("tilemesh", heavy, profiles, link, "p0")
        assert len(choice.plan.devices) >= 2, choice.label  # never the source alone
        assert choice.predicted_s <= last
        last = choice.predicted_s
        macs = {d: v["macs"] for d, v in choice.prediction.to_dict()["devices"].items()}
        assert macs["p0"] >= max(macs.values()) * 0.97, (choice.label, macs)
    assert alone / last > 1.5
