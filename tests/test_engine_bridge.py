"""The worker's engine loop (`engine_bridge`, as `tilemesh/web/ort_engine.js` drives it) with native onnxruntime
standing in for onnxruntime-web: a deferred peer whose tasks run in task-model sessions (weights external in
the compact blob) computes a two-device plan with a numpy peer and gets the single-device answer."""

from __future__ import annotations

import json
import random

import numpy as np
import onnxruntime as ort
import pytest
from test_peer import spec_for

from tilemesh.runtime import engine_bridge as bridge
from tilemesh.runtime import graph as graph_mod
from tilemesh.runtime import peer as peer_mod
from tilemesh.runtime.classify import LocalClassifier


class NativeEngine:
    """What ort_engine.js does, with onnxruntime: sessions per plan task, the compute loop, the local model."""

    def __init__(self, blob: bytes):
        self.blob = blob
        self.sessions: dict[int, tuple] = {}
        self.runs = 0

    def session(self, model: dict):
        opts = ort.SessionOptions()
        opts.add_external_initializers_from_files_in_memory([bridge.BLOB_NAME], [self.blob], [len(self.blob)])
        return ort.InferenceSession(model["model"], opts, providers=["CPUExecutionProvider"]), list(model["outputs"])

    def adopt(self):
        models = bridge.plan_models()
        self.sessions = {i: self.session(m) for i, m in enumerate(models["tasks"])} if models else {}

    def drain(self, reply: dict) -> dict:
        while True:
            reqs = bridge.take_compute(reply)
            if not reqs:
                return reply
            for req in reqs:
                sess, outs = self.sessions[req["task"]]
                got = sess.run(outs, {name: a for name, a in req["inputs"]})
                self.runs += 1
                bridge.computed(reply, reply["plan_id"], req["frame"], req["task"], outs,
                                [g.tobytes() for g in got], [g.shape for g in got])


@pytest.fixture(scope="module")
def files(demo_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compact")
    json_path, bin_path = graph_mod.save_compact(graph_mod.load_onnx(demo_model_dir / "mobilenet_v2.onnx"),
                                                 out / "mobilenet_v2")
    labels = out / "labels.json"
    labels.write_text((demo_model_dir / "labels.json").read_text())
    return str(json_path), str(labels), bin_path


def test_deferred_peer_on_onnxruntime_equals_numpy_room(files):
    model_json, labels_json, bin_path = files
    peer_mod.load(model_json, labels_json)
    assert bridge.blob_path(model_json) == str(bin_path)
    assert bridge.use_engine("onnxruntime", True)["name"] == "onnxruntime"
    engine = NativeEngine(bin_path.read_bytes())
    phone = peer_mod.current()
    laptop = peer_mod.Peer(LocalClassifier.from_files(model_json, labels_json))  # numpy, inline
    spec = json.loads(json.dumps(spec_for(phone.graph)))
    role = phone.set_plan(spec, "phone")
    engine.adopt()
    assert len(engine.sessions) == role["tasks"] > 0
    laptop.set_plan(spec, "laptop")
    frame = np.random.default_rng(9).integers(0, 256, (256, 256, 4), dtype=np.uint8)
    peers = {"phone": phone, "laptop": laptop}
    reply = engine.drain(phone.start_frame(1, frame.tobytes(), 256, 256))
    rng = random.Random(1)
    queue = [("phone", o["dst"], c) for o in reply["out"] for c in o["chunks"]]
    results = list(reply["results"])
    while queue:
        src, dst, chunk = queue.pop(rng.randrange(len(queue)))
        got = peers[dst].on_chunk(src, memoryview(chunk))
        if dst == "phone":
            got = engine.drain(got)
        assert not got.get("compute")
        queue += [(dst, o["dst"], c) for o in got["out"] for c in o["chunks"]]
        results += got["results"]
    assert engine.runs == role["tasks"]
    local = laptop.classifier.classify(frame.tobytes(), 256, 256)
    assert [r["frame"] for r in results] == [1]
    assert [t["index"] for t in results[0]["top"]] == [t["index"] for t in local["top"]]
    np.testing.assert_allclose([t["p"] for t in results[0]["top"]], [t["p"] for t in local["top"]], atol=1e-4)
    # A result for a plan that has been replaced is ignored, not applied.
    assert bridge.computed({}, 999, 1, 0, [], [], []) == {"out": [], "results": [], "reports": [], "compute": []}
    bridge.use_engine("onnxruntime", False)
    assert not phone.deferred and bridge.engine()["name"] == "numpy"


def test_local_classifier_through_the_whole_model(files):
    model_json, labels_json, bin_path = files
    peer_mod.load(model_json, labels_json)
    engine = NativeEngine(bin_path.read_bytes())
    sess, outs = engine.session(bridge.whole_model())
    frame = np.random.default_rng(2).integers(0, 256, (256, 256, 4), dtype=np.uint8)
    x, pre_ms = bridge.local_input(frame.tobytes(), 256, 256)
    (logits,) = sess.run(outs, {peer_mod.current().graph.input: x})
    got = bridge.local_result(logits.tobytes(), logits.shape, pre_ms, 1.0)
    want = peer_mod.classify_local(frame.tobytes(), 256, 256)
    assert [t["index"] for t in got["top"]] == [t["index"] for t in want["top"]]
    np.testing.assert_allclose([t["p"] for t in got["top"]], [t["p"] for t in want["top"]], atol=1e-4)


def test_engine_profile_from_probes_and_the_choice(files):
    """The engine times `engine_probes` (here native onnxruntime); the peer takes whichever engine its profile
    predicts faster than numpy's, and the planner gets that profile."""
    import time

    from tilemesh.runtime.profile import measure_profile, predict_graph_seconds, scaled_profile, validate_profile

    model_json, labels_json, bin_path = files
    peer_mod.load(model_json, labels_json)
    graph = peer_mod.current().graph
    engine = NativeEngine(bin_path.read_bytes())
    seconds = {}
    for probe in bridge.engine_probes():
        sess, outs = engine.session(probe)
        feeds = dict(probe["inputs"])
        sess.run(outs, feeds)
        t0 = time.perf_counter()
        for _ in range(5):
            sess.run(outs, feeds)
        seconds[probe["key"]] = (time.perf_counter() - t0) / 5
    assert {"call", "overhead", "chain"} <= set(seconds) and len(seconds) >= 6
    numpy_prof = measure_profile(graph, budget_s=0.05)
    fast = bridge.engine_profile("onnxruntime", seconds, "native", model_ms=5.0, numpy_profile=numpy_prof)
    validate_profile(fast)
    assert fast["backend"] == "onnxruntime" and peer_mod.current().deferred
    assert predict_graph_seconds(fast, graph) * 1e3 == pytest.approx(5.0, rel=1e-6)  # calibrated on the model
    # Against a numpy that were 1000x faster, the device stays on numpy, says why, and reports numpy's profile.
    slow = bridge.engine_profile("onnxruntime", seconds, "native", model_ms=5.0,
                                 numpy_profile=scaled_profile(numpy_prof, 1000))
    assert slow["backend"] == "numpy" and "numpy predicted faster" in slow["engine_reason"]
    assert slow["sec_per_mac"] == scaled_profile(numpy_prof, 1000)["sec_per_mac"]
    assert not peer_mod.current().deferred
