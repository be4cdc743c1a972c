"""Every numpy kernel against onnxruntime on small random single-op ONNX models, and the `pads` override.

Each model goes through the real import path (`graph.load_onnx`), so attribute normalization (auto_pad,
ceil_mode, Clip bounds, constant operands) is exercised together with the kernel. Tests run with both 2D
products (`matmul`, the CPython default, `einsum`, the Pyodide default without scipy, and scipy's `sgemm`,
the Pyodide default with it) so the browser's code paths are checked here too.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tilemesh.runtime import kernels
from tilemesh.runtime.executor import run_graph
from tilemesh.runtime.graph import Node, load_onnx

TOL = 1e-4


@pytest.fixture(params=["matmul", "einsum", "sgemm"], autouse=True)
def dot_impl(request):
    kernels.set_dot(request.param)
    yield request.param
    kernels.set_dot("auto")


def single_op_model(op, x_shape, attrs=None, consts=None, inputs=None, opset=17, extra_nodes=()):
    """A model `y = op(x, *consts)`; `inputs` overrides the op's input list (names "x", consts' keys, "")."""
    rng = np.random.default_rng(zlib.crc32(repr((op, x_shape)).encode()))
    consts = consts or {}
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
    ins = inputs if inputs is not None else ["x", *consts]
    nodes = [*extra_nodes, helper.make_node(op, ins, ["y"], name=f"the_{op.lower()}", **(attrs or {}))]
    g = helper.make_graph(
        nodes, "single", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    x = rng.standard_normal(x_shape).astype(np.float32) * 2
    return model, x


def ort_run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def check(model, x, tol=TOL):
    g = load_onnx(model)
    ours = run_graph(g, x)
    ref = ort_run(model, x)
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=tol, rtol=tol)
    return g


def conv_model(cin, cout, hw, k, group=1, bias=True, **attrs):
    rng = np.random.default_rng(cin * 100 + cout)
    consts = {"w": rng.standard_normal((cout, cin // group, *k)).astype(np.float32) * 0.3}
    if bias:
        consts["b"] = rng.standard_normal(cout).astype(np.float32)
    return single_op_model("Conv", (1, cin, *hw), {"group": group, **attrs}, consts)


CONV_CASES = {
    "3x3": (4, 6, (9, 11), (3, 3), 1, dict(pads=[1, 1, 1, 1])),
    "3x3-stride2-asym-pads": (4, 6, (9, 11), (3, 3), 1, dict(strides=[2, 2], pads=[0, 1, 2, 1])),
    "5x3-dilated-stride12": (3, 5, (13, 12), (5, 3), 1, dict(strides=[1, 2], dilations=[2, 1], pads=[2, 0, 3, 1])),
    "1x1": (8, 5, (7, 6), (1, 1), 1, {}),
    "1x1-stride2": (8, 5, (7, 6), (1, 1), 1, dict(strides=[2, 2])),
    "1x1-padded": (8, 5, (7, 6), (1, 1), 1, dict(pads=[1, 0, 2, 1])),
    "depthwise": (6, 6, (10, 9), (3, 3), 6, dict(pads=[1, 1, 1, 1])),
    "depthwise-stride2": (6, 6, (10, 9), (3, 3), 6, dict(strides=[2, 2], pads=[0, 0, 1, 1])),
    "depthwise-dilated-5x5": (4, 4, (12, 12), (5, 5), 4, dict(dilations=[2, 2], pads=[4, 4, 4, 4])),
    "depthwise-multiplier2": (3, 6, (8, 8), (3, 3), 3, dict(pads=[1, 1, 1, 1])),
    "grouped": (4, 6, (8, 7), (3, 3), 2, dict(pads=[1, 2, 0, 1], strides=[1, 2])),
    "same-upper": (3, 4, (9, 10), (3, 3), 1, dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "same-lower": (3, 4, (9, 10), (4, 4), 1, dict(auto_pad="SAME_LOWER")),
    "valid": (3, 4, (9, 10), (3, 3), 1, dict(auto_pad="VALID")),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_matches_onnxruntime(case):
    cin, cout, hw, k, group, attrs = CONV_CASES[case]
    g = check(*conv_model(cin, cout, hw, k, group, **attrs))
    a = g.nodes[0].attrs
    assert set(a) == {"kernel", "strides", "pads", "dilations", "group"} and len(a["pads"]) == 4


def test_conv_without_bias_gets_zero_bias():
    g = check(*conv_model(3, 4, (6, 6), (3, 3), bias=False, pads=[1, 1, 1, 1]))
    assert len(g.nodes[0].params) == 2
    assert not g.weights[g.nodes[0].params[1]].any()


@settings(max_examples=25, deadline=None)
@given(
    cin_g=st.integers(1, 4), cout_g=st.integers(1, 4), group=st.sampled_from([1, 2, 3]),
    kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
    dh=st.integers(1, 2), dw=st.integers(1, 2), pads=st.tuples(*[st.integers(0, 2)] * 4),
    h=st.integers(8, 12), w=st.integers(8, 12),
)
def test_conv_random_configs(cin_g, cout_g, group, kh, kw, sh, sw, dh, dw, pads, h, w):
    model, x = conv_model(cin_g * group, cout_g * group, (h, w), (kh, kw), group,
                          strides=[sh, sw], dilations=[dh, dw], pads=list(pads))
    check(model, x)


POOL_CASES = {
    "max-3x3-s2-p1": ("MaxPool", (1, 3, 9, 10), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    "max-2x2-s2": ("MaxPool", (1, 3, 8, 8), dict(kernel_shape=[2, 2], strides=[2, 2])),
    "max-ceil": ("MaxPool", (1, 2, 9, 10), dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    "max-dilated": ("MaxPool", (1, 2, 11, 10), dict(kernel_shape=[2, 3], dilations=[2, 2], pads=[1, 0, 1, 2])),
    "max-same-upper": ("MaxPool", (1, 2, 9, 8), dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")),
    "avg-exclude-pad": ("AveragePool", (1, 3, 9, 10),
                        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0)),
    "avg-include-pad": ("AveragePool", (1, 3, 9, 10),
                        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 2, 0, 1], count_include_pad=1)),
    "avg-5x5-asym": ("AveragePool", (1, 2, 12, 9), dict(kernel_shape=[5, 3], pads=[2, 0, 1, 1])),
    "global-avg": ("GlobalAveragePool", (1, 5, 7, 9), {}),
}


@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_pool_matches_onnxruntime(case):
    op, shape, attrs = POOL_CASES[case]
    check(*single_op_model(op, shape, attrs))


def test_average_pool_ceil_mode_that_changes_size_is_refused():
    from tilemesh.runtime.graph import UnsupportedOpError

    model, _ = single_op_model("AveragePool", (1, 2, 9, 10), dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1))
    with pytest.raises(UnsupportedOpError, match="ceil_mode"):
        load_onnx(model)


def relu_of_x():
    return helper.make_node("Relu", ["x"], ["rx"], name="pre")


ELEMENTWISE_CASES = {
    "relu": ("Relu", (1, 3, 5, 6), {}, {}, None, 17, ()),
    "sigmoid": ("Sigmoid", (1, 3, 5, 6), {}, {}, None, 17, ()),
    "hardswish": ("HardSwish", (1, 3, 5, 6), {}, {}, None, 17, ()),
    "clip-inputs": ("Clip", (1, 3, 5, 6), {}, {"lo": np.float32(0), "hi": np.float32(1.5)}, None, 13, ()),
    "clip-min-only": ("Clip", (1, 3, 5, 6), {}, {"lo": np.float32(-0.5)}, None, 13, ()),
    "clip-attrs": ("Clip", (1, 3, 5, 6), dict(min=0.0, max=6.0), {}, None, 6, ()),
    "add-two-tensors": ("Add", (1, 3, 5, 6), {}, {}, ["x", "rx"], 17, (relu_of_x(),)),
    "add-broadcast-const": ("Add", (1, 3, 5, 6), {}, {"c": np.arange(3, dtype=np.float32).reshape(1, 3, 1, 1)},
                            None, 17, ()),
    "mul-const-first": ("Mul", (1, 3, 5, 6), {}, {"c": np.float32([[[[2.0]]]])}, ["c", "x"], 17, ()),
    "sub-const-first": ("Sub", (1, 4), {}, {"c": np.float32([1, 2, 3, 4])}, ["c", "x"], 17, ()),
    "div": ("Div", (1, 4), {}, {"c": np.float32([1, 2, 3, 4])}, None, 17, ()),
    "flatten": ("Flatten", (1, 3, 2, 4), dict(axis=1), {}, None, 17, ()),
    "flatten-negative-axis": ("Flatten", (1, 3, 2, 4), dict(axis=-3), {}, None, 17, ()),
    "reshape": ("Reshape", (1, 3, 2, 4), {}, {"s": np.int64([1, -1])}, None, 17, ()),
    "concat": ("Concat", (1, 3, 4, 5), dict(axis=1), {}, ["x", "rx"], 17, (relu_of_x(),)),
    "concat-negative-axis": ("Concat", (1, 3, 4, 5), dict(axis=-1), {}, ["rx", "x"], 17, (relu_of_x(),)),
}


@pytest.mark.parametrize("case", sorted(ELEMENTWISE_CASES))
def test_elementwise_and_shape_ops_match_onnxruntime(case):
    op, shape, attrs, consts, ins, opset, extra = ELEMENTWISE_CASES[case]
    check(*single_op_model(op, shape, attrs, consts, ins, opset, extra))


def test_sigmoid_saturates_without_overflow_warnings():
    node = Node("s", "Sigmoid", ("x",), "y", {})
    x = np.float32([[-1000.0, -90.0, 0.0, 90.0, 1000.0]])
    y = kernels.run_node(node, [x], {})
    np.testing.assert_allclose(y, [[0.0, 0.0, 0.5, 1.0, 1.0]], atol=1e-7)


@pytest.mark.parametrize("trans_b,alpha,beta", [(0, 1.0, 1.0), (1, 0.5, 2.0), (1, 1.0, 0.0)])
def test_gemm_matches_onnxruntime(trans_b, alpha, beta):
    rng = np.random.default_rng(trans_b)
    b = rng.standard_normal((7, 5) if trans_b else (5, 7)).astype(np.float32)
    c = rng.standard_normal(7).astype(np.float32)
    attrs = dict(transB=trans_b, alpha=alpha, beta=beta)
    check(*single_op_model("Gemm", (1, 5), attrs, {"b": b, "c": c}))


def test_gemm_trans_a():
    # A graph input of shape (F, 1) would have batch F, so transA is checked on the kernel alone.
    rng = np.random.default_rng(2)
    x, b, c = (rng.standard_normal(s).astype(np.float32) for s in ((5, 1), (5, 3), (3,)))
    node = Node("g", "Gemm", ("x",), "y", dict(alpha=2.0, beta=1.0, transA=1, transB=0), ("b", "c"))
    y = kernels.run_node(node, [x], {"b": b, "c": c})
    np.testing.assert_allclose(y, 2.0 * (x.T.astype(np.float64) @ b) + c, atol=1e-5)


def test_gemm_without_c_and_matmul_with_constant():
    b = np.random.default_rng(1).standard_normal((6, 3)).astype(np.float32)
    check(*single_op_model("Gemm", (1, 6), {}, {"b": b}))
    check(*single_op_model("MatMul", (1, 6), {}, {"b": b}))


def test_unknown_op_names_op_and_node():
    node = Node("mystery_node", "LpNormalization", ("x",), "y", {})
    with pytest.raises(kernels.KernelError, match=r"'LpNormalization'.*'mystery_node'"):
        kernels.run_node(node, [np.zeros((1, 1, 2, 2), np.float32)], {})


# --------------------------------------------------------------------------- the pads override


def _node_of(model):
    g = load_onnx(model)
    return g.nodes[0], g.weights


@pytest.mark.parametrize("case", ["3x3-stride2-asym-pads", "depthwise", "5x3-dilated-stride12", "grouped"])
def test_conv_pads_override_equals_manual_zero_padding(case):
    cin, cout, hw, k, group, attrs = CONV_CASES[case]
    node, weights = _node_of(conv_model(cin, cout, hw, k, group, **attrs)[0])
    x = np.random.default_rng(3).standard_normal((1, cin, *hw)).astype(np.float32)
    pads = (2, 0, 1, 3)
    ours = kernels.run_node(node, [x], weights, pads=pads)
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    unpadded_node = dataclasses.replace(node, attrs={**node.attrs, "pads": (0, 0, 0, 0)})
    np.testing.assert_allclose(ours, kernels.run_node(unpadded_node, [padded], weights), atol=1e-5)
    (kh, kw), (sh, sw), (dh, dw) = node.attrs["kernel"], node.attrs["strides"], node.attrs["dilations"]
    assert ours.shape[2] == (hw[0] + 3 - (kh - 1) * dh - 1) // sh + 1
    assert ours.shape[3] == (hw[1] + 3 - (kw - 1) * dw - 1) // sw + 1


def test_max_pool_pads_override_pads_with_minus_infinity():
    node, weights = _node_of(single_op_model("MaxPool", (1, 2, 7, 7), dict(kernel_shape=[3, 3]))[0])
    x = -np.abs(np.random.default_rng(4).standard_normal((1, 2, 7, 7)).astype(np.float32)) - 1
    ours = kernels.run_node(node, [x], weights, pads=(1, 1, 1, 1))
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    np.testing.assert_array_equal(ours, kernels.run_node(node, [padded], weights))
    assert (ours < 0).all()  # zero padding would have produced zeros at the border


def _row_tiles(node, x, weights, bounds):
    """Compute the node's output in row bands the way the tiled executor does, and stack them."""
    kh, _ = node.attrs["kernel"]
    sh, _ = node.attrs["strides"]
    dh, _ = node.attrs["dilations"]
    pt, pl, pb, pr = node.attrs["pads"]
    h = x.shape[2]
    parts = []
    for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
        want0, want1 = r0 * sh - pt, (r1 - 1) * sh - pt + (kh - 1) * dh + 1
        got0, got1 = max(want0, 0), min(want1, h)
        tile_pads = (got0 - want0, pl, want1 - got1, pr)
        parts.append(kernels.run_node(node, [x[:, :, got0:got1]], weights, pads=tile_pads))
    return np.concatenate(parts, axis=2)


TILE_CASES = {
    "conv": ("Conv", None),
    "depthwise-stride2": ("Conv", "depthwise-stride2"),
    "maxpool": ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    "avg-exclude-pad": ("AveragePool", dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0)),
    "avg-include-pad": ("AveragePool", dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)),
    "avg-5x5-s2": ("AveragePool", dict(kernel_shape=[5, 5], strides=[2, 2], pads=[2, 2, 2, 2])),
}


@pytest.mark.parametrize("case", sorted(TILE_CASES))
def test_tiles_with_per_tile_pads_reassemble_the_full_output(case):
    op, spec = TILE_CASES[case]
    if op == "Conv":
        cin, cout, hw, k, group, attrs = CONV_CASES[spec or "3x3"]
        model, _ = conv_model(cin, cout, (16, 9), k, group, **attrs)
        shape = (1, cin, 16, 9)
    else:
        shape = (1, 3, 16, 9)
        model, _ = single_op_model(op, shape, spec)
    node, weights = _node_of(model)
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    full = kernels.run_node(node, [x], weights)
    ho = full.shape[2]
    bounds = [0, 1, ho // 2, ho - 1, ho]
    np.testing.assert_allclose(_row_tiles(node, x, weights, bounds), full, atol=1e-5)
