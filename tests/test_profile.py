"""The compute profile: its shape and JSON form, the per-node prediction, and a real calibration check
(the whole-graph prediction against a measured `run_graph` on this machine, by ratio of robust
statistics, re-measured a few times because the machine is shared)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from tilemesh.runtime import profile as P
from tilemesh.runtime.deps import node_macs
from tilemesh.runtime.executor import run_graph
from tilemesh.runtime.regions import EMPTY, Region, plane

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mobilenet(demo_graph):
    return demo_graph


@pytest.fixture(scope="module")
def prof(mobilenet):
    return P.measure_profile(mobilenet, budget_s=0.3)


def _full(graph, node):
    r = Region.full(*plane(graph.shapes[node.output]))
    return node_macs(node, graph, r), r


def test_op_classes_of_mobilenet(mobilenet):
    g = mobilenet
    classes = {n.name: P.op_class(g, n) for n in g.nodes}
    assert classes["features.0.0"] == "conv_dense"  # 3x3 stem, 3 -> 32 channels
    assert classes["features.2.conv.0.0"] == "conv_pointwise"
    assert classes["features.2.conv.1.0"] == "conv_depthwise"
    assert classes["features.3.add"] == "elementwise"
    assert classes["features.0.2"] == "elementwise"  # Clip
    assert classes["classifier.1"] == "gemm"
    assert classes["flatten"] is None
    counts = {c: sum(v == c for v in classes.values()) for c in P.OP_CLASSES}
    assert counts == {"conv_dense": 1, "conv_pointwise": 34, "conv_depthwise": 17, "elementwise": 46, "gemm": 1}


def test_representatives_cover_every_class_at_two_resolutions(mobilenet):
    reps = P._representatives(mobilenet)
    names = [n.name for _, n in reps]
    assert {c for c, _ in reps} == set(P.OP_CLASSES)
    dw = [mobilenet.shapes[n.output][2] for c, n in reps if c == "conv_depthwise"]
    assert sorted(dw) == [14, 56]
    assert "features.0.0" in names and "classifier.1" in names


def test_profile_is_valid_json(prof):
    again = json.loads(json.dumps(prof, allow_nan=False))
    assert P.validate_profile(again) is again
    assert again["version"] == P.PROFILE_VERSION
    assert set(again["sec_per_mac"]) == set(P.OP_CLASSES)
    assert all(v > 0 for v in again["sec_per_mac"].values())
    assert 0 < again["overhead_s"] < 0.01
    assert 0.8 <= again["chain_factor"] <= 3.0
    assert len(again["samples"]) >= 7


def test_validate_rejects_broken_profiles(prof):
    for bad in (
        {**prof, "version": 99},
        {**prof, "sec_per_mac": {k: v for k, v in prof["sec_per_mac"].items() if k != "gemm"}},
        {**prof, "overhead_s": float("nan")},
        {**prof, "sec_per_mac": dict.fromkeys(P.OP_CLASSES, 0.0)},
        {**prof, "chain_factor": -1.0},
        {**prof, "task_s": -0.001},
        {**prof, "frame_s": float("inf")},
        "profile",
    ):
        with pytest.raises(ValueError):
            P.validate_profile(bad)


def test_median_of_sustained_runs():
    assert P.median_seconds([3.0, 1.0, 2.0]) == 2.0
    assert P.median_seconds([4.0, 1.0, 2.0, 3.0]) == 2.5
    with pytest.raises(ValueError):
        P.median_seconds([])
    calls = []
    samples = P.sustained_samples(lambda: calls.append(1), budget_s=0.0, min_runs=4)
    assert len(samples) == 4 and len(calls) == 5  # one warm-up, then the runs timed
    assert all(s >= 0 for s in samples)
    assert len(P.sustained_samples(lambda: None, budget_s=10.0, min_runs=2, max_runs=7)) == 7


def test_fixed_costs_scale_with_speed_and_default_to_zero(prof):
    assert P.task_overhead_seconds(prof) == 0.0 and P.frame_overhead_seconds(prof) == 0.0
    p = {**prof, "task_s": 0.002, "frame_s": 0.006}
    half = P.scaled_profile(p, 0.5)
    assert P.task_overhead_seconds(half) == pytest.approx(0.004)
    assert P.frame_overhead_seconds(half) == pytest.approx(0.012)
    P.validate_profile(half)


def test_prediction_scales_with_macs_speed_and_region(mobilenet, prof):
    g = mobilenet
    node = g.node("features.3.conv.0.0")
    macs, full = _full(g, node)
    t = P.predict_node_seconds(prof, g, node, macs, full)
    half = Region(0, full.rows // 2, 0, full.cols)
    t_half = P.predict_node_seconds(prof, g, node, node_macs(node, g, half), half)
    assert t_half < t
    # Time is affine in MACs: overhead + macs * rate.
    assert t - t_half == pytest.approx((macs - node_macs(node, g, half)) * prof["sec_per_mac"]["conv_pointwise"]
                                       * prof["chain_factor"], rel=1e-9)
    assert P.predict_node_seconds(prof, g, node, 0, EMPTY) == 0.0
    slow = P.scaled_profile(prof, 0.25)
    assert P.predict_node_seconds(slow, g, node, macs, full) == pytest.approx(4 * t, rel=1e-9)
    assert P.predict_graph_seconds(slow, g) == pytest.approx(4 * P.predict_graph_seconds(prof, g), rel=1e-9)
    flat = g.node("flatten")
    assert P.predict_node_seconds(prof, g, flat, 0, Region(0, 1, 0, 1)) == pytest.approx(
        prof["overhead_s"] * prof["chain_factor"])


def _cpu_share(seconds: float = 0.1) -> float:
    """Share of one core this thread gets right now: a pure-Python spin's CPU time over wall time."""
    w0, c0 = time.perf_counter(), time.thread_time()
    while time.perf_counter() - w0 < seconds:
        pass
    return (time.thread_time() - c0) / (time.perf_counter() - w0)


def _busy() -> bool:
    """The machine is too loaded for timing to mean anything (other engineers' benchmarks: a
    multi-threaded Pyodide bench on the 2 cores made run_graph swing 60-480 ms at load average 2)."""
    return os.getloadavg()[0] > 2 * (os.cpu_count() or 1) or _cpu_share() < 0.85


def test_depthwise_is_dearer_per_mac_than_pointwise(mobilenet, prof):
    # numpy's BLAS matmul vs nine strided multiply-adds: the reason the classes exist at all.
    ratios = []
    for attempt in range(3):
        p = prof if attempt == 0 else P.measure_profile(mobilenet, budget_s=0.2)
        ratios.append(p["sec_per_mac"]["conv_depthwise"] / p["sec_per_mac"]["conv_pointwise"])
        if ratios[-1] > 3:
            return
    if _busy():
        pytest.skip(f"machine too busy to time (load {os.getloadavg()[0]:.1f}); ratios {ratios}")
    raise AssertionError(f"depthwise/pointwise seconds per MAC: {ratios}")


def _lower_quartile(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 4]


def test_whole_graph_prediction_matches_run_graph(mobilenet):
    """A real measurement: the profile's whole-graph prediction is within 2x of run_graph here.

    Both sides use the lower quartile of repeated runs (other processes only add time), and the pair
    is re-measured up to four times: a burst of load can spoil one attempt, but a model that is
    systematically off by 2x fails them all. Under sustained heavy load (long runs are preempted more
    than short samples) the test skips rather than flakes.
    """
    g = mobilenet
    x = np.random.default_rng(0).standard_normal(g.shapes[g.input]).astype(np.float32)
    run_graph(g, x)  # warm-up
    ratios = []
    for _ in range(4):
        prof = P.measure_profile(g, budget_s=0.3)
        measured = _lower_quartile(lambda: run_graph(g, x), 8)
        ratios.append(P.predict_graph_seconds(prof, g) / measured)
        if 0.5 <= ratios[-1] <= 2.0:
            break
    if not 0.5 <= ratios[-1] <= 2.0 and _busy():
        pytest.skip(f"machine too busy to time (load {os.getloadavg()[0]:.1f}, CPU share {_cpu_share():.2f});"
                    f" ratios {ratios}")
    assert 0.5 <= ratios[-1] <= 2.0, f"predicted/measured ratios {ratios}"
