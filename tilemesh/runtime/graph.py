"""The graph IR every other part of tilemesh works on, its ONNX importer and its compact on-disk form.

A `Graph` is a flat, topologically ordered list of single-output `Node`s over activation tensors with
batch 1, plus a dict of float32 weights. Importing from ONNX (`load_onnx`, CPython only: ``onnx`` is
imported inside because Pyodide lacks it) normalizes what varies between exporters, so kernels and the
tiling code read one spelling:

* spatial attributes are always present: kernel, strides, pads (top, left, bottom, right),
  dilations; ``auto_pad`` is turned into explicit pads and MaxPool's ``ceil_mode`` into extra
  bottom/right padding (exact, because MaxPool pads with -inf);
* BatchNormalization is folded into the Conv before it (in float64), or becomes a depthwise 1x1 Conv
  when there is no such Conv; every Conv carries a bias;
* Clip's bounds (attributes before opset 11, inputs after) become ``attrs["min"/"max"]``;
* Identity and Dropout disappear; Constant nodes and initializers become weights or attributes; nodes
  computing only from constants (shape arithmetic: Shape, Gather, Concat, ...) are folded;
* chains of Reshape/Transpose/Squeeze/Unsqueeze/Flatten become one Reshape, a channel Gather (channel
  shuffle) or nothing; a transpose of an NHWC graph input to NCHW makes the NCHW tensor the graph input;
* constant operands of Add/Mul/Sub/Div/MatMul become ``params`` (``attrs["const_index"]`` records
  whether the constant was the first or the second ONNX input).

The compact form (`save_compact` / `load_compact` / `graph_from_compact`) is what the browser
fetches: one JSON file for the topology and one raw little-endian .bin holding every weight at an
aligned offset, so loading needs numpy alone and no per-tensor files or zip parsing.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

SUPPORTED_OPS = frozenset(
    {
        "Conv", "Clip", "Relu", "Add", "Mul", "Sub", "Div", "Sigmoid", "HardSwish", "MaxPool",
        "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Gemm", "MatMul", "Concat",
        # activations and channel-local ops
        "LeakyRelu", "Elu", "Selu", "HardSigmoid", "Tanh", "Softplus", "Softsign", "Abs", "Neg", "Exp",
        "PRelu", "Softmax", "LogSoftmax", "LRN", "Gather", "Sum", "Max", "Min", "Mean", "GlobalMaxPool",
        # resampling ops: their per-tile `pads` adjust the raw output (see kernels)
        "Pad", "Resize", "ConvTranspose", "DepthToSpace", "SpaceToDepth",
    }
)
# Ops the importer removes or rewrites; they never appear in a Graph.
_ELIDED_OPS = frozenset({"Identity", "Dropout", "Constant", "BatchNormalization"})
# Layout ops: folded into the Reshape or channel Gather (channel shuffle) their chain amounts to.
_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})
# Rewritten: Upsample -> Resize, ReduceMean/ReduceMax over H and W -> GlobalAveragePool/GlobalMaxPool.
_REWRITTEN_OPS = frozenset({"Upsample", "ReduceMean", "ReduceMax"})
_IMPORTABLE_OPS = SUPPORTED_OPS | _ELIDED_OPS | _LAYOUT_OPS | _REWRITTEN_OPS
_BINARY_OPS = ("Add", "Mul", "Sub", "Div")
_NARY_OPS = ("Sum", "Max", "Min", "Mean")
_ACTIVATION_ATTRS = {
    "LeakyRelu": {"alpha": 0.01}, "Elu": {"alpha": 1.0}, "HardSigmoid": {"alpha": 0.2, "beta": 0.5},
    "Selu": {"alpha": 1.67326319217681884765625, "gamma": 1.05070102214813232421875},
    "Tanh": {}, "Softplus": {}, "Softsign": {}, "Abs": {}, "Neg": {}, "Exp": {},
}

COMPACT_FORMAT = "tilemesh-compact"
COMPACT_VERSION = 1
_ALIGN = 64  # byte alignment of every weight in the .bin, so np.frombuffer views are aligned


class UnsupportedOpError(ValueError):
    """The ONNX model uses an op (or an op variant) that tilemesh cannot run."""

    def __init__(self, op: str, node: str, detail: str = ""):
        self.op = op
        self.node = node
        msg = f"unsupported op {op!r} in node {node!r}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


@dataclass(frozen=True)
class Node:
    name: str
    op: str
    inputs: tuple[str, ...]
    output: str
    attrs: dict = field(default_factory=dict)
    params: tuple[str, ...] = ()


@dataclass
class Graph:
    nodes: list[Node]
    input: str
    output: str
    shapes: dict[str, tuple[int, ...]]
    weights: dict[str, np.ndarray]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def producer(self, tensor: str) -> Node | None:
        """The node that outputs `tensor`, or None for the graph input."""
        for n in self.nodes:
            if n.output == tensor:
                return n
        if tensor == self.input:
            return None
        raise KeyError(tensor)

    def consumers(self, tensor: str) -> list[Node]:
        return [n for n in self.nodes if tensor in n.inputs]

    @property
    def weight_bytes(self) -> int:
        return sum(int(w.nbytes) for w in self.weights.values())


def external_inputs(nodes) -> list[str]:
    """Tensors a consecutive run of nodes reads but does not produce, in first-use order."""
    produced = {n.output for n in nodes}
    out: list[str] = []
    for n in nodes:
        for t in n.inputs:
            if t not in produced and t not in out:
                out.append(t)
    return out


def node_flops(graph: Graph, node: Node) -> int:
    """Floating-point operations of one node on the full tensor (a multiply-add counts as two)."""
    out = graph.shapes[node.output]
    size = math.prod(out)
    if node.op == "Conv":
        _, cin_g, kh, kw = graph.weights[node.params[0]].shape
        return 2 * size * cin_g * kh * kw
    if node.op in ("MaxPool", "AveragePool"):
        kh, kw = node.attrs["kernel"]
        return size * kh * kw
    if node.op == "GlobalAveragePool":
        return math.prod(graph.shapes[node.inputs[0]])
    if node.op in ("Gemm", "MatMul"):
        a = graph.shapes[node.inputs[0]]
        k = a[-2] if node.op == "Gemm" and node.attrs.get("transA") else a[-1]
        return 2 * size * k
    if node.op == "ConvTranspose":
        cin, cout_g, kh, kw = graph.weights[node.params[0]].shape
        return 2 * math.prod(graph.shapes[node.inputs[0]]) * cout_g * kh * kw
    if node.op == "LRN":
        return size * (int(node.attrs["size"]) + 3)
    if node.op in ("Flatten", "Reshape", "Concat", "Gather", "Pad", "DepthToSpace", "SpaceToDepth"):
        return 0
    return size


# --------------------------------------------------------------------------- ONNX import (CPython only)


def load_onnx(model, input_shape: tuple[int, ...] | None = None) -> Graph:
    """Import an ONNX model (path or ModelProto) into a `Graph`.

    `input_shape` fixes a symbolic input shape; a symbolic batch dimension alone is set to 1. Raises
    `UnsupportedOpError` for an op tilemesh has no kernel for, ValueError for batch != 1.
    """
    import onnx
    from onnx import numpy_helper, shape_inference

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    for i, n in enumerate(model.graph.node):
        if n.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(f"{n.domain}.{n.op_type}", n.name or f"{n.op_type}_{i}")
    model = _fix_input_shape(model, input_shape)
    model = shape_inference.infer_shapes(model)
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)

    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    shapes_onnx = {vi.name: _static_shape(vi) for vi in [*g.input, *g.value_info, *g.output]}
    folded = _fold_constants(model, consts, shapes_onnx)
    if any(g.node[i].op_type != "Constant" for i in folded):
        # Shapes behind folded arithmetic (a Reshape fed by Shape/Gather/Concat) are now known: infer again.
        known = {t.name for t in g.initializer}
        m2 = onnx.ModelProto()
        m2.CopyFrom(model)
        del m2.graph.node[:]
        m2.graph.node.extend(n for i, n in enumerate(g.node) if i not in folded)
        m2.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()
                                    if k not in known)
        m2 = shape_inference.infer_shapes(m2)
        for vi in [*m2.graph.value_info, *m2.graph.output]:
            if shapes_onnx.get(vi.name) is None:
                shapes_onnx[vi.name] = _static_shape(vi)
    for i, n in enumerate(g.node):
        if i not in folded and n.op_type not in _IMPORTABLE_OPS:
            raise UnsupportedOpError(n.op_type, n.name or f"{n.op_type}_{i}")
    inputs = [vi for vi in g.input if vi.name not in consts]
    if len(inputs) != 1:
        raise ValueError(f"expected one graph input, got {[vi.name for vi in inputs]}")
    if len(g.output) != 1:
        raise ValueError(f"expected one graph output, got {[o.name for o in g.output]}")

    b = _Builder(consts, inputs[0].name, opset)
    uses: dict[str, int] = {}
    for n in g.node:
        for t in n.input:
            uses[t] = uses.get(t, 0) + 1
    uses[g.output[0].name] = uses.get(g.output[0].name, 0) + 1
    b.input_uses = uses.get(inputs[0].name, 0)

    for i, n in enumerate(g.node):
        name = n.name or f"{n.op_type}_{i}"
        if i in folded:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        for extra in n.output[1:]:
            if extra and uses.get(extra):
                raise UnsupportedOpError(n.op_type, name, f"its second output {extra!r} is used")
        b.add(n.op_type, name, list(n.input), n.output[0], attrs, shapes_onnx, uses)

    graph_out = b.materialize(b.resolve(g.output[0].name), shapes_onnx)
    graph_in = inputs[0].name if b.input_alias is None else b.input_alias[0]
    shape = shapes_onnx.get(graph_in) if b.input_alias is None else b.input_alias[1]
    if shape is None or len(shape) not in (2, 4) or shape[0] != 1:
        raise ValueError(f"graph input must have batch 1 and a static 2D or 4D shape, got {shape}")
    shapes = {graph_in: shape}
    for node in b.nodes:
        shapes[node.output] = b.shapes.get(node.output) or shapes_onnx.get(node.output)
    graph = Graph(b.nodes, graph_in, graph_out, shapes, b.weights)
    if any(s is None for s in shapes.values()):
        _fill_shapes_by_running(graph)
    for t, s in graph.shapes.items():
        if s[0] != 1:
            raise ValueError(f"tensor {t!r} has batch {s[0]}; only batch 1 is supported")
    return graph


def _fold_constants(model, consts: dict, shapes: dict) -> set[int]:
    """Evaluate nodes whose inputs are all constants (shape arithmetic: Shape of a static tensor, Gather,
    Concat, Unsqueeze, Cast, ...) with onnx's reference evaluator; their outputs join `consts`.

    Returns the indices of the folded nodes. Constant nodes are always folded.
    """
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    done: set[int] = set()
    for i, n in enumerate(model.graph.node):
        if n.domain not in ("", "ai.onnx"):
            continue
        if n.op_type == "Constant":
            consts[n.output[0]] = _constant_value(n)
            done.add(i)
            continue
        if n.op_type == "Shape" and shapes.get(n.input[0]) is not None and not n.attribute:
            consts[n.output[0]] = np.asarray(shapes[n.input[0]], np.int64)
            done.add(i)
            continue
        if not n.input or any(t and t not in consts for t in n.input) or n.op_type in ("Identity", "Dropout"):
            continue
        try:
            ins = [t for t in n.input if t]
            sub = helper.make_model(
                helper.make_graph([n], "fold", [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(
                    consts[t].dtype), consts[t].shape) for t in ins], [helper.make_value_info(o, helper.TypeProto())
                                                                       for o in n.output]),
                opset_imports=model.opset_import)
            outs = ReferenceEvaluator(sub).run(None, {t: consts[t] for t in ins})
        except Exception:  # noqa: BLE001 - not foldable: the importer then names the op if it cannot run it
            continue
        for o, v in zip(n.output, outs, strict=False):
            consts[o] = np.asarray(v)
        done.add(i)
    return done


def _fix_input_shape(model, input_shape):
    import onnx

    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    init = {t.name for t in model_copy.graph.initializer}
    for vi in model_copy.graph.input:
        if vi.name in init:
            continue
        dims = vi.type.tensor_type.shape.dim
        if input_shape is not None:
            if len(input_shape) != len(dims):
                raise ValueError(f"input_shape {input_shape} has the wrong rank for {vi.name!r}")
            for d, v in zip(dims, input_shape, strict=True):
                d.Clear()
                d.dim_value = int(v)
        elif dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
        elif dims and dims[0].dim_value != 1:
            raise ValueError(f"input {vi.name!r} has batch {dims[0].dim_value}; only batch 1 is supported")
    return model_copy


def _static_shape(vi) -> tuple[int, ...] | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims = []
    for d in tt.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return tuple(dims)


def _constant_value(n) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    a = n.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    v = onnx.helper.get_attribute_value(a)
    return np.asarray(v, dtype=np.float32 if a.name.startswith("value_float") else np.int64)


def _pair(v, default: int) -> tuple[int, int]:
    if v is None:
        return (default, default)
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"expected 2 spatial values, got {v}")
    return v


def _explicit_pads(auto_pad, pads, in_hw, kernel, strides, dilations) -> tuple[int, int, int, int]:
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else (auto_pad or "NOTSET")
    if auto_pad == "NOTSET":
        p = tuple(int(x) for x in pads) if pads is not None else (0, 0, 0, 0)
        if len(p) != 4:
            raise ValueError(f"expected 4 pads, got {p}")
        return p
    if auto_pad == "VALID":
        return (0, 0, 0, 0)
    begin, end = [], []
    for size, k, s, d in zip(in_hw, kernel, strides, dilations, strict=True):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else big)
        end.append(big if auto_pad == "SAME_UPPER" else small)
    return (begin[0], begin[1], end[0], end[1])


class _Builder:
    """Accumulates normalized nodes and weights while walking the ONNX nodes in order."""

    def __init__(self, consts: dict[str, np.ndarray], graph_input: str, opset: int = 17):
        self.consts = consts
        self.graph_input = graph_input
        self.opset = opset
        self.nodes: list[Node] = []
        self.weights: dict[str, np.ndarray] = {}
        self.alias: dict[str, str] = {}
        self.names: set[str] = set()
        self.shapes: dict[str, tuple[int, ...]] = {}  # shapes of tensors the importer names itself
        # Pending layout chains: tensor -> (source tensor, int array of the tensor's shape indexing the
        # source's flat elements, (op, node) of the chain's last layout node). See `materialize`.
        self.views: dict[str, tuple[str, np.ndarray, tuple[str, str]]] = {}
        self.input_uses = 0  # readers of the graph input in the ONNX graph
        self.input_alias: tuple | None = None  # (tensor, NCHW shape, perm) when an input transpose is absorbed

    def shape_of(self, t: str, shapes) -> tuple[int, ...] | None:
        if t in self.views:
            return tuple(self.views[t][1].shape)
        return self.shapes.get(t) or shapes.get(t)

    def materialize(self, t: str, shapes) -> str:
        """Turn a pending layout chain ending in `t` into IR nodes: nothing (identity), a Reshape, or a
        channel Gather (a channel shuffle); anything that moves data across positions is refused."""
        if t not in self.views:
            return t
        src, idx, (op, name) = self.views.pop(t)
        src_shape = self.shape_of(src, shapes)
        flat = idx.reshape(-1)
        if tuple(idx.shape) == tuple(src_shape) and np.array_equal(flat, np.arange(flat.size)):
            self.alias[t] = src
            return src
        if len(idx.shape) not in (2, 4):
            raise UnsupportedOpError(op, name, f"output rank {len(idx.shape)}; only 2D and 4D tensors")
        if np.array_equal(flat, np.arange(flat.size)):
            self.emit(Node(name, "Reshape", (src,), t, {"shape": tuple(int(d) for d in idx.shape)}))
        elif len(src_shape) == 4 and len(idx.shape) == 4 and tuple(idx.shape[2:]) == tuple(src_shape[2:]):
            hw = src_shape[2] * src_shape[3]
            perm = idx[0, :, 0, 0] // hw
            want = perm[:, None, None] * hw + np.arange(hw).reshape(src_shape[2:])
            if not np.array_equal(idx[0], want):
                raise UnsupportedOpError(op, name, "moves data across spatial positions")
            self.emit(Node(name, "Gather", (src,), t, {"axis": 1, "indices": tuple(int(c) for c in perm)}))
        elif self._absorb_input_layout(src, src_shape, idx, t):
            return t
        else:
            raise UnsupportedOpError(op, name, "a layout change that is neither a reshape nor a channel permutation")
        self.shapes[t] = tuple(int(d) for d in idx.shape)
        return t

    def _absorb_input_layout(self, src, src_shape, idx, t) -> bool:
        """An NHWC graph input transposed to NCHW first thing (tf2onnx's Keras exports): the transposed
        tensor becomes the IR's graph input, so devices are fed NCHW like for every other model."""
        if src != self.graph_input or self.input_alias is not None or self.input_uses != 1:
            return False
        if len(src_shape) != 4 or idx.ndim != 4 or idx.shape[0] != 1:
            return False
        base = np.arange(idx.size).reshape(src_shape)
        for perm in ((0, 3, 1, 2), (0, 1, 2, 3), (0, 2, 3, 1), (0, 1, 3, 2), (0, 2, 1, 3), (0, 3, 2, 1)):
            if base.transpose(perm).shape == idx.shape and np.array_equal(base.transpose(perm), idx):
                self.input_alias = (t, tuple(int(d) for d in idx.shape), perm)
                return True
        return False

    def _layout(self, op, name, ins, out, attrs, shapes):
        x = ins[0]
        if x in self.consts:  # constant folding missed it (e.g. an unusual dtype): do it with numpy
            src, idx = None, self.consts[x]
        else:
            src_shape = self.shape_of(x, shapes)
            if src_shape is None:
                raise UnsupportedOpError(op, name, f"input {x!r} has no static shape")
            if x in self.views:
                src, idx, _ = self.views[x]
            else:
                src, idx = x, np.arange(math.prod(src_shape)).reshape(src_shape)
        if op == "Transpose":
            perm = attrs.get("perm")
            y = idx.transpose(tuple(perm) if perm is not None else None)
        elif op == "Flatten":
            axis = int(attrs.get("axis", 1))
            axis += idx.ndim if axis < 0 else 0
            y = idx.reshape(math.prod(idx.shape[:axis]), -1)
        else:
            target = shapes.get(out)
            if op == "Reshape" and self.const(ins[1]) is not None:
                spec = [int(v) for v in self.const(ins[1]).reshape(-1)]
                if not attrs.get("allowzero", 0):
                    spec = [idx.shape[i] if v == 0 else v for i, v in enumerate(spec)]
                target = spec
            elif op in ("Squeeze", "Unsqueeze"):
                axes = attrs.get("axes")
                if axes is None and len(ins) > 1 and ins[1]:
                    if self.const(ins[1]) is None:
                        raise UnsupportedOpError(op, name, "axes must be a constant")
                    axes = [int(v) for v in self.const(ins[1]).reshape(-1)]
                if op == "Squeeze":
                    axes = [a + idx.ndim for a in axes] if axes is not None else None
                    y0 = np.squeeze(idx, axis=tuple(a % idx.ndim for a in axes) if axes is not None else None)
                    target = y0.shape
                else:
                    rank = idx.ndim + len(axes)
                    y0 = np.expand_dims(idx, tuple(sorted(a % rank for a in axes)))
                    target = y0.shape
            if target is None:
                raise UnsupportedOpError(op, name, "the target shape must be static")
            y = idx.reshape(tuple(int(d) for d in target))
        if src is None:
            self.consts[out] = np.ascontiguousarray(y)
        else:
            self.views[out] = (src, y, (op, name))

    def resolve(self, t: str) -> str:
        while t in self.alias:
            t = self.alias[t]
        return t

    def weight(self, key: str, value: np.ndarray) -> str:
        value = np.ascontiguousarray(value, dtype=np.float32)
        if key in self.weights and not np.array_equal(self.weights[key], value):
            raise ValueError(f"weight name clash: {key!r}")
        self.weights[key] = value
        return key

    def const(self, t: str) -> np.ndarray | None:
        return self.consts.get(t) if t else None

    def emit(self, node: Node) -> None:
        name = node.name
        k = 1
        while name in self.names:
            name = f"{node.name}_{k}"
            k += 1
        self.names.add(name)
        self.nodes.append(replace(node, name=name) if name != node.name else node)

    def add(self, op, name, ins, out, attrs, shapes, uses):
        if op not in _IMPORTABLE_OPS:
            raise UnsupportedOpError(op, name)
        ins = [self.resolve(t) if t else t for t in ins]
        if op in ("Identity", "Dropout"):
            self.alias[out] = ins[0]
            return
        if op in _LAYOUT_OPS and not (op in ("Flatten", "Reshape") and ins[0] not in self.views
                                      and self._plain_reshape_ok(op, ins, out, shapes)):
            self._layout(op, name, ins, out, attrs, shapes)
            return
        ins = [self.materialize(t, shapes) if t else t for t in ins]
        if op == "BatchNormalization":
            self._batch_norm(name, ins, out, attrs, shapes, uses)
            return

        acts = [t for t in ins if t and t not in self.consts]
        for t in acts:
            s = self.shape_of(t, shapes)
            if s is not None and len(s) not in (2, 4):
                raise UnsupportedOpError(op, name, f"input {t!r} has rank {len(s)}; only 2D and 4D tensors")
        if not acts:
            raise UnsupportedOpError(op, name, "every input is a constant")
        in_shape = self.shape_of(acts[0], shapes)
        if in_shape is None:
            raise UnsupportedOpError(op, name, f"the shape of {acts[0]!r} is unknown (ONNX shape inference failed)")

        if op == "Conv":
            w = self.const(ins[1])
            if w is None or w.ndim != 4:
                raise UnsupportedOpError(op, name, "weights must be a constant 4D tensor (2D convolution)")
            kernel = (int(w.shape[2]), int(w.shape[3]))
            strides = _pair(attrs.get("strides"), 1)
            dil = _pair(attrs.get("dilations"), 1)
            pads = _explicit_pads(attrs.get("auto_pad"), attrs.get("pads"), in_shape[2:], kernel, strides, dil)
            bias = self.const(ins[2]) if len(ins) > 2 and ins[2] else np.zeros(w.shape[0], np.float32)
            wk = self.weight(ins[1], w)
            bk = self.weight(ins[2], bias) if len(ins) > 2 and ins[2] else self.weight(f"{name}.B", bias)
            a = {"kernel": kernel, "strides": strides, "pads": pads, "dilations": dil,
                 "group": int(attrs.get("group", 1))}
            self.emit(Node(name, op, (ins[0],), out, a, (wk, bk)))
        elif op in ("MaxPool", "AveragePool"):
            if len(in_shape) != 4:
                raise UnsupportedOpError(op, name, "only 2D pooling of 4D tensors")
            kernel = _pair(attrs["kernel_shape"], 1)
            strides = _pair(attrs.get("strides"), 1)
            dil = _pair(attrs.get("dilations"), 1)
            pads = _explicit_pads(attrs.get("auto_pad"), attrs.get("pads"), in_shape[2:], kernel, strides, dil)
            pads = self._ceil_pads(op, name, pads, in_shape, shapes.get(out), kernel, strides, dil)
            a = {"kernel": kernel, "strides": strides, "pads": pads, "dilations": dil}
            if op == "AveragePool":
                a["count_include_pad"] = bool(attrs.get("count_include_pad", 0))
            self.emit(Node(name, op, (ins[0],), out, a))
        elif op == "Clip":
            lo = attrs.get("min", -math.inf)
            hi = attrs.get("max", math.inf)
            for pos, val in ((1, "lo"), (2, "hi")):
                if len(ins) > pos and ins[pos]:
                    c = self.const(ins[pos])
                    if c is None or c.size != 1:
                        raise UnsupportedOpError(op, name, "min/max must be scalar constants")
                    c = c.reshape(-1)[0]
                    if val == "lo":
                        lo = c
                    else:
                        hi = c
            self.emit(Node(name, op, (ins[0],), out, {"min": float(lo), "max": float(hi)}))
        elif op in ("Relu", "Sigmoid", "HardSwish", "GlobalAveragePool", "GlobalMaxPool"):
            if op.startswith("Global") and len(in_shape) != 4:
                raise UnsupportedOpError(op, name, "only on 4D tensors")
            self.emit(Node(name, op, (ins[0],), out, {}))
        elif op in _ACTIVATION_ATTRS:
            a = {k: float(attrs.get(k, v)) for k, v in _ACTIVATION_ATTRS[op].items()}
            self.emit(Node(name, op, (ins[0],), out, a))
        elif op in _BINARY_OPS or op == "MatMul":
            cidx = [i for i, t in enumerate(ins[:2]) if t in self.consts]
            if not cidx:
                self.emit(Node(name, op, (ins[0], ins[1]), out, {}))
            else:
                c = cidx[0]
                if op == "MatMul" and c != 1:
                    raise UnsupportedOpError(op, name, "a constant first operand")
                if op != "MatMul":
                    self._check_broadcast(op, name, self.consts[ins[c]], in_shape)
                key = self.weight(ins[c], self.consts[ins[c]])
                self.emit(Node(name, op, (ins[1 - c],), out, {"const_index": c}, (key,)))
        elif op in _NARY_OPS:
            pos = tuple(i for i, t in enumerate(ins) if t in self.consts)
            for i in pos:
                self._check_broadcast(op, name, self.consts[ins[i]], in_shape)
            params = tuple(self.weight(ins[i], self.consts[ins[i]]) for i in pos)
            a = {"const_positions": pos} if pos else {}
            self.emit(Node(name, op, tuple(t for t in ins if t not in self.consts), out, a, params))
        elif op == "PRelu":
            slope = self.const(ins[1])
            if slope is None:
                raise UnsupportedOpError(op, name, "the slope must be a constant")
            self._check_broadcast(op, name, slope, in_shape)
            self.emit(Node(name, op, (ins[0],), out, {}, (self.weight(ins[1], slope),)))
        elif op in ("Softmax", "LogSoftmax"):
            rank = len(in_shape)
            legacy = self.opset < 13
            axis = int(attrs.get("axis", 1 if legacy else -1))
            axis = axis + rank if axis < 0 else axis
            if legacy and axis == rank - 1:
                legacy = False
            a = {"axis": axis}
            if legacy:
                a["legacy"] = True
            self.emit(Node(name, op, (ins[0],), out, a))
        elif op == "LRN":
            if len(in_shape) != 4:
                raise UnsupportedOpError(op, name, "only on 4D tensors")
            a = {"size": int(attrs["size"]), "alpha": float(attrs.get("alpha", 1e-4)),
                 "beta": float(attrs.get("beta", 0.75)), "bias": float(attrs.get("bias", 1.0))}
            self.emit(Node(name, op, (ins[0],), out, a))
        elif op == "Gather":
            idx = self.const(ins[1])
            axis = int(attrs.get("axis", 0))
            axis += len(in_shape) if axis < 0 else 0
            if len(in_shape) != 4 or axis != 1 or idx is None or idx.ndim != 1:
                raise UnsupportedOpError(op, name, "only a constant 1-D channel selection (axis 1) of a 4D tensor")
            c = in_shape[1]
            self.emit(Node(name, op, (ins[0],), out, {"axis": 1, "indices": tuple(int(i) % c for i in idx)}))
        elif op in ("ReduceMean", "ReduceMax"):
            axes = attrs.get("axes")
            if axes is None and len(ins) > 1 and ins[1]:
                if self.const(ins[1]) is None:
                    raise UnsupportedOpError(op, name, "axes must be a constant")
                axes = [int(v) for v in self.const(ins[1]).reshape(-1)]
            rank = len(in_shape)
            axes = sorted(a % rank for a in axes) if axes else list(range(rank))
            if rank != 4 or axes != [2, 3]:
                raise UnsupportedOpError(op, name, f"only over H and W (axes 2, 3) of a 4D tensor, got {axes}")
            gop = "GlobalAveragePool" if op == "ReduceMean" else "GlobalMaxPool"
            pooled = out if attrs.get("keepdims", 1) else f"{out}.pooled"
            self.emit(Node(name, gop, (ins[0],), pooled, {}))
            self.shapes[pooled] = (1, in_shape[1], 1, 1)
            if pooled != out:
                self.views[out] = (pooled, np.arange(in_shape[1]).reshape(1, in_shape[1]), (op, name))
        elif op == "Pad":
            self._pad(name, ins, out, attrs, in_shape)
        elif op in ("Resize", "Upsample"):
            self._resize(op, name, ins, out, attrs, in_shape, shapes)
        elif op == "ConvTranspose":
            self._conv_transpose(name, ins, out, attrs, in_shape, shapes)
        elif op in ("DepthToSpace", "SpaceToDepth"):
            bs = int(attrs["blocksize"])
            if len(in_shape) != 4:
                raise UnsupportedOpError(op, name, "only on 4D tensors")
            if op == "SpaceToDepth" and (in_shape[2] % bs or in_shape[3] % bs):
                raise UnsupportedOpError(op, name, f"H and W of {in_shape} must be multiples of {bs}")
            a = {"blocksize": bs, "mode": attrs.get("mode", "DCR")}
            if op == "DepthToSpace":
                a["pads"] = (0, 0, 0, 0)
            self.emit(Node(name, op, (ins[0],), out, a))
        elif op == "Gemm":
            bw = self.const(ins[1])
            if bw is None:
                raise UnsupportedOpError(op, name, "B must be a constant")
            n_out = bw.shape[0] if attrs.get("transB", 0) else bw.shape[1]
            has_c = len(ins) > 2 and ins[2]
            if has_c and self.const(ins[2]) is None:
                raise UnsupportedOpError(op, name, "C must be a constant")
            ck = self.weight(ins[2], self.consts[ins[2]]) if has_c else self.weight(
                f"{name}.C", np.zeros(n_out, np.float32))
            a = {"alpha": float(attrs.get("alpha", 1.0)), "beta": float(attrs.get("beta", 1.0)),
                 "transA": int(attrs.get("transA", 0)), "transB": int(attrs.get("transB", 0))}
            self.emit(Node(name, op, (ins[0],), out, a, (self.weight(ins[1], bw), ck)))
        elif op == "Flatten":
            axis = int(attrs.get("axis", 1))
            self.emit(Node(name, op, (ins[0],), out, {"axis": axis + len(in_shape) if axis < 0 else axis}))
        elif op == "Reshape":
            self.emit(Node(name, op, (ins[0],), out, {"shape": tuple(shapes[out])}))
        elif op == "Concat":
            if any(t in self.consts for t in ins):
                raise UnsupportedOpError(op, name, "constant operands")
            axis = int(attrs["axis"])
            rank = len(shapes[out]) if shapes.get(out) else len(in_shape)
            self.emit(Node(name, op, tuple(ins), out, {"axis": axis + rank if axis < 0 else axis}))
        else:  # pragma: no cover - _IMPORTABLE_OPS and this chain must list the same ops
            raise UnsupportedOpError(op, name)

    def _plain_reshape_ok(self, op, ins, out, shapes) -> bool:
        """Flatten/Reshape of a materialized tensor to rank 2 or 4: the IR's own Flatten/Reshape (as before)."""
        x, o = self.shape_of(ins[0], shapes), shapes.get(out)
        if x is None or o is None or len(o) not in (2, 4) or len(x) not in (2, 4) or ins[0] in self.consts:
            return False
        if op == "Reshape" and (self.const(ins[1]) is None or tuple(o) == tuple(x)):
            return False
        return not (len(o) == 4 and len(x) == 4)  # 4D -> 4D may be a shuffle step: let the view decide

    @staticmethod
    def _check_broadcast(op, name, c: np.ndarray, in_shape) -> None:
        """A constant operand must not vary over H or W of a 4D activation (tiles would misalign it)."""
        if in_shape is not None and len(in_shape) == 4 and c.ndim >= 2:
            hw = (1,) * max(0, 4 - c.ndim) + tuple(c.shape)
            if hw[-2] > 1 or hw[-1] > 1:
                raise UnsupportedOpError(op, name, f"a constant of shape {c.shape} varying over H or W")

    def _pad(self, name, ins, out, attrs, in_shape):
        mode = attrs.get("mode", "constant")
        if self.opset < 11:
            pads, value = attrs.get("pads"), float(attrs.get("value", 0.0))
        else:
            pads = self.const(ins[1]) if len(ins) > 1 else None
            value = self.const(ins[2]) if len(ins) > 2 and ins[2] else None
            if (len(ins) > 1 and pads is None) or (len(ins) > 2 and ins[2] and value is None):
                raise UnsupportedOpError("Pad", name, "pads and value must be constants")
            value = float(value.reshape(-1)[0]) if value is not None else 0.0
            if len(ins) > 3 and ins[3]:
                axes = self.const(ins[3])
                if axes is None:
                    raise UnsupportedOpError("Pad", name, "axes must be a constant")
                full = [0] * (2 * len(in_shape))
                axes = [int(a) % len(in_shape) for a in axes.reshape(-1)]
                for k, ax in enumerate(axes):
                    full[ax] = int(pads[k])
                    full[ax + len(in_shape)] = int(pads[k + len(axes)])
                pads = full
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        rank = len(in_shape)
        if mode not in ("constant", "reflect", "edge"):
            raise UnsupportedOpError("Pad", name, f"mode {mode!r}")
        if rank != 4 or len(pads) != 8:
            raise UnsupportedOpError("Pad", name, "only on 4D tensors")
        if min(pads) < 0 or pads[0] or pads[4] or (mode != "constant" and (pads[1] or pads[5])):
            raise UnsupportedOpError("Pad", name, f"pads {pads}: negative, on the batch, or non-constant on channels")
        if mode == "reflect" and (max(pads[2], pads[6]) >= in_shape[2] or max(pads[3], pads[7]) >= in_shape[3]):
            raise UnsupportedOpError("Pad", name, f"reflect pads {pads} not smaller than the input {in_shape}")
        a = {"pads": (pads[2], pads[3], pads[6], pads[7]), "mode": mode, "value": value,
             "channel_pads": (pads[1], pads[5])}
        self.emit(Node(name, "Pad", (ins[0],), out, a))

    def _resize(self, op, name, ins, out, attrs, in_shape, shapes):
        if len(in_shape) != 4:
            raise UnsupportedOpError(op, name, "only on 4D tensors")
        mode = attrs.get("mode", "nearest")
        if mode not in ("nearest", "linear", "bilinear"):
            raise UnsupportedOpError(op, name, f"mode {mode!r}")
        mode = "linear" if mode == "bilinear" else mode
        scales = sizes = None
        if op == "Upsample" or self.opset < 11:
            scales = attrs.get("scales") if "scales" in attrs else self.const(ins[1] if len(ins) > 1 else "")
            if scales is None:
                raise UnsupportedOpError(op, name, "scales must be constants")
            ct, nm = "asymmetric", "floor"
        else:
            for k in ("antialias", "exclude_outside"):
                if attrs.get(k, 0):
                    raise UnsupportedOpError(op, name, f"{k}={attrs[k]}")
            if attrs.get("axes") is not None or attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
                raise UnsupportedOpError(op, name, "axes / keep_aspect_ratio_policy")
            ct = attrs.get("coordinate_transformation_mode", "half_pixel")
            nm = attrs.get("nearest_mode", "round_prefer_floor")
            if ct not in ("half_pixel", "pytorch_half_pixel", "asymmetric", "tf_half_pixel_for_nn", "align_corners"):
                raise UnsupportedOpError(op, name, f"coordinate_transformation_mode {ct!r}")
            sc = self.const(ins[2]) if len(ins) > 2 and ins[2] else None
            sz = self.const(ins[3]) if len(ins) > 3 and ins[3] else None
            if (len(ins) > 2 and ins[2] and sc is None) or (len(ins) > 3 and ins[3] and sz is None):
                raise UnsupportedOpError(op, name, "scales and sizes must be constants")
            scales = sc if sc is not None and sc.size else None
            sizes = sz if sz is not None and sz.size else None
        if scales is not None:
            scales = [float(v) for v in np.asarray(scales).reshape(-1)]
            if len(scales) != 4 or scales[:2] != [1.0, 1.0]:
                raise UnsupportedOpError(op, name, f"scales {scales}: only H and W may be resized")
            out_hw = tuple(int(math.floor(n * sc)) for n, sc in zip(in_shape[2:], scales[2:], strict=True))
            sc_hw = tuple(scales[2:])
        elif sizes is not None:
            sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
            if len(sizes) != 4 or tuple(sizes[:2]) != tuple(in_shape[:2]):
                raise UnsupportedOpError(op, name, f"sizes {sizes}: only H and W may be resized")
            out_hw = tuple(sizes[2:])
            sc_hw = tuple(o / n for o, n in zip(out_hw, in_shape[2:], strict=True))
        else:
            raise UnsupportedOpError(op, name, "neither scales nor sizes")
        a = {"mode": mode, "coordinate_transformation_mode": ct, "nearest_mode": nm, "scales": sc_hw,
             "sizes": out_hw, "in_size": tuple(in_shape[2:]), "pads": (0, 0, 0, 0)}
        self.shapes[out] = (*in_shape[:2], *out_hw)
        self.emit(Node(name, "Resize", (ins[0],), out, a))

    def _conv_transpose(self, name, ins, out, attrs, in_shape, shapes):
        w = self.const(ins[1])
        if w is None or w.ndim != 4 or len(in_shape) != 4:
            raise UnsupportedOpError("ConvTranspose", name, "weights must be a constant 4D tensor (2D)")
        group = int(attrs.get("group", 1))
        k = (int(w.shape[2]), int(w.shape[3]))
        s, d = _pair(attrs.get("strides"), 1), _pair(attrs.get("dilations"), 1)
        op_ = _pair(attrs.get("output_padding"), 0)
        raw = [(n - 1) * st + (kk - 1) * dd + 1 for n, st, kk, dd in zip(in_shape[2:], s, k, d, strict=True)]
        auto_pad = attrs.get("auto_pad", "NOTSET")
        if attrs.get("output_shape") is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            if attrs.get("output_shape") is not None:
                want = [int(v) for v in attrs["output_shape"]][-2:]
            else:
                want = [n * st for n, st in zip(in_shape[2:], s, strict=True)]
            begin = []
            for r, o, p in zip(raw, want, op_, strict=True):
                total = r + p - o
                begin.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
            out_hw = want
        else:
            p = (0, 0, 0, 0) if auto_pad == "VALID" else tuple(int(v) for v in attrs.get("pads", (0, 0, 0, 0)))
            begin = [p[0], p[1]]
            out_hw = [r + o - p[i] - p[i + 2] for i, (r, o) in enumerate(zip(raw, op_, strict=True))]
        adj = (-begin[0], -begin[1], out_hw[0] - (raw[0] - begin[0]), out_hw[1] - (raw[1] - begin[1]))
        cout = w.shape[1] * group
        bias = self.const(ins[2]) if len(ins) > 2 and ins[2] else np.zeros(cout, np.float32)
        wk = self.weight(ins[1], w)
        bk = self.weight(ins[2], bias) if len(ins) > 2 and ins[2] else self.weight(f"{name}.B", bias)
        a = {"kernel": k, "strides": s, "dilations": d, "group": group, "pads": adj}
        self.shapes[out] = (1, cout, *out_hw)
        self.emit(Node(name, "ConvTranspose", (ins[0],), out, a, (wk, bk)))

    def _ceil_pads(self, op, name, pads, in_shape, out_shape, kernel, strides, dil):
        """Extra bottom/right padding that reproduces ceil_mode's output size with floor arithmetic."""
        if out_shape is None:
            return pads
        t, left, b, r = pads
        extra = []
        for size, k, s, d, p0, p1, want in zip(
            in_shape[2:], kernel, strides, dil, (t, left), (b, r), out_shape[2:], strict=True
        ):
            got = (size + p0 + p1 - (k - 1) * d - 1) // s + 1
            extra.append((want - got) * s if want > got else 0)
        if not any(extra):
            return pads
        if op == "AveragePool":
            raise UnsupportedOpError(op, name, "ceil_mode that changes the output size")
        return (t, left, b + extra[0], r + extra[1])

    def _batch_norm(self, name, ins, out, attrs, shapes, uses):
        x, scale, bias, mean, var = ins[:5]
        vals = [self.const(t) for t in (scale, bias, mean, var)]
        if any(v is None for v in vals):
            raise UnsupportedOpError("BatchNormalization", name, "statistics must be constants")
        scale, bias, mean, var = (v.astype(np.float64) for v in vals)
        s = scale / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
        shift = bias - mean * s
        idx = next((i for i, n in enumerate(self.nodes) if n.output == x), None)
        prev = self.nodes[idx] if idx is not None else None
        # Folding renames the Conv's output to the BN's, so nobody else may read the Conv's output.
        if prev is not None and prev.op == "Conv" and uses.get(x, 0) == 1:
            w = self.weights[prev.params[0]].astype(np.float64)
            b0 = self.weights[prev.params[1]].astype(np.float64)
            wk = self.weight(f"{prev.name}.W_bn", w * s[:, None, None, None])
            bk = self.weight(f"{prev.name}.B_bn", b0 * s + shift)
            self.nodes[idx] = replace(prev, output=out, params=(wk, bk))
            used = {p for n in self.nodes for p in n.params}
            for k in prev.params:
                if k not in used:
                    self.weights.pop(k, None)
            return
        in_shape = self.shape_of(x, shapes)
        if in_shape is not None and len(in_shape) == 2:
            mid = f"{out}.scaled"
            self.emit(Node(f"{name}.scale", "Mul", (x,), mid, {"const_index": 1},
                           (self.weight(f"{name}.scale", s),)))
            self.shapes[mid] = tuple(in_shape)
            self.emit(Node(name, "Add", (mid,), out, {"const_index": 1}, (self.weight(f"{name}.shift", shift),)))
            return
        if in_shape is None or len(in_shape) != 4:
            raise UnsupportedOpError("BatchNormalization", name, "only on 2D or 4D tensors")
        c = in_shape[1]
        a = {"kernel": (1, 1), "strides": (1, 1), "pads": (0, 0, 0, 0), "dilations": (1, 1), "group": c}
        wk = self.weight(f"{name}.W", s.reshape(c, 1, 1, 1))
        bk = self.weight(f"{name}.B", shift)
        self.emit(Node(name, "Conv", (x,), out, a, (wk, bk)))


def _fill_shapes_by_running(graph: Graph) -> None:
    """Shape inference left gaps: run the graph once on zeros and record the real shapes."""
    from .kernels import run_node

    tensors = {graph.input: np.zeros(graph.shapes[graph.input], np.float32)}
    for n in graph.nodes:
        y = run_node(n, [tensors[t] for t in n.inputs], graph.weights)
        tensors[n.output] = y
        graph.shapes[n.output] = tuple(int(d) for d in y.shape)


# --------------------------------------------------------------------------- ONNX export (CPython only)


def to_onnx(graph: Graph, nodes: list[Node] | None = None, outputs: list[str] | None = None,
            input_shapes: dict[str, tuple[int, ...]] | None = None, opset: int = 17):
    """Build an ONNX ModelProto for `nodes` (default: the whole graph).

    Tensors the nodes read but do not produce become graph inputs (shapes from `input_shapes`, else
    from `graph.shapes`); `outputs` defaults to the last node's output. Used to run a segment or a
    single layer through onnxruntime (the bench, `OnnxRuntimeBackend`).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = list(graph.nodes if nodes is None else nodes)
    in_names = external_inputs(nodes)
    outputs = outputs or [nodes[-1].output]
    input_shapes = input_shapes or {}

    onodes, inits, done = [], [], set()

    def init(key, arr):
        if key not in done:
            done.add(key)
            inits.append(numpy_helper.from_array(np.asarray(arr), key))
        return key

    for n in nodes:
        a, ins, extra = n.attrs, list(n.inputs), {}
        op = n.op
        if op == "Conv":
            ins += [init(k, graph.weights[k]) for k in n.params]
            extra = dict(kernel_shape=a["kernel"], strides=a["strides"], pads=a["pads"],
                         dilations=a["dilations"], group=a["group"])
        elif op in ("MaxPool", "AveragePool"):
            extra = dict(kernel_shape=a["kernel"], strides=a["strides"], pads=a["pads"])
            if tuple(a["dilations"]) != (1, 1):
                extra["dilations"] = a["dilations"]
            if op == "AveragePool":
                extra["count_include_pad"] = int(a["count_include_pad"])
        elif op == "Clip":
            ins += [init(f"{n.name}.min", np.float32(a["min"])), init(f"{n.name}.max", np.float32(a["max"]))]
        elif op in _BINARY_OPS or op == "MatMul":
            if n.params:
                k = init(n.params[0], graph.weights[n.params[0]])
                ins = [k, ins[0]] if a.get("const_index", 1) == 0 else [ins[0], k]
        elif op == "Gemm":
            ins += [init(k, graph.weights[k]) for k in n.params]
            extra = dict(alpha=a["alpha"], beta=a["beta"], transA=a["transA"], transB=a["transB"])
        elif op in ("Flatten", "Concat"):
            extra = {"axis": a["axis"]}
        elif op == "Reshape":
            ins.append(init(f"{n.name}.shape", np.asarray(a["shape"], np.int64)))
        elif op in _ACTIVATION_ATTRS or op == "LRN":
            extra = dict(a)
        elif op in ("Softmax", "LogSoftmax"):
            if a.get("legacy"):  # over every axis from `axis` on: flatten, normalize the last axis, restore
                shape = input_shapes.get(ins[0], graph.shapes[ins[0]])
                k = f"{n.name}.2d"
                onodes.append(helper.make_node("Flatten", ins, [k], name=f"{k}.flatten", axis=a["axis"]))
                onodes.append(helper.make_node(op, [k], [k + ".y"], name=n.name, axis=-1))
                ins, op = [k + ".y", init(f"{n.name}.shape", np.asarray(shape, np.int64))], "Reshape"
            else:
                extra = {"axis": a["axis"]}
        elif op == "PRelu":
            ins.append(init(n.params[0], graph.weights[n.params[0]]))
        elif op in _NARY_OPS:
            for pos, key in zip(a.get("const_positions", ()), n.params, strict=True):
                ins.insert(pos, init(key, graph.weights[key]))
        elif op == "Gather":
            ins.append(init(f"{n.name}.indices", np.asarray(a["indices"], np.int64)))
            extra = {"axis": 1}
        elif op == "SpaceToDepth":
            extra = {"blocksize": a["blocksize"]}
            if a.get("mode", "DCR") != "DCR":
                extra["mode"] = a["mode"]
        onodes += _export_resampling(n, ins, init, helper, graph, input_shapes) if op in _RESAMPLING_OPS else [
            helper.make_node(op, ins, [n.output], name=n.name, **extra)]

    def vi(t, shape):
        return helper.make_tensor_value_info(t, TensorProto.FLOAT, list(shape))

    g = helper.make_graph(
        onodes, "tilemesh",
        [vi(t, input_shapes.get(t, graph.shapes[t])) for t in in_names],
        # With caller-given input shapes (a tile) output sizes differ from the graph's: rank only.
        [vi(t, [None] * len(graph.shapes[t]) if input_shapes else graph.shapes[t]) for t in outputs],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


_RESAMPLING_OPS = frozenset({"Pad", "Resize", "ConvTranspose", "DepthToSpace"})


def _export_resampling(n: Node, ins, init, helper, graph: Graph, input_shapes) -> list:
    """ONNX nodes for an op whose attrs["pads"] adjusts its raw output (positive: add, negative: remove):
    the op on the given input, then Pad (positive part) and Slice (negative part)."""
    a = n.attrs
    adj = [int(v) for v in a.get("pads", (0, 0, 0, 0))]
    raw = f"{n.output}.raw"
    x_shape = input_shapes.get(ins[0], graph.shapes[ins[0]])
    out: list = []
    mode, value = "constant", 0.0
    if n.op == "Pad":
        mode, value = a["mode"], a["value"]
        c0, c1 = a.get("channel_pads", (0, 0))
        if c0 or c1:
            out.append(helper.make_node("Pad", [ins[0], init(f"{n.name}.cpads", np.int64([0, c0, 0, 0, 0, c1, 0, 0])),
                                                init(f"{n.name}.value", np.float32(value))], [raw], name=f"{raw}.c"))
        else:
            raw = ins[0]
    elif n.op == "Resize":
        from .kernels import resize_out_len

        hw = [resize_out_len(x_shape[2 + i], a["in_size"][i], a["sizes"][i], a["scales"][i]) for i in (0, 1)]
        sizes = init(f"{n.name}.sizes.{hw[0]}x{hw[1]}", np.int64([*x_shape[:2], *hw]))
        extra = {"mode": a["mode"], "coordinate_transformation_mode": a["coordinate_transformation_mode"]}
        if a["mode"] == "nearest":
            extra["nearest_mode"] = a["nearest_mode"]
        integer = all(abs(sc - round(sc)) < 1e-9 for sc in a["scales"])
        if integer:  # scales keep the coordinate mapping exact; sizes would recompute them from the tile
            scales = init(f"{n.name}.scales", np.float32([1, 1, *a["scales"]]))
            out.append(helper.make_node("Resize", [ins[0], "", scales], [raw], name=n.name, **extra))
        else:
            out.append(helper.make_node("Resize", [ins[0], "", "", sizes], [raw], name=n.name, **extra))
    elif n.op == "ConvTranspose":
        out.append(helper.make_node(
            "ConvTranspose", [ins[0], init(n.params[0], graph.weights[n.params[0]])], [raw], name=n.name,
            kernel_shape=a["kernel"], strides=a["strides"], dilations=a["dilations"], group=a["group"]))
    else:  # DepthToSpace
        out.append(helper.make_node("DepthToSpace", ins, [raw], name=n.name, blocksize=a["blocksize"],
                                    mode=a["mode"]))
    pos = [max(v, 0) for v in adj]
    neg = [max(-v, 0) for v in adj]
    cur = raw
    if any(pos) or cur == ins[0]:
        nxt = f"{n.output}.padded"
        out.append(helper.make_node("Pad", [cur, init(f"{n.name}.pads.{'_'.join(map(str, pos))}", np.int64(
            [0, 0, pos[0], pos[1], 0, 0, pos[2], pos[3]])), init(f"{n.name}.value", np.float32(value))], [nxt],
            name=f"{n.name}.pad", mode=mode))
        cur = nxt
    if any(neg):
        nxt = f"{n.output}.cropped"
        big = np.iinfo(np.int64).max
        out.append(helper.make_node("Slice", [
            cur, init(f"{n.name}.starts.{neg[0]}_{neg[1]}", np.int64([neg[0], neg[1]])),
            init(f"{n.name}.ends.{neg[2]}_{neg[3]}",
                 np.int64([-neg[2] if neg[2] else big, -neg[3] if neg[3] else big])),
            init(f"{n.name}.axes", np.int64([2, 3]))], [nxt], name=f"{n.name}.crop"))
        cur = nxt
    if n.op == "ConvTranspose":
        bias = graph.weights[n.params[1]].reshape(-1, 1, 1)
        out.append(helper.make_node("Add", [cur, init(f"{n.params[1]}.chw", bias)], [n.output], name=f"{n.name}.bias"))
    else:
        out.append(helper.make_node("Identity", [cur], [n.output], name=f"{n.name}.out"))
    return out


# --------------------------------------------------------------------------- compact form (numpy only)


def _compact_paths(dir_or_prefix) -> tuple[Path, Path]:
    p = os.fspath(dir_or_prefix)
    if os.path.isdir(p) or p.endswith(("/", os.sep)):
        return Path(p, "model.json"), Path(p, "model.bin")
    if p.endswith(".json"):
        p = p[: -len(".json")]
    return Path(p + ".json"), Path(p + ".bin")


def _encode(v):
    if isinstance(v, bool | int | str) or v is None:
        return v
    if isinstance(v, float):
        # JSON has no infinities (JavaScript's JSON.parse rejects them), so they are tagged.
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, tuple | list):
        return [_encode(x) for x in v]
    if isinstance(v, np.integer | np.floating):
        return _encode(v.item())
    raise TypeError(f"cannot store attribute value {v!r}")


def _decode(v):
    if isinstance(v, list):
        return tuple(_decode(x) for x in v)
    if isinstance(v, dict):
        return float(v["float"])
    return v


def compact_offsets(graph: Graph) -> tuple[dict[str, int], int]:
    """Byte offset of every weight in the compact .bin (in `graph.weights` order, each aligned) and its size.

    A graph loaded from the compact form has its weights in the same order, so the offsets are those of the
    blob the device downloaded (task models point into it as ONNX external data, `task_model`)."""
    offsets, off = {}, 0
    for key, w in graph.weights.items():
        offsets[key] = off
        off += -(-w.nbytes // _ALIGN) * _ALIGN
    return offsets, off


def compact_meta(graph: Graph) -> tuple[dict, list[tuple[int, np.ndarray]]]:
    """The JSON-ready topology and (offset, array) pairs of the weight blob."""
    entries, chunks = [], []
    offsets, off = compact_offsets(graph)
    for key, w in graph.weights.items():
        w = np.ascontiguousarray(w, dtype=w.dtype.newbyteorder("<"))
        entries.append({"name": key, "dtype": w.dtype.str, "shape": list(w.shape), "offset": offsets[key]})
        chunks.append((offsets[key], w))
    meta = {
        "format": COMPACT_FORMAT,
        "version": COMPACT_VERSION,
        "input": graph.input,
        "output": graph.output,
        "shapes": {k: list(v) for k, v in graph.shapes.items()},
        "nodes": [
            {"name": n.name, "op": n.op, "inputs": list(n.inputs), "output": n.output,
             "attrs": {k: _encode(v) for k, v in n.attrs.items()}, "params": list(n.params)}
            for n in graph.nodes
        ],
        "weights": entries,
        "bin_bytes": off,
    }
    return meta, chunks


def save_compact(graph: Graph, dir_or_prefix) -> tuple[Path, Path]:
    """Write ``<prefix>.json`` + ``<prefix>.bin`` (or ``model.json``/``model.bin`` in a directory)."""
    json_path, bin_path = _compact_paths(dir_or_prefix)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    meta, chunks = compact_meta(graph)
    meta["bin"] = bin_path.name
    blob = bytearray(meta["bin_bytes"])
    for off, w in chunks:
        blob[off: off + w.nbytes] = w.tobytes()
    bin_path.write_bytes(blob)
    json_path.write_text(json.dumps(meta, separators=(",", ":"), allow_nan=False))
    return json_path, bin_path


def graph_from_compact(meta: dict | str | bytes, blob) -> Graph:
    """Rebuild a Graph from the JSON topology and the weight blob (bytes, bytearray or memoryview).

    Weights are zero-copy views into `blob`; pass a writable buffer (bytearray) for writable arrays.
    This is the entry point in the browser, where both parts arrive from fetch().
    """
    if not isinstance(meta, dict):
        meta = json.loads(meta)
    if meta.get("format") != COMPACT_FORMAT or meta.get("version") != COMPACT_VERSION:
        raise ValueError(f"not a {COMPACT_FORMAT} v{COMPACT_VERSION} file: {meta.get('format')!r}")
    buf = memoryview(blob).cast("B")
    if len(buf) != meta["bin_bytes"]:
        raise ValueError(f"weight blob has {len(buf)} bytes, expected {meta['bin_bytes']}")
    weights = {}
    for e in meta["weights"]:
        dt = np.dtype(e["dtype"])
        count = math.prod(e["shape"])
        arr = np.frombuffer(buf, dtype=dt, count=count, offset=e["offset"]).reshape(e["shape"])
        weights[e["name"]] = arr if dt.isnative else arr.astype(dt.newbyteorder("="))
    nodes, shapes = _topology(meta)
    return Graph(nodes, meta["input"], meta["output"], shapes, weights)


def _topology(meta: dict) -> tuple[list[Node], dict[str, tuple[int, ...]]]:
    nodes = [
        Node(d["name"], d["op"], tuple(d["inputs"]), d["output"],
             {k: _decode(v) for k, v in d["attrs"].items()}, tuple(d["params"]))
        for d in meta["nodes"]
    ]
    return nodes, {k: tuple(v) for k, v in meta["shapes"].items()}


def compact_variant(base: Graph, meta: dict | str | bytes) -> Graph:
    """A variant of `base` (the same weights at another input size, `tilemesh.models.card` variants) from its
    compact topology: nodes and shapes from `meta`, weights shared with `base` (no second copy of the blob).
    Raises ValueError unless `meta`'s weight table is exactly the layout of `base`'s blob."""
    if not isinstance(meta, dict):
        meta = json.loads(meta)
    if meta.get("format") != COMPACT_FORMAT or meta.get("version") != COMPACT_VERSION:
        raise ValueError(f"not a {COMPACT_FORMAT} v{COMPACT_VERSION} file: {meta.get('format')!r}")
    offsets, size = compact_offsets(base)
    layout = [(k, np.dtype(w.dtype).newbyteorder("<").str, list(w.shape), offsets[k]) for k, w in base.weights.items()]
    theirs = [(e["name"], e["dtype"], list(e["shape"]), e["offset"]) for e in meta["weights"]]
    if theirs != layout or meta["bin_bytes"] != size:
        raise ValueError("the variant's weights are not laid out as the model's blob (a variant must share them)")
    nodes, shapes = _topology(meta)
    return Graph(nodes, meta["input"], meta["output"], shapes, base.weights)


def load_compact(dir_or_prefix) -> Graph:
    json_path, _ = _compact_paths(dir_or_prefix)
    meta = json.loads(json_path.read_text())
    bin_path = json_path.with_name(meta.get("bin", json_path.stem + ".bin"))
    blob = bytearray(meta["bin_bytes"])
    with open(bin_path, "rb") as f:
        n = f.readinto(blob)
        if n != len(blob) or f.read(1):
            raise ValueError(f"{bin_path} does not hold exactly {len(blob)} bytes")
    return graph_from_compact(meta, blob)
