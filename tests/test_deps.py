"""Region arithmetic, splits, and the layer dependency table (backward region propagation).

Hand-built graphs pin down the rules (residual union, concat, broadcast operands, global ops, border
pads); property tests check the window formula against brute-force tap enumeration, that the needed
region is sufficient (changing input outside it leaves the tile unchanged) and tight (changing any
edge row or column of it changes the tile).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemesh.runtime.deps import (
    SegmentDeps,
    cut_candidates,
    input_halo,
    live_tensors,
    make_segments,
    node_macs,
    segment_deps,
    segment_is_spatial,
    window_input_region,
)
from tilemesh.runtime.executor import run_graph
from tilemesh.runtime.graph import Graph, Node, node_flops
from tilemesh.runtime.regions import EMPTY, Region, check_partition, grid_split, row_split, whole

SETTINGS = settings(max_examples=50, deadline=None)

regions = st.builds(
    lambda r0, dr, c0, dc: Region(r0, r0 + dr, c0, c0 + dc),
    st.integers(-5, 10),
    st.integers(0, 8),
    st.integers(-5, 10),
    st.integers(0, 8),
)


def cells(r: Region) -> set[tuple[int, int]]:
    return {(i, j) for i in range(r.r0, r.r1) for j in range(r.c0, r.c1)}


# ---------------------------------------------------------------------------------------------------
# Regions


@SETTINGS
@given(regions, regions)
def test_region_set_semantics(a, b):
    assert cells(a.intersect(b)) == cells(a) & cells(b)
    assert a.intersect(b).area == len(cells(a) & cells(b))
    h = a.hull(b)
    assert cells(a) | cells(b) <= cells(h)
    assert h.contains(a) and h.contains(b)
    if not a.empty and not b.empty:
        # The hull is the smallest such rectangle: each side touches one of the two.
        assert h.r0 in (a.r0, b.r0) and h.r1 in (a.r1, b.r1) and h.c0 in (a.c0, b.c0) and h.c1 in (a.c1, b.c1)
    assert cells(a.clip(6, 7)) == cells(a) & cells(Region(0, 6, 0, 7))
    assert Region.from_list(json.loads(json.dumps(a.to_list()))) == a


def test_empty_hull_is_identity():
    r = Region(2, 5, 1, 3)
    assert EMPTY.hull(r) == r and r.hull(EMPTY) == r
    assert Region(3, 1, 0, 4).empty and Region(3, 1, 0, 4).area == 0


@SETTINGS
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.lists(st.integers(1, 9), min_size=1, max_size=4),
    st.lists(st.integers(1, 9), min_size=1, max_size=4),
)
def test_grid_split_partitions(h, w, rs, cs):
    devs = [[f"d{i}{j}" for j in range(len(cs))] for i in range(len(rs))]
    part = grid_split(h, w, devs, rs, cs)
    check_partition(part, h, w)
    for i, row in enumerate(devs):
        for j, d in enumerate(row):
            if d in part:
                # Within one cell of the exact proportional share.
                assert abs(part[d].rows - h * rs[i] / sum(rs)) < 1
                assert abs(part[d].cols - w * cs[j] / sum(cs)) < 1


def test_row_split_uneven_shares():
    assert row_split(10, 4, {"a": 50, "b": 30, "c": 20}) == {
        "a": Region(0, 5, 0, 4),
        "b": Region(5, 8, 0, 4),
        "c": Region(8, 10, 0, 4),
    }
    part = row_split(224, 224, {"a": 50, "b": 30, "c": 20})
    assert [r.rows for r in part.values()] == [112, 67, 45]
    assert whole(7, 7, "x") == {"x": Region(0, 7, 0, 7)}
    # A 3x3 grid of a 2x2 tensor leaves some devices without a cell.
    assert len(grid_split(2, 2, [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]])) == 4


def test_check_partition_rejects_overlap_and_gaps():
    with pytest.raises(ValueError, match="overlap"):
        check_partition({"a": Region(0, 3, 0, 4), "b": Region(2, 4, 0, 4)}, 4, 4)
    with pytest.raises(ValueError, match="cover"):
        check_partition({"a": Region(0, 3, 0, 4)}, 4, 4)


# ---------------------------------------------------------------------------------------------------
# Window arithmetic


@SETTINGS
@given(
    k=st.integers(1, 5),
    s=st.integers(1, 3),
    d=st.integers(1, 3),
    p0=st.integers(0, 4),
    o0=st.integers(0, 6),
    n=st.integers(1, 5),
)
def test_window_region_is_hull_of_taps(k, s, d, p0, o0, n):
    out = Region(o0, o0 + n, 0, 1)
    got = window_input_region(out, (k, 1), (s, 1), (p0, 0, 0, 0), (d, 1))
    taps = {o * s - p0 + j * d for o in range(o0, o0 + n) for j in range(k)}
    assert (got.r0, got.r1) == (min(taps), max(taps) + 1)


# ---------------------------------------------------------------------------------------------------
# Hand-built graphs


class G:
    """Tiny graph builder over the real IR dataclasses."""

    def __init__(self, c=2, h=8, w=8, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.weights, self.shapes = [], {}, {"x": (1, c, h, w)}

    def node(self, op, inputs, shape, attrs=None, params=()):
        name = f"n{len(self.nodes)}_{op.lower()}"
        self.nodes.append(Node(name, op, tuple(inputs), name, attrs or {}, tuple(params)))
        self.shapes[name] = tuple(shape)
        return name

    def conv(self, x, cout, k=3, s=1, p=None, d=1, group=1):
        _, c, h, w = self.shapes[x]
        p = ((k - 1) * d // 2,) * 4 if p is None else p
        oh = (h + p[0] + p[2] - (k - 1) * d - 1) // s + 1
        ow = (w + p[1] + p[3] - (k - 1) * d - 1) // s + 1
        wn = f"w{len(self.nodes)}"
        self.weights[wn] = self.rng.standard_normal((cout, c // group, k, k)).astype(np.float32)
        self.weights[wn + "b"] = self.rng.standard_normal(cout).astype(np.float32)
        attrs = {"kernel": (k, k), "strides": (s, s), "pads": tuple(p), "dilations": (d, d), "group": group}
        return self.node("Conv", [x], (1, cout, oh, ow), attrs, (wn, wn + "b"))

    def graph(self, out):
        return Graph(list(self.nodes), "x", out, dict(self.shapes), dict(self.weights))


def test_residual_add_needs_union_of_skip_and_branch():
    g = G(h=12, w=12)
    a = g.conv("x", 4)
    b = g.conv(a, 2)
    y = g.node("Add", ["x", b], g.shapes["x"])
    graph = g.graph(y)
    d = segment_deps(graph, graph.nodes, {y: Region(4, 6, 5, 7)})
    # Skip needs x at the output region; the branch (two 3x3 convs) needs 2 more on each side.
    assert d.inputs == {"x": Region(2, 8, 3, 9)}
    assert d.regions[a] == Region(3, 7, 4, 8)
    assert [s.node for s in d.steps] == [n.name for n in graph.nodes]
    assert all(s.pads == (0, 0, 0, 0) for s in d.steps if s.pads is not None)


def test_border_tile_gets_true_padding_and_interior_edges_zero():
    g = G(h=8, w=8)
    y = g.conv("x", 3, k=3, p=(1, 2, 1, 0))
    graph = g.graph(y)
    assert graph.shapes[y] == (1, 3, 8, 8)
    (step,) = segment_deps(graph, graph.nodes, {y: Region(0, 4, 0, 8)}).steps
    # Top tile: rows -1..4 and cols -2..7 are read; the parts outside the image become padding.
    assert step.ins == (Region(0, 5, 0, 8),)
    assert step.pads == (1, 2, 0, 0)
    (step,) = segment_deps(graph, graph.nodes, {y: Region(4, 8, 0, 8)}).steps
    # Bottom tile: its top edge is interior (pad 0); row 8 is the image's bottom padding.
    assert step.ins == (Region(3, 8, 0, 8),)
    assert step.pads == (0, 2, 1, 0)
    (step,) = segment_deps(graph, graph.nodes, {y: Region(2, 5, 3, 6)}).steps
    assert step.ins == (Region(1, 6, 1, 6),) and step.pads == (0, 0, 0, 0)


def test_concat_and_unrequested_branch():
    g = G(h=10, w=10)
    a = g.conv("x", 2, k=5)
    b = g.conv("x", 2, k=1)
    cat = g.node("Concat", [a, b], (1, 4, 10, 10), {"axis": 1})
    side = g.conv("x", 2, k=3)
    graph = g.graph(cat)
    d = segment_deps(graph, graph.nodes, {cat: Region(4, 5, 4, 5)})
    assert d.inputs["x"] == Region(2, 7, 2, 7)
    assert side not in d.regions  # nobody asked for it, so it is not computed
    assert {s.node for s in d.steps} == {a, b, cat}


def test_broadcast_operand_and_global_ops_need_everything():
    g = G(c=3, h=9, w=9)
    pooled = g.node("GlobalAveragePool", ["x"], (1, 3, 1, 1))
    gate = g.node("Sigmoid", [pooled], (1, 3, 1, 1))
    y = g.node("Mul", ["x", gate], (1, 3, 9, 9))
    graph = g.graph(y)
    d = segment_deps(graph, graph.nodes, {y: Region(0, 2, 0, 2)})
    assert d.regions[gate] == Region(0, 1, 0, 1)
    assert d.inputs["x"] == Region(0, 9, 0, 9)
    assert not segment_is_spatial(graph, make_segments(graph, [])[0])


def test_segment_deps_json_roundtrip():
    g = G(h=10, w=10)
    y = g.conv(g.conv("x", 3, s=2), 2, k=5, p=(2, 1, 2, 3))
    graph = g.graph(y)
    d = segment_deps(graph, graph.nodes, {y: Region(1, 3, 2, 4)})
    assert SegmentDeps.from_dict(json.loads(json.dumps(d.to_dict()))) == d


def test_cuts_live_tensors_and_segments():
    g = G(h=8, w=8)
    a = g.conv("x", 2)
    b = g.conv(a, 2)
    r = g.node("Add", [a, b], g.shapes[a])
    c = g.conv(r, 2)
    graph = g.graph(c)
    assert live_tensors(graph, 1) == (a,)
    assert live_tensors(graph, 2) == (a, b)  # inside the residual block both the skip and branch live
    assert cut_candidates(graph) == [1, 3]
    s0, s1 = make_segments(graph, [2])
    # Cutting inside the block: both the skip and the branch cross the boundary.
    assert (s0.inputs, s0.outputs) == (("x",), (a, b))
    assert (s1.inputs, s1.outputs) == ((a, b), (c,))
    assert s1.nodes == (r, c)
    t0, t1 = make_segments(graph, [1])
    assert (t0.outputs, t1.inputs, t1.nodes) == ((a,), (a,), (b, r, c))


def test_input_halo_of_a_stride_two_chain():
    g = G(h=32, w=32)
    a = g.conv("x", 2, k=3, s=2)
    b = g.conv(a, 2, k=3)
    graph = g.graph(b)
    assert input_halo(graph, a) == (2, 1)
    # b's pixel r reads a[r-1..r+1] -> x[2r-3 .. 2r+3]; its own footprint is x[2r, 2r+2).
    assert input_halo(graph, b) == (2, 3)


def test_macs_agree_with_graph_flops():
    g = G(c=4, h=8, w=8)
    a = g.conv("x", 8, k=3, s=2)
    dw = g.conv(a, 8, k=3, group=8)
    r = g.node("Relu", [dw], g.shapes[dw])
    graph = g.graph(r)
    for n in graph.nodes:
        full = Region(0, graph.shapes[n.output][2], 0, graph.shapes[n.output][3])
        factor = 2 if n.op == "Conv" else 1  # node_flops counts a multiply-add as two
        assert factor * node_macs(n, graph, full) == node_flops(graph, n)
    # Half the rows of a conv output cost half its MACs.
    half, full = Region(0, 2, 0, 4), Region(0, 4, 0, 4)
    assert node_macs(graph.nodes[0], graph, half) * 2 == node_macs(graph.nodes[0], graph, full)


# ---------------------------------------------------------------------------------------------------
# Sufficient and tight, by perturbation


@st.composite
def conv_chain(draw):
    c, h, w = draw(st.integers(1, 3)), draw(st.integers(10, 18)), draw(st.integers(10, 18))
    g = G(c, h, w, seed=draw(st.integers(0, 2**16)))
    x = "x"
    for _ in range(draw(st.integers(1, 3))):
        _, c, h, w = g.shapes[x]
        k, s = draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 2]))
        p = tuple(draw(st.integers(0, k - 1)) for _ in range(4))
        if (h + p[0] + p[2] - k) // s + 1 < 2 or (w + p[1] + p[3] - k) // s + 1 < 2:
            continue
        group = c if draw(st.booleans()) else 1
        x = g.conv(x, c if group > 1 else draw(st.integers(1, 3)), k, s, p, group=group)
    if x == "x":
        x = g.conv(x, 2)
    graph = g.graph(x)
    _, _, oh, ow = graph.shapes[x]
    r0, c0 = draw(st.integers(0, oh - 1)), draw(st.integers(0, ow - 1))
    out = Region(r0, draw(st.integers(r0 + 1, oh)), c0, draw(st.integers(c0 + 1, ow)))
    return graph, out


@SETTINGS
@given(conv_chain(), st.integers(0, 2**16))
def test_needed_region_is_sufficient_and_tight(chain, seed):
    graph, out = chain
    need = segment_deps(graph, graph.nodes, {graph.output: out}).inputs["x"]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(graph.shapes["x"]).astype(np.float32)
    y = run_graph(graph, x)[:, :, out.r0 : out.r1, out.c0 : out.c1]

    outside = rng.standard_normal(x.shape).astype(np.float32) * 10
    x2 = outside.copy()
    x2[:, :, need.r0 : need.r1, need.c0 : need.c1] = x[:, :, need.r0 : need.r1, need.c0 : need.c1]
    np.testing.assert_array_equal(run_graph(graph, x2)[:, :, out.r0 : out.r1, out.c0 : out.c1], y)

    # Every edge row/column of the needed region matters (no activations, generic weights).
    for edge in (
        Region(need.r0, need.r0 + 1, need.c0, need.c1),
        Region(need.r1 - 1, need.r1, need.c0, need.c1),
        Region(need.r0, need.r1, need.c0, need.c0 + 1),
        Region(need.r0, need.r1, need.c1 - 1, need.c1),
    ):
        x3 = x.copy()
        x3[:, :, edge.r0 : edge.r1, edge.c0 : edge.c1] += 1.0
        assert not np.allclose(run_graph(graph, x3)[:, :, out.r0 : out.r1, out.c0 : out.c1], y)


# ---------------------------------------------------------------------------------------------------
# Resampling ops: regions map through the op's geometry, `pads` adjusts the raw output


def _one_node_graph(op, attrs, in_shape, out_shape, params=(), weights=None):
    from tilemesh.runtime.graph import Graph, Node

    node = Node("n", op, ("x",), "y", attrs, params)
    return Graph([node], "x", "y", {"x": in_shape, "y": out_shape}, weights or {}), node


def test_resampling_rules_by_hand():
    from tilemesh.runtime.deps import resample_rule

    # ConvTranspose k3 s2, ONNX pads 1 and output_padding 1: output row y is raw row y + 1, input i writes
    # raw rows 2i..2i+2. Output rows 4..7 = raw 5..8 need inputs 2..4, whose raw rows are 3..9.
    w = {"w": np.zeros((2, 2, 3, 3), np.float32), "b": np.zeros(2, np.float32)}
    g, n = _one_node_graph("ConvTranspose", {"kernel": (3, 3), "strides": (2, 2), "dilations": (1, 1), "group": 1,
                                             "pads": (-1, -1, 0, 0)}, (1, 2, 7, 7), (1, 2, 14, 14), ("w", "b"), w)
    assert resample_rule(n, g, Region(4, 8, 0, 14)) == (Region(2, 5, 0, 7), (-1, -1, -2, 0))
    # Resize x2, nearest, half_pixel: rows 5..8 read source rows 2..4 (8 -> 3.75 -> 4); raw rows 4..9.
    g, n = _one_node_graph("Resize", {"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
                                      "nearest_mode": "round_prefer_floor", "scales": (2.0, 2.0), "sizes": (14, 14),
                                      "in_size": (7, 7), "pads": (0, 0, 0, 0)}, (1, 2, 7, 7), (1, 2, 14, 14))
    assert resample_rule(n, g, Region(5, 9, 0, 14)) == (Region(2, 5, 0, 7), (-1, 0, -1, 0))
    # Reflect padding of 3 rows on top: output rows 0..1 mirror input rows 3 and 2, so a tile there reads
    # rows 0..3, reflects 3 rows itself and drops what it does not own.
    g, n = _one_node_graph("Pad", {"pads": (3, 0, 0, 0), "mode": "reflect", "value": 0.0, "channel_pads": (0, 0)},
                           (1, 2, 7, 5), (1, 2, 10, 5))
    assert resample_rule(n, g, Region(0, 2, 0, 5)) == (Region(0, 4, 0, 5), (3, 0, -5, 0))
    # DepthToSpace 2: output rows 3..6 come from input rows 1..3.
    g, n = _one_node_graph("DepthToSpace", {"blocksize": 2, "mode": "DCR", "pads": (0, 0, 0, 0)},
                           (1, 8, 5, 5), (1, 2, 10, 10))
    assert resample_rule(n, g, Region(3, 7, 0, 10)) == (Region(1, 4, 0, 5), (-1, 0, -1, 0))
