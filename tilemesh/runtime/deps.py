"""The layer dependency table: which part of every tensor a tile needs, by backward region propagation.

Given a segment (consecutive nodes of a `graph.Graph`) and the region of each segment output that one
device must produce, `segment_deps` walks the nodes backwards and returns, for every node that has to
run, the output region it computes, the region of each input it reads and the per-tile padding to pass
to `kernels.run_node`, plus its MAC count. A tensor read by several nodes (a residual skip, a Concat
branch) gets the hull of all its consumers' needs. Regions are clipped to the tensor; what falls
outside is padding, which the kernel supplies from the `pads` we compute here (the node's true padding
at image borders, 0 at interior tile edges).

Op families and their rules:
* window ops (Conv, MaxPool, AveragePool, SpaceToDepth): an output region reads the hull of its taps;
  the step carries per-tile zero/-inf padding for the parts that fall outside the image;
* channel-local ops (activations, PRelu, LRN, channel Softmax, channel Gather, Add/Mul/Sum/Max/Min/...,
  Concat on channels): the output region reads the same region of every input (a broadcast operand of
  1x1 plane, e.g. a squeeze-excite scale, is read whole);
* resampling ops (Pad, Resize, ConvTranspose, DepthToSpace): the region maps through the op's geometry
  (scaled by a Resize factor, a ConvTranspose stride or a DepthToSpace block); the step's `pads` is then
  the adjustment that turns the op's raw output on that input into the wanted region (see `kernels`);
* global ops (GlobalAveragePool, GlobalMaxPool, Flatten, Reshape, Gemm, MatMul, Softmax over H or W)
  need the whole input, so spatial tiling ends there: a segment containing one can only be computed
  whole by a single device.

The module also finds cut points (where few activation tensors are live) and splits a graph into
segments. It needs only the fields of the IR dataclasses, never numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .graph import external_inputs
from .regions import EMPTY, Region, is_spatial, plane

WINDOW_OPS = frozenset({"Conv", "MaxPool", "AveragePool"})
ELEMENTWISE_OPS = frozenset({
    "Clip", "Relu", "Add", "Mul", "Sigmoid", "HardSwish", "Sub", "Div", "Identity",
    "LeakyRelu", "Elu", "Selu", "HardSigmoid", "Tanh", "Softplus", "Softsign", "Abs", "Neg", "Exp", "PRelu",
    "LRN", "Gather", "Sum", "Max", "Min", "Mean", "Softmax", "LogSoftmax",
})
RESAMPLING_OPS = frozenset({"Pad", "Resize", "ConvTranspose", "DepthToSpace"})
GLOBAL_OPS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape", "Gemm", "MatMul"})


def is_global(node, graph) -> bool:
    """Whether `node` needs the whole of its input whatever output region is wanted (ends spatial tiling)."""
    if node.op in GLOBAL_OPS:
        return True
    if node.op in ("Softmax", "LogSoftmax") and len(graph.shapes[node.inputs[0]]) == 4:
        return node.attrs.get("legacy", False) or node.attrs.get("axis", -1) % 4 != 1
    return False


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pad_axis(a: int, b: int, n: int, p0: int, mode: str) -> tuple[int, int, int]:
    """Pad along one axis: (input lo, input hi, raw output start) for output [a, b) of an n-long input."""
    lo, hi = max(a - p0, 0), min(b - p0, n)
    need = [(lo, hi)] if lo < hi else []
    if a < p0:  # top padding: reflect reads rows 1..p0-a, edge and constant row 0 (kept so the tile is not empty)
        need.append((0, min(p0 - a + 1, n) if mode == "reflect" else 1))
    if b > p0 + n:
        if mode == "reflect":
            need.append((max(2 * (n - 1) - (b - 1 - p0), 0), n))
        else:
            need.append((n - 1, n))
    i0, i1 = min(x for x, _ in need), max(y for _, y in need)
    return i0, i1, i0 + p0


def _resize_src(y: int, n_in: int, n_out: int, scale: float, a) -> tuple[int, int]:
    """Lowest and highest input index read by Resize output position y (ONNX formulas, pure Python)."""
    import math

    ct = a.get("coordinate_transformation_mode", "half_pixel")
    if ct == "asymmetric":
        x = y / scale
    elif ct == "tf_half_pixel_for_nn":
        x = (y + 0.5) / scale
    elif ct == "align_corners":
        x = y * (n_in - 1) / (n_in * scale - 1) if n_out > 1 else 0.0
    elif ct == "pytorch_half_pixel" and n_out <= 1:
        x = 0.0
    else:
        x = (y + 0.5) / scale - 0.5
    if a.get("mode", "nearest") == "nearest":
        nm = a.get("nearest_mode", "round_prefer_floor")
        i = {"round_prefer_floor": lambda v: math.ceil(v - 0.5), "round_prefer_ceil": lambda v: math.floor(v + 0.5),
             "floor": math.floor, "ceil": math.ceil}[nm](x)
        i = min(max(i, 0), n_in - 1)
        return i, i
    x = min(max(x, 0.0), n_in - 1)
    lo = math.floor(x)
    return lo, min(lo + 1, n_in - 1)


def _resample_axis(node, axis: int, a: int, b: int, n: int) -> tuple[int, int, int, int]:
    """(input lo, input hi, raw output start, raw output end) of a resampling op along one spatial axis for
    output [a, b) of an n-long input; the raw output is what the op makes from exactly that input."""
    at = node.attrs
    if node.op == "Pad":
        i0, i1, r0 = _pad_axis(a, b, n, at["pads"][axis], at.get("mode", "constant"))
        return i0, i1, r0, r0 + (i1 - i0)
    if node.op == "DepthToSpace":
        bs = int(at["blocksize"])
        i0, i1 = a // bs, min(_ceil_div(b, bs), n)
        return i0, i1, i0 * bs, i1 * bs
    if node.op == "Resize":
        scale, n_out = at["scales"][axis], at["sizes"][axis]
        s = round(scale)
        if abs(scale - s) > 1e-9 or s < 1 or at.get("coordinate_transformation_mode") == "align_corners":
            return 0, n, 0, n_out  # not translation-equivariant: the whole axis, cropped
        # The sources of [a, b), and the input rows whose raw output covers [a, b) at all.
        i0 = min(_resize_src(a, n, n_out, scale, at)[0], a // s)
        i1 = min(max(_resize_src(b - 1, n, n_out, scale, at)[1] + 1, _ceil_div(b, s)), n)
        return i0, i1, i0 * s, i1 * s
    # ConvTranspose: input i adds to raw rows i*s + t*d; raw row z is output row z - begin.
    k = node.attrs["kernel"][axis]
    s, d = at["strides"][axis], at["dilations"][axis]
    begin = -at["pads"][axis]
    z0, z1 = a + begin, b + begin
    i0 = max(_ceil_div(z0 - (k - 1) * d, s), 0)
    i1 = min((z1 - 1) // s, n - 1) + 1
    if i0 >= i1:  # no input reaches these rows (output padding, or gaps of a kernel smaller than its stride)
        i0 = min(max((z1 - 1) // s, 0), n - 1)
        i1 = i0 + 1
    return i0, i1, i0 * s - begin, (i1 - 1) * s + (k - 1) * d + 1 - begin


def resample_rule(node, graph, out: Region) -> tuple[Region, tuple[int, int, int, int]]:
    """Input region a resampling op reads for output region `out`, and the adjustment (top, left, bottom,
    right) that turns its raw output on that input into exactly `out` (positive: add, negative: remove)."""
    h, w = plane(graph.shapes[node.inputs[0]])
    ri0, ri1, rr0, rr1 = _resample_axis(node, 0, out.r0, out.r1, h)
    ci0, ci1, cr0, cr1 = _resample_axis(node, 1, out.c0, out.c1, w)
    return Region(ri0, ri1, ci0, ci1), (rr0 - out.r0, cr0 - out.c0, out.r1 - rr1, out.c1 - cr1)


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
    # Global pools computed as distributed reductions: pooled tensor -> (pooled input, "mean" or "max",
    # this device's own part of the input or None). The pooled tensor is then an input of the segment,
    # assembled from every owner's partial (see `tiling.task_inputs`); its pool node is not a step.
    reduced: dict[str, tuple] = field(default_factory=dict)

    @property
    def macs(self) -> int:
        return sum(s.macs for s in self.steps)

    def to_dict(self) -> dict:
        d = {
            "steps": [s.to_dict() for s in self.steps],
            "regions": {k: v.to_list() for k, v in self.regions.items()},
            "inputs": {k: v.to_list() for k, v in self.inputs.items()},
        }
        if self.reduced:
            d["reduced"] = {p: [x, kind, own.to_list() if own else None] for p, (x, kind, own) in self.reduced.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SegmentDeps:
        return cls(
            tuple(NodeStep.from_dict(s) for s in d["steps"]),
            {k: Region.from_list(v) for k, v in d["regions"].items()},
            {k: Region.from_list(v) for k, v in d["inputs"].items()},
            {p: (x, kind, Region.from_list(own) if own else None)
             for p, (x, kind, own) in d.get("reduced", {}).items()},
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
    if op == "ConvTranspose":
        cin, cout_g, kh, kw = graph.weights[node.params[0]].shape
        return resample_rule(node, graph, out)[0].area * int(cin) * int(cout_g) * int(kh) * int(kw)
    if op == "LRN":
        return out.area * int(oshape[1]) * (int(node.attrs["size"]) + 3)
    if op in ("Gather", "Pad", "DepthToSpace", "SpaceToDepth"):
        return 0
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
    if is_global(node, graph):
        return tuple(Region.full(*plane(s)) for s in in_shapes), None
    if op in RESAMPLING_OPS:
        want, adj = resample_rule(node, graph, out)
        if not clip:
            return (want,), None
        return (want,), adj
    if op == "SpaceToDepth":
        bs = int(node.attrs["blocksize"])
        return (Region(out.r0 * bs, out.r1 * bs, out.c0 * bs, out.c1 * bs),), None
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
    inside = {n.name for n in nodes}
    read_outside = {t for n in graph.nodes if n.name not in inside for t in n.inputs} | {graph.output}
    reduced: dict[str, tuple] = {}
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
        kind = reduction_kind(node, graph)
        # Reduced only when the pooled vector stays inside the segment: a segment output is shipped as
        # ordinary pieces, which must never share a store with the partials (their regions are the owners').
        if kind and node.inputs[0] not in produced and node.output not in read_outside:
            reduced[node.output] = (node.inputs[0], kind, None)
            continue
        ins, pads = node_input_needs(node, graph, out, clip)
        for t, r in zip(node.inputs, ins, strict=True):
            need[t] = need.get(t, EMPTY).hull(r)
        steps.append(NodeStep(node.name, out, ins, pads, node_macs(node, graph, out)))
    steps.reverse()
    inputs = {t: r for t, r in need.items() if t not in produced or t in reduced}
    return SegmentDeps(tuple(steps), need, inputs, reduced)


def reduction_kind(node, graph) -> str | None:
    """"mean"/"max" for a global pool that can run as a distributed reduction: every owner of its input
    pools its own part and the partial results (C floats each) are combined. None for anything else.
    The graph input is never reduced this way (the device holding the camera frame pools it whole)."""
    if node.op in ("GlobalAveragePool", "GlobalMaxPool") and node.inputs[0] != graph.input:
        return "mean" if node.op == "GlobalAveragePool" else "max"
    return None


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
    """True if the segment can be tiled: all its outputs are NCHW, and every global op in it is either a pool
    of a segment input (a distributed reduction, e.g. a squeeze-excite block's) or reads only 1x1 planes
    (the excitation MLP, which every device computes whole)."""
    by_name = {n.name: n for n in graph.nodes}
    for name in seg.nodes:
        n = by_name[name]
        if not is_global(n, graph):
            continue
        if reduction_kind(n, graph) and n.inputs[0] in seg.inputs:
            continue
        if all(plane(graph.shapes[t]) == (1, 1) for t in n.inputs):
            continue
        return False
    return all(is_spatial(graph.shapes[t]) for t in seg.outputs)


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
