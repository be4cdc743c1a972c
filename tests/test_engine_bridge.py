"""The worker's engine loop (`engine_bridge`, as `tilemesh/web/ort_engine.js` drives it) with native onnxruntime
standing in for onnxruntime-web: a deferred peer whose tasks run in task-model sessions (weights external in
the compact blob) computes a two-device plan with a numpy peer and gets the single-device answer."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from tilemesh.runtime import engine_bridge as bridge
from tilemesh.runtime import graph as graph_mod
from tilemesh.runtime import session as S


class NativeEngine:
    """What ort_engine.js does, with onnxruntime: sessions per plan task, the compute loop, the local model."""

    def __init__(self, blob: bytes):
        self.blob = blob
        self.sessions: dict[int, tuple] = {}
        self.runs = 0
        self.reference = None
        self.reference_runs = 0

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
                if req["task"] < 0:  # a reference run (rescues, a frame alone): one session per graph
                    self.reference = self.reference or self.session(bridge.reference_model())
                    self.reference_runs += 1
                sess, outs = self.reference if req["task"] < 0 else self.sessions[req["task"]]
                got = sess.run(outs, {name: a for name, a in req["inputs"]})
                self.runs += 1
                bridge.computed(reply, req["plan_id"], req["frame"], req["task"], outs,
                                [g.tobytes() for g in got], [g.shape for g in got])


@pytest.fixture(scope="module")
def files(demo_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compact")
    json_path, bin_path = graph_mod.save_compact(graph_mod.load_onnx(demo_model_dir / "mobilenet_v2.onnx"),
                                                 out / "mobilenet_v2")
    labels = out / "labels.json"
    labels.write_text((demo_model_dir / "labels.json").read_text())
    return str(json_path), str(labels), bin_path


def test_session_on_onnxruntime_equals_numpy(files):
    """The device session (`tilemesh.runtime.session`) with its tasks handed out: a plan fused in three segments
    is adopted (sessions made then), a frame's compute requests run in task-model sessions and come back as
    `Computed`, and the frame's top-5 equals single-device numpy."""
    from tilemesh.runtime.deps import cut_candidates

    model_json, labels_json, bin_path = files
    S._session = None
    S.load(model_json, labels_json)
    assert bridge.blob_path(model_json) == str(bin_path)
    assert bridge.use_engine("onnxruntime", True)["name"] == "onnxruntime"
    engine = NativeEngine(bin_path.read_bytes())
    graph = S.session().runtime.graph
    cuts = cut_candidates(graph)
    whole = {"devices": [["me"]], "row_shares": None, "col_shares": None}
    spec = {"plan_id": 4, "source": "me", "cuts": [cuts[3], cuts[8]], "splits": [whole] * 3}
    msg = {"type": "plan", "plan_id": 4, "source": "me", "devices": ["me"], "spec": spec}
    reply = bridge.handle({"on": "plan", "msg": msg, "me": "me"}, 0.0)
    assert reply["adopted"] == [4] and not reply["compute"]
    engine.adopt()
    assert len(engine.sessions) == 3
    frame = np.random.default_rng(9).integers(0, 256, (256, 256, 4), dtype=np.uint8)
    reply = engine.drain(bridge.handle({"on": "frame", "frame": 1, "data": frame.tobytes(), "height": 256,
                                        "width": 256}, 1.0))
    done = [e for e in reply["effects"] if e["do"] == "frame_done"]
    assert engine.runs == 3 and len(done) == 1
    local = S.session().runtime.classifier.classify(frame.tobytes(), 256, 256)
    got = done[0]["result"]["top"]
    assert [t["index"] for t in got] == [t["index"] for t in local["top"]]
    np.testing.assert_allclose([t["p"] for t in got], [t["p"] for t in local["top"]], atol=1e-4)
    # A result for a plan that has been replaced is not applied (the session reports it, nothing runs).
    stale = bridge.computed({"effects": [], "compute": []}, 999, 1, 0, [], [], [])
    assert not stale["compute"] and not [e for e in stale["effects"] if e["do"] == "frame_done"]
    bridge.use_engine("onnxruntime", False)
    assert not S.session().runtime.deferred and bridge.engine()["name"] == "numpy"


def test_local_classifier_through_the_whole_model(files):
    model_json, labels_json, bin_path = files
    S._session = None
    S.load(model_json, labels_json)
    engine = NativeEngine(bin_path.read_bytes())
    sess, outs = engine.session(bridge.whole_model())
    frame = np.random.default_rng(2).integers(0, 256, (256, 256, 4), dtype=np.uint8)
    x, pre_ms = bridge.local_input(frame.tobytes(), 256, 256)
    (logits,) = sess.run(outs, {S.session().runtime.graph.input: x})
    got = bridge.local_result(logits.tobytes(), logits.shape, pre_ms, 1.0)
    want = S.classify_local(frame.tobytes(), 256, 256)
    assert [t["index"] for t in got["top"]] == [t["index"] for t in want["top"]]
    np.testing.assert_allclose([t["p"] for t in got["top"]], [t["p"] for t in want["top"]], atol=1e-4)


def test_engine_profile_from_probes_and_the_choice(files):
    """The engine times `engine_probes` (here native onnxruntime); the peer takes whichever engine its profile
    predicts faster than numpy's, and the planner gets that profile."""
    import time

    from tilemesh.runtime.profile import measure_profile, predict_graph_seconds, scaled_profile, validate_profile

    model_json, labels_json, bin_path = files
    S._session = None
    S.load(model_json, labels_json)
    graph = S.session().runtime.graph
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
    assert fast["backend"] == "onnxruntime" and S.session().runtime.deferred
    # Calibrated on the model: one whole-model task (its nodes plus the engine's per-task call) is what it measured.
    assert fast["task_s"] == pytest.approx(seconds["call"])
    assert (predict_graph_seconds(fast, graph) + fast["task_s"]) * 1e3 == pytest.approx(5.0, rel=1e-6)
    # What the worker adds (its thread count and the times that chose it) joins the profile; numpy's frame_s
    # (the camera device's per-frame Python work) carries over: it does not depend on the engine.
    trial = bridge.engine_profile("onnxruntime", seconds, "native", model_ms=5.0,
                                  numpy_profile={**numpy_prof, "frame_s": 0.003},
                                  extra={"threads": 1, "thread_trial_ms": {"2": 9.0, "1": 5.0}})
    assert trial["threads"] == 1 and trial["thread_trial_ms"] == {"2": 9.0, "1": 5.0}
    assert trial["frame_s"] == 0.003
    assert bridge.preprocessing() == {"crop": 224, "resize_shorter_side": 256, "mean": [0.485, 0.456, 0.406],
                                      "std": [0.229, 0.224, 0.225]}
    # The choice compares like with like: an engine whose median (what the planner gets) loses to numpy's
    # lower-quartile-based prediction but whose own lower quartile wins stays on the engine.
    six = scaled_profile(numpy_prof, predict_graph_seconds(numpy_prof, graph) * 1e3 / 6.0)  # numpy: 6 ms
    fair = bridge.engine_profile("onnxruntime", seconds, "native", model_ms=7.0, numpy_profile=six,
                                 extra={"model_best_ms": 5.0})
    assert fair["backend"] == "onnxruntime"
    assert (predict_graph_seconds(fair, graph) + fair["task_s"]) * 1e3 == pytest.approx(7.0, rel=1e-6)
    assert bridge.engine_profile("onnxruntime", seconds, "native", model_ms=7.0, numpy_profile=six)["backend"] == \
        "numpy"  # without the lower quartile, the median decides
    # Against a numpy that were 1000x faster, the device stays on numpy, says why, and reports numpy's profile.
    slow = bridge.engine_profile("onnxruntime", seconds, "native", model_ms=5.0,
                                 numpy_profile=scaled_profile(numpy_prof, 1000))
    assert slow["backend"] == "numpy" and "numpy predicted faster" in slow["engine_reason"]
    assert slow["sec_per_mac"] == scaled_profile(numpy_prof, 1000)["sec_per_mac"]
    assert not S.session().runtime.deferred


def test_reference_run_pieces_equal_numpy_rescues(files):
    """The reference run's model (the whole graph keeping every block boundary's tensor) on onnxruntime: every
    piece of a plan cut out of it equals the numpy kernels' rescue of that piece over its receptive field."""
    from tilemesh.runtime import recovery as R
    from tilemesh.runtime.deps import cut_candidates
    from tilemesh.runtime.peer import plan_from_spec

    model_json, labels_json, bin_path = files
    S._session = None
    S.load(model_json, labels_json)
    rt = S.session().runtime
    graph = rt.graph
    sess, outs = NativeEngine(bin_path.read_bytes()).session(bridge.reference_model())
    assert outs == R.reference_tensors(graph) and outs[-1] == graph.output
    pixels = np.random.default_rng(4).integers(0, 256, (1, 3, 224, 224), dtype=np.uint8)
    ref = dict(zip(outs, sess.run(outs, {graph.input: rt.classifier.pre.normalize_u8(pixels)}), strict=True))
    cuts = cut_candidates(graph)
    rows = {"devices": [["a"], ["b"], ["c"]], "row_shares": [1, 2, 1], "col_shares": None}
    grid = {"devices": [["a", "b"], ["c", "d"]], "row_shares": [1, 1], "col_shares": [2, 1]}
    head = {"devices": [["c"]], "row_shares": None, "col_shares": None}
    plan = plan_from_spec(graph, {"source": "a", "cuts": [cuts[2], cuts[6], cuts[12]],
                                  "splits": [rows, grid, rows, head]})
    checked = 0
    for tr in plan.transfers:
        got = R.piece_from_reference(graph, ref, tr)
        if tr.tensor == graph.input:
            assert got is None  # pixels travel as they are: nothing to rescue
            continue
        want = R.rescue_piece(graph, pixels, rt.classifier.pre.normalize_u8, tr)
        assert got is not None and got.shape == want.shape, tr
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
        checked += 1
    assert checked >= 8


def test_a_silent_device_is_rescued_by_a_reference_run_on_the_engine(files):
    """The phone's session on onnxruntime, a tablet in its plan that never answers: past the stall bound the
    phone rescues the tablet's pieces from one reference run on the engine (the profile predicts it faster than
    numpy for pieces that deep), and the frame equals single-device numpy. A frame finished alone (its plan
    replaced) takes its answer from a reference run too."""
    from tilemesh.runtime.deps import cut_candidates

    model_json, labels_json, bin_path = files
    S._session = None
    S.load(model_json, labels_json)
    bridge.use_engine("onnxruntime", True)
    engine = NativeEngine(bin_path.read_bytes())
    s = S.session()
    s.check_rate = 0.0
    s.handle(S.Profiled({"engines": {"onnxruntime": 5.0, "numpy": 40.0}}), 0.0)
    graph = s.runtime.graph
    cuts = cut_candidates(graph)
    rows = {"devices": [["me"], ["tablet"]], "row_shares": [1, 1], "col_shares": None}
    whole = {"devices": [["me"]], "row_shares": None, "col_shares": None}
    spec = {"plan_id": 6, "source": "me", "cuts": [cuts[2 * len(cuts) // 3]], "splits": [rows, whole]}
    msg = {"type": "plan", "plan_id": 6, "source": "me", "devices": ["me", "tablet"], "spec": spec}
    engine.drain(bridge.handle({"on": "plan", "msg": msg, "me": "me"}, 0.0))
    engine.adopt()
    frames = {f: np.random.default_rng(20 + f).integers(0, 256, (256, 256, 4), dtype=np.uint8) for f in (1, 2)}
    reply = engine.drain(bridge.handle({"on": "frame", "frame": 1, "data": frames[1].tobytes(), "height": 256,
                                        "width": 256}, 1.0))
    assert not [e for e in reply["effects"] if e["do"] == "frame_done"]
    assert engine.reference_runs == 0
    reply = engine.drain(bridge.handle({"on": "tick"}, 1.0 + 2 * 2.0 + 0.5))  # past piece_wait at the 2 s bound
    done = [e["result"] for e in reply["effects"] if e["do"] == "frame_done"]
    assert engine.reference_runs == 1 and len(done) == 1, (s.faults, reply["effects"])
    assert s.faults["rescue_macs"] == 0  # nothing on numpy
    local = s.runtime.classifier.classify(frames[1].tobytes(), 256, 256)
    assert [t["index"] for t in done[0]["top"]] == [t["index"] for t in local["top"]]
    np.testing.assert_allclose([t["p"] for t in done[0]["top"]], [t["p"] for t in local["top"]], atol=1e-4)
    # Frame 2 is in flight when a new plan replaces this one: it finishes alone, from a reference run.
    engine.drain(bridge.handle({"on": "frame", "frame": 2, "data": frames[2].tobytes(), "height": 256,
                                "width": 256}, 7.0))
    reply = engine.drain(bridge.handle({"on": "plan", "msg": {**msg, "plan_id": 7, "devices": ["me"],
                                                              "spec": {**spec, "plan_id": 7, "splits": [whole, whole]}},
                                        "me": "me"}, 7.1))
    done = [e["result"] for e in reply["effects"] if e["do"] == "frame_done"]
    assert engine.reference_runs == 2 and len(done) == 1 and done[0]["recovered"]
    local = s.runtime.classifier.classify(frames[2].tobytes(), 256, 256)
    assert [t["index"] for t in done[0]["top"]] == [t["index"] for t in local["top"]]
    bridge.use_engine("onnxruntime", False)


def test_a_task_falling_back_to_numpy_still_digests_its_overlap(files):
    """A task the engine cannot run (no task model, or the requests drained after the engine failed) runs on
    numpy through `computed_numpy`: it keeps what the request asks (the owned tensors and the overlap checks'),
    so its digests are recorded like the engine's (they were not: the frame was then held for its digests and
    shown unverified)."""
    from tilemesh.runtime.deps import cut_candidates

    model_json, labels_json, _ = files
    S._session = None
    S.load(model_json, labels_json)
    assert bridge.use_engine("onnxruntime", True)["name"] == "onnxruntime"
    graph = S.session().runtime.graph
    rows = {"devices": [["me"], ["other"]], "row_shares": [1, 1], "col_shares": None}
    whole = {"devices": [["me"]], "row_shares": None, "col_shares": None}
    spec = {"plan_id": 6, "source": "me", "cuts": [cut_candidates(graph)[3]], "splits": [rows, whole]}
    msg = {"type": "plan", "plan_id": 6, "source": "me", "devices": ["me", "other"], "spec": spec}
    bridge.handle({"on": "link_opened", "peer": "other", "max_message": 256 * 1024}, 0.0)
    bridge.handle({"on": "plan", "msg": msg, "me": "me"}, 0.0)
    runner = S.session().runtime.runners[6]
    assert runner.task_checks[0], "a row split has an overlap check in its first segment"
    frame = np.random.default_rng(5).integers(0, 256, (256, 256, 4), dtype=np.uint8)
    reply = bridge.handle({"on": "frame", "frame": 1, "data": frame.tobytes(), "height": 256, "width": 256}, 1.0)
    (req,) = bridge.take_compute(reply)
    assert req["task"] == 0 and set(req["keep"]) > set(runner.dplan.tasks[0].owned)
    bridge.computed_numpy(reply, 6, req, 1.1)
    copies = {dev for key in runner.checks for dev in runner.digests.get(1, {}).get(key, {})}
    assert copies == {"me"}
    bridge.use_engine("onnxruntime", False)
