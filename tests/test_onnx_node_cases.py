"""Every supported op against ONNX's own node test cases (the expected outputs ONNX ships for each op).

The cases come from `onnx.backend.test.case.node` (the generator of `onnx/backend/test/data/node`; this
wheel ships the generator, not the files). tilemesh takes batch-1 graphs with one input, 2D or 4D, so each
case is adapted without changing what it computes:
* the first input is the graph input, every other input a constant (initializer);
* a 4D case with batch B runs as B batch-1 graphs, one per batch item;
* elementwise ops (activations, n-ary Sum/Max/Min/Mean, PRelu) with inputs of one shape run flattened to
  (1, N); a rank-3 Softmax/LogSoftmax gets a leading batch axis (its axis shifted).
Cases that still do not fit (rank 3 or 5 data, broadcasting that varies over H/W, integer data) are
counted and listed, never silently dropped: the test asserts how many ran per op.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from onnx import helper, numpy_helper

from tilemesh.runtime.executor import run_graph
from tilemesh.runtime.graph import UnsupportedOpError, load_onnx

UNARY = {"Relu", "Sigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "HardSigmoid", "Tanh", "Softplus",
         "Softsign", "Abs", "Neg", "Exp", "Clip"}
NARY = {"Sum", "Max", "Min", "Mean", "PRelu", "Add", "Mul", "Sub", "Div"}
OPS = sorted(UNARY | NARY | {
    "Softmax", "LogSoftmax", "Concat", "LRN", "Transpose", "Unsqueeze", "Squeeze", "Pad", "BatchNormalization",
    "ReduceMean", "ReduceMax", "Resize", "Upsample", "ConvTranspose", "DepthToSpace", "SpaceToDepth", "Conv",
    "GlobalMaxPool", "GlobalAveragePool", "Gather", "MaxPool", "AveragePool", "Flatten", "Reshape",
})
# Minimum number of cases that must run per op (the rest do not fit batch-1, 2D/4D, one input).
MIN_RUN = {"Resize": 12, "ConvTranspose": 7, "Pad": 3, "LRN": 2, "DepthToSpace": 2, "Softmax": 3,
           "LogSoftmax": 3, "LeakyRelu": 3, "PRelu": 1, "Elu": 3, "Tanh": 2, "HardSigmoid": 3, "Sum": 2,
           "Max": 3, "Min": 3, "BatchNormalization": 2, "Conv": 6, "GlobalMaxPool": 2, "Upsample": 1}


@pytest.fixture(scope="module")
def cases():
    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {}
        for c in node.collect_testcases(None):
            if c.model is None or len(c.model.graph.node) != 1 or c.model.graph.node[0].op_type not in OPS:
                continue
            out.setdefault(c.model.graph.node[0].op_type, []).append(c)
    return out


def _model(node, opset_imports, x_shape, consts: dict, out_rank: int, attrs=None):
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
    n = helper.make_node(node.op_type, list(node.input), [node.output[0]], name=node.name or "the_node")
    for a in node.attribute:
        if attrs is None or a.name not in attrs:
            n.attribute.append(a)
    for k, v in (attrs or {}).items():
        n.attribute.append(helper.make_attribute(k, v))
    g = helper.make_graph(
        [n], "case", [helper.make_tensor_value_info(node.input[0], 1, list(x_shape))],
        [helper.make_tensor_value_info(node.output[0], 1, [None] * out_rank)], inits)
    m = helper.make_model(g, opset_imports=opset_imports)
    m.ir_version = 8
    return m


def _variants(case):
    """(model, x, expected) triples for one case, or a reason it cannot run as a batch-1 2D/4D graph."""
    node = case.model.graph.node[0]
    op = node.op_type
    ins, outs = case.data_sets[0]
    if len(outs) != 1 or len([o for o in node.output if o]) != 1:
        return "several outputs"
    x, want = ins[0], outs[0]
    if x.dtype != np.float32:
        return f"{x.dtype} data"
    names = [t for t in node.input if t]
    consts = {t: v for t, v in zip(names[1:], ins[1:], strict=False) if t}
    opsets = case.model.opset_import
    if op in UNARY or (op in NARY and all(np.shape(v) == x.shape for v in ins)):
        flat = {k: np.asarray(v).reshape(1, -1) for k, v in consts.items()}
        if op == "Clip":
            flat = {k: np.asarray(v) for k, v in consts.items()}
        return [(_model(node, opsets, (1, x.size), flat, 2), x.reshape(1, -1), want.reshape(1, -1))]
    if op in ("Softmax", "LogSoftmax") and x.ndim == 3:
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
        m = _model(node, opsets, (1, *x.shape), consts, 4, {"axis": axis + 1 if axis >= 0 else axis})
        return [(m, x[None], want[None])]
    if x.ndim not in (2, 4):
        return f"rank {x.ndim}"
    if x.shape[0] == 1:
        return [(_model(node, opsets, x.shape, consts, want.ndim), x, want)]
    if x.ndim == 4 and want.ndim == 4 and want.shape[0] == x.shape[0]:
        return [(_model(node, opsets, (1, *x.shape[1:]), consts, 4), x[i:i + 1], want[i:i + 1])
                for i in range(x.shape[0])]
    return f"batch {x.shape[0]}"


def _graphs(op, cases):
    """(case name, graph, x, expected) for each case of `op` the importer takes."""
    for case in cases.get(op, []):
        v = _variants(case)
        if isinstance(v, str):
            continue
        for model, x, want in v:
            try:
                graph = load_onnx(model)
            except UnsupportedOpError:
                break
            yield case, graph, np.ascontiguousarray(x), want


@pytest.mark.parametrize("op", OPS)
def test_op_matches_onnx_node_test_data(op, cases, capsys):
    ran, skipped, refused = [], [], []
    for case in cases.get(op, []):
        v = _variants(case)
        if isinstance(v, str):
            skipped.append(f"{case.name}: {v}")
            continue
        for model, x, want in v:
            try:
                graph = load_onnx(model)
            except UnsupportedOpError as e:  # a clear refusal naming op and node is allowed, a wrong answer not
                assert e.op and e.node, e
                refused.append(f"{case.name}: {e}")
                break
            got = run_graph(graph, np.ascontiguousarray(x))
            tol = max(case.rtol, 1e-5), max(case.atol, 1e-6)
            np.testing.assert_allclose(got, want.reshape(got.shape) if got.size == want.size else want,
                                       rtol=tol[0] * 10, atol=tol[1] * 10, err_msg=case.name)
        else:
            ran.append(case.name)
    with capsys.disabled():
        print(f"\n{op}: {len(ran)} ONNX node cases ran, {len(refused)} refused, {len(skipped)} do not fit"
              + "".join(f"\n    refused {r}" for r in refused))
    assert len(ran) >= MIN_RUN.get(op, 0), (ran, skipped)


@pytest.mark.parametrize("op", OPS)
def test_op_task_model_on_onnxruntime_equals_numpy(op, cases):
    """Every node case the importer takes, written as the task model the ONNX engines run (onnx_proto, no onnx
    package) and run by onnxruntime, equals the numpy kernels within 1e-5: each op has an engine lowering."""
    import onnxruntime as ort

    from tilemesh.runtime.task_model import graph_model

    ran = 0
    for case, graph, x, _ in _graphs(op, cases):
        ref = run_graph(graph, x)
        sess = ort.InferenceSession(graph_model(graph).model, providers=["CPUExecutionProvider"])
        (got,) = sess.run(None, {graph.input: x})
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=case.name)
        ran += 1
    assert ran >= MIN_RUN.get(op, 0)
