"""The pretrained zoo (`tilemesh.models.zoo`): each architecture, built from the wheel that `make test`'s setup put in
the download cache (sha256-checked, no torch), loads into the IR, runs whole like onnxruntime on a real photo (same
top-5), tiles exactly (2x2 grid and uneven rows, past every squeeze-excite pool), and gets an exact plan from the
planner on the default rooms. The weights are real: each classifier names the photo's content.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from skimage import data

from bench.zoo import default_room, photo_for, photo_input, tiled_plan
from tilemesh.models import zoo
from tilemesh.models.card import CardError, load_card
from tilemesh.models.demo import SourceError, SourceFile, read_source
from tilemesh.planning import planner as PL
from tilemesh.runtime.executor import run_graph
from tilemesh.runtime.graph import load_onnx
from tilemesh.runtime.tiling import Split, simulate

NAMES = list(zoo.DEFAULT)  # what setup builds (CRAFT's 88 MB wheel is on request: its wiring is tested below)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    for name in NAMES:
        zoo.build(name, out, log=lambda line: None)
    return out


_loaded: dict = {}


def loaded(zoo_dir, name):
    """(onnx path, card dict, graph, input from a real photo, onnxruntime's output), once per architecture."""
    if name not in _loaded:
        path = zoo_dir / f"{name}.onnx"
        card = json.loads(path.with_suffix(".json").read_text())
        graph = load_onnx(path)
        x = photo_input(photo_for(name), zoo.architecture(name).input_shape, card["preprocess"])
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (ref,) = sess.run(None, {sess.get_inputs()[0].name: x})
        _loaded[name] = (path, card, graph, x, ref)
    return _loaded[name]


def top5(v) -> list[int]:
    return list(np.argsort(-np.asarray(v).ravel(), kind="stable")[:5])


@pytest.mark.parametrize("name", NAMES)
def test_whole_matches_onnxruntime_on_a_photo(zoo_dir, name):
    _, card, graph, x, ref = loaded(zoo_dir, name)
    whole = run_graph(graph, x)
    scale = float(np.abs(ref).max())
    assert np.abs(whole - ref).max() <= 1e-4 * max(scale, 1.0)
    if card["output"] == "logits":
        assert top5(whole)[: min(5, ref.size)] == top5(ref)[: min(5, ref.size)]


@pytest.mark.parametrize("split", [Split.grid([["a", "b"], ["c", "d"]]), Split.rows({"a": 3, "b": 1, "c": 2})],
                         ids=["2x2", "rows-3-1-2"])
@pytest.mark.parametrize("name", NAMES)
def test_tiles_exactly_past_every_pool(zoo_dir, name, split):
    _, _, graph, x, _ = loaded(zoo_dir, name)
    whole = run_graph(graph, x)
    head = PL.head_start(graph)
    # Tiling reaches the head: no node after its first node makes a spatial map.
    after = [graph.shapes[nd.output] for nd in graph.nodes[head + 1:]]
    assert all(len(s) != 4 or s[2:] == (1, 1) for s in after), f"tiling stops at {graph.nodes[head].name}"
    plan = tiled_plan(graph, split)
    tiled = [s for s in plan.segments if len([t for t in plan.tasks if t.segment == s.index]) > 1]
    assert sum(s.stop - s.start for s in tiled) >= head * 0.9  # the body really is split, not just its start
    out = simulate(graph, plan, x)
    scale = max(float(np.abs(whole).max()), 1.0)
    assert np.abs(out - whole).max() <= 1e-4 * scale


@pytest.mark.parametrize("name", NAMES)
def test_the_planner_plans_it_exactly_on_the_default_room(zoo_dir, name):
    _, _, graph, x, _ = loaded(zoo_dir, name)
    whole = run_graph(graph, x)
    # bench/scenarios/default.toml: two phones, a laptop and the edge; and its browsers alone (there the planner
    # splits the frame across devices).
    for room in (default_room(), default_room(with_edge=False)):
        assert (room["edge"] == "edge") == ("edge" in room["profiles"])
        choice = PL.plan_frame(graph, room["profiles"], room["links"], room["source"], {"edge": room["edge"]})
        assert choice.predicted_s > 0 and set(choice.plan.devices) <= set(room["profiles"])
        out = simulate(graph, choice.plan, x)
        assert np.abs(out - whole).max() <= 1e-4 * max(float(np.abs(whole).max()), 1.0), choice.label


def _probs(v):
    p = np.exp(v - v.max())
    return (p / p.sum()).ravel()


def test_the_weights_are_real_they_recognise_photos(zoo_dir):
    """A converted architecture with wrong wiring (padding, flatten order, scaling) or random weights fails here."""
    def run(name, img):
        path = zoo_dir / f"{name}.onnx"
        card = json.loads(path.with_suffix(".json").read_text())
        x = photo_input(img, zoo.architecture(name).input_shape, card["preprocess"])
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return card["labels"], _probs(sess.run(None, {sess.get_inputs()[0].name: x})[0])

    labels, p = run("efficientnet_lite0", data.chelsea())
    assert 281 <= int(p.argmax()) <= 285, labels[int(p.argmax())]  # a domestic cat class
    labels, p = run("efficientnet_lite0", data.coffee())
    assert labels[int(p.argmax())] == "espresso" and p.max() > 0.5
    astronaut = data.astronaut()
    _, p = run("mtcnn_onet", astronaut[20:200, 150:330])  # her face
    assert p[1] > 0.7
    _, p = run("mtcnn_onet", data.chelsea())
    assert p[0] > 0.7
    # A page of text (scikit-image's scanned page) upright, then turned: the orientation model follows it.
    page = np.repeat(data.page()[..., None], 3, axis=2)
    for k, want in [(0, "0°"), (2, "180°")]:
        labels, p = run("pplcnet_orientation", np.rot90(page, k))
        assert labels[int(p.argmax())] == want
    # The text-line direction classifier: each of the page's first five lines of text (its input is one line),
    # upright and upside down.
    for top in (12, 46, 64, 82, 100):
        line = page[top:top + 20, 50:350]
        for k, want in [(0, "0°"), (2, "180°")]:
            labels, p = run("ppocr_mobilenetv3_cls", np.rot90(line, k))
            assert labels[int(p.argmax())] == want, (top, k)
    # The text detector finds text on the page and little on the cat.
    for img, lo, hi in [(page, 0.05, 1.0), (data.chelsea(), 0.0, 0.05)]:
        path = zoo_dir / "ppocr_det.onnx"
        card = json.loads(path.with_suffix(".json").read_text())
        x = photo_input(img, zoo.architecture("ppocr_det").input_shape, card["preprocess"])
        (m,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        assert lo <= float((m > 0.3).mean()) <= hi


@pytest.mark.parametrize("name", NAMES)
def test_card_serves_or_says_why_not(zoo_dir, name, tmp_path):
    path, card, graph, _, _ = loaded(zoo_dir, name)
    arch = zoo.architecture(name)
    assert card["source"]["sha256"] == arch.source.sha256 and card["licence"] and card["family"]
    classes = int(np.prod(graph.shapes[graph.output][1:]))
    if arch.servable:
        with pytest.raises(CardError, match="square|map"):
            load_card(path, graph.shapes[graph.input], classes)
    else:
        loaded_card = load_card(path, graph.shapes[graph.input], classes)
        assert loaded_card.name == card["name"] and len(loaded_card.labels) == classes
        # What `tilemesh serve --model` does at startup: the served bundle (compact graph for Pyodide, card).
        from tilemesh.server.model import prepare

        bundle = prepare(path, tmp_path)
        assert bundle.dir.is_dir() and any(bundle.dir.iterdir())


def test_build_is_idempotent_and_refuses_a_wrong_hash(zoo_dir, tmp_path):
    lines = []
    zoo.build("mtcnn_onet", zoo_dir, log=lines.append)
    assert lines == [f"mtcnn_onet: up to date in {zoo_dir}"]
    # A changed ONNX file is rebuilt.
    (tmp_path / "mtcnn_onet.onnx").write_bytes(b"")
    (tmp_path / "mtcnn_onet.json").write_text((zoo_dir / "mtcnn_onet.json").read_text())
    zoo.build("mtcnn_onet", tmp_path, log=lambda line: None)
    assert (tmp_path / "mtcnn_onet.onnx").read_bytes() == (zoo_dir / "mtcnn_onet.onnx").read_bytes()
    src = zoo.architecture("mtcnn_onet").source
    wrong = SourceFile(src.package, src.version, src.member, sha256="0" * 64)
    with pytest.raises(SourceError, match="sha256"):
        read_source(wrong)
    with pytest.raises(KeyError, match="known: efficientnet_lite0"):
        zoo.architecture("vgg99")


def craft_state(rng) -> dict:
    """A state_dict with CRAFT's keys and shapes (as saved from DataParallel, "module." prefixed) and seeded values."""
    from tilemesh.models import nets

    shapes = {}

    def conv(name, cin, cout, k, bn=None):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)
        if bn:
            for s in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{bn}.{s}"] = (cout,)

    for sl, layers in nets.CRAFT_SLICES:
        for layer in layers:
            if layer != "pool":
                c, bn, cin, cout = layer
                conv(f"basenet.{sl}.{c}", cin, cout, 3, f"basenet.{sl}.{bn}")
    conv("basenet.slice5.1", 512, 1024, 3)
    conv("basenet.slice5.2", 1024, 1024, 1)
    for name, cin, mid, cout in nets.CRAFT_UPCONVS:
        conv(f"{name}.conv.0", cin, mid, 1, f"{name}.conv.1")
        conv(f"{name}.conv.3", mid, cout, 3, f"{name}.conv.4")
    for i, (cin, cout, k) in enumerate(nets.CRAFT_CLS):
        conv(f"conv_cls.{2 * i}", cin, cout, k)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("running_var"):
            v = rng.uniform(0.5, 1.5, shape)
        elif len(shape) == 4:
            v = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        else:
            v = rng.standard_normal(shape) * 0.1 + (1.0 if key.endswith(".weight") else 0.0)
        state[f"module.{key}"] = v.astype(np.float32)
    return state


def test_craft_converter_wiring_whole_and_tiled():
    """CRAFT's converter (VGG16-BN + U-Net with bilinear upsampling and skip Concats) on seeded weights of its real
    shapes at 64x64: the IR matches onnxruntime, tiles exactly on a 2x2 grid and uneven rows (the whole graph is
    spatial: no head), and a missing tensor is a clear error. The real 88 MB weights are built on request."""
    from tilemesh.models import nets
    from tilemesh.models.mobilenet_v2 import StateDictError

    state = craft_state(np.random.default_rng(3))
    model = nets.build_craft(state, size=64)
    graph = load_onnx(model)
    assert PL.head_start(graph) == len(graph.nodes) and graph.shapes[graph.output] == (1, 2, 32, 32)
    x = np.random.default_rng(4).standard_normal((1, 3, 64, 64)).astype(np.float32)
    (ref,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    whole = run_graph(graph, x)
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(whole - ref).max() <= 1e-4 * scale
    for split in (Split.grid([["a", "b"], ["c", "d"]]), Split.rows({"a": 3, "b": 1, "c": 2})):
        assert np.abs(simulate(graph, tiled_plan(graph, split), x) - whole).max() <= 1e-4 * scale
    # Its bilinear Resize tiles run on the ONNX engine like the convs (no task falls back to numpy).
    from tilemesh.runtime.backend import OnnxRuntimeBackend
    from tilemesh.runtime.task_model import plan_task_models

    plan = tiled_plan(graph, Split.grid([["a", "b"], ["c", "d"]]))
    assert all(tm is not None for d in plan.devices for tm in plan_task_models(graph, plan.device_plan(d)))
    assert np.abs(simulate(graph, plan, x, backend=OnnxRuntimeBackend(graph)) - whole).max() <= 1e-4 * scale
    del state["module.upconv2.conv.4.running_var"]
    with pytest.raises(StateDictError, match="upconv2.conv.4.running_var"):
        nets.build_craft(state, size=64)


def tiny_yolo(rng):
    """A YOLOX-shaped ONNX graph: a Focus stem (four strided Slice pairs + Concat), SiLU convs at two scales and the
    (anchors, K) head Reshape/Concat/Transpose; trained-on-BGR is simulated by nothing: weights are seeded."""
    from onnx import TensorProto, helper, numpy_helper

    def w(*shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), f"w{len(inits)}")

    inits, nodes = [], []
    ints = {"zero": 0, "one": 1, "big": 2**62, "two": 2, "ax2": 2, "ax3": 3}
    inits += [numpy_helper.from_array(np.array([v], np.int64), k) for k, v in ints.items()]
    parts = []
    for r, c in [(0, 0), (1, 0), (0, 1), (1, 1)]:
        a, b = f"s{r}{c}a", f"s{r}{c}b"
        nodes.append(helper.make_node("Slice", ["img", ["zero", "one"][r], "big", "ax2", "two"], [a]))
        nodes.append(helper.make_node("Slice", [a, ["zero", "one"][c], "big", "ax3", "two"], [b]))
        parts.append(b)
    nodes.append(helper.make_node("Concat", parts, ["focus"], axis=1))
    x, maps = "focus", []
    for i, (cin, cout, stride) in enumerate([(12, 8, 1), (8, 8, 2)]):
        t = w(cout, cin, 3, 3)
        inits.append(t)
        nodes.append(helper.make_node("Conv", [x, t.name], [f"c{i}"], kernel_shape=[3, 3], pads=[1] * 4,
                                      strides=[stride] * 2))
        nodes.append(helper.make_node("Sigmoid", [f"c{i}"], [f"g{i}"]))
        nodes.append(helper.make_node("Mul", [f"c{i}", f"g{i}"], [f"y{i}"]))
        x = f"y{i}"
        h = w(6, cout, 1, 1)
        inits.append(h)
        nodes.append(helper.make_node("Conv", [x, h.name], [f"head{i}"], kernel_shape=[1, 1]))
        maps.append(f"head{i}")
    for i, (m, hw) in enumerate(zip(maps, [16 * 16, 8 * 8], strict=True)):
        inits.append(numpy_helper.from_array(np.array([1, 6, hw], np.int64), f"shape{i}"))
        nodes.append(helper.make_node("Reshape", [m, f"shape{i}"], [f"r{i}"]))
    nodes.append(helper.make_node("Concat", ["r0", "r1"], ["cat"], axis=2))
    nodes.append(helper.make_node("Transpose", ["cat"], ["out"], perm=[0, 2, 1]))
    graph = helper.make_graph(nodes, "tiny_yolo", [helper.make_tensor_value_info("img", TensorProto.FLOAT,
                                                                                  ["n", 3, 32, 32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 320, 6])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_yolo_stem_and_head_rewrites_are_exact_and_tile():
    """The rewrites the YOLOX zoo model needs (its 73 MB wheel is on request), on a YOLOX-shaped graph: Focus ->
    SpaceToDepth with permuted conv channels, BGR -> RGB, the (anchors, K) head as one row. The rewritten model fed
    RGB gives the original's table on BGR; the IR loads it, matches onnxruntime and tiles exactly up to the head."""
    from tilemesh.models import nets

    original = tiny_yolo(np.random.default_rng(5))
    model = nets.adapt_onnx(original.SerializeToString(), (1, 3, 32, 32), drop_softmax=False, focus=True,
                            yolo_head=True, bgr=True)
    assert [n.op_type for n in model.graph.node].count("Slice") == 0
    sizes = json.loads({p.key: p.value for p in model.metadata_props}["tilemesh.yolo_head_sizes"])
    assert sizes == [[6, 256], [6, 64]]
    x = np.random.default_rng(6).standard_normal((1, 3, 32, 32)).astype(np.float32)
    (want,) = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"img": np.ascontiguousarray(x[:, ::-1])})
    (row,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"img": x})
    np.testing.assert_allclose(nets.unflatten_yolo(row, sizes), want[0], rtol=1e-5, atol=1e-5)
    graph = load_onnx(model)
    whole = run_graph(graph, x)
    np.testing.assert_allclose(whole, row, rtol=1e-4, atol=1e-4)
    for split in (Split.grid([["a", "b"], ["c", "d"]]), Split.rows({"a": 3, "b": 1, "c": 2})):
        np.testing.assert_allclose(simulate(graph, tiled_plan(graph, split), x), whole, rtol=1e-5, atol=1e-5)
    # A graph without the pattern is refused with a reason, not changed silently.
    with pytest.raises(ValueError, match="Focus"):
        nets.adapt_onnx(model.SerializeToString(), (1, 3, 32, 32), drop_softmax=False, focus=True)


@pytest.mark.parametrize("name", ["mtcnn_onet", "pplcnet_orientation", "ppocr_mobilenetv3_cls", "ppocr_det"])
def test_tiles_run_on_the_onnx_engine(zoo_dir, name):
    """Every op lowers to ONNX (O-Net's PRelu, the SE blocks' HardSigmoid, DBNet's Resize and ConvTranspose), so
    browsers and the edge compute every task of these models on onnxruntime(-web) instead of falling back to
    numpy; the tiled result through onnxruntime equals the numpy reference."""
    from tilemesh.runtime.backend import OnnxRuntimeBackend
    from tilemesh.runtime.graph import save_compact
    from tilemesh.runtime.task_model import plan_task_models

    _, _, graph, x, _ = loaded(zoo_dir, name)
    plan = tiled_plan(graph, Split.grid([["a", "b"], ["c", "d"]]))
    for dev in plan.devices:
        assert all(tm is not None for tm in plan_task_models(graph, plan.device_plan(dev), external="model.bin"))
    _, bin_path = save_compact(graph, zoo_dir / f"{name}.compact")
    out = simulate(graph, plan, x, backend=OnnxRuntimeBackend(graph, blob=bin_path.read_bytes()))
    whole = run_graph(graph, x)
    assert np.abs(out - whole).max() <= 1e-4 * max(1.0, float(np.abs(whole).max()))


def test_cli_lists_builds_and_refuses_unknown_names(tmp_path, capsys):
    from tilemesh.cli import main

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert all(a.name in out for a in zoo.ARCHITECTURES) and "built on request only" in out and "licence" in out
    assert main(["models", "build", "mtcnn_onet", "--out", str(tmp_path)]) == 0
    assert f"tilemesh serve --model {tmp_path / 'mtcnn_onet.onnx'}" in capsys.readouterr().out
    assert main(["models", "build", "ppocr_det", "--out", str(tmp_path)]) == 0
    assert "not servable: outputs a per-pixel map" in capsys.readouterr().out
    assert main(["models", "build", "vgg99", "--out", str(tmp_path)]) == 2
    assert "no zoo model 'vgg99'" in capsys.readouterr().err
