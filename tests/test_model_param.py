"""The model is a parameter: a second, small CNN (not the demo model) with its model card is checked, converted
into a served bundle, served at /model/<file>, planned over and classified through its compact form, agreeing
with onnxruntime on the ONNX file itself; malformed cards and missing files are clear errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tiling import _Builder, to_onnx

from tilemesh import cli
from tilemesh.models.card import CardError, load_card
from tilemesh.runtime.classify import LocalClassifier
from tilemesh.runtime.graph import load_compact
from tilemesh.runtime.profile import predict_graph_seconds, scaled_profile
from tilemesh.server import model as model_mod
from tilemesh.server.app import create_app
from tilemesh.server.context import ServerConfig
from tilemesh.server.inference import Inference
from tilemesh.server.signaling import protocol, rooms
from tilemesh.server.signaling.ids import PeerId, ResumeToken

CLASSES = 7
SIZE = 32
LABELS = [f"thing {i}" for i in range(CLASSES)]
CARD = {"name": "Tiny test CNN", "labels": LABELS,
        "preprocess": {"resize_shorter_side": 36, "crop": SIZE, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}}


def tiny_cnn(seed: int = 0) -> onnx.ModelProto:
    """conv3x3 s2 + relu, a residual block, conv s2, global pool and a 7-way classifier: a random CNN of the
    tiling tests' builder, with node names that follow no convention at all."""
    b = _Builder(np.random.default_rng(seed), 3, SIZE, SIZE)
    x = b.unary("Relu", b.conv("x", 8, (3, 3), (2, 2), (1, 1, 1, 1)))
    y = b.unary("Relu", b.conv(x, 16, (1, 1)))
    y = b.conv(b.conv(y, 16, (3, 3), (1, 1), (1, 1, 1, 1), group=16), 8, (1, 1))
    x = b.add("Add", [x, y], b.shapes[x])
    x = b.unary("Clip", b.conv(x, 12, (3, 3), (2, 2), (1, 1, 1, 1)))
    x = b.add("GlobalAveragePool", [x], (1, 12, 1, 1))
    x = b.add("Flatten", [x], (1, 12), {"axis": 1})
    b.weights["fc"] = b.rng.standard_normal((CLASSES, 12)).astype(np.float32)
    b.weights["fcb"] = b.rng.standard_normal(CLASSES).astype(np.float32)
    b.output = b.add("Gemm", [x], (1, CLASSES), {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 1}, ("fc", "fcb"))
    return to_onnx(b)


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "models" / "tiny.onnx"
    path.parent.mkdir()
    onnx.save(tiny_cnn(), path)
    (tmp_path / "models" / "tiny.json").write_text(json.dumps(CARD))
    return path


def test_bundle_of_a_second_model_classifies_like_onnxruntime(tiny, tmp_path):
    static = tmp_path / "static"
    bundle = model_mod.prepare(tiny, static)
    assert sorted(p.name for p in bundle.dir.iterdir()) == sorted([*model_mod.BUNDLE_FILES, model_mod.STAMP,
                                                                   model_mod.WHOLE_FILE])
    assert bundle.card.name == "Tiny test CNN" and bundle.card.labels == tuple(LABELS)
    assert bundle.summary["nodes"] == len(onnx.load(tiny).graph.node) and bundle.summary["classes"] == CLASSES
    assert bundle.summary["input"] == [1, 3, SIZE, SIZE]
    card = json.loads((bundle.dir / "card.json").read_text())
    assert card["preprocess"] == {"resize_shorter_side": 36, "crop": SIZE, "mean": [0.5, 0.4, 0.3],
                                  "std": [0.2, 0.25, 0.3]}
    # The compact form (what Pyodide and the edge load) computes what onnxruntime computes on the ONNX file.
    with pytest.raises(ValueError, match="crops 224x224"):  # without its card: ImageNet's 224 does not fit
        LocalClassifier.from_files(bundle.dir / "graph.json", bundle.dir / "labels.json")
    classifier = LocalClassifier.from_files(bundle.dir / "graph.json", bundle.dir / "labels.json",
                                            bundle.dir / "card.json")
    x = np.random.default_rng(3).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    want = ort.InferenceSession(str(tiny), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    from tilemesh.runtime.executor import run_graph

    np.testing.assert_allclose(run_graph(classifier.graph, x), want, atol=1e-4, rtol=1e-4)
    assert classifier.labels == LABELS
    # whole.onnx (the browser's first onnxruntime-web session, made while Python boots) holds exactly the bytes
    # the runtime builds for it, and run over graph.bin's weights it computes what onnxruntime computes.
    from tilemesh.runtime.task_model import graph_model

    whole = (bundle.dir / model_mod.WHOLE_FILE).read_bytes()
    assert whole == graph_model(classifier.graph, external="model.bin").model
    runs = tmp_path / "whole"
    runs.mkdir()
    (runs / "whole.onnx").write_bytes(whole)
    (runs / "model.bin").write_bytes((bundle.dir / "graph.bin").read_bytes())
    got = ort.InferenceSession(str(runs / "whole.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=1e-4)
    # A second start converts nothing: same directory, files untouched.
    mtimes = {p.name: p.stat().st_mtime_ns for p in bundle.dir.iterdir()}
    again = model_mod.prepare(tiny, static)
    assert again.dir == bundle.dir and {p.name: p.stat().st_mtime_ns for p in again.dir.iterdir()} == mtimes
    # A changed card (same ONNX) reaches the bundle.
    (tiny.parent / "tiny.json").write_text(json.dumps({**CARD, "name": "Renamed"}))
    assert json.loads((model_mod.prepare(tiny, static).dir / "card.json").read_text())["name"] == "Renamed"


async def test_server_serves_and_plans_the_model_it_was_given(tiny, tmp_path, aiohttp_client):
    client = await aiohttp_client(create_app(ServerConfig(static_dir=tmp_path / "static", model=tiny)))
    graph_json = await client.get("/model/graph.json")
    assert graph_json.status == 200
    meta = await graph_json.json()
    assert meta["input"] == "x"
    assert (await client.get("/model/labels.json")).status == 200
    assert json.loads(await (await client.get("/model/labels.json")).text()) == LABELS
    assert (await client.get("/model/model.onnx")).status == 200
    assert (await client.get("/model/bundle.json")).status == 404  # only the bundle's served files
    assert (await client.get("/model/..%2Fbundle.json")).status == 404
    page = await (await client.get("/runtime")).text()
    info = json.loads(page.split('id="tilemesh-model">')[1].split("</script>")[0])
    assert info["name"] == "Tiny test CNN" and info["classes"] == CLASSES and info["nodes"] > 5
    # The page's MAC totals give the runtime's whole-model prediction (the JS formula, in Python).
    prof = scaled_profile({"version": 1, "sec_per_mac": {c: 1e-9 for c in info["macs"]}, "overhead_s": 1e-5,
                           "chain_factor": 1.2}, 1.0)
    graph = load_compact(model_mod.bundle_of(client.app).dir / "graph.json")
    js = (info["nodes"] * prof["overhead_s"] + sum(m * prof["sec_per_mac"][c] for c, m in info["macs"].items()))
    assert js * prof["chain_factor"] == pytest.approx(predict_graph_seconds(prof, graph), rel=1e-9)


def _room(profiles: dict[str, dict]) -> tuple[rooms.Room, PeerId]:
    ids = {name: PeerId(f"p{i}".ljust(12, "x")) for i, name in enumerate(profiles)}
    peers = tuple(
        rooms.Member(id=ids[name], name=name, kind="laptop", token=ResumeToken.new(), joined_at=1.0, state="ready",
                   progress=1.0, profile={"compute": prof, "links": {ids[o]: {"rtt_ms": 3.0, "mbps": 200.0}
                                                                     for o in profiles if o != name}})
        for name, prof in profiles.items())
    return rooms.Room(id="r" * 22, created_at=0.0, peers=peers), ids[next(iter(profiles))]


def test_camera_frames_follow_the_card_locally_and_through_a_plan(tiny, tmp_path):
    """A 36x36 RGBA frame (the card's resize_shorter_side): the centre 32 crop, normalised with the card's mean
    and std, classified alone and through a single-device plan; both equal onnxruntime on the same input."""
    from tilemesh.runtime.peer import PlanRuntime

    bundle = model_mod.prepare(tiny, tmp_path / "static")
    classifier = LocalClassifier.from_files(bundle.dir / "graph.json", bundle.dir / "labels.json",
                                            bundle.dir / "card.json")
    frame = np.random.default_rng(11).integers(0, 256, (36, 36, 4), dtype=np.uint8)
    crop = frame[2:34, 2:34, :3].astype(np.float32) / 255.0
    x = ((crop - np.float32([0.5, 0.4, 0.3])) / np.float32([0.2, 0.25, 0.3])).transpose(2, 0, 1)[None]
    sess = ort.InferenceSession(str(tiny), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0][0]
    want_top = [LABELS[i] for i in np.argsort(-want, kind="stable")[:3]]
    local = classifier.classify(frame.tobytes(), 36, 36, 3)
    assert [e["label"] for e in local["top"]] == want_top
    peer = PlanRuntime(classifier)
    peer.set_plan({"plan_id": 1, "source": "me", "cuts": [], "splits": [{"devices": [["me"]]}]}, "me")
    reply = peer.start_frame(1, frame.tobytes(), 36, 36)
    (result,) = reply["results"]
    assert [e["label"] for e in result["top"]][:3] == want_top
    with pytest.raises(ValueError, match="shorter side scaled to 36"):
        peer.start_frame(2, np.zeros((256, 256, 4), np.uint8).tobytes(), 256, 256)


def test_inference_plans_over_the_second_model(tiny, tmp_path):
    bundle = model_mod.prepare(tiny, tmp_path / "static")
    base = {"version": 1, "sec_per_mac": {"conv_dense": 2e-9, "conv_pointwise": 3e-10, "conv_depthwise": 1e-9,
                                          "elementwise": 3e-10, "gemm": 3e-10}, "overhead_s": 3e-5,
            "chain_factor": 1.0}
    room, source = _room({"a": scaled_profile(base, 1.0), "b": scaled_profile(base, 4.0)})
    for strategy in ("tilemesh", "equal_split", "offload"):
        msg = protocol.plan(Inference(bundle).choose(room, source, protocol.PlanRequest(strategy=strategy)))
        msg = json.loads(json.dumps(msg))
        assert msg["spec"]["source"] == source and msg["predicted_ms"] > 0
        assert all(0 < c < bundle.summary["nodes"] for c in msg["spec"]["cuts"])
        # Every device expands the spec on the same graph, and the plan computes the model exactly.
        from tilemesh.runtime.executor import run_graph
        from tilemesh.runtime.peer import plan_from_spec
        from tilemesh.runtime.tiling import simulate

        graph = bundle.graph()
        x = np.random.default_rng(5).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
        got = simulate(graph, plan_from_spec(graph, msg["spec"]), x)
        np.testing.assert_allclose(got, run_graph(graph, x), atol=1e-4, rtol=1e-4, err_msg=strategy)
    # The tiny CNN's names follow no convention, yet the planner finds its blocks: conv+relu | residual block
    # (nodes 2-6) | strided conv+clip | head (global pool, flatten, gemm from node 9).
    from tilemesh.planning.planner import block_cuts, head_start

    assert [n.op for n in graph.nodes[6:10]] == ["Add", "Conv", "Clip", "GlobalAveragePool"]
    assert block_cuts(graph) == [2, 7, 9] and head_start(graph) == 9


def test_no_model_is_a_clear_planning_error(tmp_path):
    with pytest.raises(ValueError, match="no model"):
        _ = Inference(None).graph


def test_serve_with_a_missing_model_or_a_bad_card_exits_with_a_message(tiny, tmp_path, capsys):
    static = tmp_path / "static"
    (static / "vendor" / "pyodide").mkdir(parents=True)
    (static / "vendor" / "pyodide" / "pyodide.js").write_text("")
    args = ["serve", "--host", "127.0.0.1", "--port", "1", "--static-dir", str(static)]
    assert cli.main([*args, "--model", str(tmp_path / "nope.onnx")]) == 2
    assert "nope.onnx" in capsys.readouterr().err
    (tiny.parent / "tiny.json").write_text(json.dumps({**CARD, "labels": LABELS[:3]}))
    assert cli.main([*args, "--model", str(tiny)]) == 2
    assert "'labels' has 3 names but the model has 7 classes" in capsys.readouterr().err
    (tiny.parent / "tiny.json").unlink()
    assert cli.main([*args, "--model", str(tiny)]) == 2
    assert "no model card" in capsys.readouterr().err


BAD_CARDS = [
    ({"labels": "missing.json"}, "not readable JSON"),
    ({"labels": []}, "list of names"),
    ({"labels": {"0": "a", "2": "b"}}, "'0'..'1'"),
    ({"labels": LABELS, "preprocess": {"crop": 30}}, "crop' is 30"),
    ({"labels": LABELS, "preprocess": {"resize_shorter_side": 16}}, "resize_shorter_side"),
    ({"labels": LABELS, "preprocess": {"mean": [0.5, 0.5]}}, "three numbers"),
    ({"labels": LABELS, "preprocess": {"std": [1, 0, 1]}}, "positive"),
    ({"labels": LABELS, "preprocess": {"scale": 2}}, "unknown 'preprocess' fields"),
    ({"labels": LABELS, "name": ""}, "'name'"),
    ([1, 2], "JSON object"),
]


@pytest.mark.parametrize("raw,message", BAD_CARDS)
def test_bad_cards_name_the_field(tmp_path, raw, message):
    (tmp_path / "m.json").write_text(json.dumps(raw))
    with pytest.raises(CardError, match=message):
        load_card(tmp_path / "m.onnx", (1, 3, SIZE, SIZE), CLASSES)


def test_card_defaults_and_label_files(tmp_path):
    (tmp_path / "names.json").write_text(json.dumps({str(i): n for i, n in enumerate(LABELS)}))
    (tmp_path / "m.json").write_text(json.dumps({"labels": "names.json"}))
    card = load_card(tmp_path / "m.onnx", (1, 3, SIZE, SIZE), CLASSES)
    assert card.name == "m" and card.labels == tuple(LABELS)
    assert (card.preprocess.crop, card.preprocess.resize_shorter_side) == (SIZE, SIZE)
    assert card.preprocess.mean == (0.0, 0.0, 0.0) and card.preprocess.std == (1.0, 1.0, 1.0)
    with pytest.raises(CardError, match="square RGB"):
        load_card(tmp_path / "m.onnx", (1, 1, SIZE, SIZE), CLASSES)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_any_tiny_cnn_becomes_a_bundle_that_matches_onnxruntime(tmp_path_factory, seed):
    d = tmp_path_factory.mktemp("m")
    onnx.save(tiny_cnn(seed), d / "m.onnx")
    (d / "m.json").write_text(json.dumps({"labels": LABELS}))
    bundle = model_mod.prepare(d / "m.onnx", d / "static")
    from tilemesh.runtime.executor import run_graph

    x = np.random.default_rng(seed).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    want = ort.InferenceSession(str(d / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run_graph(bundle.graph(), x), want, atol=1e-4, rtol=1e-4)
