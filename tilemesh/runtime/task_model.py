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

`lower_node` is the one place that maps an IR node to ONNX; it is generic: attributes pass through under their
ONNX names (only `kernel` is renamed), params become inputs after the activations, and the few normalized forms
of the importer go back (Clip's bounds and Reshape's shape as constant inputs, a constant operand's position).
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
# The IR ops `lower_node` writes (their IR attributes are ONNX's, up to the normalizations undone below). Other
# ops (the importer keeps gaining them) raise `NotLowerable`: that task runs on numpy instead, per task.
ENGINE_OPS = frozenset({
    "Conv", "Clip", "Relu", "Add", "Mul", "Sub", "Div", "Sigmoid", "HardSwish", "MaxPool", "AveragePool",
    "GlobalAveragePool", "Flatten", "Reshape", "Gemm", "MatMul", "Concat",
    # Elementwise activations whose IR attributes (alpha, beta) and params (PRelu's slope) are ONNX's as they are.
    "PRelu", "HardSigmoid", "LeakyRelu", "Elu", "Tanh", "Softplus",
})


class NotLowerable(ValueError):
    """A node this writer does not lower to ONNX; the caller computes it with numpy."""


def check_lowerable(nodes) -> None:
    bad = sorted({n.op for n in nodes if n.op not in ENGINE_OPS})
    if bad:
        raise NotLowerable(f"no ONNX lowering for {', '.join(bad)}")
# Window ops whose `dilations` attribute ONNX only knows from a later opset (AveragePool: 19): left out at (1, 1).
_DEFAULT_DILATIONS_DROPPED = frozenset({"MaxPool", "AveragePool"})


def lower_node(node: Node, inputs: list[str] | None = None, pads=None) -> tuple[OnnxNode, dict[str, np.ndarray]]:
    """The ONNX node for IR `node` reading `inputs` (default: its own), with `pads` overriding its padding.

    Returns the node and the small constants it needs as initializers (name -> array); weights (`node.params`)
    are referenced by their graph names.
    """
    attrs = dict(node.attrs)
    if pads is not None:
        attrs["pads"] = tuple(int(p) for p in pads)
    ins = list(node.inputs if inputs is None else inputs)
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
    return OnnxNode(node.op, ins + params, [node.output], onnx_attrs, name=node.name), consts


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
               whole_inputs: bool = False) -> TaskModel:
    """The ONNX model of one tile's steps: inputs `deps.inputs`, outputs each kept tensor's `deps.regions`.

    external: the file name the weight blob will be known by (ONNX external data into the compact .bin);
        None inlines the weights.
    whole_inputs: take each input whole (cropped inside) even where the steps read less of it (a stride that
        never reaches the last column): for running a whole graph on a whole input.
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
    slices: dict[tuple[str, Region], str] = {}

    def view(t: str, want: Region) -> str:
        """`t` cropped to `want` (a Slice unless it holds exactly that)."""
        if t not in have:  # read through a path the writer does not model (e.g. a distributed pool's partials)
            raise NotLowerable(f"{t} reaches this tile other than as a segment input")
        if not is_spatial(graph.shapes[t]) or have[t] == want:
            return t
        if not have[t].contains(want):
            raise ValueError(f"{t}: holds {have[t]}, a step reads {want}")
        key = (t, want)
        if key not in slices:
            name = slices[key] = f"{t}@{want.r0}_{want.r1}_{want.c0}_{want.c1}"
            (rs, cs) = want.relative_to(have[t])
            c = {f"{name}.starts": np.asarray([rs.start, cs.start], np.int64),
                 f"{name}.ends": np.asarray([rs.stop, cs.stop], np.int64),
                 f"{name}.axes": np.asarray([2, 3], np.int64)}
            consts.update(c)
            onodes.append(OnnxNode("Slice", [t, *c], [name], name=f"slice:{name}"))
        return slices[key]

    for step in deps.steps:
        node = nodes[step.node]
        args = [view(t, r) for t, r in zip(node.inputs, step.ins, strict=True)]
        onode, c = lower_node(node, args, step.pads)
        onodes.append(onode)
        consts.update(c)
        used_weights += [p for p in node.params if p not in used_weights]
        have[node.output] = step.out
    keep = [t for t in keep if t in have and t not in inputs]
    if not keep:
        raise ValueError("the task keeps nothing it computes")

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
    outs = {t: tile_shape(graph, t, have[t]) for t in keep}
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
    for n in nodes:
        onode, consts = lower_node(n)
        onodes.append(onode)
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
    return model_bytes(onodes, ins, outs, inits, opset=opset)


def whole_deps(graph: Graph, nodes=None, outputs=None) -> SegmentDeps:
    """The steps of running `nodes` (default: the whole graph) untiled, for `outputs` (default: the last's)."""
    nodes = list(graph.nodes if nodes is None else nodes)
    outputs = outputs or [nodes[-1].output]
    return segment_deps(graph, nodes, {t: Region.full(*plane(graph.shapes[t])) for t in outputs})


def graph_model(graph: Graph, *, external: str | None = None) -> TaskModel:
    """The whole graph as one model (the single-device classifier, profiles)."""
    return task_model(graph, whole_deps(graph), [graph.output], external=external, whole_inputs=True)


def plan_task_models(graph: Graph, dplan, *, external: str | None = None) -> list[TaskModel | None]:
    """One model per task of a `tiling.DevicePlan`, in task order (built at plan adoption); None for a task with
    an op `lower_node` does not write (that task runs on numpy)."""
    out: list[TaskModel | None] = []
    for t in dplan.tasks:
        if not t.deps.steps:  # nothing to compute (a distributed pool's result passes through)
            out.append(None)
            continue
        try:
            out.append(task_model(graph, t.deps, list(t.owned), external=external))
        except NotLowerable:
            out.append(None)
    return out
