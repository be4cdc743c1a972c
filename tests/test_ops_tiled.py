"""The vision ops beyond MobileNetV2, each inside a small CNN: whole inference against onnxruntime on the
original ONNX model (1e-4), tiled execution against whole inference (1e-5) on 2x2 grids, uneven row bands
and column splits with a cut in the middle, every tile's task model on onnxruntime (the ONNX engines' lowering
of every op, per-tile adjustments included: no tile falls back to numpy), and the export of the whole graph back
to ONNX.

Each model is conv 3x3 -> OP -> conv 3x3, so the op's own dependency rule sits between two halos.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_task_model import check_tasks

from tilemesh.runtime import graph as graph_mod
from tilemesh.runtime.backend import OnnxRuntimeBackend
from tilemesh.runtime.deps import is_global, make_segments, segment_is_spatial
from tilemesh.runtime.executor import run_graph
from tilemesh.runtime.graph import UnsupportedOpError, load_onnx
from tilemesh.runtime.tiling import Split, build_plan, simulate

C, H, W = 8, 14, 13


class Net:
    """A model under construction: x -> conv -> (the op's nodes) -> conv -> y."""

    def __init__(self, seed: int, c: int = C, h: int = H, w: int = W):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.k = [], [], 0
        self.shape = (1, c, h, w)

    def const(self, value, dtype=np.float32) -> str:
        self.k += 1
        name = f"k{self.k}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op, ins, **attrs) -> str:
        self.k += 1
        out = f"t{self.k}"
        self.nodes.append(helper.make_node(op, list(ins), [out], name=f"{op.lower()}_{self.k}", **attrs))
        return out

    def conv(self, x, cin, cout, k=3, group=1, **attrs) -> str:
        w = self.const(self.rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin // group * k * k))
        b = self.const(0.1 * self.rng.standard_normal(cout))
        attrs.setdefault("pads", [k // 2] * 4)
        return self.node("Conv", [x, w, b], kernel_shape=[k, k], group=group, **attrs)

    def model(self, y, opset=17):
        g = helper.make_graph(self.nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, self.shape)],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        return m


def _shuffle(n, x, form):
    g, cg = 2, C // 2
    if form == "transpose5d":
        y = n.node("Reshape", [x, n.const([1, g, cg, H, W], np.int64)])
        y = n.node("Transpose", [y], perm=[0, 2, 1, 3, 4])
    else:  # the 4-D reshape form: (1, g, C/g, H*W)
        y = n.node("Reshape", [x, n.const([1, g, cg, H * W], np.int64)])
        y = n.node("Transpose", [y], perm=[0, 2, 1, 3])
    return n.node("Reshape", [y, n.const([1, C, H, W], np.int64)])


def _branches(n, x, k):
    return [n.conv(x, C, C, k=1) for _ in range(k)]


# name -> (body(net, x) -> (tensor, channels), opset)
CASES = {
    "softmax-channels": lambda n, x: (n.node("Softmax", [x], axis=1), C),
    "logsoftmax-channels": lambda n, x: (n.node("LogSoftmax", [x], axis=1), C),
    "softmax-width (global)": lambda n, x: (n.node("Softmax", [x], axis=-1), C),
    "sum-3": lambda n, x: (n.node("Sum", _branches(n, x, 3)), C),
    "max-3": lambda n, x: (n.node("Max", _branches(n, x, 3)), C),
    "min-3": lambda n, x: (n.node("Min", _branches(n, x, 3)), C),
    "mean-2": lambda n, x: (n.node("Mean", _branches(n, x, 2)), C),
    "max-with-constant": lambda n, x: (n.node("Max", [x, n.const(np.full((1, C, 1, 1), 0.1))]), C),
    "concat-4": lambda n, x: (n.node("Concat", _branches(n, x, 4), axis=1), 4 * C),
    "lrn": lambda n, x: (n.node("LRN", [x], size=5, alpha=1e-2, beta=0.75, bias=2.0), C),
    "shuffle-transpose": lambda n, x: (_shuffle(n, x, "transpose5d"), C),
    "shuffle-reshape4d": lambda n, x: (_shuffle(n, x, "reshape4d"), C),
    "pad-constant": lambda n, x: (n.node("Pad", [x, n.const([0, 1, 2, 1, 0, 0, 1, 3], np.int64),
                                                 n.const(0.5)], mode="constant"), C + 1),
    "pad-reflect": lambda n, x: (n.node("Pad", [x, n.const([0, 0, 3, 1, 0, 0, 2, 4], np.int64)], mode="reflect"), C),
    "pad-edge": lambda n, x: (n.node("Pad", [x, n.const([0, 0, 1, 3, 0, 0, 4, 0], np.int64)], mode="edge"), C),
    "leakyrelu": lambda n, x: (n.node("LeakyRelu", [x], alpha=0.1), C),
    "prelu": lambda n, x: (n.node("PRelu", [x, n.const(n.rng.uniform(0, 0.5, (C, 1, 1)))]), C),
    "elu": lambda n, x: (n.node("Elu", [x], alpha=0.7), C),
    "selu": lambda n, x: (n.node("Selu", [x]), C),
    "tanh": lambda n, x: (n.node("Tanh", [x]), C),
    "softplus": lambda n, x: (n.node("Softplus", [x]), C),
    "hardsigmoid": lambda n, x: (n.node("HardSigmoid", [x], alpha=0.25, beta=0.4), C),
    "sigmoid-gating": lambda n, x: (n.node("Mul", [x, n.node("Sigmoid", [n.conv(x, C, C, k=1)])]), C),
    "hardswish-gating": lambda n, x: (n.node("Mul", [x, n.node("HardSigmoid", [n.conv(x, C, C, k=1)],
                                                               alpha=1 / 6, beta=0.5)]), C),
    "hardswish": lambda n, x: (n.node("HardSwish", [x]), C),
    "batchnorm-alone": lambda n, x: (n.node("BatchNormalization", [
        n.node("Add", [x, n.conv(x, C, C, k=1)]), n.const(n.rng.uniform(0.5, 2, C)), n.const(n.rng.normal(0, 1, C)),
        n.const(n.rng.normal(0, 1, C)), n.const(n.rng.uniform(0.5, 2, C))]), C),
    "se-reducemean-unsqueeze (global)": lambda n, x: (n.node("Mul", [x, n.node("Unsqueeze", [n.node(
        "Sigmoid", [n.node("ReduceMean", [x], axes=[2, 3], keepdims=0)]), n.const([2, 3], np.int64)])]), C),
    "resize-nearest-x2": lambda n, x: (n.node("Resize", [x, "", n.const([1, 1, 2, 2])], mode="nearest"), C),
    "resize-linear-x2": lambda n, x: (n.node("Resize", [x, "", n.const([1, 1, 2, 3])], mode="linear"), C),
    "resize-linear-pytorch": lambda n, x: (n.node("Resize", [x, "", n.const([1, 1, 3, 2])], mode="linear",
                                                  coordinate_transformation_mode="pytorch_half_pixel"), C),
    "resize-nearest-asym-ceil": lambda n, x: (n.node("Resize", [x, "", n.const([1, 1, 3, 2])], mode="nearest",
                                                     coordinate_transformation_mode="asymmetric",
                                                     nearest_mode="ceil"), C),
    "resize-linear-align-corners": lambda n, x: (n.node("Resize", [x, "", "", n.const([1, C, 2 * H - 1, 2 * W - 1],
                                                                                        np.int64)], mode="linear",
                                                        coordinate_transformation_mode="align_corners"), C),
    "resize-sizes-1.5x": lambda n, x: (n.node("Resize", [x, "", "", n.const([1, C, 21, 19], np.int64)],
                                              mode="nearest"), C),
    "convtranspose-s2-k3-p1-op1": lambda n, x: (n.node("ConvTranspose", [x, n.const(n.rng.normal(0, 0.3, (C, 6, 3, 3))),
                                                                       n.const(n.rng.normal(0, 1, 6))],
                                                       strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]), 6),
    "convtranspose-s2-k2": lambda n, x: (n.node("ConvTranspose", [x, n.const(n.rng.normal(0, 0.3, (C, 5, 2, 2)))],
                                                strides=[2, 2]), 5),
    "convtranspose-grouped-dilated": lambda n, x: (n.node("ConvTranspose", [
        x, n.const(n.rng.normal(0, 0.3, (C, 3, 3, 3)))], strides=[2, 1], dilations=[1, 2], group=2,
        pads=[0, 2, 1, 0]), 6),
    "convtranspose-k1-s3": lambda n, x: (n.node("ConvTranspose", [x, n.const(n.rng.normal(0, 0.3, (C, 4, 1, 1)))],
                                                strides=[3, 3]), 4),
    "depthtospace-dcr": lambda n, x: (n.node("DepthToSpace", [x], blocksize=2), C // 4),
    "depthtospace-crd": lambda n, x: (n.node("DepthToSpace", [x], blocksize=2, mode="CRD"), C // 4),
    "grouped-dilated-conv": lambda n, x: (n.conv(x, C, C, k=3, group=4, dilations=[2, 3], pads=[2, 3, 2, 3]), C),
}
OPSET9 = {"upsample-nearest": lambda n, x: (n.node("Upsample", [x, n.const([1, 1, 2, 2])], mode="nearest"), C),
          "upsample-linear": lambda n, x: (n.node("Upsample", [x, n.const([1, 1, 2, 2])], mode="linear"), C)}


def build(name):
    body = CASES.get(name) or OPSET9[name]
    n = Net(abs(hash(name)) % 1000)
    x = n.conv("x", C, C)
    y, c = body(n, x)
    y = n.conv(y, c, 3)
    return n.model(y, opset=9 if name in OPSET9 else 17)


SPLITS = [
    Split.grid([["a", "b"], ["c", "d"]]),
    Split.rows({"a": 5, "b": 2, "c": 3}),
    Split.grid([["a", "b", "c"]], col_shares=[1, 3, 2]),
]


@pytest.mark.parametrize("name", sorted(CASES) + sorted(OPSET9))
def test_op_whole_and_tiled(name, tmp_path):
    model = build(name)
    x = np.random.default_rng(1).standard_normal((1, C, H, W)).astype(np.float32)
    (ref,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    graph = load_onnx(model)
    whole = run_graph(graph, x)
    np.testing.assert_allclose(whole, ref, rtol=1e-4, atol=1e-4)
    # The graph exported back to ONNX gives the same result in onnxruntime.
    (back,) = ort.InferenceSession(graph_mod.to_onnx(graph).SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, {graph.input: x})
    np.testing.assert_allclose(back, ref, rtol=1e-4, atol=1e-4)
    # The compact form the browsers load keeps every attribute (strings, index tuples, flags).
    graph_mod.save_compact(graph, tmp_path / "m")
    np.testing.assert_array_equal(run_graph(graph_mod.load_compact(tmp_path / "m"), x), whole)

    n = len(graph.nodes)
    spatial = not any(is_global(nd, graph) for nd in graph.nodes)
    assert spatial == ("(global)" not in name), [nd.op for nd in graph.nodes]
    for i, split in enumerate(SPLITS):
        cuts = [n // 2] if i % 2 else []
        segs = make_segments(graph, cuts)
        splits = [split if segment_is_spatial(graph, s) else Split.whole("b") for s in segs]
        plan = build_plan(graph, cuts, splits, "a")
        np.testing.assert_allclose(simulate(graph, plan, x, roundtrip_json=(i == 0)), whole, rtol=1e-5, atol=1e-5)
        # Every tile's task model runs on the engine (none falls back to numpy) and equals its numpy steps.
        check_tasks(graph, plan)
        if i == 0:
            out = simulate(graph, plan, x, backend=OnnxRuntimeBackend(graph))
            np.testing.assert_allclose(out, whole, rtol=1e-5, atol=1e-5)


def test_every_tile_of_a_resampling_op_is_exact():
    """Single-row and single-column tiles at every position: the smallest tiles stress the adjustments."""
    for name in ("pad-reflect", "resize-linear-x2", "convtranspose-s2-k3-p1-op1", "convtranspose-k1-s3",
                 "depthtospace-dcr", "resize-linear-align-corners"):
        graph = load_onnx(build(name))
        x = np.random.default_rng(2).standard_normal((1, C, H, W)).astype(np.float32)
        whole = run_graph(graph, x)
        k = next(i for i, nd in enumerate(graph.nodes) if nd.op in ("Pad", "Resize", "ConvTranspose", "DepthToSpace"))
        t = graph.nodes[k].output
        oh, ow = graph.shapes[t][2:]
        # Segment 0 ends at the op: own its output in one-row bands, then gather.
        devs = {f"r{i}": 1 for i in range(oh)}
        plan = build_plan(graph, [k + 1], [Split.rows(devs), Split.whole("r0")], "r0")
        np.testing.assert_allclose(simulate(graph, plan, x), whole, rtol=1e-5, atol=1e-5, err_msg=name)
        check_tasks(graph, plan)  # and each one-row tile's task model on onnxruntime
        cols = Split.grid([[f"c{i}" for i in range(ow)]])
        plan = build_plan(graph, [k + 1], [cols, Split.whole("c0")], "c0")
        np.testing.assert_allclose(simulate(graph, plan, x), whole, rtol=1e-5, atol=1e-5, err_msg=name)
        check_tasks(graph, plan)


@pytest.mark.parametrize("bad,match", [
    (lambda n, x: n.node("Transpose", [x], perm=[0, 1, 3, 2]), "Transpose.*transpose_.*neither a reshape"),
    (lambda n, x: n.node("Resize", [x, "", n.const([1, 1, 2, 2])], mode="cubic"), "Resize.*cubic"),
    (lambda n, x: n.node("Pad", [x, n.const([0, 0, 1, 1, 0, 0, 1, 1], np.int64)], mode="wrap"), "Pad.*wrap"),
    (lambda n, x: n.node("ReduceMean", [x], axes=[1], keepdims=1), "ReduceMean.*axes"),
    (lambda n, x: n.node("Add", [x, n.const(np.ones((1, 1, H, W)))]), "Add.*varying over H or W"),
    (lambda n, x: n.node("Einsum", [x], equation="nchw->nchw"), "'Einsum'.*'einsum_"),
])
def test_ops_outside_the_list_are_refused_by_op_and_node(bad, match):
    n = Net(0)
    y = bad(n, n.conv("x", C, C))
    with pytest.raises(UnsupportedOpError, match=match):
        load_onnx(n.model(y))


def _head_model(flatten: str):
    n = Net(5)
    x = n.conv("x", C, C)
    p = n.node("GlobalAveragePool", [x])
    if flatten == "squeeze":
        f = n.node("Squeeze", [p, n.const([2, 3], np.int64)])
    else:  # what torch.onnx writes for x.view(x.size(0), -1): shape arithmetic feeding a Reshape
        shape = n.node("Shape", [p])
        batch = n.node("Gather", [shape, n.const(0, np.int64)], axis=0)
        dims = n.node("Concat", [n.node("Unsqueeze", [batch, n.const([0], np.int64)]),
                                 n.const([-1], np.int64)], axis=0)
        f = n.node("Reshape", [p, dims])
    y = n.node("Gemm", [f, n.const(n.rng.standard_normal((5, C))), n.const(n.rng.standard_normal(5))], transB=1)
    return n.model(n.node("Softmax", [y], axis=-1))


@pytest.mark.parametrize("flatten", ["squeeze", "torch-shape-arithmetic"])
def test_classifier_heads_squeeze_and_shape_arithmetic(flatten):
    model = _head_model(flatten)
    x = np.random.default_rng(3).standard_normal((1, C, H, W)).astype(np.float32)
    (ref,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    graph = load_onnx(model)
    # Shape arithmetic is folded away; the squeeze is a plain reshape of the pooled vector.
    assert [nd.op for nd in graph.nodes] == ["Conv", "GlobalAveragePool", "Reshape", "Gemm", "Softmax"]
    np.testing.assert_allclose(run_graph(graph, x), ref, rtol=1e-5, atol=1e-6)
    plan = build_plan(graph, [1], [Split.grid([["a", "b"], ["c", "d"]]), Split.whole("d")], "a")
    np.testing.assert_allclose(simulate(graph, plan, x), ref, rtol=1e-5, atol=1e-6)


def test_nhwc_input_transposed_first_is_absorbed():
    """tf2onnx's Keras exports take NHWC and transpose it to NCHW first: the IR's input is the NCHW tensor."""
    n = Net(9)
    t = n.node("Transpose", ["x"], perm=[0, 3, 1, 2])
    y = n.conv(n.conv(t, C, C), C, 4)
    g = helper.make_graph(n.nodes, "nhwc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, H, W, C])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], n.inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    graph = load_onnx(model)
    assert graph.shapes[graph.input] == (1, C, H, W) and [nd.op for nd in graph.nodes] == ["Conv", "Conv"]
    x = np.random.default_rng(4).standard_normal((1, H, W, C)).astype(np.float32)
    (ref,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(run_graph(graph, nchw), ref, rtol=1e-5, atol=1e-5)
    plan = build_plan(graph, [], [Split.grid([["a", "b"], ["c", "d"]])], "a")
    np.testing.assert_allclose(simulate(graph, plan, nchw), ref, rtol=1e-5, atol=1e-5)
