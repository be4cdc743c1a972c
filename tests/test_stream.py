"""The camera phone's stream scheduler: lane choice by weight within depth, frame order, drops, failures, replans."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemesh.runtime.stream import finished, new_stream, next_frame, replan


def test_frames_follow_the_weights_when_lanes_have_room():
    s = new_stream([(1, 3.0, 2), (2, 1.0, 2)])
    lanes = []
    for _ in range(400):
        s, got = next_frame(s)
        lanes.append(got[1])
        s, _ = finished(s, got[0])
    c = Counter(lanes)
    assert c[1] == 300 and c[2] == 100  # smooth WRR is exact over whole cycles
    # ... and interleaved, not in bursts: never more than 3 lane-1 frames in a row.
    run = best = 0
    for ln in lanes:
        run = run + 1 if ln == 1 else 0
        best = max(best, run)
    assert best == 3


def test_full_lanes_skip_the_camera_frame_and_free_slots_on_results():
    s = new_stream([(7, 1.0, 2)])
    s, a = next_frame(s)
    s, b = next_frame(s)
    s, c = next_frame(s)
    assert a == (1, 7) and b == (2, 7) and c is None and s.skipped == 1
    s, show = finished(s, 1)
    assert show
    s, d = next_frame(s)
    assert d == (3, 7)


def test_results_are_shown_in_frame_order_and_late_ones_counted():
    s = new_stream([(1, 1.0, 4), (2, 1.0, 4)])
    for _ in range(4):
        s, _ = next_frame(s)
    s, show3 = finished(s, 3)
    s, show1 = finished(s, 1)  # older than a shown result: dropped
    s, show2 = finished(s, 2, ok=False)
    s, show4 = finished(s, 4)
    assert (show3, show1, show2, show4) == (True, False, False, True)
    assert s.dropped_late == 1 and s.failed == 1 and s.shown == 4
    s, again = finished(s, 4)
    assert not again and s.dropped_late == 1


def test_replan_keeps_slots_of_lanes_that_stay():
    s = new_stream([(1, 1.0, 1), (2, 1.0, 1)])
    s, a = next_frame(s)
    s, b = next_frame(s)
    s = replan(s, [(2, 1.0, 1), (3, 1.0, 1)])
    s, c = next_frame(s)
    assert c[1] == 3  # lane 2 still holds its frame
    s, _ = finished(s, a[0])  # a frame of the removed lane 1 still finishes
    assert a[0] not in s.frame_lane
    with pytest.raises(ValueError):
        replan(s, [(4, 0.0, 1)])
    with pytest.raises(ValueError):
        replan(s, [(4, 1.0, 1), (4, 1.0, 1)])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.floats(0.1, 5), st.integers(1, 3)), min_size=1, max_size=4),
       st.lists(st.integers(0, 10), min_size=1, max_size=80), st.randoms(use_true_random=False))
def test_no_lane_ever_exceeds_its_depth_and_shown_frames_increase(lanes, script, rnd):
    s = new_stream([(i + 1, w, d) for i, (w, d) in enumerate(lanes)])
    shown = []
    for step in script:
        if step < 6:
            s, got = next_frame(s)
            assert got is None or got[1] in {ln.lane for ln in s.lanes}
        elif s.frame_lane:
            frame = rnd.choice(sorted(s.frame_lane))
            s, show = finished(s, frame, ok=step != 10)
            if show:
                shown.append(frame)
        for ln in s.lanes:
            assert len(ln.in_flight) <= ln.depth
        assert sum(len(ln.in_flight) for ln in s.lanes) == len(s.frame_lane)
    assert shown == sorted(shown)
    assert len(set(shown)) == len(shown)


def test_paced_frames_finish_in_order_on_lanes_of_different_latency():
    """A frame goes to the fast lane only once it would finish after the slow lane's frame in flight; measured
    results replace the predicted latencies."""
    s = new_stream([(1, 1.0, 1, 0.3), (2, 1.0, 1, 0.1)])
    s, a = next_frame(s, now=0.0)
    assert a == (1, 1) and s.horizon == pytest.approx(0.3)
    s, b = next_frame(s, now=0.05)  # the fast lane would finish at 0.15, before frame 1
    assert b is None and s.wait_s == pytest.approx(0.15) and s.skipped == 1
    s, b = next_frame(s, now=0.2)
    assert b == (2, 2)
    s, show2 = finished(s, 2, now=0.32)
    s, show1 = finished(s, 1, now=0.4)  # the slow lane was slower than predicted: measured 0.4
    assert show2 and not show1 and s.dropped_late == 1
    lanes = {ln.lane: ln.latency for ln in s.lanes}
    assert lanes[1] == pytest.approx(0.7 * 0.3 + 0.3 * 0.4) and lanes[2] == pytest.approx(0.7 * 0.1 + 0.3 * 0.12)
    assert s.horizon == 0.0 and not s.started_at  # nothing in flight
    # Without a clock the scheduler does not pace (the lanes' slots alone decide).
    s, c = next_frame(s)
    s, d = next_frame(s)
    assert c is not None and d is not None


def test_a_result_timed_before_its_start_measures_nothing_and_replans_still_work():
    """A clock-skewed result (timed by another clock than its start: the page's and its Worker's once disagreed by
    the Worker's start-up delay) is not a latency: the lane keeps its figure, never negative, and replanning the
    lanes as the session does when a plan retires (`_unschedule`: every lane with its measured latency) works."""
    s = new_stream([(4, 1.0, 1, 0.2), (5, 1.0, 1, 0.2)])
    s, a = next_frame(s, now=10.0)
    s, shown = finished(s, a[0], now=9.8)  # 0.2 s "before" it started
    assert shown
    lane = {ln.lane: ln for ln in s.lanes}[a[1]]
    assert lane.latency == pytest.approx(0.2)
    s = replan(s, [(ln.lane, ln.weight, ln.depth, ln.latency) for ln in s.lanes if ln.lane != 5])
    assert [(ln.lane, ln.latency) for ln in s.lanes] == [(4, pytest.approx(0.2))]
    # A frame still finishes and measures its lane normally afterwards.
    s, b = next_frame(s, now=11.0)
    s, _ = finished(s, b[0], now=11.3)
    assert s.lanes[0].latency == pytest.approx(0.7 * 0.2 + 0.3 * 0.3)
