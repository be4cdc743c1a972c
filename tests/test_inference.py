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


def test_streams_divide_the_room_and_re_divide_when_a_camera_starts_and_stops(graph, tmp_path):
    """A camera asking for a stream gets lanes over the room; a second camera makes the room re-divide (both
    streams' plans go out, on disjoint devices); stopping or leaving gives the devices back. Private streams
    keep the camera's pixels at home."""
    from tilemesh.runtime.lanes import lanes_of
    from tilemesh.runtime.peer import plan_from_spec

    inf = inference.Inference(tmp_path)
    inf._graphs[None] = graph
    # A fixed profile, not one timed here: a profile measured under load made the planner keep frames home.
    phone = {"compute": planner.browser_profile(0.5)}
    members = [peer(p, profile=phone) for p in ("paaaa", "pbbbb", "pcccc", "pdddd")]
    room = rooms.Room(id="r", created_at=0, peers=tuple(members))
    a, b = PeerId("paaaa"), PeerId("pbbbb")
    (one,) = inf.choose(room, a, protocol.PlanRequest(objective="throughput"))
    assert one["source"] == a and one["stream"]["objective"] == "throughput" and one["strategy"] == "tilemesh"
    everyone = {"paaaa", "pbbbb", "pcccc", "pdddd"}
    assert len(one["devices"]) >= 3 and set(one["devices"]) <= everyone  # the planner may leave one out
    assert one["stream"]["predicted_fps"] > 0 and one["stream"]["latency_s"] <= one["stream"]["bound_s"] * 1.001
    for lane in lanes_of(one):
        assert plan_from_spec(graph, lane["spec"]).devices  # every device can expand it
    two = inf.choose(room, b, protocol.PlanRequest(objective="latency", private=True))
    assert [m["source"] for m in two] == [a, b]
    (da, db) = ({d for ln in lanes_of(m) for d in ln["devices"]} | {m["source"]} for m in two)
    assert not da & db and da | db <= everyone and a in da and b in db
    assert min(lane["plan_id"] for m in two for lane in m["lanes"]) > max(ln["plan_id"] for ln in one["lanes"])
    assert two[1]["stream"]["objective"] == "latency" and two[1]["stream"]["private"] is True
    for lane in lanes_of(two[1]):
        assert all(tr.dst == b for tr in plan_from_spec(graph, lane["spec"]).input_send)  # pixels stay on b
    (back,) = inf.choose(room, b, protocol.PlanRequest(objective="stop"))
    assert back["source"] == a and back["devices"] == one["devices"]
    # b streams again, then leaves the room: a's next request prunes it.
    inf.choose(room, b, protocol.PlanRequest(objective="throughput"))
    gone = rooms.Room(id="r", created_at=0, peers=tuple(m for m in members if m.id != b))
    (alone,) = inf.choose(gone, a, protocol.PlanRequest(objective="throughput"))
    assert set(alone["devices"]) == {"paaaa", "pcccc", "pdddd"} and list(inf.streams["r"]) == [a]
    assert inf.choose(gone, a, protocol.PlanRequest(objective="stop")) == [] and "r" not in inf.streams



def test_streams_leave_out_excluded_devices_and_keep_to_named_ones(graph, tmp_path):
    """A camera that caught a device lying (its request's `exclude`) gets no lane on it, nor does any other
    stream of the room; a camera naming `devices` (benchmarks: 1..N phones in one run) gets lanes on those only."""
    from tilemesh.runtime.lanes import lanes_of

    inf = inference.Inference(tmp_path)
    inf._graphs[None] = graph
    phone = {"compute": planner.browser_profile(0.5)}  # fixed, not timed (see above)
    room = rooms.Room(id="r", created_at=0, peers=tuple(peer(p, profile=phone)
                                                        for p in ("paaaa", "pbbbb", "pcccc", "pdddd")))
    a, b, liar = PeerId("paaaa"), PeerId("pbbbb"), PeerId("pcccc")

    def used(msg):
        return {d for ln in lanes_of(msg) for d in ln["devices"]}

    (first,) = inf.choose(room, a, protocol.PlanRequest(objective="throughput", latency_factor=3.0))
    assert liar in used(first)  # equal phones at a loose bound: the room is used
    (alone,) = inf.choose(room, a, protocol.PlanRequest(objective="throughput", latency_factor=3.0,
                                                        exclude=(liar,)))
    assert liar not in used(alone) and alone["devices"]
    both = inf.choose(room, b, protocol.PlanRequest(objective="throughput", latency_factor=3.0))
    assert all(liar not in used(m) for m in both)
    inf.choose(room, a, protocol.PlanRequest(objective="stop"))  # a's exclusion ends with its stream
    (two,) = inf.choose(room, b, protocol.PlanRequest(objective="throughput", latency_factor=3.0,
                                                      devices=(PeerId("pdddd"),)))
    assert used(two) | {b} <= {b, PeerId("pdddd")}


def test_plan_request_objectives_are_checked():
    assert protocol.parse(json.dumps({"v": 1, "type": "plan_request", "objective": "latency", "private": True})) == \
        protocol.PlanRequest(objective="latency", private=True)
    assert protocol.parse(json.dumps({"v": 1, "type": "plan_request", "objective": "throughput",
                                      "latency_factor": 2})).latency_factor == 2.0
    for bad in ({"objective": "fastest"}, {"objective": "latency", "private": "yes"},
                {"objective": "throughput", "latency_factor": 0.5}, {"latency_factor": True}):
        with pytest.raises(protocol.ProtocolError):
            protocol.parse(json.dumps({"v": 1, "type": "plan_request", **bad}))


def test_learned_replans_leave_a_streaming_camera_alone(graph, tmp_path):
    """A camera that turned its single plan into a stream: a learned replan of the old plan (reports of frames
    still in flight) answers nothing, and the stream's lanes are not learned from."""
    inf = inference.Inference(tmp_path)
    inf._graphs[None] = graph
    phone = {"compute": planner.browser_profile(0.5)}  # fixed, not timed
    room = rooms.Room(id="r", created_at=0, peers=tuple(peer(p, profile=phone) for p in ("paaaa", "pbbbb")))
    a = PeerId("paaaa")
    single = inf.choose(room, a, protocol.PlanRequest(strategy="equal_split"))
    (stream,) = inf.choose(room, a, protocol.PlanRequest(objective="throughput", latency_factor=3.0))
    assert (room.id, a) not in inf.running and (room.id, a) not in inf.requests
    assert inf.choose(room, a, protocol.PlanRequest(strategy="equal_split"), only_if_new=True,
                      based_on=single["plan_id"]) is None
    report = {"kind": "frame_report", "plan_id": stream["plan_id"], "report": {"compute_ms": 1.0}}
    assert inf.observe(room, PeerId("pbbbb"), report, 0.0) is None
