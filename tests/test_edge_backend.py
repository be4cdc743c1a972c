"""The edge computes with native onnxruntime (task-model sessions per tile), chosen by profiling it against numpy
on the model's own layers, and its share of a room's frame equals the numpy reference."""

from __future__ import annotations

import json

import numpy as np
from test_peer import run_mesh, spec_for

from tilemesh.edge.device import load_model_runtime
from tilemesh.runtime.backend import OnnxRuntimeBackend
from tilemesh.runtime.peer import PlanRuntime as Peer


def test_edge_picks_onnxruntime_and_computes_its_share(demo_model_dir, tmp_path):
    from tilemesh.server.model import prepare

    model = load_model_runtime(prepare(demo_model_dir / "mobilenet_v2.onnx", tmp_path).dir)  # the served bundle
    prof = model.compute
    assert set(prof["engines"]) == {"onnxruntime", "numpy"}
    # Native onnxruntime runs this model about 15x faster than numpy here: the choice is not close.
    assert isinstance(model.backend, OnnxRuntimeBackend) and prof["backend"] == "onnxruntime"
    assert "onnxruntime predicts" in prof["engine_reason"] and prof["name"] == "edge"

    spec = json.loads(json.dumps(spec_for(model.classifier.graph)))
    edge = Peer(model.classifier, device="laptop", backend=model.backend)  # the worker in spec_for's plan
    phone = Peer(model.classifier)
    peers = {"phone": phone, "laptop": edge}
    roles = {d: p.set_plan(spec, d) for d, p in peers.items()}
    assert roles["laptop"]["sessions_ms"] > 0 and "sessions_ms" not in roles["phone"]  # made at adoption
    made = len(model.backend._sessions)
    frame = np.random.default_rng(5).integers(0, 256, (256, 256, 4), dtype=np.uint8)
    results = run_mesh(peers, phone.start_frame(1, frame.tobytes(), 256, 256))
    local = model.classifier.classify(frame.tobytes(), 256, 256)
    assert [t["index"] for t in results[0]["top"]] == [t["index"] for t in local["top"]]
    np.testing.assert_allclose([t["p"] for t in results[0]["top"]], [t["p"] for t in local["top"]], atol=1e-4)
    assert edge.runner.tasks_run > 0 and len(model.backend._sessions) == made  # no session made per frame
