"""Task models written without the onnx package (`onnx_proto`, `task_model`) against the real onnx and onnxruntime.

Every model is parsed by `onnx`, passes `onnx.checker`, and runs in onnxruntime with its weights as external data
in the compact model's blob; each tile's result must equal the numpy reference (`tiling.run_steps`) within 1e-4,
for every task of random plans on random CNNs (border and interior tiles alike) and for the demo model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper as oh
from onnx import numpy_helper
from test_tiling import random_cnn, random_plan_args, to_graph

from tilemesh.runtime import graph as graph_mod
from tilemesh.runtime.backend import NumpyBackend, OnnxRuntimeBackend
from tilemesh.runtime.executor import run_graph
from tilemesh.runtime.onnx_proto import External, Initializer, OnnxNode, model_bytes
from tilemesh.runtime.task_model import ENGINE_OPS, graph_model, plan_task_models, task_model
from tilemesh.runtime.tiling import Split, build_plan, run_steps, simulate


def compact_blob(graph) -> bytes:
    meta, chunks = graph_mod.compact_meta(graph)
    blob = bytearray(meta["bin_bytes"])
    for off, w in chunks:
        blob[off: off + w.nbytes] = w.tobytes()
    return bytes(blob)


def session(model: bytes, blob: bytes | None = None, threads: int = 1):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if blob is not None:
        opts.add_external_initializers_from_files_in_memory(["model.bin"], [blob], [len(blob)])
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def check(model: bytes, blob: bytes | None = None) -> onnx.ModelProto:
    """Parse with onnx and run the full checker, the blob as the file the external data names."""
    proto = onnx.load_model_from_string(model)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "model.onnx").write_bytes(model)
        Path(d, "model.bin").write_bytes(blob or b"")
        onnx.checker.check_model(str(Path(d, "model.onnx")), full_check=True)
    return proto


def tile_input(graph, deps, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for t, r in deps.inputs.items():
        shape = graph.shapes[t]
        shape = (shape[0], shape[1], r.rows, r.cols) if len(shape) == 4 else shape
        out[t] = rng.standard_normal(shape).astype(np.float32)
    return out


def test_writer_attributes_and_initializers_parse_as_onnx():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [OnnxNode("Gemm", ["x", "w", "b"], ["y"], {"alpha": 0.5, "transB": 1, "beta": 2.0}, name="g"),
             OnnxNode("Reshape", ["y", "shape"], ["z"], {"allowzero": 0}),
             OnnxNode("Pad", ["z", "pads"], ["p"], {"mode": "reflect"})]
    inits = [Initializer("w", (2, 3), np.dtype(np.float32), external=External("model.bin", 64, 24)),
             Initializer.from_array("b", np.array([1.0, -1.0], np.float32)),
             Initializer.from_array("shape", np.array([1, 1, 1, -1], np.int64)),
             Initializer.from_array("pads", np.array([0, 0, 0, 1, 0, 0, 0, 1], np.int64))]
    blob = bytearray(88)
    blob[64:88] = w.tobytes()
    proto = check(model_bytes(nodes, {"x": (1, 3)}, {"p": (1, 1, 1, None)}, inits), bytes(blob))
    g = proto.graph
    attrs = {a.name: oh.get_attribute_value(a) for a in g.node[0].attribute}
    assert attrs == {"alpha": 0.5, "beta": 2.0, "transB": 1}
    assert oh.get_attribute_value(g.node[2].attribute[0]) == b"reflect"
    assert numpy_helper.to_array(g.initializer[2]).tolist() == [1, 1, 1, -1]
    ext = {e.key: e.value for e in g.initializer[0].external_data}
    assert ext == {"location": "model.bin", "offset": "64", "length": "24"}
    assert g.output[0].type.tensor_type.shape.dim[3].HasField("dim_value") is False
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    (y,) = session(model_bytes(nodes, {"x": (1, 3)}, {"p": (1, 1, 1, None)}, inits), bytes(blob)).run(None, {"x": x})
    want = 0.5 * x @ w.T + 2.0 * np.array([1.0, -1.0], np.float32)
    np.testing.assert_allclose(y, np.pad(want.reshape(1, 1, 1, 2), [(0, 0)] * 3 + [(1, 1)], mode="reflect"))


def test_writer_refuses_values_it_cannot_write():
    with pytest.raises(TypeError, match="attribute bad"):
        model_bytes([OnnxNode("Relu", ["x"], ["y"], {"bad": {"a": 1}})], {"x": (1,)}, {"y": (1,)})
    with pytest.raises(TypeError, match="dtype"):
        Initializer.from_array("u", np.zeros(2, np.uint16))


def check_tasks(graph, plan, tol=1e-5):
    """Every task of every device of `plan`: its task model (weights external) is written (no numpy fallback),
    parses and passes the checker, and on onnxruntime equals its numpy steps within `tol` on random tiles."""
    blob = compact_blob(graph)
    numpy = NumpyBackend(graph)
    ran = 0
    for dev in plan.devices:
        dplan = plan.device_plan(dev)
        for task, tm in zip(dplan.tasks, plan_task_models(graph, dplan, external="model.bin"), strict=True):
            if not task.deps.steps:  # nothing to compute (a distributed pool's result passes through)
                assert tm is None
                continue
            assert tm is not None, f"task {task.segment} of {dev} falls back to numpy"
            proto = check(tm.model, blob)
            assert not [t for t in proto.graph.initializer if t.raw_data and t.name in graph.weights]
            feeds = tile_input(graph, task.deps, task.segment)
            ref = run_steps(graph, task.deps, feeds, keep=task.owned, backend=numpy)
            got = dict(zip(tm.outputs, session(tm.model, blob).run(list(tm.outputs), feeds), strict=True))
            assert set(got) == set(task.owned)
            for t in task.owned:
                np.testing.assert_allclose(got[t], ref[t], rtol=tol, atol=tol, err_msg=t)
            ran += 1
    return ran


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_task_of_random_plans_equals_numpy(data):
    """Random CNN, random cuts and splits: each task has a model (every op lowers), equal to its numpy steps."""
    graph = to_graph(data.draw(random_cnn()))
    cuts, splits, source = data.draw(random_plan_args(graph))
    check_tasks(graph, build_plan(graph, cuts, splits, source))


def test_engines_lower_every_op_the_importer_emits():
    from tilemesh.runtime import kernels

    assert graph_mod.SUPPORTED_OPS <= ENGINE_OPS
    assert kernels.SUPPORTED_OPS <= ENGINE_OPS


# Generator kinds (test_tiling.random_cnn) of the ops lowered as more than one plain ONNX node, with the ops each
# must put in the graph.
NEW_KINDS = {"lrn": {"LRN"}, "shuffle": {"Gather"}, "softmax": {"Softmax", "LogSoftmax"},
             "nary": {"Sum", "Max", "Min", "Mean"}, "pad": {"Pad"}, "resize": {"Resize"}, "convT": {"ConvTranspose"},
             "d2s": {"DepthToSpace"}, "s2d": {"SpaceToDepth"}, "act2": {"Selu", "Softsign", "Abs", "Neg", "PRelu",
                                                                         "LeakyRelu", "Elu", "Tanh", "HardSigmoid",
                                                                         "Softplus"}}


@pytest.mark.parametrize("kind", sorted(NEW_KINDS))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_each_lowered_op_on_random_tiles_equals_numpy(kind, data):
    """Random CNNs made of convs and one op kind, cut and split at random (border and interior tiles, uneven
    bands, grids): every task runs on the engine and equals numpy within 1e-5."""
    from hypothesis import assume

    graph = to_graph(data.draw(random_cnn(kinds=(kind, kind, "conv"))))
    assume(any(n.op in NEW_KINDS[kind] for n in graph.nodes))
    cuts, splits, source = data.draw(random_plan_args(graph))
    assert check_tasks(graph, build_plan(graph, cuts, splits, source)) > 0


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_plans_through_segment_sessions_equal_full_inference(data):
    graph = to_graph(data.draw(random_cnn()))
    cuts, splits, source = data.draw(random_plan_args(graph))
    x = np.random.default_rng(3).standard_normal(graph.shapes[graph.input]).astype(np.float32)
    backend = OnnxRuntimeBackend(graph, blob=compact_blob(graph))
    out = simulate(graph, build_plan(graph, cuts, splits, source), x, backend=backend)
    np.testing.assert_allclose(out, run_graph(graph, x), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def demo(demo_model_dir, tmp_path_factory):
    """The demo model as browsers have it: loaded from its compact form, with the blob's bytes."""
    from tilemesh.runtime.graph import load_onnx, save_compact

    out = tmp_path_factory.mktemp("compact")
    _, bin_path = save_compact(load_onnx(demo_model_dir / "mobilenet_v2.onnx"), out / "m")
    return graph_mod.load_compact(out / "m"), bin_path.read_bytes(), bin_path


def test_demo_model_whole_equals_numpy_and_onnxruntime(demo, demo_model_dir):
    graph, blob, _ = demo
    tm = graph_model(graph, external="model.bin")
    proto = check(tm.model, blob)
    assert len(tm.model) < 100_000 < len(blob)  # the weights stay in the blob
    assert sum(n.op_type == "Conv" for n in proto.graph.node) == 52
    x = np.random.default_rng(0).standard_normal(graph.shapes[graph.input]).astype(np.float32)
    (got,) = session(tm.model, blob).run(None, {graph.input: x})
    ref = run_graph(graph, x)
    (orig,) = session((demo_model_dir / "mobilenet_v2.onnx").read_bytes()).run(None, {graph.input: x})
    for other in (ref, orig):
        np.testing.assert_allclose(got, other, rtol=1e-4, atol=1e-4)
        assert list(np.argsort(-got[0])[:5]) == list(np.argsort(-other[0])[:5])


def test_external_data_file_beside_the_model(demo, tmp_path):
    """The standard external-data layout: a model file loaded by path finds the blob by its relative location."""
    graph, _, bin_path = demo
    tm = graph_model(graph, external=bin_path.name)
    model_path = bin_path.with_name("whole.onnx")
    model_path.write_bytes(tm.model)
    onnx.checker.check_model(str(model_path))
    x = np.random.default_rng(1).standard_normal(graph.shapes[graph.input]).astype(np.float32)
    (got,) = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {graph.input: x})
    np.testing.assert_allclose(got, run_graph(graph, x), rtol=1e-4, atol=1e-4)


def test_demo_grid_tiles_pad_at_borders_only_and_equal_numpy(demo):
    """A 2x2 grid fused over the first blocks: the top-left tile pads top/left only, and every tile is exact."""
    graph, blob, _ = demo
    plan = build_plan(graph, [10], [Split.grid([["a", "b"], ["c", "d"]]), Split.whole("a")], "a")
    first = plan.device_plan("a").tasks[0]
    conv_pads = [s.pads for s in first.deps.steps if s.pads is not None and s.pads != (0, 0, 0, 0)]
    assert conv_pads and all(p[2] == 0 and p[3] == 0 for p in conv_pads)  # interior sides read halo rows
    for dev in "abcd":
        task = plan.device_plan(dev).tasks[0]
        tm = task_model(graph, task.deps, list(task.owned), external="model.bin")
        check(tm.model, blob)
        feeds = tile_input(graph, task.deps, 7)
        ref = run_steps(graph, task.deps, feeds, keep=task.owned)
        got = session(tm.model, blob, threads=2).run(list(tm.outputs), feeds)
        for t, g in zip(tm.outputs, got, strict=True):
            np.testing.assert_allclose(g, ref[t], rtol=1e-4, atol=1e-4)
            r = task.deps.regions[t]
            assert g.shape[2:] == (r.rows, r.cols) != tuple(graph.shapes[t][2:])  # a tile, not the whole map


def test_task_model_refuses_a_task_without_outputs(demo):
    graph, _, _ = demo
    plan = build_plan(graph, [], [Split.whole("a")], "a")
    task = plan.device_plan("a").tasks[0]
    with pytest.raises(ValueError, match="keeps nothing"):
        task_model(graph, task.deps, ["not-a-tensor"])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_task_model_lowering_agrees_with_graph_to_onnx(data):
    """Two IR->ONNX paths exist (`graph.to_onnx` with onnx.helper for setup and benches, `task_model` without onnx
    for devices): on random CNNs their whole-graph models compute the same."""
    graph = to_graph(data.draw(random_cnn()))
    x = np.random.default_rng(4).standard_normal(graph.shapes[graph.input]).astype(np.float32)
    (a,) = session(graph_mod.to_onnx(graph).SerializeToString()).run(None, {graph.input: x})
    (b,) = session(graph_model(graph).model).run(None, {graph.input: x})
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op,attrs", [("PRelu", {}), ("HardSigmoid", {"alpha": 0.2, "beta": 0.4}),
                                      ("LeakyRelu", {"alpha": 0.07}), ("Elu", {"alpha": 0.8}), ("Tanh", {}),
                                      ("Softplus", {})])
def test_activations_lower_and_equal_numpy(op, attrs):
    """Each elementwise activation in ENGINE_OPS, after a conv, lowers (PRelu's per-channel slope as an input) and
    its task model equals numpy on a border tile of a 2x1 split."""
    from tilemesh.runtime.graph import load_onnx

    rng = np.random.default_rng(11)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    inits = [w]
    ins = ["c"]
    if op == "PRelu":
        inits.append(numpy_helper.from_array(rng.uniform(0, 0.5, (4, 1, 1)).astype(np.float32), "slope"))
        ins.append("slope")
    nodes = [oh.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             oh.make_node(op, ins, ["y"], **attrs)]
    model = oh.make_model(oh.make_graph(nodes, "act", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                  [1, 3, 8, 8])],
                                        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
                                        initializer=inits), opset_imports=[oh.make_opsetid("", 17)])
    graph = load_onnx(model)
    assert graph.nodes[-1].op == op and op in ENGINE_OPS
    plan = build_plan(graph, [], [Split.rows({"a": 1, "b": 1})], "a")
    blob = compact_blob(graph)
    for dev in "ab":
        task = plan.device_plan(dev).tasks[0]
        tm = task_model(graph, task.deps, list(task.owned), external="model.bin")
        check(tm.model, blob)
        feeds = tile_input(graph, task.deps, 5)
        ref = run_steps(graph, task.deps, feeds, keep=task.owned)
        for t, g in zip(tm.outputs, session(tm.model, blob).run(list(tm.outputs), feeds), strict=True):
            np.testing.assert_allclose(g, ref[t], rtol=1e-5, atol=1e-5)


def _unet(mode: str):
    """A small U-Net: two down steps (MaxPool), up by ConvTranspose (stride 2) and by Resize (x2, `mode`), each
    up step concatenated with its skip connection; a 2-class map at full resolution."""
    from test_ops_tiled import Net

    n = Net(21, c=3, h=32, w=32)
    relu_conv = lambda x, cin, cout: n.node("Relu", [n.conv(x, cin, cout)])  # noqa: E731
    e1 = relu_conv("x", 3, 8)
    e2 = relu_conv(n.node("MaxPool", [e1], kernel_shape=[2, 2], strides=[2, 2]), 8, 16)
    b = relu_conv(n.node("MaxPool", [e2], kernel_shape=[2, 2], strides=[2, 2]), 16, 16)
    u2 = n.node("ConvTranspose", [b, n.const(n.rng.normal(0, 0.2, (16, 16, 2, 2))), n.const(n.rng.normal(0, 1, 16))],
                strides=[2, 2])
    d2 = relu_conv(n.node("Concat", [u2, e2], axis=1), 32, 16)
    u1 = n.node("Resize", [d2, "", n.const([1, 1, 2, 2])], mode=mode)
    d1 = relu_conv(n.node("Concat", [u1, e1], axis=1), 24, 8)
    return n.model(n.conv(d1, 8, 2, k=1))


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_unet_plans_run_every_task_on_the_engine(mode):
    """A U-Net with ConvTranspose and Resize: the planner's plan for a three-device room, and hand-made grids and
    bands run every task on onnxruntime (no numpy fallback, each task within 1e-5 of its numpy steps), and the
    distributed result equals single-device inference (numpy 1e-5, onnxruntime on the original model 1e-4)."""
    from test_planner import WIFI, room

    from tilemesh.planning.planner import plan_frame
    from tilemesh.runtime.graph import load_onnx
    from tilemesh.runtime.task_model import NotLowerable

    class EngineOnly(OnnxRuntimeBackend):
        def run_segment(self, deps, inputs, keep):
            try:
                return super().run_segment(deps, inputs, keep)
            except NotLowerable as e:  # pragma: no cover - the failure this test exists to catch
                raise AssertionError(f"a tile fell back to numpy: {e}") from e

    model = _unet(mode)
    graph = load_onnx(model)
    assert {"ConvTranspose", "Resize", "Concat", "MaxPool"} <= {nd.op for nd in graph.nodes}
    x = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)
    (orig,) = session(model.SerializeToString()).run(None, {"x": x})
    whole = run_graph(graph, x)
    np.testing.assert_allclose(whole, orig, rtol=1e-4, atol=1e-4)
    n = len(graph.nodes)
    plans = [plan_frame(graph, room(a=0.25, b=1.0, c=1.0), WIFI, "a").plan,  # a slow camera phone, two laptops
             build_plan(graph, [], [Split.grid([["a", "b"], ["c", "d"]])], "a"),
             build_plan(graph, [n // 2], [Split.rows({"a": 3, "b": 1, "c": 2}),
                                          Split.grid([["b", "c"]], col_shares=[2, 1])], "a")]
    assert len(plans[0].devices) == 3  # the planner splits the frame among all three
    for plan in plans:
        assert check_tasks(graph, plan) > 0
        out = simulate(graph, plan, x, backend=EngineOnly(graph, blob=compact_blob(graph)))
        np.testing.assert_allclose(out, whole, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out, orig, rtol=1e-4, atol=1e-4)
