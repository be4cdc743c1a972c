"""Device sessions running several plans at once: lanes of one camera's stream, streams of several cameras.

Whole rooms over the fake transport (bench/fakenet.py): every session is the one the browser's worker and the
edge run; deferred tasks take fake time on each device (`sec_per_gmac`), one at a time whichever plan they
belong to, so frame rates, frame order and fairness are measured on the fake clock, deterministically. Most
tests run the small CNN of test_model_param (the numpy kernels' real time stays small); one runs the demo model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.fakenet import FakeRoom
from tilemesh.runtime import graph as graph_mod
from tilemesh.runtime import lanes as L
from tilemesh.runtime import session as S
from tilemesh.runtime.classify import LocalClassifier
from tilemesh.runtime.deps import cut_candidates
from tilemesh.runtime.peer import plan_from_spec

FRAME_S = 0.1  # one frame whole on one device, fake seconds


@pytest.fixture(scope="module")
def mobilenet(demo_model_dir):
    graph = graph_mod.load_onnx(demo_model_dir / "mobilenet_v2.onnx")
    labels = json.loads((demo_model_dir / "labels.json").read_text())
    return LocalClassifier(graph, labels)


@pytest.fixture(scope="module")
def classifier(tiny_served):
    return tiny_served


def speed(classifier) -> float:
    """Seconds per GMAC that make the whole model take `FRAME_S` on one device."""
    plan = plan_from_spec(classifier.graph, whole(1, "x", "x")["spec"])
    macs = sum(t.macs for t in plan.device_plan("x").tasks)
    return FRAME_S / (macs / 1e9)


def whole(plan_id, source, device):
    """A lane: the frame whole on `device` (sent there from the camera unless it is the camera)."""
    spec = {"plan_id": plan_id, "source": source, "cuts": [],
            "splits": [{"devices": [[device]], "row_shares": None, "col_shares": None}]}
    return {"plan_id": plan_id, "devices": [device], "spec": spec}


def split(graph, plan_id, source, helper):
    """A lane: camera and helper share the first segment by rows, the helper runs the rest."""
    cuts = cut_candidates(graph)
    spec = {"plan_id": plan_id, "source": source, "cuts": [cuts[len(cuts) // 2]],
            "splits": [{"devices": [[source], [helper]], "row_shares": [1, 1], "col_shares": None},
                       {"devices": [[helper]], "row_shares": None, "col_shares": None}]}
    return {"plan_id": plan_id, "devices": [source, helper], "spec": spec}


def stream_msg(source, lanes, depth=2):
    """A stream's `plan` message as the server sends it (tilemesh.server.inference)."""
    lanes = [{**lane, "weight": 1.0, "depth": depth} for lane in lanes]
    return json.loads(json.dumps({"plan_id": lanes[0]["plan_id"], "source": source, "spec": lanes[0]["spec"],
                                  "devices": sorted({d for lane in lanes for d in lane["devices"]}),
                                  "lanes": lanes, "stream": {"objective": "throughput"}}))


def frame(seed, n=256):
    """A camera frame, RGBA, `n` x `n` (the model card's shorter side: the browser scales the video to it)."""
    return np.random.default_rng(seed).integers(0, 256, (n, n, 4), dtype=np.uint8).tobytes()


def top5(result):
    return [t["index"] for t in result["top"]]


def make_room(classifier, devices, **kw) -> FakeRoom:
    r = FakeRoom({d: S.DeviceSession(classifier, deferred=True) for d in devices},
                 sec_per_gmac=dict.fromkeys(devices, speed(classifier)), **kw)
    r.open_links()
    r.run()
    return r


def adopt(r: FakeRoom, msg):
    for d in r.sessions:
        r.fire(d, S.PlanIn(msg, d))


class Camera:
    """A camera loop as the AR page runs it: a new frame whenever the stream has a free slot."""

    def __init__(self, room: FakeRoom, device: str, first: int = 1):
        self.room, self.device, self.next = room, device, first
        self.n = room.sessions[device].runtime.classifier.pre.resize_shorter_side
        self.sent: dict[int, bytes] = {}

    def fill(self, limit: int = 8) -> int:
        """Start frames until the stream refuses one (or `limit`: a frame the camera finishes alone at once
        frees its slot at once, as the page's loop would only after awaiting it)."""
        started = 0
        while started < limit:
            data = frame(self.next, self.n)
            effects = self.room.fire(self.device, S.FrameIn(self.next, data, self.n, self.n))
            failed = [e for e in effects if isinstance(e, S.FrameFailed) and e.frame == self.next]
            if failed:  # busy (every lane full) is the camera skipping a frame; anything else is kept and seen
                if failed[0].reason.startswith("busy"):
                    self.room.failed[self.device].pop(self.next)
                return started
            self.sent[self.next] = data
            self.next += 1
            started += 1
        return started

    def done(self) -> dict[int, dict]:
        return self.room.done.get(self.device, {})


def run_cameras(r: FakeRoom, cameras, seconds, step=0.01):
    end = r.now + seconds
    while r.now < end:
        for c in cameras:
            c.fill()
        r.run(until=r.now + step)


def assert_exact(classifier, cam: Camera):
    for f, res in cam.done().items():
        want = classifier.classify(cam.sent[f], cam.n, cam.n)["top"]
        assert top5(res) == [t["index"] for t in want], f
        np.testing.assert_allclose([t["p"] for t in res["top"]], [t["p"] for t in want], atol=1e-5)


# --- pure pieces ----------------------------------------------------------------------------------------------


def test_lanes_of_reads_one_plan_and_streams_and_refuses_bad_ones(classifier):
    one = {"plan_id": 3, "source": "a", "devices": ["a"], "spec": whole(3, "a", "a")["spec"]}
    (lane,) = L.lanes_of(one)
    assert lane["plan_id"] == 3 and lane["depth"] == L.MAX_DEPTH and lane["weight"] == 1.0
    msg = stream_msg("a", [whole(4, "a", "a"), whole(5, "a", "b")])
    assert [ln["plan_id"] for ln in L.lanes_of(msg)] == [4, 5]
    for bad in ([], [whole(5, "a", "a"), whole(4, "a", "b")], [whole(4, "x", "a")]):
        with pytest.raises(ValueError):
            L.lanes_of({**msg, "lanes": bad})
    with pytest.raises(ValueError, match="depth"):
        L.lanes_of({**msg, "lanes": [{**whole(4, "a", "a"), "depth": 9}]})


# --- several plans on one device ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny", "mobilenet"])
def test_two_cameras_sharing_a_laptop_both_get_exact_answers(model, request):
    """Each camera's plan includes the laptop; the laptop holds both plans at once (no swapping), computes for
    both as tasks arrive, and every frame of both streams equals single-device inference."""
    classifier = request.getfixturevalue("classifier" if model == "tiny" else "mobilenet")
    seconds = 3.0 if model == "tiny" else 0.3  # the demo model's numpy kernels take real seconds per frame
    r = make_room(classifier, ("a", "b", "laptop"))
    adopt(r, stream_msg("a", [split(classifier.graph, 3, "a", "laptop")]))
    adopt(r, stream_msg("b", [split(classifier.graph, 4, "b", "laptop")]))
    assert set(r.sessions["laptop"].runtime.runners) == {3, 4}
    assert set(r.sessions["a"].runtime.runners) == {3} and set(r.sessions["b"].runtime.runners) == {4}
    cams = [Camera(r, "a"), Camera(r, "b", first=100)]
    run_cameras(r, cams, seconds)
    r.run()
    for cam in cams:
        assert len(cam.done()) >= (10 if model == "tiny" else 2) and not r.failed.get(cam.device)
        assert_exact(classifier, cam)
    # Fair: neither camera got much more of the laptop than the other.
    a, b = (len(c.done()) for c in cams)
    assert 0.7 <= a / b <= 1.4, (a, b)
    assert not [n for _, n in r.notices if n.what == "error"]


def test_lanes_run_frames_in_parallel_and_results_show_in_frame_order(classifier):
    """Three equal devices, a lane each (the frame whole there): about three times one device's frame rate;
    a result older than one already shown comes back with `shown` false and is counted."""
    alone = make_room(classifier, ("cam",))
    adopt(alone, stream_msg("cam", [whole(1, "cam", "cam")], depth=1))
    one = Camera(alone, "cam")
    run_cameras(alone, [one], 4.0)
    r = make_room(classifier, ("cam", "p1", "p2"))
    adopt(r, stream_msg("cam", [whole(1, "cam", "cam"), whole(2, "cam", "p1"), whole(3, "cam", "p2")]))
    three = Camera(r, "cam")
    run_cameras(r, [three], 4.0)
    rate = len(three.done()) / len(one.done())
    assert len(one.done()) >= 30 and rate >= 2.5, (len(three.done()), len(one.done()))
    assert_exact(classifier, three)
    late = [f for f, res in three.done().items() if not res["shown"]]
    assert r.sessions["cam"].stream.dropped_late == len(late)
    # In completion order (as the page saw them), every shown frame is newer than those shown before it.
    seen = [f for f in r.done["cam"] if r.done["cam"][f]["shown"]]
    assert seen == sorted(seen) and len(seen) + len(late) == len(three.done())
    assert {res["plan_id"] for res in three.done().values()} == {1, 2, 3}


def split_away(graph, plan_id, source, a, b):
    """A lane the camera only feeds: `a` and `b` share the first segment by rows, `b` runs the rest."""
    cuts = cut_candidates(graph)
    spec = {"plan_id": plan_id, "source": source, "cuts": [cuts[len(cuts) // 2]],
            "splits": [{"devices": [[a], [b]], "row_shares": [1, 1], "col_shares": None},
                       {"devices": [[b]], "row_shares": None, "col_shares": None}]}
    return {"plan_id": plan_id, "devices": [a, b], "spec": spec}


def test_split_lanes_with_and_without_the_camera_run_side_by_side_exact(classifier):
    """The stream planner's group lanes: camera + one phone sharing frames, and two other phones sharing frames
    the camera only sends them, two frames in flight each: every frame equals single-device inference, both
    lanes take frames, and the room beats one device alone."""
    alone = make_room(classifier, ("cam",))
    adopt(alone, stream_msg("cam", [whole(1, "cam", "cam")], depth=1))
    one = Camera(alone, "cam")
    run_cameras(alone, [one], 3.0)
    r = make_room(classifier, ("cam", "p1", "p2", "p3"))
    adopt(r, stream_msg("cam", [split(classifier.graph, 1, "cam", "p1"),
                                split_away(classifier.graph, 2, "cam", "p2", "p3")]))
    assert set(r.sessions["p2"].runtime.runners) == {2} and set(r.sessions["cam"].runtime.runners) == {1, 2}
    cam = Camera(r, "cam")
    run_cameras(r, [cam], 3.0)
    r.run()
    assert not r.failed.get("cam") and len(cam.done()) >= 1.5 * len(one.done()), (len(cam.done()), len(one.done()))
    assert_exact(classifier, cam)
    assert {res["plan_id"] for res in cam.done().values()} == {1, 2}
    assert not [n for _, n in r.notices if n.what == "error"]


def test_a_frame_finishing_late_is_not_shown(classifier):
    """A slow lane's frame 1 finishes after a fast lane's frame 2: 2 is shown, 1 is dropped and counted."""
    r = make_room(classifier, ("cam", "slow", "fast"))
    adopt(r, stream_msg("cam", [whole(1, "cam", "slow"), whole(2, "cam", "fast")], depth=1))
    r.sec_per_gmac.update(slow=30 * speed(classifier), fast=speed(classifier))
    n = classifier.pre.resize_shorter_side
    r.fire("cam", S.FrameIn(1, frame(1, n), n, n))  # equal weights: the first lane, then the second
    r.fire("cam", S.FrameIn(2, frame(2, n), n, n))
    assert "busy" in r.fire("cam", S.FrameIn(3, frame(3, n), n, n))[0].reason  # every lane full
    r.run()
    assert list(r.done["cam"]) == [2, 1]
    assert r.done["cam"][2]["shown"] and not r.done["cam"][1]["shown"]
    assert r.sessions["cam"].stream_counts()["dropped_late"] == 1


def test_a_second_stream_starting_and_stopping_does_not_disturb_the_first(classifier):
    """Camera a streams over p1 and p2; camera b starts (the room re-divides: p2 goes to b) and later stops
    (p2 comes back). a's frames in flight finish on their retired lanes: none fails, all exact."""
    g = classifier.graph
    r = make_room(classifier, ("a", "b", "p1", "p2"))
    adopt(r, stream_msg("a", [whole(1, "a", "p1"), whole(2, "a", "p2")]))
    a = Camera(r, "a")
    run_cameras(r, [a], 1.5)
    assert r.sessions["a"].waiting  # frames in flight when the room re-divides
    before = len(a.done())
    adopt(r, stream_msg("a", [whole(3, "a", "p1")]))
    adopt(r, stream_msg("b", [split(g, 4, "b", "p2")]))
    assert {3, 4} <= set(r.sessions["p1"].runtime.runners) | set(r.sessions["p2"].runtime.runners)
    b = Camera(r, "b", first=1000)
    run_cameras(r, [a, b], 2.0)
    assert len(b.done()) >= 3 and len(a.done()) > before
    # b stops: its lanes are retired (its frames in flight still finish), a gets p2 back.
    effects = r.fire("b", S.RequestPlan(objective="stop"))
    assert [e.fields for e in effects if isinstance(e, S.Signal)] == [{"objective": "stop", "private": False},
                                                                      {"data": {"kind": "stream_stopped"}}]
    assert r.sessions["b"].plan is None
    adopt(r, stream_msg("a", [whole(5, "a", "p1"), whole(6, "a", "p2")]))
    run_cameras(r, [a], 2.0)
    r.run(until=r.now + L.RETIRE_AFTER_S + 1)
    assert not r.failed.get("a") and not r.failed.get("b")
    assert_exact(classifier, a)
    assert_exact(classifier, b)
    assert {res["plan_id"] for res in a.done().values()} >= {1, 2, 3, 5, 6}
    # Retired plans are gone everywhere once done; the live ones stay.
    assert set(r.sessions["p2"].runtime.runners) == {6} and set(r.sessions["a"].runtime.runners) == {5, 6}
    assert not [n for _, n in r.notices if n.what == "error"]


def test_a_lane_losing_its_device_has_its_frames_rescued_and_takes_no_new_ones(classifier):
    """A device of one lane leaves: that lane's frames in flight are rescued by the camera from the frame (none
    fails), the lane takes no new frames while the other lane goes on, and the camera asks the room once."""
    r = make_room(classifier, ("cam", "p1", "p2"))
    r.fire("cam", S.RequestPlan(objective="throughput"))
    adopt(r, stream_msg("cam", [whole(1, "cam", "p1"), whole(2, "cam", "p2")]))
    cam = Camera(r, "cam")
    cam.fill()
    r.run(until=r.now + 0.05)
    on_p2 = [f for f, (pid, _) in r.sessions["cam"].frame_plan.items() if pid == 2]
    assert on_p2
    r.signals.clear()
    r.leave("p2")
    assert [s.fields for _, s in r.signals if s.type == "plan_request"] == [{"objective": "throughput",
                                                                            "private": False}]
    assert [n.detail["plan_id"] for d, n in r.notices if d == "cam" and n.what == "recovering"] == [2]
    run_cameras(r, [cam], 1.0)
    r.run()
    assert not r.failed.get("cam")
    assert set(on_p2) <= set(cam.done()) and all(cam.done()[f]["plan_id"] == 2 for f in on_p2)
    assert {res["plan_id"] for f, res in cam.done().items() if f > max(on_p2)} == {1}
    assert r.sessions["cam"].faults["rescued_pieces"] >= len(on_p2)
    assert_exact(classifier, cam)


def test_a_liar_in_one_stream_is_caught_and_the_other_stream_is_untouched(classifier):
    """Two cameras share a helper that returns wrong tiles; spot checks run per plan: the camera whose lane the
    liar serves convicts it and excludes it from its next request; every frame shown by either camera is still
    the single-device answer (frames touched by the lie finish alone on their camera)."""
    r = FakeRoom({d: S.DeviceSession(classifier, deferred=True, check_rate=1.0, seed=i)
                  for i, d in enumerate(("a", "b", "liar"))},
                 sec_per_gmac=dict.fromkeys(("a", "b", "liar"), speed(classifier)))
    r.open_links()
    r.run()
    r.tamper["liar"] = lambda outs: {k: (v + np.float32(0.25)).astype(v.dtype) if v.ndim == 4 else v
                                     for k, v in outs.items()}
    r.fire("a", S.RequestPlan(objective="throughput"))
    r.fire("b", S.RequestPlan(objective="throughput"))
    g = classifier.graph
    adopt(r, stream_msg("a", [split(g, 1, "a", "liar")]))
    adopt(r, stream_msg("b", [whole(2, "b", "b")]))
    a, b = Camera(r, "a"), Camera(r, "b", first=1000)
    r.signals.clear()
    run_cameras(r, [a, b], 2.0)
    r.run(until=r.now + 1.0)
    assert r.sessions["a"].excluded.get("liar", ("",))[0] == "wrong results"
    assert "liar" not in r.sessions["b"].excluded
    assert ("a", {"objective": "throughput", "private": False, "exclude": ["liar"]}) in \
        [(d, s.fields) for d, s in r.signals if s.type == "plan_request"]
    assert len(a.done()) >= 2 and len(b.done()) >= 5
    assert_exact(classifier, a)
    assert_exact(classifier, b)


def test_a_camera_hearing_another_stream_end_asks_to_re_divide(classifier):
    r = make_room(classifier, ("a", "b", "p1"))
    r.fire("a", S.RequestPlan(objective="latency", private=True, latency_factor=2.0))
    adopt(r, stream_msg("a", [whole(1, "a", "a")]))
    adopt(r, stream_msg("b", [whole(2, "b", "p1")]))
    r.signals.clear()
    r.leave("b")
    assert [(d, s.fields) for d, s in r.signals if s.type == "plan_request"] == [
        ("a", {"objective": "latency", "private": True, "latency_factor": 2.0})]


def test_devices_sharing_one_cpu_queue_their_tasks(classifier):
    """The fake room's shared CPU (bench.shared_edge: the edge peers of several rooms in one server): two
    cameras offloading whole frames to two helpers take twice as long when the helpers share one CPU, and every
    answer is still exact; `zeros` answers tasks with zero tiles of the right shapes (timing-only runs)."""

    def one_frame_each(cpu, zeros=False):
        r = make_room(classifier, ("a", "b", "ha", "hb"), cpu=cpu, zeros=zeros,
                      task_time=lambda d, runner, task: 0.2)
        adopt(r, stream_msg("a", [whole(1, "a", "ha")], depth=1))
        adopt(r, stream_msg("b", [whole(2, "b", "hb")], depth=1))
        a, b = Camera(r, "a", first=1), Camera(r, "b", first=100)
        a.fill(limit=1)
        b.fill(limit=1)
        r.run()
        return r, a, b

    r, a, b = one_frame_each({})
    apart = sorted(res["ms"] for cam in (a, b) for res in cam.done().values())
    assert_exact(classifier, a)
    assert_exact(classifier, b)
    r, a, b = one_frame_each({"ha": "server", "hb": "server"})
    shared = sorted(res["ms"] for cam in (a, b) for res in cam.done().values())
    assert_exact(classifier, a)
    assert_exact(classifier, b)
    assert shared[0] == pytest.approx(apart[0], abs=1.0) and shared[1] - apart[1] == pytest.approx(200, abs=5)
    assert r.cpu_seconds["ha"] == pytest.approx(0.2) and r.cpu_seconds["hb"] == pytest.approx(0.2)
    r, a, b = one_frame_each({}, zeros=True)
    assert len(a.done()) == len(b.done()) == 1 and not r.failed.get("a")
