"""The cost model on the real MobileNetV2 with fixed (synthetic) profiles, so every number is exact:
single-device sums, offload arithmetic, uint8 input, serialized uplinks, waits, redundant halo
compute, link lookup and the JSON form of a prediction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tilemesh.planning import costmodel as C
from tilemesh.runtime.profile import predict_graph_seconds, scaled_profile
from tilemesh.runtime.tiling import Split, build_plan

REPO = Path(__file__).resolve().parents[1]

# Roughly a laptop running Pyodide numpy: ~3 GMAC/s pointwise, ~1 depthwise.
SYNTH = {
    "version": 1,
    "sec_per_mac": {"conv_dense": 2e-9, "conv_pointwise": 3e-10, "conv_depthwise": 1e-9,
                    "elementwise": 3e-10, "gemm": 3e-10},
    "overhead_s": 3e-5,
    "chain_factor": 1.0,
}


@pytest.fixture(scope="module")
def g(demo_graph):
    return demo_graph


def profiles(*names, speeds=None):
    speeds = speeds or [1.0] * len(names)
    return {n: scaled_profile(SYNTH, s) for n, s in zip(names, speeds, strict=True)}


FAST = {"*": {"rtt_ms": 2.0, "mbps": 400.0}}


def _check_timeline(pred):
    for dev, ivs in pred.timeline.items():
        for kind in ("compute", "send"):
            xs = sorted((i for i in ivs if i.kind == kind), key=lambda i: i.start)
            for a, b in zip(xs, xs[1:], strict=False):
                assert a.end <= b.start + 1e-12, f"{dev}: overlapping {kind} intervals {a} {b}"
        comp = [i for i in ivs if i.kind == "compute"]
        assert [i.segment for i in comp] == sorted(i.segment for i in comp)
        assert sum(i.end - i.start for i in comp) == pytest.approx(pred.compute_s.get(dev, 0.0), abs=1e-12)
        assert pred.finish_s.get(dev, 0.0) <= pred.total_s + 1e-12


def test_fixed_costs_per_task_and_per_frame(g):
    """`task_s` is paid once per task, `frame_s` once per frame on the source before anything leaves it."""
    prof = {**SYNTH, "task_s": 0.004, "frame_s": 0.010}
    one = build_plan(g, [], [Split.whole("a")], "a")
    pred = C.predict_plan(g, one, {"a": prof}, {}, "a")
    assert pred.total_s == pytest.approx(predict_graph_seconds(SYNTH, g) + 0.004 + 0.010, rel=1e-12)
    assert pred.compute_s["a"] == pytest.approx(predict_graph_seconds(SYNTH, g) + 0.004, rel=1e-12)
    # Three segments on the source: three task costs, one frame cost.
    from tilemesh.runtime.deps import cut_candidates

    cuts = cut_candidates(g)
    three = build_plan(g, [cuts[3], cuts[8]], [Split.whole("a")] * 3, "a")
    assert C.predict_plan(g, three, {"a": prof}, {}, "a").total_s == pytest.approx(
        predict_graph_seconds(SYNTH, g) + 3 * 0.004 + 0.010, rel=1e-9)
    # Offloading: the frame work comes first on the source, then the input leaves; the phone's own
    # task cost is not paid (it computes nothing), the edge's is.
    off = build_plan(g, [], [Split.whole("e")], "a")
    edge = {**SYNTH, "task_s": 0.001}
    bare = C.predict_plan(g, off, {"a": SYNTH, "e": SYNTH}, FAST, "a").total_s
    assert C.predict_plan(g, off, {"a": prof, "e": edge}, FAST, "a").total_s == pytest.approx(bare + 0.010 + 0.001)
    first_send = min(i.start for i in C.predict_plan(g, off, {"a": prof, "e": edge}, FAST, "a").timeline["a"]
                     if i.kind == "send")
    assert first_send == pytest.approx(0.010)


def test_single_device_is_the_sum_of_node_times(g):
    plan = build_plan(g, [], [Split.whole("a")], "a")
    pred = C.predict_plan(g, plan, profiles("a"), {}, "a")
    assert pred.total_s == pytest.approx(predict_graph_seconds(SYNTH, g), rel=1e-12)
    assert pred.source_compute_s == pytest.approx(pred.total_s)
    assert pred.bytes_sent == {}
    assert [i.kind for i in pred.timeline["a"]] == ["compute"]
    assert pred.macs["a"] == sum(plan.full_macs)


def test_offload_arithmetic_with_uint8_input(g):
    links = {("a", "x"): {"rtt_ms": 10.0, "mbps": 80.0}}  # 10 MB/s, 5 ms one way
    plan = build_plan(g, [], [Split.whole("x")], "a")
    pred = C.predict_plan(g, plan, profiles("a", "x", speeds=[1.0, 4.0]), links, "a")
    in_bytes = 224 * 224 * 3  # uint8 RGB, not float32
    assert pred.bytes_sent == {"a": in_bytes, "x": 1000 * 4}
    compute = predict_graph_seconds(SYNTH, g) / 4
    expect = (in_bytes / 10e6 + 0.005) + compute + (4000 / 10e6 + 0.005)
    assert pred.total_s == pytest.approx(expect, rel=1e-12)
    assert pred.source_compute_s == 0.0
    wait = [i for i in pred.timeline["x"] if i.kind == "wait"]
    assert len(wait) == 1 and wait[0].start == 0.0
    assert wait[0].end == pytest.approx(in_bytes / 10e6 + 0.005)
    _check_timeline(pred)


def test_link_lookup():
    links = {("a", "b"): {"rtt_ms": 10, "mbps": 8}, "c|d": {"rtt_ms": 4, "mbps": 16}, "*": {"rtt_ms": 2, "mbps": 80}}
    assert C.link_params(links, "a", "b") == (0.005, 1e6)
    assert C.link_params(links, "b", "a") == (0.005, 1e6)  # symmetric by default
    assert C.link_params({("b", "a"): {"rtt_ms": 1, "mbps": 8}, ("a", "b"): {"rtt_ms": 3, "mbps": 8}},
                         "a", "b")[0] == 0.0015  # an explicit direction wins
    assert C.link_params(links, "d", "c") == (0.002, 2e6)
    assert C.link_params(links, "a", "z") == (0.001, 1e7)
    assert C.link_params({}, "a", "z") == (C.DEFAULT_LINK["rtt_ms"] / 2000, C.DEFAULT_LINK["mbps"] * 1e6 / 8)
    assert C.link_params({}, "a", "a") == (0.0, float("inf"))
    with pytest.raises(ValueError):
        C.link_params({("a", "b"): {"rtt_ms": 1, "mbps": 0}}, "a", "b")


def _fused_rows_plan(g, devs, source):
    return build_plan(g, [97], [Split.rows(dict.fromkeys(devs, 1.0)), Split.whole(source)], source)


def test_uplink_sends_are_serialized(g):
    plan = _fused_rows_plan(g, ["a", "b", "c", "d"], "a")
    slow = {"*": {"rtt_ms": 1.0, "mbps": 8.0}}  # 1 MB/s: the input pieces take ~40 ms each
    pred = C.predict_plan(g, plan, profiles("a", "b", "c", "d"), slow, "a")
    sends = [i for i in pred.timeline["a"] if i.kind == "send"]
    assert [i.peer for i in sends[:3]] == ["b", "c", "d"]
    # One radio: the third piece leaves only after the first two are out.
    assert sends[1].start == pytest.approx(sends[0].end) and sends[2].start == pytest.approx(sends[1].end)
    for s in sends:
        assert s.end - s.start == pytest.approx(s.nbytes / 1e6)
    first = {d: next(i for i in pred.timeline[d] if i.kind == "compute").start for d in "bcd"}
    assert first["b"] < first["c"] < first["d"]
    assert first["d"] >= sends[2].end
    _check_timeline(pred)


def test_faster_links_and_devices_never_predict_slower(g):
    plan = build_plan(g, [33, 97], [Split.rows({"a": 2, "b": 1, "c": 1}), Split.whole("a"), Split.whole("a")], "a")
    base = C.predict_plan(g, plan, profiles("a", "b", "c"), FAST, "a").total_s
    faster_link = C.predict_plan(g, plan, profiles("a", "b", "c"), {"*": {"rtt_ms": 1.0, "mbps": 800.0}}, "a")
    faster_bc = C.predict_plan(g, plan, profiles("a", "b", "c", speeds=[1, 2, 2]), FAST, "a")
    faster_a = C.predict_plan(g, plan, profiles("a", "b", "c", speeds=[2, 1, 1]), FAST, "a")
    assert faster_link.total_s <= base and faster_bc.total_s <= base
    # a holds half the split and the whole tail: it is the critical path, b and c idle at the end.
    assert faster_a.total_s < base
    assert faster_bc.finish_s["b"] < C.predict_plan(g, plan, profiles("a", "b", "c"), FAST, "a").finish_s["b"]
    slow = C.predict_plan(g, plan, profiles("a", "b", "c"), {"*": {"rtt_ms": 50.0, "mbps": 1.0}}, "a")
    assert slow.total_s > 1.0  # 1 Mbit/s: the halo pieces alone take seconds


def test_redundant_halo_compute_is_charged(g):
    plan = _fused_rows_plan(g, ["a", "b", "c", "d"], "a")
    pred = C.predict_plan(g, plan, profiles("a", "b", "c", "d"), FAST, "a")
    single = predict_graph_seconds(SYNTH, g)
    # Fusing all 17 blocks into one tile stack recomputes most of the frame on every device.
    assert sum(pred.compute_s.values()) > 1.5 * single
    assert sum(pred.macs.values()) == sum(t.macs for t in plan.tasks) > sum(plan.full_macs)
    stats = plan.stats(g)
    assert stats[0]["redundant_pct"] > 50
    _check_timeline(pred)


def test_tasks_wait_for_their_pieces(g):
    plan = build_plan(g, [10, 97], [Split.rows({"a": 1, "b": 1})] * 2 + [Split.whole("a")], "a")
    profs = profiles("a", "b", speeds=[1.0, 0.25])  # b is slow: a must wait for its halo
    pred = C.predict_plan(g, plan, profs, FAST, "a")
    waits = [i for i in pred.timeline["a"] if i.kind == "wait"]
    assert waits and waits[0].segment == 1
    b_first = next(i for i in pred.timeline["b"] if i.kind == "compute")
    assert waits[0].end > b_first.end  # a resumes only after b's segment-0 tile (and its halo) is done
    _check_timeline(pred)


def test_per_transfer_cost_option(g):
    plan = build_plan(g, [], [Split.whole("x")], "a")
    profs = profiles("a", "x")
    base = C.predict_plan(g, plan, profs, FAST, "a").total_s
    more = C.predict_plan(g, plan, profs, FAST, "a", {"per_transfer_s": 0.01}).total_s
    assert more == pytest.approx(base + 0.02)  # input in, logits out
    other = C.predict_plan(g, plan, profs, {}, "a", {"default_link": {"rtt_ms": 100, "mbps": 400}}).total_s
    assert other == pytest.approx(base + 0.098)


def test_missing_profile_is_an_error(g):
    plan = build_plan(g, [], [Split.whole("x")], "a")
    with pytest.raises(ValueError, match="no profile"):
        C.predict_plan(g, plan, profiles("a"), FAST, "a")


def test_prediction_json_roundtrip_and_text_timeline(g):
    plan = build_plan(g, [33, 97], [Split.grid([["a", "b"], ["c", "d"]]), Split.whole("b"), Split.whole("b")], "a")
    pred = C.predict_plan(g, plan, profiles("a", "b", "c", "d", speeds=[1, 2, 1, 1]), FAST, "a")
    d = json.loads(json.dumps(pred.to_dict(), allow_nan=False))
    back = C.Prediction.from_dict(d)
    assert back.to_dict() == pred.to_dict()
    in_bytes = sum(t.region.area * 3 for t in plan.input_send)
    halo_bytes = sum(t.nbytes(g) for t in plan.tasks if t.device == "a" for t in t.send)
    assert d["devices"]["a"]["bytes_sent"] == in_bytes + halo_bytes
    assert d["devices"]["b"]["macs"] > d["devices"]["a"]["macs"]  # b runs the gathered tail
    text = C.format_timeline(pred)
    assert len(text.splitlines()) == 4 and "#" in text and ">" in text
