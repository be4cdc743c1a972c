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


def test_frame_reports_teach_the_server_and_a_changed_picture_replans_once(graph, base_profile, tmp_path):
    """Three equal phones, b profiled 3x too slow (it profiled while the others booted): the plan leaves b a
    small share or none. Frame reports of an equal split say b is as fast as the others; once a window of them
    has come the server wants the source's request planned again, and the new plan is made with b corrected.
    Bad reports are ignored; a report of another plan, or more of the same, asks for nothing more."""
    inf = inference.Inference(tmp_path)
    inf._graphs[None] = graph
    fast = scaled_profile(base_profile, 0.1)
    links = {q: {"rtt_ms": 3, "mbps": 200} for q in ("paaaa", "pbbbb", "pcccc")}
    room = rooms.Room(id="r", created_at=0, peers=(
        peer("paaaa", profile={"compute": fast, "links": links}),
        peer("pbbbb", profile={"compute": scaled_profile(fast, 1 / 3), "links": links}),
        peer("pcccc", profile={"compute": fast, "links": links}),
    ))
    request = protocol.PlanRequest(strategy="equal_split")
    msg = inf.choose(room, PeerId("paaaa"), request)
    pid = msg["plan_id"]
    predicted = {d: v["compute_s"] for d, v in msg["timeline"]["devices"].items()}
    assert predicted["pbbbb"] > 2 * predicted["pcccc"]  # equal rows (b in the middle: two halos), a 3x slower b
    for bad in ({"plan_id": "x"}, {"plan_id": pid, "report": "no"}, {"plan_id": 999, "report": {"compute_ms": 5}}):
        assert inf.observe(room, PeerId("pbbbb"), bad, 0.0) is None
    due = []
    for i in range(12):
        for d in ("paaaa", "pbbbb", "pcccc"):  # b truly computes its rows 3x faster than predicted
            truth = 1 / 3 if d == "pbbbb" else 1.0
            report = {"compute_ms": predicted[d] * truth * 1e3, **({"links": {}} if d == "pbbbb" else {})}
            got = inf.observe(room, PeerId(d), {"kind": "frame_report", "plan_id": pid, "report": report}, float(i))
            if got is not None:
                due.append((i, got))
    assert len(due) == 1 and due[0][1] == ("paaaa", request, pid), due
    assert inf.choose(room, PeerId("paaaa"), request, only_if_new=True, based_on=pid - 1) is None  # superseded
    again = inf.choose(room, PeerId("paaaa"), request, only_if_new=True)  # equal split: the same plan's shape
    assert again is None
    fixed = inf.choose(room, PeerId("paaaa"), protocol.PlanRequest())
    devices = fixed["timeline"]["devices"]
    # corrected, b's predicted time for its share is like the others' (it was 3x theirs)
    assert inf.pictures["r"].compute["pbbbb"].value == pytest.approx(1 / 3, rel=0.01)
    if devices.get("pbbbb", {}).get("compute_s") and devices.get("pcccc", {}).get("compute_s"):
        assert devices["pbbbb"]["macs"] == pytest.approx(devices["pcccc"]["macs"], rel=0.25)
    inf.forget("r")
    assert "r" not in inf.pictures and not inf.requests
