"""Tiled execution of fused segments must equal full inference.

Random small CNNs (kernels 1/3/5, strides 1/2, dilation, grouped and depthwise convs, asymmetric
padding, residual adds, concat, gating Mul, pools, the activations and channel-local ops (PRelu, LRN,
channel Softmax, channel shuffle, n-ary Sum/Max/Min/Mean), squeeze-excite gates from global pools inside
the body (distributed reductions when a cut precedes the pool), the resampling ops (Pad in three modes,
Resize in every coordinate and nearest mode, ConvTranspose, DepthToSpace, SpaceToDepth), optional
classifier head) are cut at random node indices and split among devices at random (uneven row bands,
grids up to 3x3, gathers). Every device runs only its own tasks on only the pieces the transfer list
brings it; the stitched output is compared with running every node whole, and with onnxruntime on the
same graph exported to ONNX. The real MobileNetV2 is checked with the grids the demo uses, and its halo
and redundant-compute figures are printed (run with -s to see them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tilemesh.runtime import graph as graph_mod
from tilemesh.runtime.backend import OnnxRuntimeBackend
from tilemesh.runtime.deps import input_halo, live_tensors, make_segments, segment_is_spatial
from tilemesh.runtime.executor import run_graph
from tilemesh.runtime.regions import Region, check_partition, plane
from tilemesh.runtime.tiling import Plan, Split, Transfer, build_plan, fused_tiling_report, run_task, simulate

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------------
# Random CNNs: one spec -> IR Graph and ONNX model


class _Builder:
    def __init__(self, rng: np.random.Generator, c: int, h: int, w: int):
        self.rng = rng
        self.nodes: list[dict] = []
        self.weights: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int, ...]] = {"x": (1, c, h, w)}
        self.count = 0

    def _name(self, op: str) -> str:
        self.count += 1
        return f"{op.lower()}{self.count}"

    def add(self, op, inputs, shape, attrs=None, params=()):
        name = self._name(op)
        self.nodes.append({"name": name, "op": op, "inputs": tuple(inputs), "attrs": attrs or {}, "params": params})
        self.shapes[name] = tuple(shape)
        return name

    def conv(self, x, cout, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1), group=1):
        _, c, h, w = self.shapes[x]
        oh = (h + pads[0] + pads[2] - (kernel[0] - 1) * dil[0] - 1) // strides[0] + 1
        ow = (w + pads[1] + pads[3] - (kernel[1] - 1) * dil[1] - 1) // strides[1] + 1
        fan_in = (c // group) * kernel[0] * kernel[1]
        wname = f"w{self.count + 1}"
        self.weights[wname] = (self.rng.standard_normal((cout, c // group, *kernel)) / np.sqrt(fan_in)).astype(
            np.float32
        )
        self.weights[wname + "b"] = (0.1 * self.rng.standard_normal(cout)).astype(np.float32)
        attrs = {"kernel": tuple(kernel), "strides": tuple(strides), "pads": tuple(pads), "dilations": tuple(dil)}
        attrs["group"] = group
        return self.add("Conv", [x], (1, cout, oh, ow), attrs, (wname, wname + "b"))

    def pool(self, op, x, kernel, strides, pads, dil=(1, 1)):
        _, c, h, w = self.shapes[x]
        oh = (h + pads[0] + pads[2] - (kernel[0] - 1) * dil[0] - 1) // strides[0] + 1
        ow = (w + pads[1] + pads[3] - (kernel[1] - 1) * dil[1] - 1) // strides[1] + 1
        attrs = {"kernel": tuple(kernel), "strides": tuple(strides), "pads": tuple(pads), "dilations": tuple(dil)}
        return self.add(op, [x], (1, c, oh, ow), attrs)

    def unary(self, op, x):
        attrs = {"min": 0.0, "max": 6.0} if op == "Clip" else {}
        return self.add(op, [x], self.shapes[x], attrs)


@st.composite
def window(draw, h, w, max_k=5, allow_dil=True, pool=False):
    """Kernel/stride/pads/dilation that leave at least one output pixel and never a padding-only window.

    Pools: onnxruntime also wants each pad smaller than the (undilated) kernel.
    """
    for _ in range(20):
        k = (draw(st.sampled_from([1, 3, 5][: 1 + (max_k >= 3) + (max_k >= 5)])), draw(st.sampled_from([1, 3])))
        s = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])))
        d = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))) if allow_dil else (1, 1)
        eff = ((k[0] - 1) * d[0] + 1, (k[1] - 1) * d[1] + 1)
        lim = k if pool else eff
        p = tuple(draw(st.integers(0, lim[i % 2] - 1)) for i in range(4))
        if h + p[0] + p[2] >= eff[0] and w + p[1] + p[3] >= eff[1]:
            return k, s, p, d
    return (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)


KINDS = ("conv", "conv", "dw", "res", "pool", "avg", "concat", "gate", "act", "act2", "lrn", "shuffle", "softmax",
         "nary", "pad", "resize", "convT", "d2s", "s2d", "se")


@st.composite
def random_cnn(draw, head=None, kinds=KINDS):
    """(builder) for a random small CNN; node dicts in topological order, shapes of every tensor. `kinds`: the
    layer kinds to draw from (default all)."""
    seed = draw(st.integers(0, 2**31 - 1))
    c, h, w = draw(st.integers(1, 3)), draw(st.integers(6, 20)), draw(st.integers(6, 20))
    b = _Builder(np.random.default_rng(seed), c, h, w)
    x = "x"
    for _ in range(draw(st.integers(2, 6))):
        _, c, h, w = b.shapes[x]
        kind = draw(st.sampled_from(list(kinds)))
        if kind in ("conv", "dw"):
            k, s, p, d = draw(window(h, w))
            if kind == "dw":
                x = b.conv(x, c * draw(st.sampled_from([1, 2])), k, s, p, d, group=c)
            else:
                group = draw(st.sampled_from([g for g in (1, 2, 3) if c % g == 0]))
                x = b.conv(x, group * draw(st.integers(1, 3)), k, s, p, d, group=group)
        elif kind == "res":
            # Size-preserving: total padding = effective kernel - 1, split unevenly on purpose.
            k, d = draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 2]))
            eff = (k - 1) * d + 1
            top, left = draw(st.integers(0, eff - 1)), draw(st.integers(0, eff - 1))
            y = b.conv(x, c * 2, (k, k), (1, 1), (top, left, eff - 1 - top, eff - 1 - left), (d, d))
            y = b.unary("Relu", y)
            y = b.conv(y, c, (1, 1))
            x = b.add("Add", [x, y], b.shapes[x])
        elif kind == "pool":
            k, s, p, d = draw(window(h, w, max_k=3, pool=True))
            x = b.pool("MaxPool", x, k, s, p, d)
        elif kind == "avg":
            # Both divisor conventions: tile edges get pad 0, image borders the true pads, so both are exact.
            k, s, p, _ = draw(window(h, w, max_k=3, allow_dil=False, pool=True))
            x = b.pool("AveragePool", x, k, s, p)
            b.nodes[-1]["attrs"]["count_include_pad"] = draw(st.sampled_from([0, 1]))
        elif kind == "concat":
            y1 = b.conv(x, 2, (1, 1))
            y2 = b.conv(x, draw(st.integers(1, 3)), (3, 3), (1, 1), (1, 1, 1, 1))
            shape = (1, 2 + b.shapes[y2][1], h, w)
            x = b.add("Concat", [y1, y2], shape, {"axis": 1})
        elif kind == "gate":
            g = b.unary("Sigmoid", b.conv(x, c, (1, 1)))
            x = b.add("Mul", [x, g], b.shapes[x])
        elif kind == "act2":
            op = draw(st.sampled_from(["LeakyRelu", "Elu", "Tanh", "HardSigmoid", "Softplus", "PRelu", "Selu",
                                       "Softsign", "Abs", "Neg"]))
            attrs = {"LeakyRelu": {"alpha": 0.1}, "Elu": {"alpha": 0.8},
                     "HardSigmoid": {"alpha": 0.2, "beta": 0.5}}.get(op, {})
            params = ()
            if op == "PRelu":
                b.weights[f"slope{b.count}"] = b.rng.uniform(0, 0.5, (c, 1, 1)).astype(np.float32)
                params = (f"slope{b.count}",)
            x = b.add(op, [x], b.shapes[x], attrs, params)
        elif kind == "lrn":
            x = b.add("LRN", [x], b.shapes[x], {"size": draw(st.sampled_from([1, 3, 5])), "alpha": 0.01,
                                                "beta": 0.75, "bias": 1.5})
        elif kind == "shuffle":  # what a ShuffleNet Reshape/Transpose/Reshape chain imports as
            perm = tuple(int(i) for i in b.rng.permutation(c))
            x = b.add("Gather", [x], b.shapes[x], {"axis": 1, "indices": perm})
        elif kind == "softmax":
            x = b.add(draw(st.sampled_from(["Softmax", "LogSoftmax"])), [x], b.shapes[x], {"axis": 1})
        elif kind == "nary":
            ins = [x] + [b.conv(x, c, (1, 1)) for _ in range(draw(st.integers(1, 3)))]
            x = b.add(draw(st.sampled_from(["Sum", "Max", "Min", "Mean"])), ins, b.shapes[x])
        elif kind == "pad":
            mode = draw(st.sampled_from(["constant", "reflect", "edge"]))
            lim = (h - 1, w - 1) if mode == "reflect" else (3, 3)
            p = tuple(draw(st.integers(0, min(3, lim[i % 2]))) for i in range(4))
            x = b.add("Pad", [x], (1, c, h + p[0] + p[2], w + p[1] + p[3]),
                      {"pads": p, "mode": mode, "value": 0.5, "channel_pads": (0, 0)})
        elif kind == "resize" and h * w <= 150:
            s_h, s_w = draw(st.integers(1, 3)), draw(st.integers(1, 2))
            mode = draw(st.sampled_from(["nearest", "linear"]))
            ct = draw(st.sampled_from(["half_pixel", "asymmetric", "pytorch_half_pixel", "align_corners"]
                                      + (["tf_half_pixel_for_nn"] if mode == "nearest" else [])))
            nm = draw(st.sampled_from(["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]))
            x = b.add("Resize", [x], (1, c, h * s_h, w * s_w),
                      {"mode": mode, "coordinate_transformation_mode": ct, "nearest_mode": nm,
                       "scales": (float(s_h), float(s_w)), "sizes": (h * s_h, w * s_w), "in_size": (h, w),
                       "pads": (0, 0, 0, 0)})
        elif kind == "convT" and h * w <= 150:
            k, s = draw(st.integers(1, 4)), draw(st.integers(1, 3))
            p = draw(st.integers(0, k - 1))
            op_ = draw(st.integers(0, s - 1))
            cout = draw(st.integers(1, 3))
            oh, ow = (h - 1) * s + k - 2 * p + op_, (w - 1) * s + k - 2 * p + op_
            if min(oh, ow) < 1:  # pads larger than the output: not a valid ConvTranspose (onnxruntime refuses it)
                continue
            wname = f"wt{b.count}"
            b.weights[wname] = (b.rng.standard_normal((c, cout, k, k)) / np.sqrt(c * k)).astype(np.float32)
            b.weights[wname + "b"] = (0.1 * b.rng.standard_normal(cout)).astype(np.float32)
            x = b.add("ConvTranspose", [x], (1, cout, oh, ow),
                      {"kernel": (k, k), "strides": (s, s), "dilations": (1, 1), "group": 1,
                       "pads": (-p, -p, op_ - p, op_ - p), "onnx_pads": p, "output_padding": op_},
                      (wname, wname + "b"))
        elif kind == "se":  # squeeze-excite: a global pool inside the body (reduced across devices)
            p = b.add(draw(st.sampled_from(["GlobalAveragePool", "GlobalMaxPool"])), [x], (1, c, 1, 1))
            e = b.unary("Sigmoid", b.conv(p, c, (1, 1)))
            x = b.add("Mul", [x, e], b.shapes[x])
        elif kind == "d2s":
            x = b.conv(x, 4 * draw(st.integers(1, 2)), (1, 1))
            _, c, h, w = b.shapes[x]
            x = b.add("DepthToSpace", [x], (1, c // 4, 2 * h, 2 * w),
                      {"blocksize": 2, "mode": draw(st.sampled_from(["DCR", "CRD"])), "pads": (0, 0, 0, 0)})
        elif kind == "s2d" and h % 2 == 0 and w % 2 == 0:
            x = b.add("SpaceToDepth", [x], (1, 4 * c, h // 2, w // 2), {"blocksize": 2, "mode": "DCR"})
        else:
            x = b.unary(draw(st.sampled_from(["Relu", "Clip", "HardSwish", "Sigmoid"])), x)
    if head if head is not None else draw(st.booleans()):
        _, c, h, w = b.shapes[x]
        x = b.add("GlobalAveragePool", [x], (1, c, 1, 1))
        x = b.add("Flatten", [x], (1, c), {"axis": 1})
        b.weights["fc"] = b.rng.standard_normal((5, c)).astype(np.float32)
        b.weights["fcb"] = b.rng.standard_normal(5).astype(np.float32)
        x = b.add("Gemm", [x], (1, 5), {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 1}, ("fc", "fcb"))
    b.output = x
    return b


def to_graph(b: _Builder):
    nodes = [
        graph_mod.Node(n["name"], n["op"], n["inputs"], n["name"], dict(n["attrs"]), tuple(n["params"]))
        for n in b.nodes
    ]
    return graph_mod.Graph(nodes, "x", b.output, dict(b.shapes), dict(b.weights))


def to_onnx(b: _Builder):
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], [numpy_helper.from_array(v, k) for k, v in b.weights.items()]
    if any(n["op"] == "Clip" for n in b.nodes):
        inits += [numpy_helper.from_array(np.array(0.0, np.float32), "clip_min")]
        inits += [numpy_helper.from_array(np.array(6.0, np.float32), "clip_max")]
    for n in b.nodes:
        a, ins = n["attrs"], list(n["inputs"]) + list(n["params"])
        kw = {}
        if n["op"] in ("Conv", "MaxPool", "AveragePool"):
            kw = {"kernel_shape": list(a["kernel"]), "strides": list(a["strides"]), "pads": list(a["pads"])}
            if n["op"] != "AveragePool":
                kw["dilations"] = list(a["dilations"])
            else:
                kw["count_include_pad"] = a["count_include_pad"]
            if n["op"] == "Conv":
                kw["group"] = a["group"]
        elif n["op"] == "Clip":
            ins += ["clip_min", "clip_max"]
        elif n["op"] in ("LeakyRelu", "Elu", "HardSigmoid", "LRN", "Softmax", "LogSoftmax"):
            kw = dict(a)
        elif n["op"] == "Gather":
            inits.append(numpy_helper.from_array(np.asarray(a["indices"], np.int64), n["name"] + "_idx"))
            ins.append(n["name"] + "_idx")
            kw = {"axis": 1}
        elif n["op"] == "Pad":
            t, left, bt, r = a["pads"]
            inits.append(numpy_helper.from_array(np.int64([0, 0, t, left, 0, 0, bt, r]), n["name"] + "_p"))
            inits.append(numpy_helper.from_array(np.float32(a["value"]), n["name"] + "_v"))
            ins += [n["name"] + "_p", n["name"] + "_v"]
            kw = {"mode": a["mode"]}
        elif n["op"] == "Resize":
            inits.append(numpy_helper.from_array(np.float32([1, 1, *a["scales"]]), n["name"] + "_s"))
            ins = [ins[0], "", n["name"] + "_s"]
            kw = {"mode": a["mode"], "coordinate_transformation_mode": a["coordinate_transformation_mode"],
                  "nearest_mode": a["nearest_mode"]}
        elif n["op"] == "ConvTranspose":
            kw = {"kernel_shape": list(a["kernel"]), "strides": list(a["strides"]), "pads": [a["onnx_pads"]] * 4,
                  "output_padding": [a["output_padding"]] * 2}
        elif n["op"] in ("DepthToSpace", "SpaceToDepth"):
            kw = {"blocksize": a["blocksize"]}
            if n["op"] == "DepthToSpace":
                kw["mode"] = a["mode"]
        elif n["op"] in ("Concat", "Flatten"):
            kw = {"axis": a["axis"]}
        elif n["op"] == "Gemm":
            kw = {"transB": 1}
        nodes.append(helper.make_node(n["op"], ins, [n["name"]], name=n["name"], **kw))
    g = helper.make_graph(
        nodes,
        "random_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(b.shapes["x"]))],
        [helper.make_tensor_value_info(b.output, TensorProto.FLOAT, list(b.shapes[b.output]))],
        initializer=inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def run_full(graph, x):
    """Reference: single-device inference with the same numpy kernels the tiles use."""
    return run_graph(graph, x)


# ---------------------------------------------------------------------------------------------------
# Random plans

DEVICES = [f"d{i}" for i in range(9)]


@st.composite
def split_for(draw):
    kind = draw(st.sampled_from(["rows", "grid", "whole"]))
    devs = draw(st.permutations(DEVICES))
    if kind == "whole":
        return Split.whole(devs[0])
    if kind == "rows":
        n = draw(st.integers(1, 4))
        return Split.rows({d: draw(st.integers(1, 5)) for d in devs[:n]})
    nr, nc = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    grid = [list(devs[i * nc : (i + 1) * nc]) for i in range(nr)]
    uneven = draw(st.booleans())
    rs = [draw(st.integers(1, 4)) for _ in range(nr)] if uneven else None
    cs = [draw(st.integers(1, 4)) for _ in range(nc)] if uneven else None
    return Split.grid(grid, rs, cs)


@st.composite
def random_plan_args(draw, graph):
    n = len(graph.nodes)
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=min(4, n - 1)))) if n > 1 else []
    segs = make_segments(graph, cuts)
    splits = []
    for seg in segs:
        s = draw(split_for())
        splits.append(s if segment_is_spatial(graph, seg) else Split.whole(draw(st.sampled_from(DEVICES))))
    source = draw(st.one_of(st.sampled_from(DEVICES), split_for()))
    return cuts, splits, source


def _input(graph, seed=0):
    return np.random.default_rng(seed).standard_normal(graph.shapes[graph.input]).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Properties on random CNNs


@SETTINGS
@given(data=st.data())
def test_tiled_equals_full_on_random_cnns(data):
    graph = to_graph(data.draw(random_cnn()))
    cuts, splits, source = data.draw(random_plan_args(graph))
    plan = build_plan(graph, cuts, splits, source)
    x = _input(graph)
    np.testing.assert_allclose(simulate(graph, plan, x), run_full(graph, x), rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_cnns_match_onnxruntime(data):
    import onnxruntime as ort

    b = data.draw(random_cnn())
    graph = to_graph(b)
    cuts, splits, source = data.draw(random_plan_args(graph))
    x = _input(graph, 1)
    sess = ort.InferenceSession(to_onnx(b).SerializeToString(), providers=["CPUExecutionProvider"])
    (ref,) = sess.run(None, {"x": x})
    out = simulate(graph, build_plan(graph, cuts, splits, source), x, roundtrip_json=True)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # The same model through the project's ONNX importer must plan and tile to the same result.
    loaded = graph_mod.load_onnx(to_onnx(b))
    plan2 = build_plan(loaded, cuts, splits, source)
    np.testing.assert_allclose(simulate(loaded, plan2, x), ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_tiles_through_onnxruntime_backend(data):
    """Per-tile pads also reach onnxruntime correctly (the backend the browsers may swap in)."""
    graph = to_graph(data.draw(random_cnn()))
    cuts, splits, source = data.draw(random_plan_args(graph))
    x = _input(graph, 2)
    out = simulate(graph, build_plan(graph, cuts, splits, source), x, backend=OnnxRuntimeBackend(graph))
    np.testing.assert_allclose(out, run_full(graph, x), rtol=1e-4, atol=1e-4)


@SETTINGS
@given(data=st.data())
def test_transfer_lists_are_consistent(data):
    graph = to_graph(data.draw(random_cnn()))
    cuts, splits, source = data.draw(random_plan_args(graph))
    plan = build_plan(graph, cuts, splits, source)
    for tensor, part in plan.owners.items():
        check_partition(part, *plane(graph.shapes[tensor]))
    sends = sorted(plan.transfers, key=lambda t: (t.src, t.dst, t.tensor, t.region))
    recvs = sorted((t for task in plan.tasks for t in task.recv), key=lambda t: (t.src, t.dst, t.tensor, t.region))
    assert sends == recvs
    for task in plan.tasks:
        for p, (x, _, own) in task.deps.reduced.items():
            # A pooled input: one partial from every other owner of the pooled tensor, covering it with its own part.
            parts = [t.region for t in task.recv if t.tensor == p]
            assert all(t.reduce and t.of == x for t in task.recv if t.tensor == p)
            assert sum(r.area for r in parts) + (own.area if own else 0) == Region.full(*plane(graph.shapes[x])).area
            assert own == plan.owners[x].get(task.device)
        for tensor, need in task.deps.inputs.items():
            if tensor in task.deps.reduced:
                continue
            own = plan.owners[tensor].get(task.device, Region(0, 0, 0, 0))
            pieces = [t.region for t in task.recv if t.tensor == tensor and not t.reduce]
            assert all(t.src != task.device for t in task.recv)
            # Own part plus received pieces tile the needed region exactly: nothing missing, nothing twice.
            assert need.intersect(own).area + sum(p.area for p in pieces) == need.area
            assert all(need.contains(p) and p.intersect(own).empty for p in pieces)
        for tensor, r in task.owned.items():
            assert task.deps.regions[tensor].contains(r)
        # Needs are monotone in the wanted region, so no tile costs more than its whole segment. (The sum
        # over tiles may be below the untiled count: with stride 2 a row between two tiles can be needed
        # by neither, while the untiled hull computes it.)
        assert task.macs <= plan.full_macs[task.segment]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_plan_json_roundtrip(data):
    graph = to_graph(data.draw(random_cnn()))
    plan = build_plan(graph, *data.draw(random_plan_args(graph)))
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    for d in plan.devices:
        dp = plan.device_plan(d)
        assert type(dp).from_dict(json.loads(json.dumps(dp.to_dict()))) == dp


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_single_device_plan_has_no_transfers_and_no_redundancy(data):
    graph = to_graph(data.draw(random_cnn()))
    cuts, _, _ = data.draw(random_plan_args(graph))
    plan = build_plan(graph, cuts, [Split.whole("solo")] * (len(cuts) + 1), "solo")
    assert plan.transfers == []
    assert all(s["tile_macs"] == s["full_macs"] for s in plan.stats(graph))
    x = _input(graph)
    np.testing.assert_allclose(simulate(graph, plan, x), run_full(graph, x), rtol=1e-6, atol=1e-6)


def test_gather_receives_every_other_part():
    rng = np.random.default_rng(3)
    bld = _Builder(rng, 2, 12, 12)
    y = bld.conv("x", 4, (3, 3), (1, 1), (1, 1, 1, 1))
    y = bld.conv(y, 4, (3, 3), (2, 2), (1, 1, 1, 1))
    bld.output = bld.conv(y, 3, (3, 3), (1, 1), (1, 1, 1, 1))
    graph = to_graph(bld)
    devs = [["a", "b"], ["c", "d"]]
    plan = build_plan(graph, [2], [Split.grid(devs), Split.whole("c")], Split.grid(devs))
    gather = [t for t in plan.tasks if t.segment == 1]
    assert [t.device for t in gather] == ["c"]
    # The gathering device needs the whole 6x6 input and holds a quarter of it: three senders.
    assert sorted(t.src for t in gather[0].recv) == ["a", "b", "d"]
    assert sum(t.region.area for t in gather[0].recv) == 36 - 9
    x = _input(graph)
    np.testing.assert_allclose(simulate(graph, plan, x), run_full(graph, x), rtol=1e-5, atol=1e-5)


def test_run_task_refuses_missing_pieces():
    bld = _Builder(np.random.default_rng(0), 1, 8, 8)
    bld.output = bld.conv("x", 2, (3, 3), (1, 1), (1, 1, 1, 1))
    graph = to_graph(bld)
    plan = build_plan(graph, [], [Split.rows({"a": 1, "b": 1})], Split.rows({"a": 1, "b": 1}))
    task = next(t for t in plan.tasks if t.device == "a")
    x = _input(graph)
    own = (Region(0, 4, 0, 8), x[:, :, :4])
    with pytest.raises(ValueError, match="missing"):
        run_task(graph, task, {"x": [own]})
    # With the halo row from b it runs, and produces exactly a's rows of the full output.
    (halo,) = task.recv
    assert halo == Transfer("b", "a", "x", Region(4, 5, 0, 8))
    owned, outgoing = run_task(graph, task, {"x": [own, (halo.region, x[:, :, 4:5])]})
    assert outgoing == []
    np.testing.assert_allclose(owned[graph.output][1], run_full(graph, x)[:, :, :4], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# MobileNetV2


@pytest.fixture(scope="module")
def mobilenet(request):
    """The real demo MobileNetV2 (conftest's `demo_model_dir`), as (Graph, onnx path)."""
    try:
        model_dir = Path(request.getfixturevalue("demo_model_dir"))
    except Exception as e:  # noqa: BLE001 - no weights offline means: cannot test this here
        pytest.skip(f"demo model could not be built (weights unavailable?): {e}")
    path = model_dir / "mobilenet_v2.onnx"
    return graph_mod.load_onnx(path), path


def _block_outputs(graph):
    """(cut index, tensor) at each block boundary before the head, as the planner finds them from the graph's
    structure (MobileNetV2: between its `features.N` modules)."""
    from tilemesh.planning.planner import block_cuts, head_start

    return [(k, live_tensors(graph, k)[0]) for k in block_cuts(graph) if k < head_start(graph)]


def mobilenet_report(graph) -> list[str]:
    """Per block: cumulative stride, receptive-field halo, and the redundant compute of a 2x2 fused
    tiling from the input up to that block (the no-communication plan)."""
    lines = [f"{'cut':>4} {'tensor':<20} {'shape':<16} {'stride':>6} {'halo px':>7} {'2x2 redundant':>13} {'in MB':>6}"]
    for r in fused_tiling_report(graph, cuts=[k for k, _ in _block_outputs(graph)]):
        lines.append(
            f"{r['cut']:>4} {r['tensor']:<20} {str(r['shape'][1:]):<16} {r['stride']:>6} {r['halo_px']:>7} "
            f"{r['redundant_pct']:>12.1f}% {r['input_bytes'] / 1e6:>6.2f}"
        )
    return lines


def test_mobilenet_halo_report(mobilenet, capsys):
    graph, _ = mobilenet
    lines = mobilenet_report(graph)
    with capsys.disabled():
        print("\nMobileNetV2 fused 2x2 tiling from the input:\n" + "\n".join(lines))
    blocks = _block_outputs(graph)
    by_stride = {}
    for _, tensor in blocks:
        by_stride.setdefault(input_halo(graph, tensor)[0], []).append(input_halo(graph, tensor)[1])
    assert sorted(by_stride)[:4] == [2, 4, 8, 16]
    # At stride 8 a tile's input halo is still small next to a 112-px half image; at stride 16 it is not.
    assert max(by_stride[8]) < 56 <= max(by_stride[16])


@pytest.mark.parametrize(
    "name,split",
    [
        ("1x2", Split.grid([["a", "b"]])),
        ("2x2", Split.grid([["a", "b"], ["c", "d"]])),
        ("1x4", Split.grid([["a", "b", "c", "d"]])),
        ("3x3", Split.grid([["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]])),
        ("rows 50/30/20", Split.rows({"a": 50, "b": 30, "c": 20})),
    ],
)
def test_mobilenet_tiled_equals_full(mobilenet, name, split):
    import onnxruntime as ort

    graph, path = mobilenet
    x = _input(graph, 7)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {graph.input: x})[0]
    strides = {k: plane(graph.shapes[graph.input])[0] // plane(graph.shapes[t])[0] for k, t in _block_outputs(graph)}
    # Fused to stride 8, then one segment per stage at 16 (halo exchange), then gather the 7x7 tail.
    s8 = max(k for k, s in strides.items() if s == 8)
    s16 = [k for k, s in strides.items() if s == 16]
    s32 = min(k for k, s in strides.items() if s == 32)
    chosen = [s8, s16[len(s16) // 2], s16[-1], s32]
    splits = [split, split, split, Split.whole("b") if name != "rows 50/30/20" else split, Split.whole("a")]
    plan = build_plan(graph, chosen, splits, "a")
    out = simulate(graph, plan, x, roundtrip_json=(name == "2x2"))
    np.testing.assert_allclose(out, run_full(graph, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert out.argmax() == ref.argmax()
