"""Squeeze-and-excite blocks tiled across devices: each global pool inside the body is a distributed
reduction (every owner of the pooled map sends its per-channel partial sum or max, C floats; every device
that needs the vector combines the same partials), so a MobileNetV3/EfficientNet-like model tiles past
its SE blocks and still equals whole inference and onnxruntime.

The test model (built with onnx.helper, random weights) has three SE variants seen in real exports:
GlobalAveragePool + 1x1 convs + HardSigmoid (MobileNetV3), ReduceMean(keepdims=1) + Sigmoid (EfficientNet),
and ReduceMean(keepdims=0) + Gemm + Reshape (a Keras-style dense excitation).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_planner import LAPTOP

from tilemesh.planning import planner as PL
from tilemesh.planning.costmodel import predict_plan
from tilemesh.runtime.executor import run_graph
from tilemesh.runtime.graph import load_onnx
from tilemesh.runtime.profile import scaled_profile
from tilemesh.runtime.tiling import Split, build_plan, simulate


class _M:
    def __init__(self):
        self.rng = np.random.default_rng(11)
        self.nodes, self.inits, self.k = [], [], 0

    def const(self, v, dtype=np.float32):
        self.k += 1
        self.inits.append(numpy_helper.from_array(np.asarray(v, dtype), f"c{self.k}"))
        return f"c{self.k}"

    def op(self, op, ins, name=None, **attrs):
        self.k += 1
        out = f"t{self.k}"
        self.nodes.append(helper.make_node(op, ins, [out], name=name or f"{op.lower()}{self.k}", **attrs))
        return out

    def conv(self, x, cin, cout, k=1, s=1, group=1):
        w = self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / (cin // group * k * k))
        return self.op("Conv", [x, self.const(w), self.const(0.1 * self.rng.standard_normal(cout))],
                       kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4, group=group)

    def se(self, x, c, style):
        r = max(4, c // 4)
        if style == "v3":
            p = self.op("GlobalAveragePool", [x])
            e = self.op("HardSigmoid", [self.conv(self.op("Relu", [self.conv(p, c, r)]), r, c)], alpha=1 / 6, beta=0.5)
        elif style == "effnet":
            p = self.op("ReduceMean", [x], axes=[2, 3], keepdims=1)
            e = self.op("Sigmoid", [self.conv(self.op("Relu", [self.conv(p, c, r)]), r, c)])
        else:  # dense excitation on the squeezed vector
            p = self.op("ReduceMean", [x], axes=[2, 3], keepdims=0)
            h = self.op("Relu", [self.op("Gemm", [p, self.const(self.rng.standard_normal((r, c)) / np.sqrt(c)),
                                                  self.const(np.zeros(r))], transB=1)])
            h = self.op("Gemm", [h, self.const(self.rng.standard_normal((c, r)) / np.sqrt(r)), self.const(np.zeros(c))],
                        transB=1)
            e = self.op("Reshape", [self.op("Sigmoid", [h]), self.const([1, c, 1, 1], np.int64)])
        return self.op("Mul", [x, e])

    def block(self, x, cin, cexp, cout, k, s, style, act):
        y = act(self.conv(x, cin, cexp))
        y = act(self.conv(y, cexp, cexp, k=k, s=s, group=cexp))
        y = self.conv(self.se(y, cexp, style), cexp, cout)
        return self.op("Add", [x, y]) if s == 1 and cin == cout else y


def se_model(hw=48):
    m = _M()

    def hswish(t):
        return m.op("HardSwish", [t])

    def swish(t):
        return m.op("Mul", [t, m.op("Sigmoid", [t])])

    x = hswish(m.conv("x", 3, 16, k=3, s=2))
    x = m.block(x, 16, 32, 16, 3, 1, "v3", lambda t: m.op("Relu", [t]))
    x = m.block(x, 16, 48, 24, 5, 2, "effnet", swish)
    x = m.block(x, 24, 72, 24, 3, 1, "dense", hswish)
    x = hswish(m.conv(x, 24, 96))
    y = m.op("Gemm", [m.op("Flatten", [m.op("GlobalAveragePool", [x])]),
                      m.const(m.rng.standard_normal((10, 96)) * 0.1), m.const(np.zeros(10))], transB=1)
    g = helper.make_graph(m.nodes, "se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, hw, hw])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 10])], m.inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def se():
    model = se_model()
    graph = load_onnx(model)
    x = np.random.default_rng(0).standard_normal((1, 3, 48, 48)).astype(np.float32)
    (ref,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    return graph, x, ref


def test_se_model_whole_matches_onnxruntime(se):
    graph, x, ref = se
    np.testing.assert_allclose(run_graph(graph, x), ref, rtol=1e-4, atol=1e-4)


def test_body_pools_are_cut_points_and_not_the_head(se):
    graph, _, _ = se
    pools = PL.pool_cuts(graph)
    assert [graph.nodes[k].op for k in pools] == ["GlobalAveragePool"] * 3
    head = PL.head_start(graph)
    # The head is the final pool + Flatten + Gemm; every SE block lies before it.
    assert [n.op for n in graph.nodes[head:]] == ["GlobalAveragePool", "Flatten", "Gemm"]
    for mode in PL.FUSIONS:
        assert set(pools) <= set(PL.fusion_cuts(graph, mode)), mode


@pytest.mark.parametrize("split", [Split.grid([["a", "b"], ["c", "d"]]), Split.rows({"a": 3, "b": 1, "c": 2})],
                         ids=["2x2", "rows-3-1-2"])
def test_se_blocks_tile_exactly_with_partial_sums(se, split):
    graph, x, ref = se
    cuts = PL.fusion_cuts(graph, "block")
    plan = build_plan(graph, cuts, [split] * len(cuts) + [Split.whole("b")], "a")
    first_pool = PL.pool_cuts(graph)[0]
    after = [s for s in plan.segments if s.start >= first_pool and s.stop <= PL.head_start(graph)]
    assert after and all(len([t for t in plan.tasks if t.segment == s.index]) > 1 for s in after)
    partials = [t for t in plan.transfers if t.reduce]
    assert partials and all(t.nbytes(graph) == graph.shapes[t.tensor][1] * 4 for t in partials)
    # Every device of a segment after a pool combines the partials of all owners (its own included).
    out = simulate(graph, plan, x, roundtrip_json=True)
    np.testing.assert_allclose(out, run_graph(graph, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_pooled_bytes_instead_of_the_map():
    """The head's pool on a gather device needs C floats from each owner, not their part of the map."""
    graph = load_onnx(se_model())
    head = PL.head_start(graph)
    split = Split.grid([["a", "b"], ["c", "d"]])
    cuts = [*PL.pool_cuts(graph), head]
    plan = build_plan(graph, cuts, [split] * len(cuts) + [Split.whole("a")], "a")
    gather = [t for t in plan.tasks if t.segment == len(cuts)]
    assert len(gather) == 1
    recv = gather[0].recv
    c = graph.shapes[graph.nodes[head].inputs[0]][1]
    assert sorted(t.src for t in recv) == ["b", "c", "d"] and all(t.reduce == "mean" for t in recv)
    assert sum(t.nbytes(graph) for t in recv) == 3 * c * 4


def test_planner_plans_past_the_se_blocks_and_its_estimates_hold(se):
    graph, x, _ = se
    profs = {d: scaled_profile(LAPTOP, 1.0) for d in "abcd"}
    links = {"*": {"rtt_ms": 4.0, "mbps": 200.0}}
    est = PL.search(graph, profs, links, "a")
    past = [e for e in est if e.spec.strategy == "tilemesh" and e.spec.cuts and
            max(e.spec.cuts) > PL.pool_cuts(graph)[-1]]
    assert past
    for e in past[:3] + est[:3]:
        plan = build_plan(graph, list(e.spec.cuts), list(e.spec.splits), "a")
        assert predict_plan(graph, plan, profs, links, "a").total_s == pytest.approx(e.predicted_s, rel=1e-9)
        np.testing.assert_allclose(simulate(graph, plan, x), run_graph(graph, x), rtol=1e-5, atol=1e-5)
    choice = PL.plan_frame(graph, profs, links, "a")
    assert choice.predicted_s <= min(e.predicted_s for e in est) * (1 + PL.MARGIN) + 1e-12


def test_partials_travel_through_device_runners_over_the_wire(se):
    """The browsers' and the edge's DeviceRunner move partial sums like any piece: chunked wire messages,
    delivered in a shuffled order; the source's result equals whole inference."""
    import random

    from tilemesh.runtime.preprocess import normalize_u8
    from tilemesh.runtime.runner import DeviceRunner

    graph, _, _ = se
    cuts = PL.fusion_cuts(graph, "pair")
    rows = Split.rows({"phone": 2, "laptop": 3, "edge": 2})
    plan = build_plan(graph, cuts, [rows] * len(cuts) + [Split.whole("edge")], "phone")
    assert any(t.reduce for t in plan.transfers)
    runners = {d: DeviceRunner(graph, plan.device_plan(d), 3, source="phone") for d in plan.devices}
    pixels = np.random.default_rng(4).integers(0, 256, (1, 3, 48, 48), dtype=np.uint8)
    rng, queue = random.Random(0), []

    def post(src, outgoing):
        queue.extend((src, o.dst, c) for o in outgoing for c in o.chunks)

    post("phone", runners["phone"].start_frame(1, pixels))
    while queue:
        src, dst, chunk = queue.pop(rng.randrange(len(queue)))
        post(dst, runners[dst].on_chunk(src, chunk))
    out = runners["phone"].result(1)
    assert out is not None, {d: r.errors for d, r in runners.items()}
    np.testing.assert_allclose(out, run_graph(graph, normalize_u8(pixels)), rtol=1e-5, atol=1e-5)


def test_max_pool_gating_reduces_with_partial_maxes():
    """A channel gate from a global max pool (CBAM-style, ReduceMax over H and W) reduces with per-channel maxes."""
    m = _M()
    x = m.op("Relu", [m.conv("x", 3, 8, k=3, s=1)])
    x = m.conv(x, 8, 8, k=3)
    gate = m.op("Sigmoid", [m.conv(m.op("ReduceMax", [x], axes=[2, 3], keepdims=1), 8, 8)])
    y = m.conv(m.op("Mul", [x, gate]), 8, 4, k=3)
    g = helper.make_graph(m.nodes, "cbam", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 20, 18])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], m.inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    graph = load_onnx(model)
    x_in = np.random.default_rng(5).standard_normal((1, 3, 20, 18)).astype(np.float32)
    (ref,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x_in})
    cuts = PL.pool_cuts(graph)
    assert [graph.nodes[k].op for k in cuts] == ["GlobalMaxPool"]
    split = Split.grid([["a", "b", "c"], ["d", "e", "f"]], [1, 2], [3, 1, 1])
    plan = build_plan(graph, cuts, [split, split], "a")
    assert {t.reduce for t in plan.transfers if t.reduce} == {"max"}
    out = simulate(graph, plan, x_in, roundtrip_json=True)
    np.testing.assert_allclose(out, run_graph(graph, x_in), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_a_segment_that_is_only_the_pool_runs_on_any_backend(se):
    """Cut right before and right after a pool: that segment has no step left (its result is combined from
    partials), which both backends must pass through (found by the tiling hypothesis tests)."""
    from tilemesh.runtime.backend import OnnxRuntimeBackend

    graph, x, _ = se
    k, *rest = PL.pool_cuts(graph)
    split = Split.grid([["a", "b"], ["c", "d"]])
    cuts = [k, k + 1, *rest, PL.head_start(graph)]
    plan = build_plan(graph, cuts, [split, Split.whole("b")] + [split] * (len(cuts) - 2) + [Split.whole("a")], "a")
    assert [graph.nodes[i].op for i in range(k, k + 1)] == ["GlobalAveragePool"]
    whole = run_graph(graph, x)
    np.testing.assert_allclose(simulate(graph, plan, x), whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(simulate(graph, plan, x, backend=OnnxRuntimeBackend(graph)), whole, rtol=1e-4, atol=1e-4)
