"""The early-exit rule: normalized entropy, the exit decision, and threshold calibration, as pure functions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemesh.runtime.early_exit import (
    StreamExit,
    calibration_table,
    choose_threshold,
    decide,
    normalized_entropy,
    reset,
    room_answer,
    step,
)


def test_entropy_bounds_and_extremes():
    assert normalized_entropy(np.zeros(1000)) == pytest.approx(1.0)
    assert normalized_entropy(np.zeros((1, 10))) == pytest.approx(1.0)
    sharp = np.full(1000, -50.0)
    sharp[7] = 50.0
    assert normalized_entropy(sharp) < 1e-6
    # Two equal classes out of four: H = log 2, normalised by log 4.
    assert normalized_entropy(np.array([0.0, 0.0, -1e9, -1e9])) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        normalized_entropy(np.array([1.0]))
    with pytest.raises(ValueError):
        normalized_entropy(np.array([1.0, np.nan]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=2, max_size=50), st.floats(-20, 20))
def test_entropy_is_shift_invariant_and_in_range(scores, shift):
    z = np.array(scores)
    h = normalized_entropy(z)
    assert 0.0 <= h <= 1.0
    assert normalized_entropy(z + shift) == pytest.approx(h, abs=1e-9)
    # Sharpening (a larger temperature-free scale) never raises the entropy.
    assert normalized_entropy(z * 3) <= h + 1e-9


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=2, max_size=50), st.floats(0, 1))
def test_an_exit_shows_only_the_cheap_pass_label(scores, threshold):
    z = np.array(scores)
    d = decide(z, threshold)
    assert d.top1 == int(np.argmax(z))
    assert d.exit == (d.entropy <= threshold)
    assert not decide(np.zeros(10), 0.99).exit and decide(np.zeros(10), 1.0).exit


def test_threshold_out_of_range_is_refused():
    with pytest.raises(ValueError):
        decide(np.zeros(3), 1.5)


def test_calibration_table_counts():
    h = [0.01, 0.02, 0.2, 0.3, 0.6]
    agree = [True, False, True, True, False]
    rows = {r.threshold: r for r in calibration_table(h, agree, [0.0, 0.015, 0.25, 1.0], cheap_cost=0.25)}
    assert rows[0.0].exit_rate == 0 and rows[0.0].exit_agreement == 1.0 and rows[0.0].overall_agreement == 1.0
    assert rows[0.0].relative_cost == pytest.approx(1.25)
    assert rows[0.015].exit_rate == pytest.approx(0.2) and rows[0.015].exit_agreement == 1.0
    assert rows[0.25].exit_rate == pytest.approx(0.6) and rows[0.25].exit_agreement == pytest.approx(2 / 3)
    # The one disagreeing exit is the only wrong label shown.
    assert rows[0.25].overall_agreement == pytest.approx(0.8)
    assert rows[1.0].exit_rate == 1 and rows[1.0].overall_agreement == pytest.approx(0.6)
    assert rows[1.0].relative_cost == pytest.approx(0.25)
    with pytest.raises(ValueError):
        calibration_table([], [], [0.1], 0.25)


def test_choose_threshold_keeps_agreement_and_needs_enough_exits():
    h = np.linspace(0, 0.5, 101)
    agree = h < 0.2  # confident cheap answers agree, unsure ones do not
    rows = calibration_table(h, agree, [0.0, 0.1, 0.19, 0.2, 0.21, 0.3], cheap_cost=0.3)
    # 40 of 41 exits agree at 0.2 (97.6%); at 0.21 only 40 of 43 (93.0%).
    assert choose_threshold(rows, 0.97) == 0.2
    assert choose_threshold(rows, 1.0) == 0.19
    # A threshold is only chosen when it makes enough exits to be judged on.
    assert choose_threshold(rows, 1.0, min_exits=30, n=101) == 0.19
    assert choose_threshold(rows, 1.0, min_exits=50, n=101) == 0.0


# --------------------------------------------------------------------------- the rule on a camera stream

def sharp(k: int, margin: float = 40.0, n: int = 1000) -> np.ndarray:
    z = np.zeros(n)
    z[k] = margin
    return z


def test_stream_exit_needs_confidence_and_the_rooms_answer():
    s = StreamExit(threshold=0.1, alone_threshold=0.0, max_run=8)
    # No room answer yet and alone_threshold 0: even a certain cheap pass goes to the room.
    s, d = step(s, sharp(3))
    assert not d.exit and d.top1 == 3 and "no room answer" in d.reason
    s = room_answer(s, 3)
    s, d = step(s, sharp(3))
    assert d.exit and d.top1 == 3 and d.reason == "confident and names the room's answer"
    # Confident, but another class than the room said: the room is asked.
    s, d = step(s, sharp(5))
    assert not d.exit and "differs" in d.reason
    # The room's class, but unsure: asked too.
    s, d = step(s, np.zeros(1000))
    assert not d.exit and d.reason == "not confident" and d.entropy == pytest.approx(1.0)
    assert (s.frames, s.exits) == (4, 1) and s.exit_rate == pytest.approx(0.25)


def test_alone_threshold_and_max_run():
    s = StreamExit(threshold=0.5, alone_threshold=0.01, max_run=3)
    s, d = step(s, sharp(7))
    assert d.exit and d.reason == "confident, no room answer yet"
    s, d = step(s, sharp(7, margin=5.0))  # confident enough for `threshold`, not for `alone_threshold`
    assert not d.exit and d.entropy > 0.01
    s = room_answer(s, 7)
    exits = []
    for _ in range(5):
        s, d = step(s, sharp(7))
        exits.append(d.exit)
    # At most 3 in a row, then the room must answer again; its answer restarts the run.
    assert exits == [True, True, True, False, False] and "3 exits in a row" in d.reason
    s = room_answer(s, 7)
    s, d = step(s, sharp(7))
    assert d.exit
    s = reset(s)
    assert s.last_room is None and s.exits == 5


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.lists(st.floats(-30, 30), min_size=3, max_size=12), st.integers(0, 11),
                          st.booleans()), min_size=1, max_size=30),
       st.floats(0, 1), st.floats(0, 1), st.integers(1, 5))
def test_a_stream_exit_never_shows_a_label_the_cheap_pass_did_not_produce(frames, threshold, alone, max_run):
    """Any stream of cheap scores and room answers: an exit's label is the cheap pass's own top-1, and it is the
    room's latest answer unless no answer had come (then the cheap pass was confident to `alone`)."""
    s = StreamExit(threshold, alone, max_run)
    run = 0
    for scores, room, answered in frames:
        z = np.array(scores)
        before = s
        s, d = step(s, z)
        assert d.top1 == int(np.argmax(z))
        if d.exit:
            run += 1
            assert run <= max_run
            if before.last_room is None:
                assert d.entropy <= alone
            else:
                assert d.top1 == before.last_room and d.entropy <= threshold
        if answered:
            s = room_answer(s, room)
            run = 0
    assert s.frames == len(frames)


def test_stream_rule_refuses_bad_settings():
    with pytest.raises(ValueError):
        StreamExit(threshold=1.5)
    with pytest.raises(ValueError):
        StreamExit(threshold=0.1, alone_threshold=-0.1)
    with pytest.raises(ValueError):
        StreamExit(threshold=0.1, max_run=0)


def test_exit_scaling_bench_window_arithmetic():
    """bench.exit_scaling's per-mode numbers from recorded frames (pure)."""
    from bench.exit_scaling import window_stats

    frames = [{"t0": 0.0, "t1": 100.0, "exit": False, "index": 5, "variant": ""},
              {"t0": 100.0, "t1": 120.0, "exit": True, "index": 5, "variant": "exit"},
              {"t0": 120.0, "t1": 140.0, "exit": True, "index": 6, "variant": "exit"},
              {"t0": 140.0, "t1": 400.0, "exit": False, "index": 7, "variant": "fast160"}]
    w = window_stats(frames, [5, 5, 5, 7], cpu_s=0.2, traffic=4000)
    assert w["frames"] == 4 and w["fps"] == pytest.approx(10.0) and w["median_ms"] == pytest.approx(60.0)
    assert w["bytes_per_frame"] == 1000 and w["phone_cpu_ms_per_frame"] == pytest.approx(50.0)
    assert w["exit_rate"] == 0.5 and w["agreement"] == 0.75 and w["exit_agreement"] == 0.5
    assert w["variants"] == {"": 1, "exit": 2, "fast160": 1}


def test_bench_replay_uses_the_products_rule():
    """bench.early_exit's stream replay runs `early_exit.step`: a stream of one confident class exits once the
    (lagged) room answer arrives, and never more than max_run in a row."""
    from bench.early_exit import stream_policy

    z = np.full(10, -20.0)
    z[2] = 20.0
    rows = [{"full": 2, 160: (2, normalized_entropy(z)), "z": {160: z}} for _ in range(12)]
    out = stream_policy(rows, 160, 0.1, lag=2, match=True, alone_threshold=0.0, max_run=4)
    # Frames 0 and 1 go to the room (no answer yet), frame 2 sees frame 0's answer; then runs of 4 exits, each
    # followed by one room frame whose answer arrives 2 frames later.
    assert out["exit_rate"] == pytest.approx(8 / 12) and out["exit_agreement"] == 1.0
