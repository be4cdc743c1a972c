"""The stream benchmark's pure parts: scenario `[streams]` tables, one camera's window, the goals' ratios."""

from __future__ import annotations

import pytest

from bench.scenario import ScenarioError, load_scenario, parse_scenario
from bench.streams import ratios, window_figures
from tilemesh.runtime.stream import measured


def phones(n):
    return [{"name": f"p{i}", "kind": "phone", "cores": 0.4, "mbps": 50, "delay_ms": 10} for i in range(1, n + 1)]


def test_stream_scenarios_parse_and_bad_ones_say_why():
    sc = load_scenario("streams_phones")
    assert sc.streams.sizes == (1, 2, 3, 4) and sc.streams.cameras == ("phone1",)
    assert parse_scenario(sc.to_dict()).streams == sc.streams  # round trip (overrides go through it)
    loose = load_scenario("streams_phones_bound2")
    assert loose.streams.latency_factor == 2.0 and sc.streams.latency_factor is None
    assert parse_scenario(loose.to_dict()).streams == loose.streams
    two = load_scenario("streams_two_cameras")
    assert two.streams.cameras == ("phone1", "phone2") and two.streams.sizes == (4,)
    base = {"name": "s", "source": "p1", "devices": phones(3)}
    for streams, msg in (({"cameras": ["p9"]}, "cameras"), ({"sizes": [5]}, "between"), ({"sizes": []}, "sizes"),
                         ({"cameras": ["p1", "p3"], "sizes": [2]}, "between 3"), ({"window": 3}, "keys")):
        with pytest.raises(ScenarioError, match=msg):
            parse_scenario({**base, "streams": streams})


def test_window_counts_shown_room_frames_and_keeps_late_and_fallbacks_apart():
    frames = [{"t0": 0, "t1": 100, "shown": True, "skipped": False, "room": True, "plan_id": 3},
              {"t0": 10, "t1": 300, "shown": False, "skipped": False, "room": True, "plan_id": 4},
              {"t0": 50, "t1": 250, "shown": True, "skipped": False, "room": True, "plan_id": 3},
              {"t0": 60, "t1": 60, "shown": True, "skipped": True, "room": False, "plan_id": None},
              {"t0": 70, "t1": 170, "shown": True, "skipped": False, "room": False, "plan_id": None}]
    w = window_figures(frames, 2.0)
    assert w["shown"] == 2 and w["fps"] == 1.0 and w["dropped_late"] == 1 and w["fallback"] == 1
    assert w["p50_ms"] == 200 and w["p90_ms"] == 200 and w["plans"] == [3, 4]


def test_ratios_against_one_phone_and_shares_of_two_cameras():
    def cam(fps, p90):
        return {"fps": fps, "p90_ms": p90}

    rooms = [{"size": 1, "cameras": {"p1": cam(5.0, 200)}}, {"size": 3, "cameras": {"p1": cam(12.0, 250)}},
             {"size": 4, "cameras": {"p1": cam(6.0, 300), "p2": cam(4.0, 300)}}]
    lines = ratios(rooms)
    assert "2.40x one phone (0.80 of 3x" in lines[1] and "p90 250 ms = 1.25x" in lines[1]
    assert "total 10.00 fps" in lines[2] and "p1 6.00 fps (60%)" in lines[2] and "p2 4.00 fps (40%)" in lines[2]


def test_measured_figures_of_a_stream():
    shown = [(t * 0.1, 50.0 + t) for t in range(40)]  # 10 results a second, latency rising 50 -> 89 ms
    fig = measured(shown, now=3.9)
    assert fig["frames"] == 31 and fig["fps"] == pytest.approx(10.0)  # the last 3 s only
    assert fig["p50_ms"] == 74.0 and fig["p90_ms"] == 86.0
    assert measured([], 1.0) == {"fps": 0.0, "p50_ms": 0.0, "p90_ms": 0.0, "frames": 0}


def test_the_bench_prints_what_the_planner_saw(demo_model_dir):
    """Profiles as the devices reported them, relative to the camera's (equal phones read 1.00x; one profiled
    3x slower reads 3.00x), and the lanes the planner made from them."""
    from bench.streams import planner_view
    from tilemesh.planning.planner import browser_profile
    from tilemesh.runtime import graph as graph_mod

    graph = graph_mod.load_onnx(demo_model_dir / "mobilenet_v2.onnx")
    link = {"rtt_ms": 20.0, "mbps": 50.0}
    speeds = {"pa": 0.4, "pb": 0.4, "pc": 0.4 / 3}
    roster = [{"id": d, "name": f"phone{i + 1}", "profile": {"compute": browser_profile(v),
                                                             "links": {o: link for o in speeds if o != d}}}
              for i, (d, v) in enumerate(speeds.items())]
    plan = {"source": "pa", "lanes": [{"label": "pa runs all", "predicted_ms": 300.0, "depth": 1, "weight": 1.0}],
            "stream": {"predicted_fps": 3.3, "predicted_ms": 300.0, "bound_ms": 360.0, "single_ms": 300.0}}
    lines = planner_view(graph, {"size": 3, "roster": roster, "plans": {"phone1": plan}})
    assert "phone2" in lines[0] and "(1.00x, link 50 Mbit/s)" in lines[0] and "(3.00x, link 50 Mbit/s)" in lines[0]
    assert lines[1].startswith("  planned: phone1 runs all (300 ms, depth 1, weight 1.00)")
    assert "bound 360 ms = 1.2x" in lines[1]
    assert len(lines) == 2 + 3 and all("fps" in line for line in lines[2:])


def test_pacing_and_the_cost_model_against_a_window():
    """In flight: the share of the window with a frame out (overlapping frames count once; a gap between a
    result and the next frame does not count); measured / planned rate and mean latency."""
    from bench.streams import in_flight, vs_planned

    one_at_a_time = [{"t0": 0, "t1": 80}, {"t0": 100, "t1": 180}, {"t0": 200, "t1": 280}]
    assert in_flight(one_at_a_time, 0.3) == pytest.approx(240 / 300)
    overlapping = [{"t0": 0, "t1": 150}, {"t0": 50, "t1": 200}, {"t0": 200, "t1": 300}]
    assert in_flight(overlapping, 0.3) == pytest.approx(1.0)
    assert in_flight([], 1.0) is None
    fig = {"fps": 4.0, "mean_ms": 300.0, "predicted_fps": 5.0, "predicted_ms": 200.0}
    assert vs_planned(fig) == {"fps_vs_planned": pytest.approx(0.8), "ms_vs_planned": pytest.approx(1.5)}
    assert vs_planned({"fps": 4.0, "mean_ms": None, "predicted_fps": None, "predicted_ms": None}) == {
        "fps_vs_planned": None, "ms_vs_planned": None}
