"""The ONNX importer's normalizations and the compact format's round trip."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tilemesh.runtime import graph as G
from tilemesh.runtime.executor import run_graph

REPO = Path(__file__).resolve().parents[1]


def make_model(nodes, x_shape, inits, opset=17, x_dims=None):
    g = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims or list(x_shape))],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def ort_run(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def bn_inits(prefix, c, rng):
    return {
        f"{prefix}.scale": rng.uniform(0.5, 1.5, c).astype(np.float32),
        f"{prefix}.bias": rng.standard_normal(c).astype(np.float32),
        f"{prefix}.mean": rng.standard_normal(c).astype(np.float32),
        f"{prefix}.var": rng.uniform(0.1, 2.0, c).astype(np.float32),
    }


def bn_node(prefix, x, y):
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")],
                            [y], name=prefix, epsilon=1e-3)


def conv_bn_model(extra_reader=False):
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((6, 3, 3, 3)).astype(np.float32), **bn_inits("bn", 6, rng)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("bn", "c", "n"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
    ]
    if extra_reader:  # the Conv's raw output is read twice, so the BN cannot be folded into it
        nodes.append(helper.make_node("Add", ["r", "c"], ["y"], name="add"))
    return make_model(nodes, (1, 3, 8, 8), inits), rng.standard_normal((1, 3, 8, 8)).astype(np.float32)


def test_batch_norm_is_folded_into_the_conv():
    model, x = conv_bn_model()
    g = G.load_onnx(model)
    assert [n.op for n in g.nodes] == ["Conv", "Relu"]
    conv = g.nodes[0]
    assert conv.output == "n" and g.nodes[1].inputs == ("n",)
    assert "w" not in g.weights  # the unfolded weight is dropped, not shipped
    assert all(w.dtype == np.float32 and w.flags.c_contiguous for w in g.weights.values())
    np.testing.assert_allclose(run_graph(g, x), ort_run(model, x), atol=1e-5)


def test_batch_norm_stays_separate_when_the_conv_output_has_other_readers():
    model, x = conv_bn_model(extra_reader=True)
    g = G.load_onnx(model)
    assert [n.op for n in g.nodes] == ["Conv", "Conv", "Relu", "Add"]
    assert g.nodes[1].attrs["group"] == 6 and g.nodes[1].attrs["kernel"] == (1, 1)
    np.testing.assert_allclose(run_graph(g, x), ort_run(model, x), atol=1e-5)


def test_batch_norm_on_the_input_becomes_a_depthwise_conv():
    rng = np.random.default_rng(1)
    model = make_model([bn_node("bn", "x", "y")], (1, 4, 5, 5), bn_inits("bn", 4, rng))
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    g = G.load_onnx(model)
    assert [n.op for n in g.nodes] == ["Conv"]
    np.testing.assert_allclose(run_graph(g, x), ort_run(model, x), atol=1e-5)


def test_clip_bounds_from_inputs_and_from_attributes():
    lo, hi = np.float32(0), np.float32(6)
    m13 = make_model([helper.make_node("Clip", ["x", "lo", "hi"], ["y"], name="c")], (1, 2, 3, 3),
                     {"lo": lo, "hi": hi}, opset=13)
    m6 = make_model([helper.make_node("Clip", ["x"], ["y"], name="c", min=0.0, max=6.0)], (1, 2, 3, 3), {}, opset=6)
    m_none = make_model([helper.make_node("Clip", ["x", "", "hi"], ["y"], name="c")], (1, 2, 3, 3), {"hi": hi})
    assert G.load_onnx(m13).nodes[0].attrs == {"min": 0.0, "max": 6.0}
    assert G.load_onnx(m6).nodes[0].attrs == {"min": 0.0, "max": 6.0}
    assert G.load_onnx(m_none).nodes[0].attrs == {"min": -math.inf, "max": 6.0}


def test_identity_and_dropout_disappear_and_names_are_filled_in():
    nodes = [
        helper.make_node("Identity", ["x"], ["i"]),
        helper.make_node("Relu", ["i"], ["r"]),
        helper.make_node("Dropout", ["r"], ["d"]),
        helper.make_node("Relu", ["d"], ["y"]),
    ]
    g = G.load_onnx(make_model(nodes, (1, 2, 3, 3), {}))
    assert [n.op for n in g.nodes] == ["Relu", "Relu"]
    assert g.nodes[0].inputs == ("x",) and g.nodes[1].inputs == ("r",) and g.output == "y"
    assert len({n.name for n in g.nodes}) == 2 and all(n.name for n in g.nodes)


def test_unsupported_op_names_op_and_node():
    model = make_model([helper.make_node("LpNormalization", ["x"], ["y"], name="norm1", axis=1)], (1, 2, 3, 3), {})
    with pytest.raises(G.UnsupportedOpError, match=r"'LpNormalization'.*'norm1'") as e:
        G.load_onnx(model)
    assert e.value.op == "LpNormalization" and e.value.node == "norm1"


def test_batch_must_be_one_and_a_symbolic_batch_becomes_one():
    relu = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    with pytest.raises(ValueError, match="batch 2"):
        G.load_onnx(make_model(relu, (2, 3, 4, 4), {}))
    g = G.load_onnx(make_model(relu, None, {}, x_dims=["N", 3, 4, 4]))
    assert g.shapes == {"x": (1, 3, 4, 4), "y": (1, 3, 4, 4)}


def test_auto_pad_becomes_explicit_pads():
    w = np.ones((2, 2, 3, 3), np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="c", auto_pad="SAME_UPPER", strides=[2, 2])
    g = G.load_onnx(make_model([conv], (1, 2, 8, 7), {"w": w}))
    # SAME_UPPER: total padding (ceil(n/s)-1)*s + k - n, the odd pixel at the end.
    assert g.nodes[0].attrs["pads"] == (0, 1, 1, 1)
    assert g.shapes["y"] == (1, 2, 4, 4)


def test_node_flops_of_a_conv():
    model, _ = conv_bn_model()
    g = G.load_onnx(model)
    assert G.node_flops(g, g.nodes[0]) == 2 * 6 * 8 * 8 * 3 * 3 * 3
    assert G.node_flops(g, g.nodes[1]) == 6 * 8 * 8


def mixed_graph():
    """Every attribute kind the compact form must carry: tuples, bools, floats, inf, ints."""
    rng = np.random.default_rng(2)
    inits = {
        "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "hi": np.float32(0.75),
        "gw": rng.standard_normal((4, 5)).astype(np.float32),
        "gb": rng.standard_normal(5).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 0, 2, 1], strides=[1, 2]),
        helper.make_node("Clip", ["c", "", "hi"], ["k"], name="clip"),
        helper.make_node("AveragePool", ["k"], ["p"], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["p"], ["gp"], name="gap"),
        helper.make_node("Flatten", ["gp"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["y"], name="fc", alpha=0.5),
    ]
    model = make_model(nodes, (1, 3, 9, 9), inits)
    return model, G.load_onnx(model), rng.standard_normal((1, 3, 9, 9)).astype(np.float32)


def assert_graphs_equal(a: G.Graph, b: G.Graph):
    assert a.nodes == b.nodes
    assert [type(v) for n in a.nodes for v in n.attrs.values()] == [type(v) for n in b.nodes for v in n.attrs.values()]
    assert (a.input, a.output, a.shapes) == (b.input, b.output, b.shapes)
    assert list(a.weights) == list(b.weights)
    for k in a.weights:
        assert a.weights[k].dtype == b.weights[k].dtype and a.weights[k].shape == b.weights[k].shape
        assert a.weights[k].tobytes() == b.weights[k].tobytes()


@pytest.mark.parametrize("form", ["prefix", "directory"])
def test_compact_round_trip_is_exact(tmp_path, form):
    model, g, x = mixed_graph()
    target = tmp_path / "m" if form == "prefix" else tmp_path
    json_path, bin_path = G.save_compact(g, target)
    assert json_path.exists() and bin_path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([json_path.name, bin_path.name])
    g2 = G.load_compact(target)
    assert_graphs_equal(g, g2)
    np.testing.assert_array_equal(run_graph(g2, x), run_graph(g, x))
    np.testing.assert_allclose(run_graph(g2, x), ort_run(model, x), atol=1e-5)


def test_compact_json_is_strict_json(tmp_path):
    _, g, _ = mixed_graph()
    json_path, _ = G.save_compact(g, tmp_path / "m")

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    meta = json.loads(json_path.read_text(), parse_constant=no_constants)
    assert meta["format"] == G.COMPACT_FORMAT
    assert all(e["offset"] % 64 == 0 for e in meta["weights"])


def test_graph_from_compact_rejects_a_truncated_blob(tmp_path):
    _, g, _ = mixed_graph()
    json_path, bin_path = G.save_compact(g, tmp_path / "m")
    with pytest.raises(ValueError, match="bytes"):
        G.graph_from_compact(json_path.read_text(), bin_path.read_bytes()[:-4])


def test_compact_loads_and_runs_with_numpy_alone(tmp_path):
    """What Pyodide does: no onnx, no onnxruntime importable."""
    _, g, x = mixed_graph()
    G.save_compact(g, tmp_path / "m")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", run_graph(g, x))
    code = (
        "import sys; sys.modules['onnx'] = None; sys.modules['onnxruntime'] = None\n"
        "import numpy as np\n"
        "from tilemesh.runtime.graph import load_compact\n"
        "from tilemesh.runtime.executor import run_graph\n"
        f"d = {str(tmp_path)!r}\n"
        "y = run_graph(load_compact(d + '/m'), np.load(d + '/x.npy'))\n"
        "assert np.array_equal(y, np.load(d + '/want.npy')), 'outputs differ'\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_to_onnx_reproduces_the_graph():
    model, g, x = mixed_graph()
    back = G.to_onnx(g)
    np.testing.assert_allclose(ort_run(back, x), ort_run(model, x), atol=1e-6)
    assert_graphs_equal(G.load_onnx(back), g)
