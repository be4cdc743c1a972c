"""The planner and the baseline strategies on the real MobileNetV2 with fixed synthetic profiles:
placement cases as plain unit tests, the fast search against the cost model on built plans, and
every produced plan executed exactly (tiling.simulate == executor.run_graph)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_tiling import SETTINGS, random_cnn, to_graph

from tilemesh.planning import planner as PL
from tilemesh.planning.costmodel import predict_plan
from tilemesh.runtime.deps import ELEMENTWISE_OPS, cut_candidates, live_tensors
from tilemesh.runtime.executor import run_graph
from tilemesh.runtime.profile import scaled_profile
from tilemesh.runtime.tiling import build_plan, simulate

REPO = Path(__file__).resolve().parents[1]

# A laptop in Pyodide, roughly; an edge peer runs native numpy, ~10x faster overall.
LAPTOP = {
    "version": 1,
    "sec_per_mac": {"conv_dense": 2e-9, "conv_pointwise": 3e-10, "conv_depthwise": 1e-9,
                    "elementwise": 3e-10, "gemm": 3e-10},
    "overhead_s": 3e-5,
    "chain_factor": 1.0,
}
WIFI = {"*": {"rtt_ms": 4.0, "mbps": 200.0}}
SLOW = {"*": {"rtt_ms": 50.0, "mbps": 1.0}}


def room(**speeds):
    return {d: scaled_profile(LAPTOP, s) for d, s in speeds.items()}


@pytest.fixture(scope="module")
def g(demo_graph):
    return demo_graph


def predicted(strategy, g, profiles, links, source, edge=None):
    return PL.make_plan(strategy, g, profiles, links, source, edge).predicted_s


def _area_share(plan, tensor):
    part = plan.owners[tensor]
    total = sum(r.area for r in part.values())
    return {d: r.area / total for d, r in part.items()}


# --------------------------------------------------------------------------- graph structure


def test_block_cuts_and_fusions(g):
    cuts = PL.block_cuts(g)
    assert cuts[0] == 2 and cuts[-1] == PL.head_start(g) == 97 and len(cuts) == 19  # 19 blocks, then the head
    # Found from the structure alone, they are exactly where torchvision's module names change (`features.N`
    # -> `features.N+1`) at a single-tensor cut: the names serve here as the oracle, never in the planner.
    named = [k for k in cut_candidates(g)
             if k <= PL.head_start(g) and g.nodes[k].name.split(".")[:2] != g.nodes[k - 1].name.split(".")[:2]]
    assert cuts == named
    pair = PL.fusion_cuts(g, "pair")
    assert set(pair) <= set(cuts) and pair[-1] == cuts[-1] and len(cuts) // 2 <= len(pair) < len(cuts)
    stage = PL.fusion_cuts(g, "stage")
    assert set(stage) <= set(pair)
    # One segment per resolution: 112, 56, 28, 14, 7.
    assert [g.shapes[g.nodes[k - 1].output][2] for k in stage] == [112, 56, 28, 14, 7]
    assert PL.fixed_grid_depth(g) == 33  # end of the 28x28 stage
    with pytest.raises(ValueError):
        PL.fusion_cuts(g, "nope")


# --------------------------------------------------------------------------- placement cases


def test_heterogeneous_shares_follow_speed_and_beat_equal_split(g):
    profs = room(a=1.0, b=0.5, c=0.25)
    # margin 0: the search itself, without the preference for fewer devices (tested below).
    ch = PL.plan_frame(g, profs, WIFI, "a", {"margin": 0})
    first = ch.plan.segments[0].outputs[0]
    share = _area_share(ch.plan, first)
    assert set(share) == {"a", "b", "c"}
    assert share["a"] > share["b"] > share["c"] > 0.05
    assert share["a"] / share["c"] > 2.5  # speeds are 4:1; halo overhead pulls it in a little
    eq = predicted("equal_split", g, profs, WIFI, "a")
    single = predicted("single", g, profs, WIFI, "a")
    assert ch.predicted_s < 0.8 * eq
    assert ch.predicted_s < single


def test_rebalancing_evens_out_the_split_phase(g):
    profs = room(a=1.0, b=0.5, c=0.25)
    ch = PL.plan_frame(g, profs, WIFI, "a", {"margin": 0})
    pred = ch.prediction
    split_segs = {t.segment for t in ch.plan.tasks if t.device == "c"}
    busy = {d: sum(i.end - i.start for i in pred.timeline[d] if i.kind == "compute" and i.segment in split_segs)
            for d in ("a", "b", "c")}
    assert max(busy.values()) / min(busy.values()) < 1.35


def test_a_thin_predicted_gain_does_not_recruit_more_devices(g):
    """The cost model's error in browsers exceeds an 8% gain: then the plan with fewer devices is kept."""
    profs = room(a=1.0, b=0.5, c=0.25)
    tight = PL.plan_frame(g, profs, WIFI, "a", {"margin": 0})
    kept = PL.plan_frame(g, profs, WIFI, "a")
    single = predicted("single", g, profs, WIFI, "a")
    assert tight.predicted_s < single < tight.predicted_s * (1 + PL.MARGIN)
    assert PL.spec_devices(PL.Spec("", "", tuple(kept.cuts), tuple(kept.splits))) == {"a"}
    assert kept.predicted_s == pytest.approx(single)


def test_equal_devices_on_wifi_split_the_frame(g):
    profs = room(p0=1.0, p1=1.0, p2=1.0, p3=1.0)
    ch = PL.plan_frame(g, profs, WIFI, "p0")
    assert len(ch.plan.devices) == 4
    assert ch.predicted_s < 0.75 * predicted("single", g, profs, WIFI, "p0")


def test_slow_links_keep_the_work_on_the_source(g):
    profs = room(a=1.0, b=1.0, c=1.0, d=1.0)
    ch = PL.plan_frame(g, profs, SLOW, "a")
    assert ch.plan.devices == ["a"]
    assert ch.prediction.bytes_sent == {}
    assert ch.predicted_s == pytest.approx(predicted("single", g, profs, SLOW, "a"))
    # Even a 2x faster peer does not pay for 150 kB at 1 Mbit/s.
    ch2 = PL.plan_frame(g, room(a=1.0, b=2.0), SLOW, "a")
    assert ch2.plan.devices == ["a"]


def test_one_device_is_single(g):
    ch = PL.plan_frame(g, room(solo=0.5), WIFI, "solo")
    assert ch.plan.devices == ["solo"] and len(ch.plan.segments) == 1
    for strategy in PL.STRATEGIES:
        other = PL.make_plan(strategy, g, room(solo=0.5), WIFI, "solo")
        assert other.plan.devices == ["solo"]
        assert other.predicted_s == pytest.approx(ch.predicted_s)


def test_fast_edge_on_fast_link_is_offload_like(g):
    profs = room(phone=0.5, phone2=0.5, edge=20.0)
    ch = PL.plan_frame(g, profs, {"*": {"rtt_ms": 2.0, "mbps": 400.0}}, "phone", {"edge": "edge"})
    macs = ch.prediction.macs
    assert macs["edge"] > 0.9 * sum(macs.values())
    assert ch.predicted_s <= predicted("offload", g, profs, WIFI, "phone", "edge") + 1e-12
    assert ch.prediction.source_compute_s < 0.1 * predicted("single", g, profs, WIFI, "phone")


def test_slow_source_sends_the_frame_away(g):
    # The camera phone is 8x slower than a laptop next to it: its compute should mostly move.
    profs = room(phone=0.125, laptop=1.0)
    ch = PL.plan_frame(g, profs, WIFI, "phone")
    assert ch.prediction.macs.get("laptop", 0) > 0.7 * sum(ch.prediction.macs.values())


def test_a_hopeless_device_is_left_out(g):
    profs = room(a=1.0, b=1.0, crawl=0.01)
    ch = PL.plan_frame(g, profs, WIFI, "a")
    assert "crawl" not in ch.plan.devices
    assert set(ch.plan.devices) == {"a", "b"}


SCENARIOS = {
    "equal4": (dict(p0=1.0, p1=1.0, p2=1.0, p3=1.0), WIFI, "p0", None),
    "hetero3": (dict(a=1.0, b=0.5, c=0.25), WIFI, "a", None),
    "edge": (dict(phone=0.5, lap=1.0, edge=10.0), WIFI, "phone", "edge"),
    "slowsource": (dict(phone=0.25, lap=1.0, lap2=0.8), WIFI, "phone", None),
    "slowlinks": (dict(a=1.0, b=1.0, c=2.0), SLOW, "a", None),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_never_worse_than_any_single_device_or_baseline(g, name):
    speeds, links, source, edge = SCENARIOS[name]
    profs = room(**speeds)
    best = PL.plan_frame(g, profs, links, source, {"edge": edge})
    for dev in profs:
        plan = build_plan(g, [], [PL.Split.whole(dev)], source)
        assert best.predicted_s <= predict_plan(g, plan, profs, links, source).total_s + 1e-12
    for strategy in PL.STRATEGIES:
        assert best.predicted_s <= predicted(strategy, g, profs, links, source, edge) + 1e-12, strategy


@pytest.mark.parametrize("name", ["equal4", "hetero3", "edge"])
def test_search_estimates_equal_the_cost_model_on_built_plans(g, name):
    speeds, links, source, edge = SCENARIOS[name]
    profs = room(**speeds)
    est = PL.search(g, profs, links, source, {"edge": edge})
    # The best few, and a spread over the rest (all families), built and predicted from scratch.
    sample = est[:5] + est[5::max(1, len(est) // 25)]
    sample += [next(e for e in est if e.spec.strategy == s) for s in {e.spec.strategy for e in est}]
    assert {e.spec.strategy for e in sample} >= {"tilemesh", "single", "offload", "partition_offload"}
    for e in sample:
        plan = build_plan(g, list(e.spec.cuts), list(e.spec.splits), source)
        assert predict_plan(g, plan, profs, links, source).total_s == pytest.approx(e.predicted_s, rel=1e-9), \
            e.spec.label


@pytest.mark.parametrize("name", ["hetero3", "edge"])
def test_search_counts_the_fixed_costs_like_the_cost_model(g, name):
    """With a per-task cost (an engine call and copies) and the camera device's per-frame work in the profiles,
    the search's fast estimates still equal predict_plan on the built plans, and every plan pays the frame work."""
    speeds, links, source, edge = SCENARIOS[name]
    profs = {d: {**p, "task_s": 2e-3 / speeds[d], "frame_s": 6e-3 / speeds[d]} for d, p in room(**speeds).items()}
    est = PL.search(g, profs, links, source, {"edge": edge})
    sample = est[:5] + est[5::max(1, len(est) // 15)]
    sample += [next(e for e in est if e.spec.strategy == s) for s in {e.spec.strategy for e in est}]
    bare = room(**speeds)
    for e in sample:
        plan = build_plan(g, list(e.spec.cuts), list(e.spec.splits), source)
        pred = predict_plan(g, plan, profs, links, source)
        assert pred.total_s == pytest.approx(e.predicted_s, rel=1e-9), e.spec.label
        # Never cheaper than the same plan without fixed costs plus the source's frame work.
        floor = predict_plan(g, plan, bare, links, source).total_s + profs[source]["frame_s"]
        assert pred.total_s >= floor - 1e-12, e.spec.label


def test_partition_offload_picks_its_best_split_point(g):
    profs = room(phone=0.5, edge=4.0)
    slowish = {"*": {"rtt_ms": 20.0, "mbps": 20.0}}
    po = PL.make_plan("partition_offload", g, profs, slowish, "phone", "edge")
    assert po.predicted_s <= predicted("offload", g, profs, slowish, "phone", "edge") + 1e-12
    assert po.predicted_s <= predicted("single", g, profs, slowish, "phone") + 1e-12
    assert po.candidates[0]["predicted_s"] == pytest.approx(po.predicted_s)
    assert all(c["predicted_s"] >= po.predicted_s - 1e-12 for c in po.candidates)


def test_baseline_shapes(g):
    profs = room(a=1.0, b=0.6, c=0.5, d=0.25)
    eq = PL.make_plan("equal_split", g, profs, WIFI, "a")
    assert eq.cuts == PL.block_cuts(g)
    spatial = [s for s in eq.splits if len(s.devices) > 1]
    assert len(spatial) == 19 and all(set(s.row_shares) == {1.0} for s in spatial)
    fg = PL.make_plan("fixed_grid", g, profs, WIFI, "a", edge="b")
    assert fg.cuts == [33] and fg.splits[0].devices == (("a", "b"), ("c", "d"))
    assert fg.splits[1].devices == (("b",),)
    fg3 = PL.make_plan("fixed_grid", g, room(a=1.0, b=1.0, c=1.0), WIFI, "a")
    assert len(fg3.splits[0].devices) == 3  # rows when there are not 4 devices
    off = PL.make_plan("offload", g, profs, WIFI, "a")
    assert off.plan.owners[g.output] == {"b": off.plan.owners[g.output]["b"]}  # fastest other device
    with pytest.raises(ValueError):
        PL.make_plan("magic", g, profs, WIFI, "a")
    with pytest.raises(ValueError):
        PL.plan_frame(g, profs, WIFI, "nobody")
    with pytest.raises(ValueError, match="'b'"):
        PL.plan_frame(g, {**profs, "b": {"version": 1}}, WIFI, "a")


def test_planning_four_devices_is_fast(g):
    # CPU time, not wall time: the planner is single-threaded Python and the test machine is shared.
    profs = room(a=1.0, b=0.7, c=0.5, d=0.3)
    t0 = time.process_time()
    PL.plan_frame(g, profs, WIFI, "a")
    assert time.process_time() - t0 < 1.0


# --------------------------------------------------------------------------- exact execution


@pytest.fixture(scope="module")
def reference(g):
    x = np.random.default_rng(7).standard_normal(g.shapes[g.input]).astype(np.float32)
    return x, run_graph(g, x)


def test_every_plan_executes_exactly(g, reference):
    x, want = reference
    seen = set()
    for speeds, links, source, edge in SCENARIOS.values():
        profs = room(**speeds)
        for strategy in PL.STRATEGIES:
            ch = PL.make_plan(strategy, g, profs, links, source, edge)
            key = json.dumps(ch.plan.to_dict(), sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            got = simulate(g, ch.plan, x)
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"{strategy}: {ch.label}")
    assert len(seen) >= 12


def test_plan_choice_json_roundtrip(g, reference):
    x, want = reference
    profs = room(a=1.0, b=0.5, c=0.25)
    ch = PL.plan_frame(g, profs, WIFI, "a")
    text = json.dumps(ch.to_dict(), allow_nan=False)
    back = PL.PlanChoice.from_dict(json.loads(text))
    assert back.to_dict() == ch.to_dict()
    assert back.plan.to_dict() == ch.plan.to_dict()
    assert predict_plan(g, back.plan, profs, WIFI, "a").total_s == pytest.approx(ch.predicted_s, rel=1e-12)
    np.testing.assert_allclose(simulate(g, back.plan, x, roundtrip_json=True), want, atol=1e-4, rtol=0)


def test_cli_prints_every_strategy(g, tmp_path, capsys):
    from tilemesh.runtime.graph import save_compact

    json_path, _ = save_compact(g, tmp_path / "model")
    assert PL.main(["--model", str(json_path), "--devices", "cam:0.5,lap:1,srv:native", "--edge", "srv",
                    "--rtt", "4", "--mbps", "200"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.startswith("  ")}
    assert set(rows) == set(PL.STRATEGIES)
    assert rows["tilemesh"] <= min(rows.values())
    assert rows["offload"] < rows["single"]  # the native edge is far faster than a Pyodide phone


def test_large_rooms_cap_the_split(g):
    profs = {f"d{i}": scaled_profile(LAPTOP, 1.0 - 0.05 * i) for i in range(10)}
    est = PL.search(g, profs, WIFI, "d0", {"max_devices": 3, "fusions": ("block",)})
    split_sizes = {len(e.spec.splits[0].devices) * len(e.spec.splits[0].devices[0])
                   for e in est if e.spec.strategy == "tilemesh"}
    assert split_sizes and max(split_sizes) <= 3


# --------------------------------------------------------------------------- random CNNs


def _renamed(graph, seed: int):
    """The same graph with every node and tensor renamed at random (and weights under new keys)."""
    import dataclasses
    import random

    rng = random.Random(seed)
    tensors = [graph.input, *(n.output for n in graph.nodes)]
    names = {t: f"t{rng.randrange(10**9)}_{i}" for i, t in enumerate(tensors)}
    params = {k: f"w{rng.randrange(10**9)}_{i}" for i, k in enumerate(graph.weights)}
    nodes = [dataclasses.replace(n, name=f"n{rng.randrange(10**9)}", output=names[n.output],
                                 inputs=tuple(names[t] for t in n.inputs), params=tuple(params[p] for p in n.params))
             for n in graph.nodes]
    return dataclasses.replace(graph, nodes=nodes, input=names[graph.input], output=names[graph.output],
                               shapes={names[t]: graph.shapes[t] for t in tensors},
                               weights={params[k]: v for k, v in graph.weights.items()})


@SETTINGS
@given(data=st.data())
def test_block_cuts_of_random_cnns_come_from_structure(data):
    graph = to_graph(data.draw(random_cnn()))
    cuts = PL.block_cuts(graph)
    head = PL.head_start(graph)
    assert cuts == sorted(set(cuts))
    for k in cuts:
        assert 0 < k <= head and len(live_tensors(graph, k)) == 1
        # Never between an activation and its producer.
        node = graph.nodes[k]
        assert not (node.op in ELEMENTWISE_OPS and tuple(node.inputs) == (graph.nodes[k - 1].output,)
                    and graph.shapes[node.output] == graph.shapes[graph.nodes[k - 1].output])
    # Names play no part: the same graph under random names has the same cuts, fusions and baselines.
    other = _renamed(graph, data.draw(st.integers(0, 2**31)))
    assert PL.block_cuts(other) == cuts
    for mode in PL.FUSIONS:
        assert PL.fusion_cuts(other, mode) == PL.fusion_cuts(graph, mode)
        assert set(PL.fusion_cuts(graph, mode)) <= set(cuts)


@SETTINGS
@given(data=st.data())
def test_planner_on_random_cnns_is_exact_and_never_worse_than_a_strategy(data):
    graph = to_graph(data.draw(random_cnn()))
    speeds = data.draw(st.lists(st.sampled_from([0.1, 0.25, 0.5, 1.0, 2.0, 8.0]), min_size=1, max_size=4))
    profs = {f"d{i}": scaled_profile(LAPTOP, s) for i, s in enumerate(speeds)}
    links = data.draw(st.sampled_from([WIFI, SLOW]))
    edge = data.draw(st.sampled_from([None, *profs]))
    x = np.random.default_rng(1).standard_normal(graph.shapes[graph.input]).astype(np.float32)
    want = run_graph(graph, x)
    best = PL.plan_frame(graph, profs, links, "d0", {"edge": edge, "margin": 0})
    np.testing.assert_allclose(simulate(graph, best.plan, x), want, atol=1e-4, rtol=1e-4)
    for strategy in PL.STRATEGIES:
        ch = PL.make_plan(strategy, graph, profs, links, "d0", edge)
        assert best.predicted_s <= ch.predicted_s + 1e-12, strategy
        np.testing.assert_allclose(simulate(graph, ch.plan, x), want, atol=1e-4, rtol=1e-4, err_msg=strategy)


def test_a_graph_without_block_boundaries_still_plans():
    from tilemesh.runtime.graph import Graph, Node

    rng = np.random.default_rng(0)
    w = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "b": np.zeros(4, np.float32)}
    node = Node("only", "Conv", ("x",), "y", {"kernel": (3, 3), "strides": (1, 1), "pads": (1, 1, 1, 1),
                                              "dilations": (1, 1), "group": 1}, ("w", "b"))
    graph = Graph([node], "x", "y", {"x": (1, 3, 8, 8), "y": (1, 4, 8, 8)}, w)
    assert PL.block_cuts(graph) == []
    profs = room(a=1.0, b=2.0)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    for strategy in PL.STRATEGIES:
        ch = PL.make_plan(strategy, graph, profs, WIFI, "a")
        np.testing.assert_allclose(simulate(graph, ch.plan, x), run_graph(graph, x), atol=1e-5, err_msg=strategy)
