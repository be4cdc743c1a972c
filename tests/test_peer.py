"""The worker-facing Peer: plan specs as JSON, frames in as canvas bytes, top-5 out; same answer as one device."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from peer_runtime import graph as graph_mod
from peer_runtime.classify import LocalClassifier
from peer_runtime.deps import cut_candidates
from peer_runtime.peer import Peer, parts_of, plan_from_spec


@pytest.fixture(scope="module")
def classifier(demo_model_dir):
    graph = graph_mod.load_onnx(demo_model_dir / "mobilenet_v2.onnx")
    labels = json.loads((demo_model_dir / "labels.json").read_text())
    return LocalClassifier(graph, labels)


def spec_for(graph, plan_id=3):
    cuts = cut_candidates(graph)
    mid = cuts[len(cuts) // 2]
    rows = {"devices": [["phone"], ["laptop"]], "row_shares": [1, 2], "col_shares": None}
    return {"plan_id": plan_id, "source": "phone", "cuts": [mid],
            "splits": [rows, {"devices": [["laptop"]], "row_shares": None, "col_shares": None}]}


def run_mesh(peers: dict[str, Peer], first: dict, seed=0) -> list[dict]:
    rng = random.Random(seed)
    queue = [("phone", o["dst"], c) for o in first["out"] for c in o["chunks"]]
    results = list(first["results"])
    while queue:
        src, dst, chunk = queue.pop(rng.randrange(len(queue)))
        got = peers[dst].on_chunk(src, memoryview(chunk))
        queue += [(dst, o["dst"], c) for o in got["out"] for c in o["chunks"]]
        results += got["results"]
    return results


def test_distributed_top5_equals_single_device(classifier):
    spec = json.loads(json.dumps(spec_for(classifier.graph)))  # as it arrives over signaling
    peers = {d: Peer(classifier) for d in ("phone", "laptop")}
    roles = {d: p.set_plan(spec, d, {"phone": 65536, "laptop": 262144}) for d, p in peers.items()}
    assert roles["phone"]["role"] == "source" and roles["laptop"]["role"] == "worker"
    assert roles["laptop"]["macs"] > roles["phone"]["macs"] > 0
    frame = np.random.default_rng(4).integers(0, 256, (256, 256, 4), dtype=np.uint8)
    results = run_mesh(peers, peers["phone"].start_frame(1, frame.tobytes(), 256, 256))
    assert [r["frame"] for r in results] == [1]
    local = classifier.classify(frame.tobytes(), 256, 256)
    assert [t["index"] for t in results[0]["top"]] == [t["index"] for t in local["top"]]
    np.testing.assert_allclose([t["p"] for t in results[0]["top"]], [t["p"] for t in local["top"]], atol=1e-5)
    assert results[0]["report"]["device"] == "phone"


def test_parts_cover_the_frame(classifier):
    plan = plan_from_spec(classifier.graph, spec_for(classifier.graph))
    parts = parts_of(plan)
    assert {p["device"] for p in parts} == {"phone", "laptop"}
    assert sum((p["r1"] - p["r0"]) * (p["c1"] - p["c0"]) for p in parts) == pytest.approx(1.0)


def test_idle_device_and_missing_plan(classifier):
    peer = Peer(classifier)
    with pytest.raises(RuntimeError, match="no plan"):
        peer.start_frame(1, bytes(256 * 256 * 4), 256, 256)
    assert peer.set_plan(spec_for(classifier.graph), "tablet")["role"] == "idle"
    assert peer.on_chunk("phone", b"")["ignored"] is True
