"""The layer dependency table: which part of every tensor a tile needs, by backward region propagation.

Given a segment (consecutive nodes of a `graph.Graph`) and the region of each segment output that one
device must produce, `segment_deps` walks the nodes backwards and returns, for every node that has to
run, the output region it computes, the region of each input it reads and the per-tile padding to pass
to `kernels.run_node`, plus its MAC count. A tensor read by several nodes (a residual skip, a Concat
branch) gets the hull of all its consumers' needs. Regions are clipped to the tensor; what falls
outside is padding, which the kernel supplies from the `pads` we compute here (the node's true padding
at image borders, 0 at interior tile edges).

Global ops (GlobalAveragePool, Flatten, Reshape, Gemm, MatMul) need the whole input, so spatial tiling
ends there: a segment containing one can only be computed whole by a single device.

The module also finds cut points (where few activation tensors are live) and splits a graph into
segments. It needs only the fields of the IR dataclasses, never numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

from .graph import external_inputs
from .regions import EMPTY, Region, is_spatial, plane

WINDOW_OPS = frozenset({"Conv", "MaxPool", "AveragePool"})
ELEMENTWISE_OPS = frozenset({"Clip", "Relu", "Add", "Mul", "Sigmoid", "HardSwish", "Sub", "Div", "Identity"})
GLOBAL_OPS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape", "Gemm", "MatMul"})


def window_attrs(
    node, graph
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int, int, int], tuple[int, int]]:
    """(kernel, strides, pads, dilations) of a Conv/MaxPool/AveragePool node, with ONNX defaults."""
    a = node.attrs
    kernel = a.get("kernel")
    if kernel is None and node.op == "Conv":
        kernel = tuple(graph.weights[node.params[0]].shape[2:])
    kh, kw = (int(k) for k in kernel)
    sh, sw = (int(s) for s in a.get("strides", (1, 1)))
    pt, pl, pb, pr = (int(p) for p in a.get("pads", (0, 0, 0, 0)))
    dh, dw = (int(d) for d in a.get("dilations", (1, 1)))
    return (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw)


def window_input_region(out: Region, kernel, strides, pads, dilations) -> Region:
    """Unclipped input rows/cols read by output region `out` (negative or past the end means padding)."""
    (kh, kw), (sh, sw), (pt, pl, _, _), (dh, dw) = kernel, strides, pads, dilations
    return Region(
        out.r0 * sh - pt,
        (out.r1 - 1) * sh - pt + (kh - 1) * dh + 1,
        out.c0 * sw - pl,
        (out.c1 - 1) * sw - pl + (kw - 1) * dw + 1,
    )


@dataclass(frozen=True)
class NodeStep:
    """One node's share of a tile: compute `out` of its output from `ins` (one region per input)."""

    node: str
    out: Region
    ins: tuple[Region, ...]
    pads: tuple[int, int, int, int] | None  # per-tile padding for window ops, None otherwise
    macs: int

    def to_dict(self) -> dict:
        return {
            "node": self.node,
            "out": self.out.to_list(),
            "ins": [r.to_list() for r in self.ins],
            "pads": list(self.pads) if self.pads is not None else None,
            "macs": self.macs,
        }

    @classmethod
    def from_dict(cls, d: dict) -> NodeStep:
        return cls(
            d["node"],
            Region.from_list(d["out"]),
            tuple(Region.from_list(r) for r in d["ins"]),
            tuple(int(p) for p in d["pads"]) if d["pads"] is not None else None,
            int(d["macs"]),
        )


@dataclass(frozen=True)
class SegmentDeps:
    """The dependency table of one tile of one segment."""

    steps: tuple[NodeStep, ...]  # topological order; nodes whose output nobody needs are absent
    regions: dict[str, Region]  # every tensor involved -> region computed (inside) or needed (inputs)
    inputs: dict[str, Region]  # segment inputs -> region needed, clipped to the tensor

    @property
    def macs(self) -> int:
        return sum(s.macs for s in self.steps)

    def to_dict(self) -> dict:
        return {
            "steps": [s.to_dict() for s in self.steps],
            "regions": {k: v.to_list() for k, v in self.regions.items()},
            "inputs": {k: v.to_list() for k, v in self.inputs.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> SegmentDeps:
        return cls(
            tuple(NodeStep.from_dict(s) for s in d["steps"]),
            {k: Region.from_list(v) for k, v in d["regions"].items()},
            {k: Region.from_list(v) for k, v in d["inputs"].items()},
        )


def node_macs(node, graph, out: Region) -> int:
    """Multiply-accumulates (or, for pools and elementwise ops, element operations) to compute `out`."""
    if out.empty:
        return 0
    oshape = graph.shapes[node.output]
    op = node.op
    if op == "Conv":
        w = graph.weights[node.params[0]]
        cout, cin_g, kh, kw = w.shape
        return out.area * int(cout) * int(cin_g) * int(kh) * int(kw)
    if op in ("MaxPool", "AveragePool"):
        (kh, kw), *_ = window_attrs(node, graph)
        return out.area * int(oshape[1]) * kh * kw
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        ishape = graph.shapes[node.inputs[0]]
        return int(ishape[1]) * int(ishape[2]) * int(ishape[3])
    if op in ("Gemm", "MatMul"):
        if node.params:
            w = graph.weights[node.params[0]]
            return int(w.size)
        a, b = (graph.shapes[t] for t in node.inputs[:2])
        return int(a[-1]) * int(b[-1]) * int(a[-2]) if len(a) >= 2 else 0
    if op in ("Flatten", "Reshape", "Concat", "Identity"):
        return 0
    channels = int(oshape[1]) if len(oshape) >= 2 else 1
    return out.area * channels


def node_input_needs(
    node, graph, out: Region, clip: bool = True
) -> tuple[tuple[Region, ...], tuple[int, int, int, int] | None]:
    """Clipped region of each input that `node` reads to produce `out`, and its per-tile pads.

    With clip=False window ops return the raw footprint (padding included) and no pads: only for
    receptive-field arithmetic, never for execution.
    """
    op = node.op
    in_shapes = [graph.shapes[t] for t in node.inputs]
    if op in WINDOW_OPS:
        kernel, strides, pads, dil = window_attrs(node, graph)
        h, w = plane(in_shapes[0])
        want = window_input_region(out, kernel, strides, pads, dil)
        if not clip:
            return (want,), None
        got = want.clip(h, w)
        if got.empty:
            raise ValueError(f"{node.name}: output {out} reads only padding")
        tile_pads = (got.r0 - want.r0, got.c0 - want.c0, want.r1 - got.r1, want.c1 - got.c1)
        return (got,), tile_pads
    if op in GLOBAL_OPS:
        return tuple(Region.full(*plane(s)) for s in in_shapes), None
    if op in ELEMENTWISE_OPS or op == "Concat":
        if op == "Concat" and is_spatial(graph.shapes[node.output]):
            axis = int(node.attrs.get("axis", 1))
            if axis not in (1, -3):
                raise NotImplementedError(f"{node.name}: Concat along spatial axis {axis}")
        oh, ow = plane(graph.shapes[node.output])
        ins = []
        for s in in_shapes:
            h, w = plane(s)
            # A broadcast operand (e.g. a squeeze-excite scale of shape (1,C,1,1)) is read whole.
            ins.append(out if (h, w) == (oh, ow) else Region.full(h, w))
        return tuple(ins), None
    raise NotImplementedError(f"{node.name}: no dependency rule for op {op}")


def segment_deps(graph, nodes, out_regions: dict[str, Region], clip: bool = True) -> SegmentDeps:
    """Backward-propagate `out_regions` (tensor -> region wanted) through `nodes` (topological order).

    Tensors not produced by `nodes` are the segment inputs; their needed regions are returned in
    `inputs`. A wanted region is clipped to its tensor; an empty region asks for nothing.
    """
    produced = {n.output for n in nodes}
    need: dict[str, Region] = {}
    for t, r in out_regions.items():
        if t not in produced:
            raise ValueError(f"{t} is not produced by this segment")
        if clip:
            r = r.clip(*plane(graph.shapes[t]))
        if not r.empty:
            need[t] = need.get(t, EMPTY).hull(r)
    steps: list[NodeStep] = []
    for node in reversed(nodes):
        out = need.get(node.output, EMPTY)
        if out.empty:
            continue
        ins, pads = node_input_needs(node, graph, out, clip)
        for t, r in zip(node.inputs, ins, strict=True):
            need[t] = need.get(t, EMPTY).hull(r)
        steps.append(NodeStep(node.name, out, ins, pads, node_macs(node, graph, out)))
    steps.reverse()
    inputs = {t: r for t, r in need.items() if t not in produced}
    return SegmentDeps(tuple(steps), need, inputs)


# ---------------------------------------------------------------------------------------------------
# Segments and cut points


@dataclass(frozen=True)
class Segment:
    index: int
    start: int  # index of the first node in graph.nodes
    stop: int  # one past the last node
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]  # consumed here, produced earlier (or the graph input), in first-use order
    outputs: tuple[str, ...]  # produced here and consumed later, or the graph output

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "start": self.start,
            "stop": self.stop,
            "nodes": list(self.nodes),
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Segment:
        return cls(
            int(d["index"]),
            int(d["start"]),
            int(d["stop"]),
            tuple(d["nodes"]),
            tuple(d["inputs"]),
            tuple(d["outputs"]),
        )


def live_tensors(graph, k: int) -> tuple[str, ...]:
    """Tensors alive across the cut before graph.nodes[k]: produced before it, consumed at or after it."""
    before = {graph.input} | {n.output for n in graph.nodes[:k]}
    after_uses = [t for n in graph.nodes[k:] for t in n.inputs]
    if graph.output in before and k < len(graph.nodes):
        after_uses.append(graph.output)
    seen: list[str] = []
    for t in after_uses:
        if t in before and t not in seen:
            seen.append(t)
    return tuple(seen)


def cut_candidates(graph, max_live: int = 1) -> list[int]:
    """Node indices k (0 < k < len) where at most `max_live` tensors cross the cut (MobileNetV2: between
    inverted-residual blocks exactly one does)."""
    return [k for k in range(1, len(graph.nodes)) if len(live_tensors(graph, k)) <= max_live]


def make_segments(graph, cuts) -> list[Segment]:
    """Split graph.nodes at the given node indices into consecutive segments."""
    bounds = [0] + sorted(set(int(c) for c in cuts)) + [len(graph.nodes)]
    if bounds[1] <= 0 or bounds[-2] >= len(graph.nodes):
        raise ValueError(f"cuts must lie strictly inside 0..{len(graph.nodes)}: {cuts!r}")
    segs = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if a == b:
            continue
        nodes = graph.nodes[a:b]
        inputs = external_inputs(nodes)
        later = {t for n in graph.nodes[b:] for t in n.inputs} | {graph.output}
        outputs = tuple(n.output for n in nodes if n.output in later)
        segs.append(Segment(len(segs), a, b, tuple(n.name for n in nodes), tuple(inputs), outputs))
    return segs


def segment_is_spatial(graph, seg: Segment) -> bool:
    """True if the segment can be tiled: no global op and all its outputs are NCHW."""
    by_name = {n.name: n for n in graph.nodes}
    return all(by_name[n].op not in GLOBAL_OPS for n in seg.nodes) and all(
        is_spatial(graph.shapes[t]) for t in seg.outputs
    )


def input_halo(graph, tensor: str, nodes=None) -> tuple[int, int]:
    """(cumulative stride, receptive-field halo in graph-input pixels) of `tensor`.

    The halo is how far past its own footprint (rows r*stride .. (r+1)*stride) a single interior pixel of
    `tensor` reaches into the graph input, maximised over the four sides. Computed on the real
    dependency table, so it includes every branch feeding the tensor.
    """
    nodes = list(graph.nodes if nodes is None else nodes)
    upto = next(i for i, n in enumerate(nodes) if n.output == tensor) + 1
    h, w = plane(graph.shapes[tensor])
    ih, _ = plane(graph.shapes[graph.input])
    stride = max(1, round(ih / h))
    r, c = h // 2, w // 2
    # Unclipped: at stride 16 the footprint is larger than a 224 image, and clipping would hide that.
    d = segment_deps(graph, nodes[:upto], {tensor: Region(r, r + 1, c, c + 1)}, clip=False)
    got = d.inputs.get(graph.input, EMPTY)
    halo = max(
        r * stride - got.r0, got.r1 - (r + 1) * stride, c * stride - got.c0, got.c1 - (c + 1) * stride, 0
    )
    return stride, halo
