"""Server-side planning from a room's roster: who counts as a device, which links, what the plan message holds."""

from __future__ import annotations

import json

import pytest

from tilemesh.planning import planner
from tilemesh.runtime import graph as graph_mod
from tilemesh.runtime.profile import measure_profile, scaled_profile
from tilemesh.server import inference
from tilemesh.server.signaling import protocol, rooms
from tilemesh.server.signaling.ids import PeerId, ResumeToken


def peer(pid: str, kind="phone", state="ready", profile=None, detached=None) -> rooms.Member:
    return rooms.Member(id=PeerId(pid), name=pid, kind=kind, token=ResumeToken.new(), joined_at=0.0, state=state,
                      profile=profile, detached_at=detached)


@pytest.fixture(scope="module")
def graph(demo_model_dir):
    return graph_mod.load_onnx(demo_model_dir / "mobilenet_v2.onnx")


@pytest.fixture(scope="module")
def base_profile(graph):
    return measure_profile(graph, budget_s=0.1)


def test_planner_inputs_keep_ready_measured_connected_peers(base_profile):
    links = {"pbbbb": {"rtt_ms": 3, "mbps": 100}, "pcccc": {"rtt_ms": "bad", "mbps": 1}}
    room = rooms.Room(id="r", created_at=0, peers=(
        peer("paaaa", profile={"compute": base_profile, "links": links}),
        peer("pbbbb", kind="edge", profile={"compute": base_profile, "links": {"paaaa": {"rtt_ms": 2, "mbps": 300}}}),
        peer("pcccc", state="booting", profile={"compute": base_profile}),
        peer("pdddd", profile={"compute": base_profile}, detached=1.0),
        peer("peeee", profile={"links": {}}),
    ))
    profiles, got_links, edge = inference.planner_inputs(room, PeerId("paaaa"))
    assert set(profiles) == {"paaaa", "pbbbb"} and edge == "pbbbb"
    assert got_links == {("paaaa", "pbbbb"): {"rtt_ms": 3.0, "mbps": 100.0},
                         ("pbbbb", "paaaa"): {"rtt_ms": 2.0, "mbps": 300.0}}
    with pytest.raises(ValueError, match="measuring its speed"):
        inference.planner_inputs(room, PeerId("pcccc"))
    # A device the source excludes (caught returning wrong results) is left out; the source never is.
    profiles, got_links, edge = inference.planner_inputs(room, PeerId("paaaa"), exclude=[PeerId("pbbbb"),
                                                                                        PeerId("paaaa")])
    assert set(profiles) == {"paaaa"} and got_links == {} and edge is None


def test_plan_message_is_a_small_spec_with_baselines(graph, base_profile, tmp_path):
    inf = inference.Inference(tmp_path)
    inf._graphs[None] = graph
    room = rooms.Room(id="r", created_at=0, peers=(
        peer("paaaa", profile={"compute": scaled_profile(base_profile, 0.05)}),
        peer("pbbbb", kind="laptop", profile={"compute": scaled_profile(base_profile, 0.1)}),
        peer("pcccc", kind="laptop", profile={"compute": scaled_profile(base_profile, 0.1)}),
    ))
    msg = inf.choose(room, PeerId("paaaa"), protocol.PlanRequest())
    again = inf.choose(room, PeerId("paaaa"), protocol.PlanRequest(strategy="single"))
    assert again["plan_id"] > msg["plan_id"] and again["devices"] == ["paaaa"]
    assert msg["spec"]["plan_id"] == msg["plan_id"] and msg["spec"]["source"] == "paaaa"
    # The spec every device expands is small; the whole message stays far below a WebSocket frame limit.
    assert len(json.dumps(msg["spec"])) < 4096 and len(protocol.encode(protocol.plan(msg))) < 512 * 1024
    strategies = {c["strategy"] for c in msg["candidates"]}
    assert {"single", "offload", "equal_split"} <= strategies
    best = min(c["predicted_s"] for c in msg["candidates"]) * 1e3
    assert best <= msg["predicted_ms"] <= best * (1 + planner.MARGIN) + 1e-6


def test_shortlist_keeps_each_strategys_best():
    cands = [{"strategy": "tilemesh", "label": str(i), "predicted_s": 0.1 + i / 100} for i in range(20)]
    cands += [{"strategy": "single", "label": "s", "predicted_s": 0.9}]
    short = inference.shortlist(cands, top=3)
    assert [c["label"] for c in short] == ["0", "1", "2", "s"]
