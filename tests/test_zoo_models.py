"""Classic ImageNet CNNs from the `onnx` wheel's own test data (onnx/backend/test/data/light: the
architectures of the ONNX model zoo with placeholder weights) load, run whole like onnxruntime, tile
exactly on a 2x2 grid, and get a plan from the planner for a room of two phones and a laptop that is exact
too. The files build their conv/fc weights with ConstantOfShape fills that make every output 1/1000, so those
get seeded random values first (the shipped biases and batch-norm statistics stay).

AlexNet (LRN), ShuffleNet (channel shuffle), ResNet-50 (Sum), SqueezeNet (fire modules, Concat, a
GlobalAveragePool head) and DenseNet-121 (long Concat chains, batch norm after Concat, imported as a
depthwise 1x1) cover the op families; inception and VGG are left out only for test time (4-7 s each whole on numpy).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tilemesh.planning import planner as PL
from tilemesh.planning.planner import head_start
from tilemesh.runtime.executor import run_graph
from tilemesh.runtime.graph import load_onnx
from tilemesh.runtime.profile import scaled_profile
from tilemesh.runtime.tiling import Split, build_plan, simulate

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
MODELS = ["bvlc_alexnet", "shufflenet", "resnet50", "squeezenet", "densenet121"]
_LAPTOP = {"version": 1, "sec_per_mac": {"conv_dense": 2e-9, "conv_pointwise": 3e-10, "conv_depthwise": 1e-9,
                                         "elementwise": 3e-10, "gemm": 3e-10}, "overhead_s": 3e-5, "chain_factor": 1.0}
ROOM = {"phone": scaled_profile(_LAPTOP, 0.5), "phone2": scaled_profile(_LAPTOP, 0.35), "laptop": _LAPTOP}


def randomized(name: str):
    """The light model with every weight it builds by ConstantOfShape (a placeholder fill) replaced by a
    seeded He-initialised initializer of the same shape (the shipped biases and batch-norm statistics stay),
    ending at the logits (the final Softmax, whose op is tested elsewhere, removed)."""
    model = onnx.load(os.path.join(LIGHT, f"light_{name}.onnx"))
    rng = np.random.default_rng(len(name))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    keep = []
    for n in model.graph.node:
        if n.op_type == "ConstantOfShape" and n.input[0] in inits:
            shape = tuple(int(d) for d in inits[n.input[0]])
            if len(shape) >= 2:
                w = rng.standard_normal(shape) * np.sqrt(2.0 / int(np.prod(shape[1:])))
            else:  # a bias or batch-norm statistic: positive, so variances stay valid
                w = rng.uniform(0.5, 1.5, shape)
            model.graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), n.output[0]))
            # IR version 3: an initializer must also be a graph input.
            model.graph.input.append(helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, shape))
        else:
            keep.append(n)
    if keep[-1].op_type == "Softmax":  # compare logits: a saturated softmax would hide differences
        logits = keep.pop().input[0]
        del model.graph.output[:]
        model.graph.output.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT, None))
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


@pytest.mark.parametrize("name", MODELS)
def test_zoo_cnn_whole_and_tiled(name):
    if not os.path.exists(os.path.join(LIGHT, f"light_{name}.onnx")):
        pytest.skip("this onnx wheel ships no light models")
    model = randomized(name)
    graph = load_onnx(model)
    x = np.random.default_rng(0).standard_normal(graph.shapes[graph.input]).astype(np.float32)
    (ref,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {graph.input: x})
    whole = run_graph(graph, x)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(whole, ref, rtol=1e-4, atol=1e-4 * scale)
    # Tile the whole body (up to the head) on a 2x2 grid.
    head = head_start(graph)
    assert head > len(graph.nodes) // 2, f"tiling stops early, at {graph.nodes[head].op} {graph.nodes[head].name}"
    plan = build_plan(graph, [head], [Split.grid([["a", "b"], ["c", "d"]]), Split.whole("a")], "a")
    np.testing.assert_allclose(simulate(graph, plan, x), whole, rtol=1e-5, atol=1e-5 * scale)
    # The planner plans it for a room of two phones and a laptop (uneven row bands, cut where it chooses),
    # and its plan is exact too.
    choice = PL.plan_frame(graph, ROOM, {"*": {"rtt_ms": 4.0, "mbps": 50.0}}, "phone")
    assert choice.predicted_s > 0 and choice.plan.devices
    np.testing.assert_allclose(simulate(graph, choice.plan, x), whole, rtol=1e-5, atol=1e-5 * scale)
