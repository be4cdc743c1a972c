"""The device session core: pure rules (events in, effects out) and whole rooms over the fake transport.

Every session here is the one the browser's worker and the edge run; the fake room (bench/fakenet.py) plays the
executors' part with scripted loss, delay and reordering on a fake clock.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.fakenet import FakeLink, FakeRoom
from tilemesh.runtime import lanes as L
from tilemesh.runtime import recovery, wire
from tilemesh.runtime import session as S
from tilemesh.runtime.deps import cut_candidates


def plan_msg(graph, plan_id=3, compute_s=None):
    """A `plan` message as the server sends it: phone (camera) and laptop share the first segment by rows."""
    cuts = cut_candidates(graph)
    rows = {"devices": [["phone"], ["laptop"]], "row_shares": [1, 2], "col_shares": None}
    spec = {"plan_id": plan_id, "source": "phone", "cuts": [cuts[len(cuts) // 2]],
            "splits": [rows, {"devices": [["laptop"]], "row_shares": None, "col_shares": None}]}
    timeline = {"devices": {d: {"compute_s": s} for d, s in (compute_s or {}).items()}}
    return json.loads(json.dumps({"plan_id": plan_id, "source": "phone", "devices": ["phone", "laptop"],
                                  "spec": spec, "timeline": timeline}))


def frame(seed):
    return np.random.default_rng(seed).integers(0, 256, (256, 256, 4), dtype=np.uint8).tobytes()


def top5(result):
    return [t["index"] for t in result["top"]]


def local_top5(classifier, data):
    return [t["index"] for t in classifier.classify(data, 256, 256)["top"]]


def of(effects, cls):
    return [e for e in effects if isinstance(e, cls)]


def room(classifier, **kw) -> FakeRoom:
    return FakeRoom({d: S.DeviceSession(classifier) for d in ("phone", "laptop")}, **kw)


def adopt(r: FakeRoom, msg, devices=("phone", "laptop")):
    for d in devices:
        r.fire(d, S.PlanIn(msg, d))


# --- pure rules -----------------------------------------------------------------------------------------------


def test_link_figures_are_megabits_and_median_round_trips():
    fig = S.link_figures([3.0, 1.0, 2.0, 50.0, 2.5], 1024 * 1024, 0.1)
    assert fig == {"rtt_ms": 2.5, "mbps": round(1024 * 1024 * 8 / 1e6 / 0.1, 2)}  # 83.89 Mbit/s, not 10.49 MB/s
    with pytest.raises(ValueError, match="unusable"):
        S.link_figures([], 10, 1.0)


def test_chunk_limits_and_unknown_links():
    assert S.chunk_limit(65536) == 65536
    assert S.chunk_limit(1 << 30) == S.SEND_LIMIT and S.chunk_limit(0) == S.SEND_LIMIT
    assert S.plan_max_messages(["a", "b", "me"], "me", {"a": 65536}) == {"a": 65536, "b": S.UNKNOWN_MAX_MESSAGE}


def test_drift_needs_enough_frames_far_enough_off_and_respects_the_cooldown():
    d = S.Drift()
    for _ in range(S.DRIFT_FRAMES - 1):
        d, ratio = S.drift_step(d, 100.0, 0.01, now=100.0)
        assert ratio is None
    d, ratio = S.drift_step(d, 100.0, 0.01, now=100.0)
    assert ratio == pytest.approx(10.0) and d == S.Drift((), 100.0)
    for i in range(3 * S.DRIFT_FRAMES):  # still off, but within the cooldown: nothing
        d, ratio = S.drift_step(d, 100.0, 0.01, now=100.0 + i)
        assert ratio is None
    d, ratio = S.drift_step(d, 100.0, 0.01, now=100.0 + S.DRIFT_COOLDOWN_S)
    assert ratio == pytest.approx(10.0)
    quiet = S.Drift()
    for _ in range(3 * S.DRIFT_FRAMES):  # 1.2x slower than predicted is within the factor
        quiet, ratio = S.drift_step(quiet, 120.0, 0.1, now=1000.0)
        assert ratio is None
    fast = S.Drift()
    for _ in range(S.DRIFT_FRAMES):
        fast, ratio = S.drift_step(fast, 10.0, 0.1, now=0.0)
    assert ratio == pytest.approx(0.1)  # faster than predicted by the factor counts too


def test_events_from_the_worker_boundary_are_checked():
    ev = S.event_from_dict({"on": "link_measured", "peer": "b", "rtts_ms": [1, 2, 3], "nbytes": 10, "seconds": 1})
    assert ev == S.LinkMeasured("b", (1, 2, 3), 10, 1)
    with pytest.raises(ValueError, match="unknown session event"):
        S.event_from_dict({"on": "launch"})
    with pytest.raises(ValueError, match="unknown fields"):
        S.event_from_dict({"on": "peer_left", "peer": "b", "colour": 1})
    assert S.effect_to_dict(S.FrameFailed(3, "x")) == {"do": "frame_failed", "frame": 3, "reason": "x", "retry_s": 0.0}
    with pytest.raises(TypeError, match="not a session event"):
        S.DeviceSession().handle(S.Event(), 0.0)


# --- one session, event by event ------------------------------------------------------------------------------


def acts(effects):
    """The effects but the `refining` notices (what the roster shows; asserted in the tests about them)."""
    return [e for e in effects if not (isinstance(e, S.Notice) and e.what == "refining")]


def test_links_measured_while_joining_are_measured_again_after_the_first_profile():
    s = S.DeviceSession()
    s.handle(S.LinkOpened("b", 65536), 0.0)
    s.handle(S.LinkOpened("c", 65536), 0.0)
    s.handle(S.LinkMeasured("b", (9.0,) * 10, 1024 * 1024, 2.0), 0.5)  # slow: the device was busy joining
    report, again = acts(s.handle(S.Profiled({"sec_per_mac": {}}), 1.0))  # c's probe is still in flight
    assert isinstance(report, S.ReportProfile) and again == S.Probe("b", 64, 10, 65536, 1024 * 1024)
    assert s.links["b"]["mbps"] == pytest.approx(4.19, abs=0.01)  # the old figures stand until the new ones come
    (report,) = acts(s.handle(S.LinkMeasured("b", (2.0,) * 10, 1024 * 1024, 0.2), 1.5))
    assert report.links["b"] == {"rtt_ms": 2.0, "mbps": 41.94}  # replaced, and measured no third time
    report, again = acts(s.handle(S.LinkMeasured("c", (3.0,) * 10, 1024 * 1024, 1.0), 1.6))
    assert again == S.Probe("c", 64, 10, 65536, 1024 * 1024)  # in flight during the profile: measured again
    (report,) = acts(s.handle(S.LinkMeasured("c", (3.0,) * 10, 1024 * 1024, 0.5), 2.0))
    assert report.links["c"]["mbps"] == pytest.approx(16.78, abs=0.01)
    assert s.provisional == set()
    # A second profile (drift) re-measures nothing; a link opened after the first profile is measured once.
    assert [type(e) for e in s.handle(S.Profiled({"sec_per_mac": {}}), 3.0)] == [S.ReportProfile]
    (probe,) = s.handle(S.LinkOpened("d", 65536), 3.1)
    assert [type(e) for e in s.handle(S.LinkMeasured("d", (1.0,) * 10, 1024 * 1024, 0.1), 3.2)] == [S.ReportProfile]


def test_what_is_measured_while_others_boot_is_measured_again_once_the_room_settles():
    """Ready with provisional figures, refined when no device boots any more: the profile first, then each link
    measured in the storm, once; a device booting later makes only its own link provisional."""
    s = S.DeviceSession()
    s.handle(S.RoomChanged(2), 0.0)  # two others still boot
    s.handle(S.LinkOpened("b", 65536), 0.1)
    s.handle(S.LinkMeasured("b", (9.0,) * 10, 1024 * 1024, 2.0), 0.5)
    report, notice = s.handle(S.Profiled({"sec_per_mac": {}}), 1.0)  # ready, with both provisional
    assert isinstance(report, S.ReportProfile) and report.compute == {"sec_per_mac": {}}
    assert notice == S.Notice("refining", {"pending": ["b", "compute"]})
    s.handle(S.LinkOpened("c", 65536), 1.1)
    assert acts(s.handle(S.LinkMeasured("c", (9.0,) * 10, 1024 * 1024, 1.0), 1.5)) == [s._report()]
    assert s.handle(S.RoomChanged(1), 2.0) == []  # one still boots: nothing yet
    assert s.handle(S.RoomChanged(0), 3.0) == [S.Profile("settled")]  # settled: the profile first
    effects = s.handle(S.Profiled({"sec_per_mac": {}, "fast": 1}), 4.0)
    assert [e for e in effects if isinstance(e, S.Probe)] == [S.Probe("b", 64, 10, 65536, 1 << 20),
                                                             S.Probe("c", 64, 10, 65536, 1 << 20)]
    assert S.Notice("refining", {"pending": ["b", "c"]}) in effects
    acts(s.handle(S.LinkMeasured("b", (2.0,) * 10, 1 << 20, 0.2), 4.5))
    (report, notice) = s.handle(S.LinkMeasured("c", (2.0,) * 10, 1 << 20, 0.1), 4.6)
    assert notice == S.Notice("refining", {"pending": []}) and report.links["c"]["mbps"] == pytest.approx(83.89)
    # A fourth device boots and settles: its link (measured in its boot) again, this device's profile not.
    s.handle(S.RoomChanged(1), 5.0)
    s.handle(S.LinkOpened("d", 65536), 5.1)
    s.handle(S.LinkMeasured("d", (5.0,) * 10, 1 << 20, 1.0), 5.5)
    assert acts(s.handle(S.RoomChanged(0), 6.0)) == [S.Probe("d", 64, 10, 65536, 1 << 20)]
    acts(s.handle(S.LinkMeasured("d", (1.0,) * 10, 1 << 20, 0.1), 6.5))
    assert s.provisional == set() and s.handle(S.RoomChanged(0), 7.0) == []  # nothing left: nothing measured


def test_a_profile_that_says_it_is_provisional_is_taken_again_once_settled():
    """onnxruntime-web joins on its default thread count and chooses it later: its first profile says so."""
    s = S.DeviceSession()
    assert acts(s.handle(S.Profiled({"sec_per_mac": {}, "provisional": True}), 1.0))[1:] == [S.Profile("settled")]
    assert acts(s.handle(S.Profiled({"sec_per_mac": {}}), 2.0)) == [s._report()]
    assert s.provisional == set()


def test_a_link_is_probed_once_and_reported_in_megabits():
    s = S.DeviceSession()
    (probe,) = s.handle(S.LinkOpened("b", 65536), 0.0)
    assert probe == S.Probe("b", 64, 10, 65536, 1024 * 1024)  # the message never exceeds the link's size
    assert s.handle(S.LinkOpened("b", 65536), 0.1) == []  # already being measured
    (report,) = s.handle(S.LinkMeasured("b", (2.0,) * 10, 1024 * 1024, 0.05), 0.2)
    assert report.links == {"b": {"rtt_ms": 2.0, "mbps": 167.77}}
    s.handle(S.ProbeFailed("c"), 0.3)  # a probe of a link that failed changes nothing
    (left,) = s.handle(S.PeerLeft("b"), 0.4)
    assert left.links == {} and s.max_message == {}
    assert s.handle(S.LinkMeasured("b", (1.0,), 10, 0.1), 0.5) == []  # a late answer for a gone link


def test_no_plan_means_the_frame_fails_at_once():
    s = S.DeviceSession()
    assert s.handle(S.FrameIn(1, b"", 256, 256), 0.0) == [S.FrameFailed(1, "no plan yet")]
    assert s.handle(S.RequestPlan("equal_split"), 0.0) == [S.Signal("plan_request", {"strategy": "equal_split"})]


def test_a_plan_without_this_device_is_ignored_and_one_without_a_model_is_an_error(classifier):
    msg = plan_msg(classifier.graph)
    (n,) = S.DeviceSession(classifier).handle(S.PlanIn(msg, "tablet"), 0.0)
    assert n.what == "plan" and n.detail["role"]["role"] == "idle"
    (e,) = S.DeviceSession().handle(S.PlanIn(msg, "laptop"), 0.0)
    assert e.what == "error" and "no model" in e.detail["message"]
    (e,) = S.DeviceSession(classifier).handle(S.PlanIn({"plan_id": 1}, "laptop"), 0.0)
    assert e.what == "error" and "unusable plan" in e.detail["message"]


def test_chunk_before_plan_is_held_then_replayed(classifier):
    """The phone's chunks reach the laptop before the server's `plan` message does (signaling is slower)."""
    r = room(classifier)
    r.open_links()
    msg = plan_msg(classifier.graph, plan_id=5)
    r.fire("phone", S.PlanIn(msg, "phone"))
    r.at(0.2, "laptop", S.PlanIn(msg, "laptop"))  # the plan message is 200 ms late at the laptop
    data = frame(1)
    r.fire("phone", S.FrameIn(1, data, 256, 256))
    r.run()
    held = r.sessions["laptop"].runtime
    assert held.held == [] and held.plan_id == 5
    assert top5(r.done["phone"][1]) == local_top5(classifier, data)
    assert r.done["phone"][1]["plan"]["plan_id"] == 5 and {p["device"] for p in r.done["phone"][1]["parts"]} == {
        "phone", "laptop"}


def test_plan_replaced_mid_frame_finishes_the_frame_alone_and_the_new_plan_runs(classifier):
    r = room(classifier)
    r.open_links()
    adopt(r, plan_msg(classifier.graph, plan_id=5))
    first = frame(2)
    r.fire("phone", S.FrameIn(1, first, 256, 256))
    r.run(until=r.now + 0.001)  # some chunks are in flight, the frame has not finished
    assert 1 not in r.done.get("phone", {})
    adopt(r, plan_msg(classifier.graph, plan_id=6))
    # The camera holds the frame: it finishes it alone rather than losing it.
    assert r.done["phone"][1]["recovered"].startswith("plan replaced by plan 6")
    assert top5(r.done["phone"][1]) == local_top5(classifier, first) and not r.failed
    data = frame(3)
    r.fire("phone", S.FrameIn(2, data, 256, 256))
    r.run()  # plan 5's late chunks arrive too: dropped as stale, never mixed in
    assert list(r.done["phone"]) == [1, 2] and top5(r.done["phone"][2]) == local_top5(classifier, data)
    assert r.sessions["laptop"].runtime.dropped_chunks > 0
    assert not [n for _, n in r.notices if n.what == "error"]


def test_plan_replaced_mid_frame_finishes_the_frame_on_the_old_plan_and_the_new_plan_runs(classifier):
    """A source's newer stream plan retires the old one: its frame in flight still finishes there (no frame lost
    to a re-division), new frames go to the new plan, and the retired plan is dropped once its frames are done
    (on the source) or after `lanes.RETIRE_AFTER_S` (on workers, which cannot know); its late chunks are
    dropped as stale, never mixed in."""
    r = room(classifier)
    r.open_links()
    adopt(r, {**plan_msg(classifier.graph, plan_id=5), "stream": {"objective": "throughput"}})
    first = frame(2)
    r.fire("phone", S.FrameIn(1, first, 256, 256))
    r.run(until=r.now + 0.001)  # some chunks are in flight, the frame has not finished
    assert 1 not in r.done.get("phone", {})
    adopt(r, {**plan_msg(classifier.graph, plan_id=6), "stream": {"objective": "throughput"}})
    assert set(r.sessions["laptop"].runtime.runners) == {5, 6}
    data = frame(3)
    r.fire("phone", S.FrameIn(2, data, 256, 256))
    r.run(until=r.now + 1.0)
    assert sorted(r.done["phone"]) == [1, 2] and not r.failed.get("phone")
    assert top5(r.done["phone"][1]) == local_top5(classifier, first) and r.done["phone"][1]["plan_id"] == 5
    assert top5(r.done["phone"][2]) == local_top5(classifier, data) and r.done["phone"][2]["plan_id"] == 6
    assert set(r.sessions["phone"].runtime.runners) == {6}  # the source's retired plan had nothing left in flight
    r.run(until=r.now + L.RETIRE_AFTER_S)
    assert set(r.sessions["laptop"].runtime.runners) == {6}
    # A late chunk of plan 5 now reaches no runner: dropped and counted.
    stale = wire.encode(np.zeros((1, 3, 4, 4), np.float32), frame=1, tensor=0, plan_id=5, region=[0, 4, 0, 4])
    before = r.sessions["laptop"].runtime.dropped_chunks
    r.fire("laptop", S.ChunkIn("phone", stale[0]))
    assert r.sessions["laptop"].runtime.dropped_chunks == before + 1
    assert not [n for _, n in r.notices if n.what == "error"]


def test_peer_left_mid_frame_is_rescued_and_the_room_replans_in_the_background(classifier):
    r = room(classifier)
    r.open_links()
    adopt(r, plan_msg(classifier.graph))
    data = frame(4)
    r.fire("phone", S.FrameIn(1, data, 256, 256))
    r.run(until=r.now + 0.001)
    r.leave("laptop")
    r.run()
    assert top5(r.done["phone"][1]) == local_top5(classifier, data) and not r.failed
    assert [n.detail["device"] for d, n in r.notices if n.what == "recovering"] == ["laptop"]
    assert [d for d, s in r.signals if s.type == "plan_request"] == ["phone"]
    # Until the new plan comes, the plan keeps running: the laptop's share is computed on the phone.
    data = frame(5)
    r.fire("phone", S.FrameIn(2, data, 256, 256))
    r.run()
    assert top5(r.done["phone"][2]) == local_top5(classifier, data) and not r.failed


def test_late_max_message_update_applies_to_the_running_plan(classifier):
    """A plan adopted before the link's size is known chunks at 16 KiB; the size, once known, is used."""
    r = room(classifier)
    for link in r.links.values():
        link.max_message = 65536
    adopt(r, plan_msg(classifier.graph))
    sent = r.fire("phone", S.FrameIn(1, frame(6), 256, 256))
    sizes = [len(c) for e in of(sent, S.Send) for c in e.chunks]
    assert sizes and max(sizes) == S.UNKNOWN_MAX_MESSAGE
    r.run()
    r.open_links()  # each end learns the other accepts 64 KiB
    sent = r.fire("phone", S.FrameIn(2, frame(7), 256, 256))
    sizes = [len(c) for e in of(sent, S.Send) for c in e.chunks]
    assert max(sizes) == 65536
    r.fire("phone", S.LinkUpdated("laptop", 32768))  # a renegotiated SDP advertises less
    sent = r.fire("phone", S.FrameIn(3, frame(8), 256, 256))
    assert max(len(c) for e in of(sent, S.Send) for c in e.chunks) == 32768
    r.run()
    assert sorted(r.done["phone"]) == [1, 2, 3]


def test_drift_reprofiles_with_cooldown_and_the_source_replans(classifier):
    """The laptop computes far slower than the plan predicted: after DRIFT_FRAMES frames it profiles itself
    again, reports the new profile and tells the room; the phone asks for a new plan. Within the cooldown, no more."""
    r = room(classifier)
    r.open_links()
    r.profiles["laptop"] = {"sec_per_mac": {"conv_pointwise": 1e-9}}
    adopt(r, plan_msg(classifier.graph, compute_s={"laptop": 1e-6, "phone": 1e-6}))
    for f in range(1, S.DRIFT_FRAMES + 1):
        r.fire("phone", S.FrameIn(f, frame(f), 256, 256))
        r.run()
    drifts = [(d, n.detail["ratio"]) for d, n in r.notices if n.what == "drift"]
    assert {d for d, _ in drifts} == {"phone", "laptop"} and all(ratio > 100 for _, ratio in drifts)
    changed = [d for d, s in r.signals if s.type == "broadcast" and s.fields["data"]["kind"] == "profile_changed"]
    assert sorted(changed) == ["laptop", "phone"]
    assert ("laptop", {"conv_pointwise": 1e-9}) in [(d, (p.compute or {}).get("sec_per_mac")) for d, p in r.reports]
    assert r.sessions["phone"].plan is not None  # the plan runs on while the room replans
    assert any(n.what == "replanning" and "changed speed" in n.detail["reason"] for _, n in r.notices)
    assert [d for d, s in r.signals if s.type == "plan_request"] == ["phone"]  # on the laptop's news
    # The room replans (the same layout, a new id): the frames are still slow, but the cooldown holds.
    adopt(r, plan_msg(classifier.graph, plan_id=4, compute_s={"laptop": 1e-6, "phone": 1e-6}))
    for f in range(10, 10 + 2 * S.DRIFT_FRAMES):
        r.fire("phone", S.FrameIn(f, frame(f), 256, 256))
        r.run()
    assert len([n for _, n in r.notices if n.what == "drift"]) == 2
    r.run(until=r.now + S.DRIFT_COOLDOWN_S)
    adopt(r, plan_msg(classifier.graph, plan_id=8, compute_s={"laptop": 1e-6, "phone": 1e-6}))
    for f in range(30, 30 + S.DRIFT_FRAMES):
        r.fire("phone", S.FrameIn(f, frame(f), 256, 256))
        r.run()
    assert len([n for _, n in r.notices if n.what == "drift"]) == 4


def test_frame_reports_go_to_the_room_every_few_frames(classifier):
    r = room(classifier)
    r.open_links()
    adopt(r, plan_msg(classifier.graph))
    for f in range(1, 9):
        r.fire("phone", S.FrameIn(f, frame(f), 256, 256))
        r.run()
    reported = sorted((d, s.fields["data"]["report"]["frame"]) for d, s in r.signals
                      if s.type == "broadcast" and s.fields["data"]["kind"] == "frame_report")
    assert reported == [("laptop", 1), ("laptop", 5), ("phone", 1), ("phone", 5)]


def test_a_bad_chunk_is_an_error_and_loses_nothing_else(classifier):
    r = room(classifier)
    r.open_links()
    adopt(r, plan_msg(classifier.graph))
    (e,) = r.fire("laptop", S.ChunkIn("phone", b"TMWT" + bytes(80)))
    assert e.what == "error" and "refused" in e.detail["message"]
    data = frame(9)
    r.fire("phone", S.FrameIn(1, data, 256, 256))
    r.run()
    assert top5(r.done["phone"][1]) == local_top5(classifier, data)


# --- rooms over the fake transport ----------------------------------------------------------------------------


def test_reordered_delayed_links_give_the_single_device_answer(classifier):
    """Slow, jittery links (chunks overtake each other) and frames in flight at once: every answer is right."""
    r = room(classifier, seed=3)
    for link in r.links.values():
        link.latency, link.jitter, link.bandwidth, link.max_message = 0.02, 0.05, 2e6, 16384
    r.open_links()
    adopt(r, plan_msg(classifier.graph))
    frames = {f: frame(40 + f) for f in (1, 2, 3)}
    for f, data in frames.items():
        r.fire("phone", S.FrameIn(f, data, 256, 256))
    r.run()
    for f, data in frames.items():
        assert top5(r.done["phone"][f]) == local_top5(classifier, data)
        probs = [t["p"] for t in r.done["phone"][f]["top"]]
        np.testing.assert_allclose(probs, [t["p"] for t in classifier.classify(data, 256, 256)["top"]], atol=1e-5)
    assert r.done["phone"][1]["ms"] > 20  # the fake clock: at least the link latency
    # The probes saw the scripted links, in megabits/s.
    links = r.sessions["phone"].links
    assert links["laptop"]["rtt_ms"] == pytest.approx(40.0)
    assert links["laptop"]["mbps"] == pytest.approx(1024 * 1024 * 8 / 1e6 / (0.02 + 1024 * 1024 / 2e6), rel=1e-3)


def test_a_lost_chunk_is_rescued_and_later_frames_finish(classifier):
    lost = []

    def lose(src, dst, chunk, n):
        if src == "laptop" and wire.parse_chunk(chunk)[0].frame == 1 and not lost:
            lost.append(n)
            return True
        return False

    r = room(classifier, lose=lose)
    r.open_links()
    adopt(r, plan_msg(classifier.graph))
    r.fire("phone", S.FrameIn(1, frame(11), 256, 256))
    r.run()
    assert 1 not in r.done.get("phone", {}) and r.sessions["phone"].waiting  # stuck: a piece never came
    # No plan prediction: the stall bound is STALL_MAX_S; the laptop's piece (the output, level 2) is computed
    # on the phone from the frame once it is that late, well before the frame's timeout.
    r.run(until=r.now + S.FRAME_TIMEOUT_S + 1)
    assert not r.failed and top5(r.done["phone"][1]) == local_top5(classifier, frame(11))
    assert r.done["phone"][1]["ms"] / 1e3 <= recovery.piece_wait(recovery.STALL_MAX_S, 2) + 2 * r.tick
    for f in (2, 3):
        r.fire("phone", S.FrameIn(f, frame(f), 256, 256))
        r.run()
    assert sorted(r.done["phone"]) == [1, 2, 3] and r.dropped == 1


def test_deferred_compute_through_the_session_equals_inline(classifier):
    """Sessions that hand tasks out as `Compute` effects (onnxruntime-web's path) give the inline answer."""
    r = FakeRoom({d: S.DeviceSession(classifier, deferred=True) for d in ("phone", "laptop")}, seed=4)
    r.open_links()
    adopt(r, plan_msg(classifier.graph))
    data = frame(12)
    computes = of(r.fire("phone", S.FrameIn(1, data, 256, 256)), S.Compute)
    assert computes and computes[0].plan_id == 3
    r.run()
    assert top5(r.done["phone"][1]) == local_top5(classifier, data)
    assert all(s.tasks_run[3] > 0 for s in r.sessions.values())
    as_dict = S.effect_to_dict(computes[0])
    first = next(iter(as_dict["inputs"].values()))
    assert as_dict["do"] == "compute" and first["dtype"] == "float32" and len(first["data"]) == 4 * np.prod(
        first["shape"])
    # What an engine outside Python (the worker's onnxruntime-web) answers comes back through the same boundary.
    x = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    ev = S.event_from_dict({"on": "computed", "plan_id": 3, "frame": 9, "task": 0,
                            "outputs": {"t": S.array_to_dict(x)}})
    np.testing.assert_array_equal(ev.outputs["t"], x)
    with pytest.raises(ValueError, match="cannot hold"):
        S.event_from_dict({"on": "computed", "plan_id": 3, "frame": 9, "task": 0,
                           "outputs": {"t": {**S.array_to_dict(x), "shape": [1, 2, 3, 5]}}})


def test_ordered_links_deliver_in_order(classifier):
    r = room(classifier)
    r.links[("phone", "laptop")] = FakeLink(ordered=True, jitter=0.5)
    r.open_links()
    adopt(r, plan_msg(classifier.graph))
    r.fire("phone", S.FrameIn(1, frame(13), 256, 256))
    r.run()
    assert 1 in r.done["phone"]


def test_frame_cost_probe_runs_a_real_frame_on_a_scratch_session(classifier):
    """`measure_frame_seconds` (the profile's `frame_s`) takes whole frames through a scratch session's real path
    (crop, runner, compute request answered at once, top-5, effects as dicts): it raises unless every frame
    finished, and it leaves the worker's own session alone."""
    real = S._session
    s = S.measure_frame_seconds(classifier, budget_s=0.02)
    assert 0 < s < 0.5
    assert S._session is real


def test_a_finished_frame_names_its_plan_without_its_timeline(classifier):
    msg = {**plan_msg(classifier.graph, plan_id=7), "strategy": "tilemesh", "label": "x",
           "timeline": {"devices": {"phone": {"timeline": [{"kind": "compute"}] * 50}}}, "candidates": [{}] * 30}
    summary = S.plan_summary(msg)
    assert summary["plan_id"] == 7 and summary["devices"] == msg["devices"] and summary["strategy"] == "tilemesh"
    assert "timeline" not in summary and "candidates" not in summary and S.plan_summary(None) is None


def test_a_single_plan_replacing_the_cameras_plan_finishes_its_frames_alone_on_every_device(classifier):
    """A benchmark baseline's plan (no stream) replaces the camera's plan at once on every device, as before
    streams: the camera finishes its frame in flight alone (never lost), the workers drop the old plan (its
    late chunks are stale), and the new plan runs."""
    r = room(classifier)
    r.open_links()
    adopt(r, plan_msg(classifier.graph, plan_id=5))
    first = frame(2)
    r.fire("phone", S.FrameIn(1, first, 256, 256))
    r.run(until=r.now + 0.001)
    adopt(r, plan_msg(classifier.graph, plan_id=6))
    assert r.done["phone"][1]["recovered"].startswith("plan replaced by plan 6")
    assert top5(r.done["phone"][1]) == local_top5(classifier, first)
    assert all(set(s.runtime.runners) <= {6} for s in r.sessions.values())
    data = frame(3)
    r.fire("phone", S.FrameIn(2, data, 256, 256))
    r.run()
    assert list(r.done["phone"]) == [1, 2] and top5(r.done["phone"][2]) == local_top5(classifier, data)
    assert not r.failed.get("phone")
