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
* Identity and Dropout disappear; Constant nodes and initializers become weights or attributes;
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
    }
)
# Ops the importer removes or rewrites; they never appear in a Graph.
_ELIDED_OPS = frozenset({"Identity", "Dropout", "Constant", "BatchNormalization"})
_BINARY_OPS = ("Add", "Mul", "Sub", "Div")

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
    if node.op in ("Flatten", "Reshape", "Concat"):
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
        if n.domain not in ("", "ai.onnx") or n.op_type not in SUPPORTED_OPS | _ELIDED_OPS:
            raise UnsupportedOpError(n.op_type if not n.domain else f"{n.domain}.{n.op_type}",
                                     n.name or f"{n.op_type}_{i}")
    model = _fix_input_shape(model, input_shape)
    model = shape_inference.infer_shapes(model)
    g = model.graph

    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = _constant_value(n)
    inputs = [vi for vi in g.input if vi.name not in consts]
    if len(inputs) != 1:
        raise ValueError(f"expected one graph input, got {[vi.name for vi in inputs]}")
    if len(g.output) != 1:
        raise ValueError(f"expected one graph output, got {[o.name for o in g.output]}")
    shapes_onnx = {vi.name: _static_shape(vi) for vi in [*g.input, *g.value_info, *g.output]}

    b = _Builder(consts, inputs[0].name)
    uses: dict[str, int] = {}
    for n in g.node:
        for t in n.input:
            uses[t] = uses.get(t, 0) + 1
    uses[g.output[0].name] = uses.get(g.output[0].name, 0) + 1

    for i, n in enumerate(g.node):
        name = n.name or f"{n.op_type}_{i}"
        if n.op_type == "Constant":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        for extra in n.output[1:]:
            if extra and uses.get(extra):
                raise UnsupportedOpError(n.op_type, name, f"its second output {extra!r} is used")
        b.add(n.op_type, name, list(n.input), n.output[0], attrs, shapes_onnx, uses)

    graph_in = inputs[0].name
    graph_out = b.resolve(g.output[0].name)
    shape = shapes_onnx.get(graph_in)
    if shape is None or len(shape) not in (2, 4) or shape[0] != 1:
        raise ValueError(f"graph input must have batch 1 and a static 2D or 4D shape, got {shape}")
    shapes = {graph_in: shape}
    for node in b.nodes:
        shapes[node.output] = shapes_onnx.get(node.output)
    graph = Graph(b.nodes, graph_in, graph_out, shapes, b.weights)
    if any(s is None for s in shapes.values()):
        _fill_shapes_by_running(graph)
    for t, s in graph.shapes.items():
        if s[0] != 1:
            raise ValueError(f"tensor {t!r} has batch {s[0]}; only batch 1 is supported")
    return graph


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

    def __init__(self, consts: dict[str, np.ndarray], graph_input: str):
        self.consts = consts
        self.graph_input = graph_input
        self.nodes: list[Node] = []
        self.weights: dict[str, np.ndarray] = {}
        self.alias: dict[str, str] = {}
        self.names: set[str] = set()

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
        if op not in SUPPORTED_OPS and op not in _ELIDED_OPS:
            raise UnsupportedOpError(op, name)
        ins = [self.resolve(t) if t else t for t in ins]
        if op in ("Identity", "Dropout"):
            self.alias[out] = ins[0]
            return
        if op == "BatchNormalization":
            self._batch_norm(name, ins, out, attrs, shapes, uses)
            return

        acts = [t for t in ins if t and t not in self.consts]
        for t in acts:
            s = shapes.get(t)
            if s is not None and len(s) not in (2, 4):
                raise UnsupportedOpError(op, name, f"input {t!r} has rank {len(s)}; only 2D and 4D tensors")
        in_shape = shapes.get(acts[0]) if acts else None

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
        elif op in ("Relu", "Sigmoid", "HardSwish", "GlobalAveragePool"):
            self.emit(Node(name, op, (ins[0],), out, {}))
        elif op in _BINARY_OPS or op == "MatMul":
            cidx = [i for i, t in enumerate(ins[:2]) if t in self.consts]
            if len(cidx) == 2:
                raise UnsupportedOpError(op, name, "both operands are constants")
            if not cidx:
                self.emit(Node(name, op, (ins[0], ins[1]), out, {}))
            else:
                c = cidx[0]
                if op == "MatMul" and c != 1:
                    raise UnsupportedOpError(op, name, "a constant first operand")
                key = self.weight(ins[c], self.consts[ins[c]])
                self.emit(Node(name, op, (ins[1 - c],), out, {"const_index": c}, (key,)))
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
            if self.const(ins[1]) is None or shapes.get(out) is None:
                raise UnsupportedOpError(op, name, "the target shape must be a constant")
            self.emit(Node(name, op, (ins[0],), out, {"shape": tuple(shapes[out])}))
        elif op == "Concat":
            if any(t in self.consts for t in ins):
                raise UnsupportedOpError(op, name, "constant operands")
            axis = int(attrs["axis"])
            rank = len(shapes[out]) if shapes.get(out) else len(in_shape)
            self.emit(Node(name, op, tuple(ins), out, {"axis": axis + rank if axis < 0 else axis}))
        else:  # pragma: no cover - SUPPORTED_OPS and this chain must list the same ops
            raise UnsupportedOpError(op, name)

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
        in_shape = shapes.get(x)
        if in_shape is None or len(in_shape) != 4:
            raise UnsupportedOpError("BatchNormalization", name, "only on 4D tensors or after a Conv")
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
        onodes.append(helper.make_node(op, ins, [n.output], name=n.name, **extra))

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


def compact_meta(graph: Graph) -> tuple[dict, list[tuple[int, np.ndarray]]]:
    """The JSON-ready topology and (offset, array) pairs of the weight blob."""
    entries, chunks, off = [], [], 0
    for key, w in graph.weights.items():
        w = np.ascontiguousarray(w, dtype=w.dtype.newbyteorder("<"))
        entries.append({"name": key, "dtype": w.dtype.str, "shape": list(w.shape), "offset": off})
        chunks.append((off, w))
        off += -(-w.nbytes // _ALIGN) * _ALIGN
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
    nodes = [
        Node(d["name"], d["op"], tuple(d["inputs"]), d["output"],
             {k: _decode(v) for k, v in d["attrs"].items()}, tuple(d["params"]))
        for d in meta["nodes"]
    ]
    shapes = {k: tuple(v) for k, v in meta["shapes"].items()}
    return Graph(nodes, meta["input"], meta["output"], shapes, weights)


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
