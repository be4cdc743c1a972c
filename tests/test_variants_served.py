"""Model variants the server serves (heavy mode): the card's variants become `variant-<key>.json` in the bundle,
sharing the model's weights; the planner plans on the variant's graph; a room of device sessions runs a
variant's plan, split across devices, and gets onnxruntime's answer on the ONNX file at the variant's size."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_model_param import CARD, LABELS, SIZE, _room, tiny_cnn

from bench.fakenet import FakeRoom
from tilemesh.models.card import CardError, parse_card
from tilemesh.runtime import session as S
from tilemesh.runtime.classify import LocalClassifier
from tilemesh.runtime.executor import run_graph
from tilemesh.runtime.graph import compact_variant, load_compact
from tilemesh.runtime.profile import scaled_profile
from tilemesh.server import model as model_mod
from tilemesh.server.app import create_app
from tilemesh.server.context import ServerConfig
from tilemesh.server.inference import Inference
from tilemesh.server.signaling import protocol

BIG, BIG_FRAME = 64, 72
VCARD = {**CARD, "variants": {"big": {"name": "Big (64 px)", "input": BIG, "resize_shorter_side": BIG_FRAME}}}
PROFILE = {"version": 1, "sec_per_mac": {"conv_dense": 2e-9, "conv_pointwise": 3e-10, "conv_depthwise": 1e-9,
                                         "elementwise": 3e-10, "gemm": 3e-10}, "overhead_s": 3e-5, "chain_factor": 1.0}


@pytest.fixture
def tiny_v(tmp_path):
    path = tmp_path / "models" / "tiny.onnx"
    path.parent.mkdir()
    onnx.save(tiny_cnn(), path)
    (tmp_path / "models" / "tiny.json").write_text(json.dumps(VCARD))
    return path


def onnx_at(path, size: int) -> ort.InferenceSession:
    """onnxruntime on the ONNX file itself with its input declared size x size (the reference for a variant)."""
    m = onnx.load(path)
    for d, v in zip(m.graph.input[0].type.tensor_type.shape.dim, (1, 3, size, size), strict=True):
        d.Clear()
        d.dim_value = v
    del m.graph.value_info[:]
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def test_card_variants_are_checked():
    card = parse_card(VCARD, "c.json", (1, 3, SIZE, SIZE), len(LABELS))
    (v,) = card.variants
    assert (v.key, v.name, v.preprocess.crop, v.preprocess.resize_shorter_side) == ("big", "Big (64 px)", BIG, 72)
    assert v.preprocess.mean == card.preprocess.mean and v.preprocess.std == card.preprocess.std
    assert card.variant("big") is v and card.variant(None) is None
    with pytest.raises(CardError, match="no variant 'huge'"):
        card.variant("huge")
    assert card.to_dict()["variants"]["big"]["preprocess"]["crop"] == BIG
    for bad, msg in [({"x y": {"input": 64}}, "variant names"), ({"big": {"input": 0}}, "variants.big.input"),
                     ({"big": {"input": 64, "resize_shorter_side": 60}}, "resize_shorter_side"),
                     ({"big": {"input": 64, "crop": 64}}, "unknown 'variants.big' fields"),
                     ({"big": {"input": 4096}}, "at most"), ([], "'variants' must be an object")]:
        with pytest.raises(CardError, match=msg):
            parse_card({**CARD, "variants": bad}, "c.json", (1, 3, SIZE, SIZE), len(LABELS))


def test_bundle_holds_the_variant_sharing_the_weights_and_it_matches_onnxruntime(tiny_v, tmp_path):
    bundle = model_mod.prepare(tiny_v, tmp_path / "static")
    files = sorted(p.name for p in bundle.dir.iterdir())
    # no second blob
    assert files == sorted([*model_mod.BUNDLE_FILES, model_mod.STAMP, model_mod.WHOLE_FILE, "variant-big.json"])
    base, big = bundle.graph(), bundle.graph("big")
    assert big.shapes[big.input] == (1, 3, BIG, BIG) and base.shapes[base.input] == (1, 3, SIZE, SIZE)
    assert big.shapes[big.output] == base.shapes[base.output]
    assert bundle.summary["variants"]["big"]["input"] == [1, 3, BIG, BIG]
    # MACs grow with the pixels: 4x the input, about 4x the body's work.
    ratio = sum(bundle.summary["variants"]["big"]["macs"].values()) / sum(bundle.summary["macs"].values())
    assert 3.0 < ratio < 4.1
    shared = compact_variant(base, (bundle.dir / "variant-big.json").read_text())
    assert shared.weights is base.weights
    x = np.random.default_rng(2).standard_normal((1, 3, BIG, BIG)).astype(np.float32)
    want = onnx_at(tiny_v, BIG).run(None, {"x": x})[0]
    np.testing.assert_allclose(run_graph(big, x), want, atol=1e-4, rtol=1e-4)
    card = json.loads((bundle.dir / "card.json").read_text())
    assert card["variants"]["big"] == {"name": "Big (64 px)", "preprocess": {
        "resize_shorter_side": BIG_FRAME, "crop": BIG, "mean": CARD["preprocess"]["mean"],
        "std": CARD["preprocess"]["std"]}}
    # A variant whose layout is not the model's blob is refused, never silently loaded with other weights.
    other = json.loads((bundle.dir / "variant-big.json").read_text())
    other["weights"][0]["offset"] += 64
    with pytest.raises(ValueError, match="not laid out"):
        compact_variant(base, other)
    # A second start converts nothing.
    mtimes = {p.name: p.stat().st_mtime_ns for p in bundle.dir.iterdir()}
    again = model_mod.prepare(tiny_v, tmp_path / "static")
    assert {p.name: p.stat().st_mtime_ns for p in again.dir.iterdir()} == mtimes


def test_a_model_that_cannot_take_another_size_is_a_clear_error(tmp_path):
    """A Flatten straight after the body (no global pool): at 64 px the classifier's weights no longer fit."""
    from test_tiling import _Builder, to_onnx

    b = _Builder(np.random.default_rng(0), 3, 8, 8)
    x = b.unary("Relu", b.conv("x", 4, (3, 3), (2, 2), (1, 1, 1, 1)))
    x = b.add("Flatten", [x], (1, 64), {"axis": 1})
    b.weights["fc"] = b.rng.standard_normal((3, 64)).astype(np.float32)
    b.output = b.add("Gemm", [x], (1, 3), {"transB": 1}, ("fc",))
    path = tmp_path / "flat.onnx"
    onnx.save(to_onnx(b), path)
    path.with_suffix(".json").write_text(json.dumps({"labels": ["a", "b", "c"],
                                                     "variants": {"big": {"input": 16}}}))
    with pytest.raises(model_mod.ModelError, match="variant 'big'"):
        model_mod.prepare(path, tmp_path / "static")


async def test_server_serves_the_variant_file_and_describes_it_to_pages(tiny_v, tmp_path, aiohttp_client):
    client = await aiohttp_client(create_app(ServerConfig(static_dir=tmp_path / "static", model=tiny_v)))
    resp = await client.get("/model/variant-big.json")
    assert resp.status == 200 and (await resp.json())["shapes"]["x"] == [1, 3, BIG, BIG]
    assert (await client.get("/model/variant-huge.json")).status == 404
    page = await (await client.get("/runtime")).text()
    info = json.loads(page.split('id="tilemesh-model">')[1].split("</script>")[0])
    assert info["variants"]["big"]["file"] == "variant-big.json"
    assert info["variants"]["big"]["preprocess"]["resize_shorter_side"] == BIG_FRAME
    assert info["variants"]["big"]["summary"]["input"] == [1, 3, BIG, BIG]


def test_planner_plans_on_the_variant_and_a_room_computes_it_split(tiny_v, tmp_path):
    """Two equal devices: the variant's plan is made on its 64 px graph; the sessions (what browsers and the edge
    run) expand it, split the frame between them and give onnxruntime's answer at 64 px."""
    bundle = model_mod.prepare(tiny_v, tmp_path / "static")
    room, source = _room({"a": scaled_profile(PROFILE, 1.0), "b": scaled_profile(PROFILE, 1.0)})
    inference = Inference(bundle)
    msg = protocol.plan(inference.choose(room, source, protocol.PlanRequest(strategy="equal_split", variant="big")))
    msg = json.loads(json.dumps(msg))
    assert msg["variant"] == msg["spec"]["variant"] == "big" and len(msg["devices"]) == 2
    normal = inference.choose(room, source, protocol.PlanRequest(strategy="equal_split"))
    assert "variant" not in normal["spec"] and msg["predicted_ms"] > normal["predicted_ms"]
    macs = [sum(d["macs"] for d in m["timeline"]["devices"].values()) for m in (msg, normal)]
    assert 3.0 < macs[0] / macs[1] < 4.1  # planned on the 64 px graph
    with pytest.raises(ValueError, match="no variant 'huge'"):
        inference.choose(room, source, protocol.PlanRequest(variant="huge"))

    classifier = LocalClassifier.from_files(bundle.dir / "graph.json", bundle.dir / "labels.json",
                                            bundle.dir / "card.json")
    assert classifier.variants == {}  # loaded when a plan needs it
    assert classifier.variant("big").graph.weights is classifier.graph.weights
    assert classifier.variant("big") is classifier.variants["big"]
    a, b = msg["devices"]
    r = FakeRoom({d: S.DeviceSession(classifier) for d in (a, b)}, seed=1)
    r.open_links()
    for d in (a, b):
        r.fire(d, S.PlanIn(msg, d))
    frame = np.random.default_rng(7).integers(0, 256, (BIG_FRAME, BIG_FRAME, 4), dtype=np.uint8)
    r.fire(source, S.FrameIn(1, frame.tobytes(), BIG_FRAME, BIG_FRAME))
    r.run()
    assert not r.failed, r.failed
    got = r.done[source][1]
    crop = frame[4:4 + BIG, 4:4 + BIG, :3].astype(np.float32) / 255.0
    x = ((crop - np.float32(CARD["preprocess"]["mean"])) / np.float32(CARD["preprocess"]["std"]))
    want = onnx_at(tiny_v, BIG).run(None, {"x": np.ascontiguousarray(x.transpose(2, 0, 1)[None])})[0][0]
    assert got["top"][0]["label"] == LABELS[int(np.argmax(want))]
    e = np.exp(want - want.max())
    np.testing.assert_allclose(got["top"][0]["p"], (e / e.sum()).max(), atol=1e-5)
    # Both devices computed part of it, and the variant's runtime is the one they used.
    ran = {d: r.sessions[d].tasks_run for d in (a, b)}
    assert all(sum(v.values()) > 0 for v in ran.values()), ran
    assert r.sessions[b].runtime.plan_graph.shapes["x"] == (1, 3, BIG, BIG)
    # A frame of the normal size on the variant's plan is refused with the reason (never misread).
    r.fire(source, S.FrameIn(2, np.zeros((36, 36, 4), np.uint8).tobytes(), 36, 36))
    assert "shorter side scaled to 72" in r.failed[source][2]
    # The same devices back on the model as served: the next plan has no variant, and the base sizes.
    msg2 = json.loads(json.dumps(protocol.plan(inference.choose(room, source, protocol.PlanRequest(
        strategy="equal_split")))))
    for d in (a, b):
        r.fire(d, S.PlanIn(msg2, d))
    assert r.sessions[b].runtime.plan_graph.shapes["x"] == (1, 3, SIZE, SIZE)



def test_a_stream_in_heavy_mode_plans_and_runs_its_lanes_on_the_variant(tiny_v, tmp_path):
    """A camera streaming a variant: the server plans its lanes on the variant's graph and every lane's spec
    carries it; a second camera streaming the model as served shares the room (its lanes have no variant); the
    variant camera's frames, computed by the room, give onnxruntime's answer at the variant's size."""
    bundle = model_mod.prepare(tiny_v, tmp_path / "static")
    profiles = {d: scaled_profile(PROFILE, 1.0) for d in ("a", "b", "c")}
    room, source = _room(profiles)
    inference = Inference(bundle)
    (msg,) = inference.choose(room, source, protocol.PlanRequest(objective="throughput", variant="big"))
    msg = json.loads(json.dumps(protocol.plan(msg)))
    assert msg["variant"] == "big" and all(ln["spec"]["variant"] == "big" for ln in msg["lanes"])
    assert all(big_graph_macs(ln) > 0 for ln in msg["lanes"])
    ids = [m.id for m in room.peers]
    other = ids[1]
    both = inference.choose(room, other, protocol.PlanRequest(objective="throughput"))
    assert [m["source"] for m in both] == [source, other]
    assert all("variant" not in ln["spec"] for ln in both[1]["lanes"])
    assert all(ln["spec"]["variant"] == "big" for ln in both[0]["lanes"])
    with pytest.raises(ValueError, match="no variant 'huge'"):
        inference.choose(room, source, protocol.PlanRequest(objective="throughput", variant="huge"))

    classifier = LocalClassifier.from_files(bundle.dir / "graph.json", bundle.dir / "labels.json",
                                            bundle.dir / "card.json")
    r = FakeRoom({d: S.DeviceSession(classifier) for d in ids}, seed=1)
    r.open_links()
    stream = json.loads(json.dumps(protocol.plan(both[0])))
    for d in ids:
        r.fire(d, S.PlanIn(stream, d))
    frame = np.random.default_rng(8).integers(0, 256, (BIG_FRAME, BIG_FRAME, 4), dtype=np.uint8)
    r.fire(source, S.FrameIn(1, frame.tobytes(), BIG_FRAME, BIG_FRAME))
    r.run()
    assert not r.failed, r.failed
    crop = frame[4:4 + BIG, 4:4 + BIG, :3].astype(np.float32) / 255.0
    x = ((crop - np.float32(CARD["preprocess"]["mean"])) / np.float32(CARD["preprocess"]["std"]))
    want = onnx_at(tiny_v, BIG).run(None, {"x": np.ascontiguousarray(x.transpose(2, 0, 1)[None])})[0][0]
    assert r.done[source][1]["top"][0]["label"] == LABELS[int(np.argmax(want))]


def big_graph_macs(lane) -> int:
    return sum(d["macs"] for d in lane["timeline"]["devices"].values())


def test_request_plan_carries_the_variant():
    s = S.DeviceSession()
    (sig,) = s.handle(S.event_from_dict({"on": "request_plan", "strategy": "tilemesh", "variant": "heavy"}), 0.0)
    assert sig.fields == {"strategy": "tilemesh", "variant": "heavy"}
    (sig,) = s.handle(S.RequestPlan(), 0.0)
    assert sig.fields == {}
    req = protocol.parse(json.dumps({"v": protocol.VERSION, "type": "plan_request", "variant": "heavy"}))
    assert req.variant == "heavy"
    with pytest.raises(protocol.ProtocolError):
        protocol.parse(json.dumps({"v": protocol.VERSION, "type": "plan_request", "variant": 3}))


def test_the_compact_model_is_unchanged_by_variants_and_a_missing_variant_file_is_a_clear_error(tiny_v, tmp_path):
    bundle = model_mod.prepare(tiny_v, tmp_path / "static")
    assert load_compact(bundle.dir / "graph.json").shapes["x"] == (1, 3, SIZE, SIZE)
    # A page that fetched only the model's own files still loads it; a plan for the variant then fails clearly.
    only = tmp_path / "only"
    only.mkdir()
    for f in ("graph.json", "graph.bin", "labels.json", "card.json"):
        (only / f).write_bytes((bundle.dir / f).read_bytes())
    classifier = LocalClassifier.from_files(only / "graph.json", only / "labels.json", only / "card.json")
    with pytest.raises(ValueError, match="variant 'big'.*not readable"):
        classifier.variant("big")
    s = S.DeviceSession(classifier)
    spec = {"plan_id": 1, "source": "me", "cuts": [], "splits": [{"devices": [["me"]]}], "variant": "big"}
    (err,) = s.handle(S.PlanIn({"plan_id": 1, "source": "me", "devices": ["me"], "spec": spec}, "me"), 0.0)
    assert err.what == "error" and "variant 'big'" in err.detail["message"]

