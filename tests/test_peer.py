"""The plan runtime under every device session: plan specs as JSON, frames in as bytes, top-5 out, as one device."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tilemesh.runtime import wire
from tilemesh.runtime.deps import cut_candidates
from tilemesh.runtime.peer import PlanRuntime, parts_of, plan_from_spec


def spec_for(graph, plan_id=3):
    cuts = cut_candidates(graph)
    mid = cuts[len(cuts) // 2]
    rows = {"devices": [["phone"], ["laptop"]], "row_shares": [1, 2], "col_shares": None}
    return {"plan_id": plan_id, "source": "phone", "cuts": [mid],
            "splits": [rows, {"devices": [["laptop"]], "row_shares": None, "col_shares": None}]}


def run_mesh(peers: dict[str, PlanRuntime], first: dict, seed=0) -> list[dict]:
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
    peers = {d: PlanRuntime(classifier) for d in ("phone", "laptop")}
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
    peer = PlanRuntime(classifier)
    with pytest.raises(RuntimeError, match="no plan"):
        peer.start_frame(1, bytes(256 * 256 * 4), 256, 256)
    assert peer.set_plan(spec_for(classifier.graph), "tablet")["role"] == "idle"
    assert peer.on_chunk("phone", b"")["ignored"] is True


def test_chunks_that_outrun_their_plan_are_held_then_replayed(classifier):
    """The phone's first chunks may reach the laptop before the server's `plan` message does."""
    spec = spec_for(classifier.graph, plan_id=5)
    phone, laptop = PlanRuntime(classifier), PlanRuntime(classifier)
    phone.set_plan(spec, "phone")
    frame = np.random.default_rng(9).integers(0, 256, (256, 256, 4), dtype=np.uint8)
    first = phone.start_frame(1, frame.tobytes(), 256, 256)
    early = [c for o in first["out"] for c in o["chunks"]]
    assert early and all(laptop.on_chunk("phone", c)["held"] for c in early)
    assert laptop.held_bytes == sum(len(c) for c in early)
    # A chunk of an older plan (4) is held too while nothing is adopted, and dropped when plan 5 is.
    stale = wire.encode(np.zeros((1, 3, 4, 4), np.uint8), frame=1, tensor=0, plan_id=4, region=(0, 4, 0, 4))[0]
    assert laptop.on_chunk("phone", stale)["held"]
    adopted = laptop.set_plan(spec, "laptop")
    assert laptop.held == [] and adopted["role"] == "worker" and laptop.dropped_chunks == 1
    # Once plan 5 runs, plan 4's chunks are stale on arrival.
    assert laptop.on_chunk("phone", stale)["ignored"] and laptop.dropped_chunks == 2
    # A corrupt chunk is an error, never silently held or dropped.
    corrupt = bytearray(stale)
    corrupt[-1] ^= 1
    with pytest.raises(wire.WireError, match="checksum"):
        laptop.on_chunk("phone", bytes(corrupt))
    # Replaying produced the laptop's answer to the phone at once: deliver it and the frame completes.
    results = []
    for o in adopted["out"]:
        for c in o["chunks"]:
            results += phone.on_chunk("laptop", c)["results"]
    assert [r["frame"] for r in results] == [1]
    local = classifier.classify(frame.tobytes(), 256, 256)
    assert [t["index"] for t in results[0]["top"]] == [t["index"] for t in local["top"]]
    with pytest.raises(ValueError, match="not newer"):
        laptop.set_plan(spec, "laptop")
