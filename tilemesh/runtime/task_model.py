"""ONNX models of tasks: one fused segment's steps on one tile, written from the IR without the onnx package.

A device computing with an ONNX engine (onnxruntime-web in the browser, onnxruntime on the edge) needs, for each
task of the plan it adopts, a model that does exactly what `tiling.run_steps` does with numpy: per step, crop
each input from the region its producer computed to the region the step reads (`step.ins`; a `Slice`), and run
the node with the tile's own padding (`step.pads`: a border tile pads like the original layer, an interior tile
pads nothing and reads halo rows instead). Inputs are the segment inputs' needed regions (`deps.inputs`),
outputs the kept tensors' computed regions (`deps.regions`). One session per task serves every frame.

Weights are not copied into each task model: with `external=` they are ONNX external data (location, offset,
length) pointing into the compact model's weight blob that every device already holds (`graph.compact_offsets`);
onnxruntime-web takes that blob once per session as `externalData`, native onnxruntime through
`add_external_initializers_from_files_in_memory`. Without it the weights are inlined (raw data).

`lower_node` is the one place that maps an IR node to ONNX, for every op the importer emits. Most ops are
generic: attributes pass through under their ONNX names (only `kernel` is renamed), params become inputs after
the activations, and the few normalized forms of the importer go back (Clip's bounds and Reshape's shape as
constant inputs, a constant operand's position). The others become a few ONNX nodes computing what the numpy
kernel computes on the same tile: a legacy Softmax as Flatten/Softmax/Reshape, a channel shuffle as Gather, and
the resampling ops (Pad, Resize, ConvTranspose, DepthToSpace) as their raw output on the tile followed by the
tile's adjustment (Pad for added rows, Slice for removed ones; `deps.resample_rule`). Resize uses ONNX Resize
only where onnxruntime maps coordinates as the kernel does (integer scales, the common mappings); otherwise the
kernel's own source indices and weights become Gathers and a blend, so no mode or scale can differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .deps import SegmentDeps, segment_deps
from .graph import Graph, Node, compact_offsets, external_inputs
from .onnx_proto import External, Initializer, OnnxNode, model_bytes
from .regions import Region, is_spatial, plane

_RENAME = {"kernel": "kernel_shape"}
# Elementwise and channel-local ops whose IR attributes are ONNX's as they are.
_PLAIN_OPS = frozenset({
    "Conv", "Clip", "Relu", "Add", "Mul", "Sub", "Div", "Sigmoid", "HardSwish", "MaxPool", "AveragePool",
    "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape", "Gemm", "MatMul", "Concat",
    "PRelu", "HardSigmoid", "LeakyRelu", "Elu", "Selu", "Tanh", "Softplus", "Softsign", "Abs", "Neg", "Exp", "LRN",
})
# Ops written as several ONNX nodes (see `lower_node`): normalized IR forms, and the resampling ops whose
# attrs["pads"] adjusts their raw output per tile (kernels._adjust): the op, then Pad (added rows, in the op's
# mode) and Slice (removed rows).
_COMPOSED_OPS = frozenset({"Softmax", "LogSoftmax", "Gather", "Sum", "Max", "Min", "Mean", "SpaceToDepth",
                           "Pad", "Resize", "ConvTranspose", "DepthToSpace"})
# The IR ops `lower_node` writes: every op the importer emits (graph.SUPPORTED_OPS). An op outside it raises
# `NotLowerable`: that task runs on numpy instead, per task.
ENGINE_OPS = _PLAIN_OPS | _COMPOSED_OPS


class NotLowerable(ValueError):
    """A node this writer does not lower to ONNX; the caller computes it with numpy."""


def check_lowerable(nodes) -> None:
    bad = sorted({n.op for n in nodes if n.op not in ENGINE_OPS})
    if bad:
        raise NotLowerable(f"no ONNX lowering for {', '.join(bad)}")
# Window ops whose `dilations` attribute ONNX only knows from a later opset (AveragePool: 19): left out at (1, 1).
_DEFAULT_DILATIONS_DROPPED = frozenset({"MaxPool", "AveragePool"})


def _opset(nodes, opset: int) -> int:
    """`opset`, raised to 19 where a dilated AveragePool needs it (no op the writer emits changes meaning
    between 17 and 19)."""
    dilated = any(n.op == "AveragePool" and tuple(n.attrs.get("dilations", (1, 1))) != (1, 1) for n in nodes)
    return max(opset, 19) if dilated else opset
_INT64_MAX = np.iinfo(np.int64).max


def lower_node(node: Node, inputs: list[str] | None = None, pads=None,
               in_shape: tuple[int, ...] | None = None) -> tuple[list[OnnxNode], dict[str, np.ndarray]]:
    """The ONNX nodes for IR `node` reading `inputs` (default: its own), with `pads` overriding its padding
    (a window op's pads; a resampling op's adjustment of its raw output), its first input shaped `in_shape`.

    Returns the nodes (the last one writes `node.output`) and the small constants they need as initializers
    (name -> array); weights (`node.params`) are referenced by their graph names.
    """
    attrs = dict(node.attrs)
    if pads is not None:
        attrs["pads"] = tuple(int(p) for p in pads)
    ins = list(node.inputs if inputs is None else inputs)
    if node.op in _COMPOSED_OPS:
        return _Composer(node, ins, attrs, in_shape).lower()
    if node.op not in _PLAIN_OPS:
        raise NotLowerable(f"no ONNX lowering for {node.op} (node {node.name})")
    params = list(node.params)
    consts: dict[str, np.ndarray] = {}
    if node.op == "Clip":
        lo, hi = attrs.pop("min", -math.inf), attrs.pop("max", math.inf)
        consts = {f"{node.name}.min": np.float32(lo), f"{node.name}.max": np.float32(hi)}
        ins += list(consts)
    elif node.op == "Reshape" and "shape" in attrs:
        consts = {f"{node.name}.shape": np.asarray(attrs.pop("shape"), np.int64)}
        ins += list(consts)
    if "const_index" in attrs:
        c = int(attrs.pop("const_index"))
        k = params.pop(0)
        ins = [k, *ins] if c == 0 else [*ins, k]
    if node.op in _DEFAULT_DILATIONS_DROPPED and tuple(attrs.get("dilations", (1, 1))) == (1, 1):
        attrs.pop("dilations", None)
    onnx_attrs = {_RENAME.get(k, k): v for k, v in attrs.items()}
    return [OnnxNode(node.op, ins + params, [node.output], onnx_attrs, name=node.name)], consts


class _Composer:
    """Writes one IR node whose ONNX form is several nodes or needs its input's shape (`lower_node`)."""

    def __init__(self, node: Node, ins: list[str], attrs: dict, in_shape):
        self.node, self.ins, self.a, self.in_shape = node, ins, attrs, in_shape
        self.nodes: list[OnnxNode] = []
        self.consts: dict[str, np.ndarray] = {}
        self.n = 0

    def const(self, tag: str, value) -> str:
        name = f"{self.node.name}.{tag}"
        self.consts[name] = np.asarray(value)
        return name

    def emit(self, op: str, ins, attrs=None, out: str | None = None) -> str:
        self.n += 1
        out = out or f"{self.node.output}.{self.n}"
        self.nodes.append(OnnxNode(op, list(ins), [out], attrs or {}, name=f"{self.node.name}.{self.n}"))
        return out

    def shape(self) -> tuple[int, ...]:
        if self.in_shape is None:
            raise NotLowerable(f"{self.node.op} node {self.node.name}: lowering needs its input's shape")
        return tuple(int(d) for d in self.in_shape)

    def lower(self) -> tuple[list[OnnxNode], dict[str, np.ndarray]]:
        node, a, x = self.node, self.a, self.ins[0]
        op, out = node.op, node.output
        if op in ("Softmax", "LogSoftmax"):
            if a.get("legacy"):  # over every axis from `axis` on: flatten, normalize the last axis, restore
                flat = self.emit("Flatten", [x], {"axis": int(a["axis"])})
                y = self.emit(op, [flat], {"axis": -1})
                self.emit("Reshape", [y, self.const("shape", np.asarray(self.shape(), np.int64))], out=out)
            else:
                self.emit(op, [x], {"axis": int(a["axis"])}, out=out)
        elif op == "Gather":
            self.emit("Gather", [x, self.const("indices", np.asarray(a["indices"], np.int64))],
                      {"axis": int(a.get("axis", 1))}, out=out)
        elif op in ("Sum", "Max", "Min", "Mean"):
            ops = list(self.ins)
            for pos, key in zip(a.get("const_positions", ()), node.params, strict=True):
                ops.insert(pos, key)
            self.emit(op, ops, out=out)
        elif op == "SpaceToDepth":
            bs = int(a["blocksize"])
            if a.get("mode", "DCR") == "DCR":
                self.emit(op, [x], {"blocksize": bs}, out=out)
            else:  # CRD (ONNX's SpaceToDepth has it from opset 28 only): the kernel's reshape-transpose-reshape
                _, c, h, w = self.shape()
                blocks = self.emit("Reshape", [x, self.const("blocks", np.int64([1, c, h // bs, bs, w // bs, bs]))])
                moved = self.emit("Transpose", [blocks], {"perm": (0, 1, 3, 5, 2, 4)})
                self.emit("Reshape", [moved, self.const("shape", np.int64([1, c * bs * bs, h // bs, w // bs]))],
                          out=out)
        elif op == "Pad":
            c0, c1 = a.get("channel_pads", (0, 0))
            value = float(a.get("value", 0.0))
            if c0 or c1:
                x = self.emit("Pad", [x, self.const("cpads", np.int64([0, c0, 0, 0, 0, c1, 0, 0])),
                                      self.const("value", np.float32(value))], {"mode": "constant"})
            self.adjust(x, a["pads"], a.get("mode", "constant"), value)
        elif op == "DepthToSpace":
            raw = self.emit(op, [x], {"blocksize": int(a["blocksize"]), "mode": a.get("mode", "DCR")})
            self.adjust(raw, a.get("pads", (0, 0, 0, 0)))
        elif op == "ConvTranspose":
            w, b = node.params
            raw = self.emit(op, [x, w], {"kernel_shape": tuple(a["kernel"]), "strides": tuple(a["strides"]),
                                         "dilations": tuple(a["dilations"]), "group": int(a.get("group", 1))})
            y = self.adjust(raw, a["pads"], out=f"{out}.adjusted")
            bias = self.emit("Reshape", [b, self.const("bias_shape", np.int64([1, -1, 1, 1]))])
            self.emit("Add", [y, bias], out=out)  # after the adjustment, as the kernel: added rows get the bias
        else:  # Resize
            self.adjust(self.resize(x), a["pads"])
        return self.nodes, self.consts

    def adjust(self, x: str, adj, mode: str = "constant", value: float = 0.0, out: str | None = None) -> str:
        """kernels._adjust: add rows/columns where `adj` is positive (Pad in `mode`), remove them where it is
        negative (Slice); writes `out` (default the node's output)."""
        out = out or self.node.output
        t, left, b, r = (int(v) for v in adj)
        pos, neg = [max(v, 0) for v in (t, left, b, r)], [max(-v, 0) for v in (t, left, b, r)]
        if any(pos):
            pin = [x, self.const("pads", np.int64([0, 0, pos[0], pos[1], 0, 0, pos[2], pos[3]]))]
            if mode == "constant":
                pin.append(self.const("value", np.float32(value)))
            x = self.emit("Pad", pin, {"mode": mode}, out=None if any(neg) else out)
        if any(neg):
            ends = [-neg[2] if neg[2] else _INT64_MAX, -neg[3] if neg[3] else _INT64_MAX]
            x = self.emit("Slice", [x, self.const("starts", np.int64(neg[:2])), self.const("ends", np.int64(ends)),
                                    self.const("axes", np.int64([2, 3]))], out=out)
        if x != out:
            self.emit("Identity", [x], out=out)
        return out

    def resize(self, x: str) -> str:
        """Resize's raw output on this input (kernels.resize before its adjustment). Integer scales with a
        coordinate mapping onnxruntime computes as the kernel does: ONNX Resize (one pass, 2-60x faster than the
        Gathers). Otherwise (other scales or mappings): the kernel's own source indices and weights
        (kernels._resize_axis) as Gathers and a blend, so every mode and scale gives the kernel's numbers."""
        from .kernels import _resize_axis, resize_out_len

        a = self.a
        shape = self.shape()
        hw = [resize_out_len(shape[2 + i], a["in_size"][i], a["sizes"][i], a["scales"][i]) for i in (0, 1)]
        ct = a.get("coordinate_transformation_mode", "half_pixel")
        integer = all(abs(sc - round(sc)) < 1e-9 and round(sc) >= 1 for sc in a["scales"])
        mode = a.get("mode", "nearest")
        # Integer scales put no source coordinate within float32 rounding of a rounding boundary, and a tie
        # (nearest, x.5) is exact in float32: onnxruntime picks the kernel's sources. Not so for align_corners'
        # (in-1)/(out-1) factor with nearest (a tie may round off), nor the deprecated tf_half_pixel_for_nn.
        native = ("half_pixel", "pytorch_half_pixel", "asymmetric") + (("align_corners",) if mode == "linear" else ())
        if integer and ct in native:
            scales = self.const("scales", np.float32([1, 1, *a["scales"]]))
            attrs = {"mode": mode, "coordinate_transformation_mode": ct}
            if mode == "nearest":
                attrs["nearest_mode"] = a.get("nearest_mode", "round_prefer_floor")
            return self.emit("Resize", [x, "", scales], attrs)
        (rl, rh, rw), (cl, ch, cw) = (_resize_axis(shape[2 + i], hw[i], a["scales"][i], a) for i in (0, 1))
        rows = [self.emit("Gather", [x, self.const(f"rows{k}", idx.astype(np.int64))], {"axis": 2})
                for k, idx in enumerate((rl, rh) if a.get("mode", "nearest") == "linear" else (rl,))]
        if len(rows) == 1:
            return self.emit("Gather", [rows[0], self.const("cols", cl.astype(np.int64))], {"axis": 3})
        cw32 = cw.astype(np.float32)
        rw32 = rw.astype(np.float32)[:, None]
        c_lo, c_hi = self.const("cols0", cl.astype(np.int64)), self.const("cols1", ch.astype(np.int64))
        w_l, w_h = self.const("cw0", 1 - cw32), self.const("cw1", cw32)

        def blend_cols(r: str) -> str:  # x[r][:, cl] * (1 - cw) + x[r][:, ch] * cw
            lo = self.emit("Mul", [self.emit("Gather", [r, c_lo], {"axis": 3}), w_l])
            return self.emit("Add", [lo, self.emit("Mul", [self.emit("Gather", [r, c_hi], {"axis": 3}), w_h])])

        top, bot = blend_cols(rows[0]), blend_cols(rows[1])
        return self.emit("Add", [self.emit("Mul", [top, self.const("rw0", 1 - rw32)]),
                                 self.emit("Mul", [bot, self.const("rw1", rw32)])])


def tile_shape(graph: Graph, tensor: str, region: Region) -> tuple[int, ...]:
    shape = tuple(graph.shapes[tensor])
    return (shape[0], shape[1], region.rows, region.cols) if is_spatial(shape) else shape


@dataclass(frozen=True)
class TaskModel:
    model: bytes
    inputs: dict[str, tuple[int, ...]]  # segment input -> tile shape fed
    outputs: dict[str, tuple[int, ...]]  # kept tensor -> tile shape returned

    def to_dict(self) -> dict:
        """For the worker: the model bytes and input/output names with shapes."""
        return {"model": self.model, "inputs": {k: list(v) for k, v in self.inputs.items()},
                "outputs": {k: list(v) for k, v in self.outputs.items()}}


def task_model(graph: Graph, deps: SegmentDeps, keep, *, external: str | None = None, opset: int = 17,
               whole_inputs: bool = False, slices=()) -> TaskModel:
    """The ONNX model of one tile's steps: inputs `deps.inputs`, outputs each kept tensor's `deps.regions`.

    external: the file name the weight blob will be known by (ONNX external data into the compact .bin);
        None inlines the weights.
    whole_inputs: take each input whole (cropped inside) even where the steps read less of it (a stride that
        never reaches the last column): for running a whole graph on a whole input.
    slices: (tensor, region) pairs also output, each cropped to the region inside the model and named
        `overlap.output_name(tensor, region)` (a task's overlap cross-checks: a few rows, not the whole tile).
    """
    nodes = {n.name: n for n in graph.nodes}
    check_lowerable(nodes[st.node] for st in deps.steps)
    have: dict[str, Region] = dict(deps.inputs)  # tensor -> region its current array holds
    if whole_inputs:
        have = {t: Region.full(*plane(graph.shapes[t])) for t in deps.inputs}
    inputs = dict(have)
    onodes: list[OnnxNode] = []
    consts: dict[str, np.ndarray] = {}
    used_weights: list[str] = []
    views: dict[tuple[str, Region], str] = {}

    def view(t: str, want: Region) -> str:
        """`t` cropped to `want` (a Slice unless it holds exactly that)."""
        if t not in have:  # read through a path the writer does not model (e.g. a distributed pool's partials)
            raise NotLowerable(f"{t} reaches this tile other than as a segment input")
        if not is_spatial(graph.shapes[t]) or have[t] == want:
            return t
        if not have[t].contains(want):
            raise ValueError(f"{t}: holds {have[t]}, a step reads {want}")
        key = (t, want)
        if key not in views:
            name = views[key] = f"{t}@{want.r0}_{want.r1}_{want.c0}_{want.c1}"
            (rs, cs) = want.relative_to(have[t])
            c = {f"{name}.starts": np.asarray([rs.start, cs.start], np.int64),
                 f"{name}.ends": np.asarray([rs.stop, cs.stop], np.int64),
                 f"{name}.axes": np.asarray([2, 3], np.int64)}
            consts.update(c)
            onodes.append(OnnxNode("Slice", [t, *c], [name], name=f"slice:{name}"))
        return views[key]

    for step in deps.steps:
        node = nodes[step.node]
        args = [view(t, r) for t, r in zip(node.inputs, step.ins, strict=True)]
        ons, c = lower_node(node, args, step.pads, tile_shape(graph, node.inputs[0], step.ins[0]))
        onodes += ons
        consts.update(c)
        used_weights += [p for p in node.params if p not in used_weights]
        have[node.output] = step.out
    keep = [t for t in keep if t in have and t not in inputs]
    if not keep:
        raise ValueError("the task keeps nothing it computes")
    sliced = {view(t, r): tile_shape(graph, t, r) for t, r in slices if t in have and t not in inputs}

    inits = [Initializer.from_array(k, v) for k, v in consts.items()]
    offsets = compact_offsets(graph)[0] if external else {}
    for k in used_weights:
        w = graph.weights[k]
        if external:
            if w.dtype != np.float32:
                raise TypeError(f"weight {k} is {w.dtype}; external weights must be float32")
            inits.append(Initializer(k, tuple(int(d) for d in w.shape), np.dtype(np.float32),
                                     external=External(external, offsets[k], int(w.nbytes))))
        else:
            inits.append(Initializer.from_array(k, w))
    ins = {t: tile_shape(graph, t, r) for t, r in inputs.items()}
    outs = {t: tile_shape(graph, t, have[t]) for t in keep} | sliced
    opset = _opset([nodes[st.node] for st in deps.steps], opset)
    return TaskModel(model_bytes(onodes, ins, outs, inits, opset=opset), ins, outs)


def nodes_model(graph: Graph, nodes, input_shapes: dict, outputs, *, external: str | None = None,
                output_shapes: dict | None = None, opset: int = 17) -> bytes:
    """A model of `nodes` run as they are (no tiling): inputs shaped by `input_shapes` (else the graph's), output
    shapes from `output_shapes` (else left to the engine). Nodes need not belong to the graph (a profile's
    probes), their weights must."""
    nodes = list(nodes)
    check_lowerable(nodes)
    onodes, inits, seen = [], [], set()
    offsets = compact_offsets(graph)[0] if external else {}
    shapes = {**graph.shapes, **input_shapes}
    for n in nodes:
        ons, consts = lower_node(n, in_shape=shapes.get(n.inputs[0]))
        onodes += ons
        for k, v in consts.items():
            if k not in seen:
                seen.add(k)
                inits.append(Initializer.from_array(k, v))
        for k in n.params:
            if k in seen:
                continue
            seen.add(k)
            w = graph.weights[k]
            inits.append(Initializer(k, tuple(int(d) for d in w.shape), np.dtype(np.float32),
                                     external=External(external, offsets[k], int(w.nbytes))) if external
                         else Initializer.from_array(k, w))
    ins = {t: tuple(input_shapes.get(t, graph.shapes.get(t))) for t in external_inputs(nodes)}
    outs = {t: (output_shapes or {}).get(t) for t in outputs}
    return model_bytes(onodes, ins, outs, inits, opset=_opset(nodes, opset))


def whole_deps(graph: Graph, nodes=None, outputs=None) -> SegmentDeps:
    """The steps of running `nodes` (default: the whole graph) untiled, for `outputs` (default: the last's)."""
    nodes = list(graph.nodes if nodes is None else nodes)
    outputs = outputs or [nodes[-1].output]
    return segment_deps(graph, nodes, {t: Region.full(*plane(graph.shapes[t])) for t in outputs})


def graph_model(graph: Graph, *, external: str | None = None) -> TaskModel:
    """The whole graph as one model (the single-device classifier, profiles)."""
    return task_model(graph, whole_deps(graph), [graph.output], external=external, whole_inputs=True)


def plan_task_models(graph: Graph, dplan, *, external: str | None = None, slices=None) -> list[TaskModel | None]:
    """One model per task of a `tiling.DevicePlan`, in task order (built at plan adoption); None for a task with
    an op `lower_node` does not write (that task runs on numpy). `slices[i]`: task i's overlap regions to output
    too (`DeviceRunner.check_slices`)."""
    out: list[TaskModel | None] = []
    for i, t in enumerate(dplan.tasks):
        if not t.deps.steps:  # nothing to compute (a distributed pool's result passes through)
            out.append(None)
            continue
        try:
            out.append(task_model(graph, t.deps, list(t.owned), external=external,
                                  slices=slices[i] if slices is not None else ()))
        except NotLowerable:
            out.append(None)
    return out
