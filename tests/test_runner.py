"""Distributed inference through DeviceRunner over a fake in-memory mesh that reorders, delays and drops.

The fake transport stands in for WebRTC data channels so that lossy and out-of-order delivery is
deterministic and fast; the real-browser tests run the same runner over real channels.
"""

from __future__ import annotations

import random
import struct
import zlib

import numpy as np
import onnxruntime as ort
import pytest

from tilemesh.planning import planner
from tilemesh.runtime import graph as graph_mod
from tilemesh.runtime import wire
from tilemesh.runtime.deps import live_tensors
from tilemesh.runtime.executor import run_graph
from tilemesh.runtime.preprocess import centre_crop_u8, normalize_u8
from tilemesh.runtime.regions import plane
from tilemesh.runtime.runner import ComputeRequest, DeviceRunner, PlanMismatch
from tilemesh.runtime.tiling import Split, build_plan


@pytest.fixture(scope="module")
def mobilenet(demo_model_dir):
    path = demo_model_dir / "mobilenet_v2.onnx"
    return graph_mod.load_onnx(path), ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def block_cuts(graph) -> dict[int, int]:
    """Block-boundary cut index (as the planner finds it from the structure) -> stride of the tensor live there."""
    out = {}
    for k in planner.block_cuts(graph):
        (t,) = live_tensors(graph, k)
        out[k] = plane(graph.shapes[graph.input])[0] // plane(graph.shapes[t])[0]
    return out


def three_device_plan(graph):
    """Fused rows to stride 8, halo exchange at stride 16, the 7x7 tail and head gathered on the edge."""
    strides = block_cuts(graph)
    s8 = max(k for k, s in strides.items() if s == 8)
    s16 = [k for k, s in strides.items() if s == 16]
    s32 = min(k for k, s in strides.items() if s == 32)
    rows = Split.rows({"phone": 2, "laptop": 5, "edge": 3})
    cuts = [s8, s16[len(s16) // 2], s32]
    return build_plan(graph, cuts, [rows, rows, rows, Split.whole("edge")], "phone")


class FakeMesh:
    """Delivers chunks between runners in a seeded random order; `drop(src, dst, chunk)` loses chunks."""

    def __init__(self, runners: dict[str, DeviceRunner], seed: int = 0, drop=None):
        self.runners = runners
        self.rng = random.Random(seed)
        self.queue: list[tuple[str, str, bytes]] = []
        self.drop = drop or (lambda src, dst, chunk: False)
        self.delivered = 0

    def post(self, src: str, outgoing) -> None:
        for o in outgoing:
            assert o.dst != src
            for c in o.chunks:
                # The sender must respect the limit it was given for that link (the remote's maxMessageSize).
                assert len(c) <= self.runners[src].max_message.get(o.dst, wire.DEFAULT_MAX_MESSAGE)
                self.queue.append((src, o.dst, c))

    def run(self) -> None:
        while self.queue:
            src, dst, chunk = self.queue.pop(self.rng.randrange(len(self.queue)))
            if self.drop(src, dst, chunk):
                continue
            self.delivered += 1
            self.post(dst, self.runners[dst].on_chunk(src, chunk))


def make_runners(graph, plan, plan_id=7, max_message=16 * 1024):
    devices = plan.devices
    return {
        d: DeviceRunner(graph, plan.device_plan(d), plan_id, source="phone",
                        max_message={o: max_message for o in devices})
        for d in devices
    }


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (256, 256, 4), dtype=np.uint8)


def test_three_devices_equal_single_device_and_onnxruntime(mobilenet):
    graph, sess = mobilenet
    plan = three_device_plan(graph)
    runners = make_runners(graph, plan)
    mesh = FakeMesh(runners, seed=1)
    pixels = centre_crop_u8(frame(3))
    mesh.post("phone", runners["phone"].start_frame(1, pixels))
    mesh.run()
    out = runners["phone"].result(1)
    assert out is not None, runners["phone"].errors
    x = normalize_u8(pixels)
    np.testing.assert_allclose(out, run_graph(graph, x), rtol=1e-5, atol=1e-5)
    ref = sess.run(None, {graph.input: x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert list(np.argsort(-out[0])[:5]) == list(np.argsort(-ref[0])[:5])
    # Every device computed something and the wire carried uint8 pixels, not float32, off the phone.
    reports = {d: r.report(1) for d, r in runners.items()}
    assert all(rep is not None and rep["tasks"] for rep in reports.values()), reports
    input_bytes = sum(tr.region.area * 3 for tr in plan.input_send)
    assert 0 < input_bytes <= reports["phone"]["bytes_sent"] < input_bytes + 4 * 10**6


def test_frames_in_flight_do_not_mix(mobilenet):
    """Three frames started at once, chunks of all of them shuffled together: each gets its own answer."""
    graph, _ = mobilenet
    plan = three_device_plan(graph)
    runners = make_runners(graph, plan)
    mesh = FakeMesh(runners, seed=2)
    crops = {f: centre_crop_u8(frame(10 + f)) for f in (1, 2, 3)}
    for f, px in crops.items():
        mesh.post("phone", runners["phone"].start_frame(f, px))
    mesh.run()
    for f, px in crops.items():
        np.testing.assert_allclose(runners["phone"].result(f), run_graph(graph, normalize_u8(px)), atol=1e-5)


def test_lost_frame_is_dropped_and_later_frames_finish(mobilenet):
    graph, _ = mobilenet
    plan = three_device_plan(graph)
    runners = make_runners(graph, plan)
    lost_frame = 1
    mesh = FakeMesh(runners, seed=3, drop=lambda s, d, c: wire.parse_chunk(c)[0].frame == lost_frame and s == "laptop")
    for f in range(1, 7):
        mesh.post("phone", runners["phone"].start_frame(f, centre_crop_u8(frame(f))))
        mesh.run()
    assert runners["phone"].result(lost_frame) is None
    assert all(runners["phone"].result(f) is not None for f in range(3, 7))
    assert any(f"frame {lost_frame} dropped" in e for r in runners.values() for e in r.errors)


def test_single_device_plan_sends_nothing(mobilenet):
    graph, sess = mobilenet
    plan = build_plan(graph, [], [Split.whole("phone")], "phone")
    runner = DeviceRunner(graph, plan.device_plan("phone"), 1, source="phone")
    px = centre_crop_u8(frame(5))
    assert runner.start_frame(1, px) == []
    np.testing.assert_allclose(runner.result(1), run_graph(graph, normalize_u8(px)), atol=1e-6)


def test_offload_plan_returns_logits_to_the_phone(mobilenet):
    graph, _ = mobilenet
    plan = build_plan(graph, [], [Split.whole("edge")], "phone")
    runners = {d: DeviceRunner(graph, plan.device_plan(d), 2, source="phone") for d in ("phone", "edge")}
    mesh = FakeMesh(runners)
    px = centre_crop_u8(frame(6))
    out = runners["phone"].start_frame(1, px)
    assert [o.dst for o in out] == ["edge"] and out[0].nbytes == px.nbytes  # uint8 pixels
    mesh.post("phone", out)
    mesh.run()
    np.testing.assert_allclose(runners["phone"].result(1), run_graph(graph, normalize_u8(px)), atol=1e-6)


def test_chunks_of_another_plan_or_unexpected_pieces_are_refused(mobilenet):
    graph, _ = mobilenet
    plan = three_device_plan(graph)
    runners = make_runners(graph, plan)
    px = centre_crop_u8(frame(8))
    out = runners["phone"].start_frame(1, px)
    to_laptop = next(o for o in out if o.dst == "laptop")
    other_plan = DeviceRunner(graph, plan.device_plan("laptop"), 99, source="phone")
    with pytest.raises(PlanMismatch, match="plan 7"):
        for c in to_laptop.chunks:
            other_plan.on_chunk("phone", c)
    # The edge expects nothing from the phone at its first task in this plan's layout: a stray piece is refused.
    stray = wire.encode(np.zeros((1, 3, 4, 4), np.uint8), frame=1, tensor=0, plan_id=7, region=(0, 4, 0, 4))
    with pytest.raises(PlanMismatch, match="did not expect"):
        for c in stray:
            runners["edge"].on_chunk("phone", c)


def test_bad_frames_are_refused(mobilenet):
    graph, _ = mobilenet
    plan = three_device_plan(graph)
    runners = make_runners(graph, plan)
    with pytest.raises(ValueError, match="uint8"):
        runners["phone"].start_frame(1, np.zeros((1, 3, 224, 224), np.float32))
    with pytest.raises(ValueError, match="not the source"):
        runners["laptop"].start_frame(1, centre_crop_u8(frame(1)))


def test_a_peer_announcing_a_huge_tensor_is_refused_without_allocating_it(mobilenet):
    graph, _ = mobilenet
    plan = three_device_plan(graph)
    runner = make_runners(graph, plan)["edge"]
    # A well-formed first chunk of a (4096, 4096, 64) float32 message: 4 GiB, far over the runner's cap.
    shape, max_message = (4096, 4096, 64), 65536
    stride = max_message - wire.HEADER_SIZE
    count = -(-4096 * 4096 * 64 * 4 // stride)
    head = struct.pack("<4sBBBBIII4i4IIII", wire.MAGIC, wire.VERSION, 1, 3, 0, 1, 3, 7, 0, 4096, 0, 4096,
                       *shape, 0, stride, 0, count)
    payload = bytes(stride)
    chunk = head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload
    with pytest.raises(wire.WireError, match="max_pending_bytes"):
        runner.on_chunk("phone", chunk)


class DeferredEngine:
    """Stands in for an engine outside Python (onnxruntime-web): takes `ComputeRequest`s from the runners' effects,
    answers them later, interleaved with chunk delivery in a seeded order, through `on_computed`."""

    def __init__(self, graph, mesh: FakeMesh, backend):
        self.graph, self.mesh, self.backend = graph, mesh, backend
        self.pending: list[tuple[str, object]] = []
        self.answered = 0

    def effects(self, device: str, effects) -> None:
        self.pending += [(device, e) for e in effects if isinstance(e, ComputeRequest)]
        self.mesh.post(device, [e for e in effects if not isinstance(e, ComputeRequest)])

    def run(self) -> None:
        from tilemesh.runtime.tiling import run_steps

        while self.pending or self.mesh.queue:
            if self.pending and (not self.mesh.queue or self.mesh.rng.random() < 0.5):
                device, req = self.pending.pop(self.mesh.rng.randrange(len(self.pending)))
                runner = self.mesh.runners[device]
                task = runner.dplan.tasks[req.task]
                vals = run_steps(self.graph, task.deps, req.inputs, keep=req.keep, backend=self.backend)
                self.answered += 1
                self.effects(device, runner.on_computed(req.frame, req.task, vals))
            else:
                src, dst, chunk = self.mesh.queue.pop(self.mesh.rng.randrange(len(self.mesh.queue)))
                self.effects(dst, self.mesh.runners[dst].on_chunk(src, chunk))


def test_deferred_compute_equals_inline(mobilenet):
    """Runners that hand each task out (`deferred=True`) and resume on its result give the inline answer; one
    task per frame is out at a time, frames in flight interleave, and a stale result is ignored."""
    from tilemesh.runtime.backend import OnnxRuntimeBackend

    graph, _ = mobilenet
    plan = three_device_plan(graph)
    runners = {d: DeviceRunner(graph, plan.device_plan(d), 7, source="phone", deferred=True) for d in plan.devices}
    mesh = FakeMesh(runners, seed=5)
    engine = DeferredEngine(graph, mesh, OnnxRuntimeBackend(graph))
    crops = {f: centre_crop_u8(frame(20 + f)) for f in (1, 2)}
    for f, px in crops.items():
        engine.effects("phone", runners["phone"].start_frame(f, px))
    engine.run()
    assert engine.answered == sum(len(plan.device_plan(d).tasks) for d in plan.devices) * len(crops)
    for f, px in crops.items():
        np.testing.assert_allclose(runners["phone"].result(f), run_graph(graph, normalize_u8(px)), atol=1e-4)
        assert all(r.report(f)["tasks"] for r in runners.values())
    # A result nobody asked for (the frame is finished) changes nothing; a wrong-sized one is refused.
    assert runners["laptop"].on_computed(1, 0, {}) == []
    mesh2 = FakeMesh(runners, seed=6)
    engine2 = DeferredEngine(graph, mesh2, OnnxRuntimeBackend(graph))
    engine2.effects("phone", runners["phone"].start_frame(3, centre_crop_u8(frame(30))))
    req = next(e for d, e in engine2.pending if d == "phone")
    task = runners["phone"].dplan.tasks[req.task]
    bad = {k: np.zeros((1, 1, 1, 1), np.float32) for k in task.owned}
    with pytest.raises(ValueError, match="the plan computes"):
        runners["phone"].on_computed(3, req.task, bad)
