"""The planner: (graph, device profiles, link matrix, source) -> the fastest predicted tiling plan.

`plan_frame` is a pure function, so every placement case is a unit test. It compares, with the cost
model of `tilemesh.planning.costmodel`, a small family of candidates:

* single device: the source alone, or "send the frame to X, X runs everything" for every X;
* partition-offload (Neurosurgeon): the source runs the first blocks, X the rest;
* split-then-gather (tilemesh proper): the early, high-resolution blocks are split spatially (row bands
  or a 2-D grid) among a subset of devices with shares that follow measured speed, grouped into fused
  segments (one block per segment: small halos exchanged often; one segment per resolution stage:
  redundant halo compute instead of exchanges; or two blocks per segment), and from some block on
  everything is gathered onto one device (the deep 14x14 and 7x7 stages hold about 60% of
  MobileNetV2's MACs but their receptive fields span the frame: splitting them may cost more halo
  exchange and redundant compute than it saves, and the cost model decides where);
* the baselines of `make_plan` (equal split, fixed grid), so the planner never predicts worse than them.

Shares are rebalanced with the cost model until devices finish together (halo overlap is not
proportional to a band's height, so speed-proportional shares alone leave the slow device late).

Speed: the split family is not built once per gather point. One plan splits all spatial blocks; a
single pass of the event simulation over its segments snapshots the device clocks after each segment,
and the "gather onto G after segment k" ending (pieces to G, G runs the rest, logits back) is added
analytically for every k and G. This reproduces exactly what `costmodel.predict_plan` says of the
materialized plan (tested), so the best few are built with `tiling.build_plan` and re-predicted only
at the end. Four devices take well under a second in CPython.

The pick is the fastest prediction, except that a plan with more devices must beat the best plan with
fewer devices by more than `MARGIN` (15%): measured in browsers the cost model is 1.1-1.3x optimistic, more
for split plans, so a thinner predicted edge is not a real one (`tilemesh bench browsers`).

`make_plan(strategy, ...)` gives the benchmark's strategies the same `PlanChoice`. Run
`python -m tilemesh.planning.planner` to print every strategy's prediction for a few scenarios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tilemesh.runtime.deps import (
    ELEMENTWISE_OPS,
    cut_candidates,
    is_global,
    live_tensors,
    node_macs,
    reduction_kind,
    segment_deps,
)
from tilemesh.runtime.profile import (
    frame_overhead_seconds,
    predict_node_seconds,
    task_overhead_seconds,
    validate_profile,
)
from tilemesh.runtime.regions import Region, plane
from tilemesh.runtime.tiling import Plan, Split, build_plan

from .costmodel import (
    INPUT_ITEMSIZE,
    LinkSim,
    Prediction,
    predict_plan,
    reduced_pool_seconds,
    task_seconds,
    tensor_bytes,
    transfer_bytes,
)

STRATEGIES = ("single", "offload", "partition_offload", "equal_split", "fixed_grid", "tilemesh")
MARGIN = 0.15
FUSIONS = ("block", "pair", "stage")


@dataclass(frozen=True)
class Spec:
    """A candidate before it is built: segment cuts and one Split per segment."""

    strategy: str
    label: str
    cuts: tuple[int, ...]
    splits: tuple[Split, ...]


@dataclass
class PlanChoice:
    plan: Plan
    strategy: str
    label: str
    cuts: list[int]
    splits: list[Split]
    prediction: Prediction
    candidates: list[dict] = field(default_factory=list)  # {"strategy", "label", "predicted_s"}, best first

    @property
    def predicted_s(self) -> float:
        return self.prediction.total_s

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "label": self.label,
            "cuts": list(self.cuts),
            "splits": [s.to_dict() for s in self.splits],
            "predicted_s": self.predicted_s,
            "prediction": self.prediction.to_dict(),
            "candidates": list(self.candidates),
            "plan": self.plan.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> PlanChoice:
        return cls(Plan.from_dict(d["plan"]), d["strategy"], d["label"], [int(c) for c in d["cuts"]],
                   [Split.from_dict(s) for s in d["splits"]], Prediction.from_dict(d["prediction"]),
                   list(d.get("candidates", ())))


# --------------------------------------------------------------------------- graph structure


def spec_devices(spec: Spec) -> set[str]:
    """Every device a candidate gives work to (a split's grid, or the keys of an explicit partition)."""
    out: set[str] = set()
    for split in spec.splits:
        if isinstance(split, Split):
            out.update(d for row in split.devices for d in row)
        else:
            out.update(d for part in split.values() for d in part)
    return out


def head_start(graph) -> int:
    """Index of the first node of the non-spatial head, or len(nodes): the first global op that tiling
    cannot pass. A pool inside the body (squeeze-excite) is a distributed reduction and its excitation MLP
    reads only 1x1 planes, so neither ends tiling while a larger plane follows."""
    n = len(graph.nodes)
    spatial_after = [False] * (n + 1)
    for i in range(n - 1, -1, -1):
        spatial_after[i] = spatial_after[i + 1] or plane(graph.shapes[graph.nodes[i].output]) != (1, 1)
    for i, nd in enumerate(graph.nodes):
        if not is_global(nd, graph):
            continue
        passable = reduction_kind(nd, graph) or all(plane(graph.shapes[t]) == (1, 1) for t in nd.inputs)
        if not (passable and spatial_after[i + 1]):
            return i
    return n


def pool_cuts(graph) -> list[int]:
    """Cuts right before each body pool: its input must be a segment input to be reduced across devices."""
    head = head_start(graph)
    return [i for i, nd in enumerate(graph.nodes[:head])
            if reduction_kind(nd, graph) and i > 0 and nd.inputs[0] in live_tensors(graph, i)]


def _inside_layer(graph, k: int) -> bool:
    """True if the cut before nodes[k] would separate an elementwise op (an activation) from the node whose
    output is its only input: such a cut moves the same tensor one op later and is never a block boundary."""
    node, prev = graph.nodes[k], graph.nodes[k - 1]
    return (node.op in ELEMENTWISE_OPS and tuple(node.inputs) == (prev.output,)
            and graph.shapes[node.output] == graph.shapes[prev.output])


def block_cuts(graph) -> list[int]:
    """Cut points between blocks, found from the graph's structure alone (node names play no part).

    A block boundary is a single-tensor cut (`deps.cut_candidates`: residual branches are never cut) that
    does not split an activation from its producer, where the crossing tensor is no larger than at the
    neighbouring such cuts: the narrow points between blocks (MobileNetV2's projection outputs, not its
    6x-expanded insides). The start of the head (the first global op) is added when one tensor crosses it.
    On the demo MobileNetV2 this gives exactly the boundaries of its 19 `features.N` modules."""
    head = head_start(graph)
    bounds = [k for k in cut_candidates(graph) if k < head and not _inside_layer(graph, k)]

    def size(k):
        return sum(math.prod(graph.shapes[t]) for t in live_tensors(graph, k))

    out = [k for i, k in enumerate(bounds)
           if (i == 0 or size(k) <= size(bounds[i - 1])) and (i + 1 == len(bounds) or size(k) <= size(bounds[i + 1]))]
    if 0 < head < len(graph.nodes) and len(live_tensors(graph, head)) == 1:
        out.append(head)
    # A squeeze-excite pool inside the body needs a cut right before it (its input must be a segment input).
    return sorted(set(out) | set(pool_cuts(graph)))


def _resolution_after(graph, k: int) -> int:
    t = live_tensors(graph, k)
    return math.prod(plane(graph.shapes[t[0]])) if t else 1


def fusion_cuts(graph, mode: str) -> list[int]:
    """Boundaries of the fused split segments, ending at the last spatial block cut.

    "block": every block its own segment; "pair": two blocks per segment, never across a resolution
    change; "stage": one segment per run of blocks whose outputs share a resolution."""
    cuts = block_cuts(graph)
    if mode == "block":
        return cuts
    stage_ends = [k for i, k in enumerate(cuts)
                  if i + 1 == len(cuts) or _resolution_after(graph, k) != _resolution_after(graph, cuts[i + 1])]
    must = set(pool_cuts(graph))
    if mode == "stage":
        return sorted(set(stage_ends) | must)
    if mode == "pair":
        out, run = [], 0
        for k in cuts:
            run += 1
            if k in stage_ends or k in must or run == 2:
                out.append(k)
                run = 0
        return out
    raise ValueError(f"unknown fusion mode {mode!r}")


class _Costs:
    """Per-device prefix sums of whole-tensor node times, so 'device X runs nodes a..b' is O(1)."""

    def __init__(self, graph, profiles):
        self.graph = graph
        self.profiles = profiles
        self.prefix: dict[str, list[float]] = {}
        full = [Region.full(*plane(graph.shapes[n.output])) for n in graph.nodes]
        macs = [node_macs(n, graph, r) for n, r in zip(graph.nodes, full, strict=True)]
        for d, p in profiles.items():
            acc = [0.0]
            for n, r, m in zip(graph.nodes, full, macs, strict=True):
                acc.append(acc[-1] + predict_node_seconds(p, graph, n, m, r))
            self.prefix[d] = acc

    def run(self, device: str, a: int, b: int) -> float:
        p = self.prefix[device]
        return p[b] - p[a]

    def whole(self, device: str) -> float:
        return self.prefix[device][-1]

    def node(self, device: str, i: int) -> float:
        return self.run(device, i, i + 1)


# --------------------------------------------------------------------------- candidates


def _whole_specs(graph, devices, source) -> list[Spec]:
    out = []
    for d in devices:
        label = "source alone" if d == source else f"frame to {d}, {d} runs all"
        out.append(Spec("single" if d == source else "offload", label, (), (Split.whole(d),)))
    return out


def _partition_offload_specs(graph, source, target) -> list[Spec]:
    """Source runs nodes[:k] whole, `target` the rest, for every block cut k."""
    return [Spec("partition_offload", f"source runs {k} nodes, {target} the rest", (k,),
                 (Split.whole(source), Split.whole(target))) for k in block_cuts(graph)
            if len(live_tensors(graph, k)) == 1]


def _analytic_two_stage(graph, costs: _Costs, links, source, spec: Spec, options) -> float:
    """Prediction of a [whole on A | whole on B] plan without building it (same math as predict_plan)."""
    sim = LinkSim(links, options.get("default_link"), False, float(options.get("per_transfer_s", 0.0)))
    a, b = spec.splits[0].devices[0][0], spec.splits[-1].devices[0][0]
    k = spec.cuts[0] if spec.cuts else len(graph.nodes)
    inp = graph.input
    t = _frame_start(sim, costs.profiles, source)
    t = sim.send(source, a, tensor_bytes(graph, inp, Region.full(*plane(graph.shapes[inp])), INPUT_ITEMSIZE), t)
    t = sim.compute(a, t, costs.run(a, 0, k) + task_overhead_seconds(costs.profiles[a]))
    if spec.cuts:
        (live,) = live_tensors(graph, k)
        gather, pooled = _gather_bytes(graph, k, live)
        full = Region.full(*plane(graph.shapes[live]))
        t = sim.send(a, b, gather(full), t)
        own = full if a == b else None
        pool_fix = sum(reduced_pool_seconds(graph, p, own, costs.profiles[b])
                       - costs.node(b, graph.nodes.index(graph.producer(p))) for p in pooled)
        t = sim.compute(b, t, costs.run(b, k, len(graph.nodes)) + pool_fix + task_overhead_seconds(costs.profiles[b]))
    out = graph.output
    return sim.send(b, source, tensor_bytes(graph, out, Region.full(*plane(graph.shapes[out]))), t)


def _frame_start(sim: LinkSim, profiles, source: str) -> float:
    """When the source's input is ready: after its per-frame work (as `costmodel.predict_plan`)."""
    frame_s = frame_overhead_seconds(profiles[source]) if source in profiles else 0.0
    return sim.compute(source, 0.0, frame_s) if frame_s > 0 else 0.0


def _order(devices, source, speed) -> list[str]:
    """Source first (it holds the frame), then fastest first; ties by name for determinism."""
    rest = sorted((d for d in devices if d != source), key=lambda d: (-speed[d], d))
    return ([source] if source in devices else []) + rest


def _make_split(devs: list[str], shape: tuple[int, int], v: dict[str, float]) -> Split:
    """A rows or (r x c) grid split of `devs` with shares from speed estimates `v`."""
    r, c = shape
    if c == 1:
        return Split.rows({d: max(v[d], 1e-9) for d in devs})
    # Snake order spreads fast and slow devices over rows and columns, so the rank-1 grid of
    # row x column shares can approach the speeds.
    ranked = sorted(devs, key=lambda d: -v[d])
    grid = [[None] * c for _ in range(r)]
    for i, d in enumerate(ranked):
        row, col = i // c, i % c
        grid[row][col if row % 2 == 0 else c - 1 - col] = d
    rows = [sum(v[d] for d in grid[i]) for i in range(r)]
    cols = [sum(v[grid[i][j]] for i in range(r)) for j in range(c)]
    return Split.grid(grid, rows, cols)


def _shapes(m: int) -> list[tuple[int, int]]:
    out = [(m, 1)]
    for r in range(2, m):
        if m % r == 0 and 2 <= m // r <= r:
            out.append((r, m // r))
    return out


def _subsets(devices, source, speed, max_devices: int = 8) -> list[list[str]]:
    """The source plus the m-1 fastest others, and the m fastest overall, for 2 <= m <= max_devices
    (the search grows with the room; past ~8 devices a frame's tiles are too thin to gain anyway)."""
    ranked = sorted(devices, key=lambda d: (-speed[d], d))
    others = [d for d in ranked if d != source]
    out: list[list[str]] = []
    for m in range(2, min(len(devices), max_devices) + 1):
        for s in ([source] + others[: m - 1], ranked[:m]):
            s = _order(s, source, speed)
            if s not in out:
                out.append(s)
    return out


@dataclass
class _Estimate:
    predicted_s: float
    spec: Spec


def _split_family(graph, costs: _Costs, profiles, links, source, devs, shape, fusion, options) -> list[_Estimate]:
    """Split-then-gather candidates for one device subset, shape and fusion, rebalancing shares."""
    speed = {d: 1.0 / costs.whole(d) for d in devs}
    bounds = fusion_cuts(graph, fusion)
    if not bounds:
        return []
    fastest = max(profiles, key=lambda d: (1.0 / costs.whole(d), d))
    v = dict(speed)
    out: list[_Estimate] = []
    best_balance = math.inf
    by_name = {n.name: n for n in graph.nodes}
    kind = f"{'x'.join(map(str, shape))} {'rows' if shape[1] == 1 else 'grid'}"
    for _ in range(int(options.get("rebalance_iters", 3))):
        split = _make_split(devs, shape, v)
        # Every spatial block split; the tail's owner here is irrelevant (endings replace it).
        try:
            plan = build_plan(graph, bounds, [split] * len(bounds) + [Split.whole(fastest)], source)
        except ValueError:
            break  # a share rounded a device out of a tensor it must own: stop refining
        secs = {id(t): task_seconds(graph, t, profiles[t.device], by_name) for t in plan.tasks}
        results = _gather_endings(graph, plan, len(bounds), costs, secs, profiles, links, source, options)
        best_k = None
        for total, k, g in results:
            label = f"{kind} {_share_text(split, devs)}, {fusion} fused to node {bounds[k]}, rest on {g}"
            out.append(_Estimate(total, Spec("tilemesh", label, tuple(bounds[: k + 1]),
                                             (split,) * (k + 1) + (Split.whole(g),))))
            if best_k is None or total < best_k[0]:
                best_k = (total, k)
        # Rebalance on the segments that the best ending keeps split, so that devices finish together.
        k = best_k[1] if best_k else len(bounds) - 1
        t_dev = {d: 0.0 for d in devs}
        for t in plan.tasks:
            if t.segment <= k and t.device in t_dev:
                t_dev[t.device] += secs[id(t)]
        if min(t_dev.values()) <= 0:
            break
        arrival = _input_arrival(graph, plan, links, options)
        finish = {d: arrival.get(d, 0.0) + t_dev[d] for d in devs}
        balance = max(finish.values()) / min(finish.values())
        if balance > best_balance * 0.999 or balance < 1.03:
            break
        best_balance = balance
        v = rebalanced_speeds(_area_shares(split, devs), t_dev, arrival)
    return out


def rebalanced_speeds(share: dict[str, float], busy: dict[str, float], arrival: dict[str, float]) -> dict[str, float]:
    """Shares for the next split (as weights): each device computes `share[d]` of the frame in `busy[d]` seconds
    once its part of the frame has arrived (`arrival[d]` s after the start; the source's own part at 0). Solves
    `arrival[d] + new_share[d] * busy[d] / share[d] = T` for one finish time T over all devices, so a device whose
    input comes last over the source's uplink gets less: with equal devices and a link-bound scatter, the source
    (whose pixels are already there) takes the most. Without arrivals this is speed = share / time."""
    rate = {d: share[d] / busy[d] for d in share}  # frame fraction per second
    t = (1.0 + sum(arrival.get(d, 0.0) * r for d, r in rate.items())) / sum(rate.values())
    return {d: max(t - arrival.get(d, 0.0), 0.05 * t) * r for d, r in rate.items()}


def _input_arrival(graph, plan: Plan, links, options) -> dict[str, float]:
    """When each device has its part of the camera frame (the source sends them one after another)."""
    sim = LinkSim(links, options.get("default_link"), False, float(options.get("per_transfer_s", 0.0)))
    out: dict[str, float] = {}
    for tr in plan.input_send:
        end = sim.send(tr.src, tr.dst, tensor_bytes(graph, tr.tensor, tr.region, INPUT_ITEMSIZE), 0.0)
        out[tr.dst] = max(out.get(tr.dst, 0.0), end)
    return out


def _share_text(split: Split, devs) -> str:
    share = _area_shares(split, devs)
    return " ".join(f"{d}:{100 * share[d]:.0f}%" for d in devs)


def _area_shares(split: Split, devs) -> dict[str, float]:
    rows = split.row_shares or (1.0,) * len(split.devices)
    cols = split.col_shares or (1.0,) * len(split.devices[0])
    rs, cs = sum(rows), sum(cols)
    out = {d: 0.0 for d in devs}
    for i, row in enumerate(split.devices):
        for j, d in enumerate(row):
            out[d] += rows[i] / rs * cols[j] / cs
    return out


def _gather_endings(graph, plan: Plan, n_split: int, costs: _Costs, secs, profiles, links, source, options):
    """[(predicted total, k, G)] for 'keep segments 0..k of `plan`, then gather onto G, G runs the rest'.

    Segments 0..k and their exchanges are simulated exactly once; after segment k's compute the clocks
    are copied and the gather sends (owned pieces to G), G's remaining compute and the logits' trip to
    the source are added for every G.
    """
    sim = LinkSim(links, options.get("default_link"), False, float(options.get("per_transfer_s", 0.0)))
    arrival = {}
    start = _frame_start(sim, profiles, source)
    for tr in plan.input_send:
        arrival[tr] = sim.send(tr.src, tr.dst, tensor_bytes(graph, tr.tensor, tr.region, INPUT_ITEMSIZE), start)
    by_seg: dict[int, list] = {}
    for t in plan.tasks:
        by_seg.setdefault(t.segment, []).append(t)
    out_bytes = tensor_bytes(graph, graph.output, Region.full(*plane(graph.shapes[graph.output])))
    n = len(graph.nodes)
    results = []
    for seg in plan.segments[:n_split]:
        ends = {}
        for task in by_seg[seg.index]:
            ready = max((arrival[tr] for tr in task.recv), default=start)
            ends[task.device] = sim.compute(task.device, ready, secs[id(task)])
        # Gather endings only where one tensor crosses (a cut before a squeeze-excite pool of a residual
        # block has two: the block continues split, with the pool reduced across devices).
        (t,) = seg.outputs if len(seg.outputs) == 1 else (None,)
        gather, pooled = _gather_bytes(graph, seg.stop, t) if t else (None, [])
        for g in profiles if t else ():
            up = dict(sim.uplink)
            arr = [sim.send(d, g, gather(r), ends[d], uplink=up) for d, r in plan.owners[t].items()]
            # A pool of t runs distributed: g pools only its own part (the cost model's accounting).
            pool_fix = sum(reduced_pool_seconds(graph, p, plan.owners[t].get(g), profiles[g])
                           - costs.node(g, graph.nodes.index(graph.producer(p))) for p in pooled)
            end = (max([sim.free.get(g, 0.0), *arr]) + costs.run(g, seg.stop, n) + pool_fix
                   + task_overhead_seconds(profiles[g]))
            if g != source:
                end = sim.send(g, source, out_bytes, end, uplink=up)
            results.append((end, seg.index, g))
        for task in by_seg[seg.index]:
            for tr in task.send:
                arrival[tr] = sim.send(tr.src, tr.dst, transfer_bytes(graph, tr), ends[task.device])
    return results


_GATHER_CACHE: dict[tuple[int, int, str], tuple] = {}  # (id(graph), start, t) -> (graph, answer): memo only


def _gather_bytes(graph, start: int, t: str):
    """Bytes an owner of `region` of `t` sends when nodes[start:] run whole on one device: the region if
    they read `t` spatially, plus one pooled vector per global pool of `t` (a distributed reduction).
    Memoized per graph object (the tail's dependency table is the search's most repeated work)."""
    hit = _GATHER_CACHE.get((id(graph), start, t))
    if hit is not None and hit[0] is graph:
        return hit[1]
    if len(_GATHER_CACHE) > 4096:
        _GATHER_CACHE.clear()
    answer = _gather_bytes_of(graph, start, t)
    _GATHER_CACHE[(id(graph), start, t)] = (graph, answer)
    return answer


def _gather_bytes_of(graph, start: int, t: str):
    tail = graph.nodes[start:]
    d = segment_deps(graph, tail, {graph.output: Region.full(*plane(graph.shapes[graph.output]))})
    pooled = [p for p, (x, _, _) in d.reduced.items() if x == t]
    extra = sum(tensor_bytes(graph, p, Region(0, 1, 0, 1)) for p in pooled)
    spatial = t in d.inputs
    return (lambda region: (tensor_bytes(graph, t, region) if spatial else 0) + extra), pooled


def _baseline_specs(graph, devices, source, edge, speed) -> list[Spec]:
    specs = (_equal_split_spec(graph, devices, source), _fixed_grid_spec(graph, devices, source, edge, speed))
    return [s for s in specs if s is not None]


def _equal_split_spec(graph, devices, source) -> Spec | None:
    """MoDNN: every block its own segment, split in equal row bands among all devices; head on source."""
    if len(devices) < 2:
        return None
    order = [source] + [d for d in devices if d != source]
    cuts = block_cuts(graph)
    head = head_start(graph)
    split = Split.rows({d: 1.0 for d in order})
    # Split every segment that ends at or before the head (none when the head is the first node, e.g. a
    # model whose first op pools its input).
    bounds = [0, *cuts, len(graph.nodes)]
    spatial = sum(1 for stop in bounds[1:] if stop <= head)
    splits = [split] * spatial + [Split.whole(source)] * (len(cuts) + 1 - spatial)
    return Spec("equal_split", f"equal rows of {','.join(order)} per block, head on {source}",
                tuple(cuts), tuple(splits))


def fixed_grid_depth(graph) -> int:
    """DeepThings' fixed fused depth: the last block cut whose tensor is still at >= 1/8 of the input
    resolution (MobileNetV2: the end of the 28x28 stage, about 38% of the MACs)."""
    ih, iw = plane(graph.shapes[graph.input])
    cuts = block_cuts(graph)
    if not cuts:
        raise ValueError("the graph has no block boundary to fuse up to")
    ok = [k for k in cuts if _resolution_after(graph, k) * 64 >= ih * iw]
    return ok[-1] if ok else cuts[0]


def _fixed_grid_spec(graph, devices, source, edge, speed) -> Spec | None:
    """DeepThings: one fused segment up to a fixed depth on an equal grid (2x2 for 4 devices, rows
    otherwise), the rest gathered on the edge (or the fastest device); None without a block boundary."""
    if len(devices) < 2 or not block_cuts(graph):
        return None
    order = [source] + [d for d in devices if d != source]
    if len(order) == 4:
        split = Split.grid([order[:2], order[2:]])
        shape = "2x2 grid"
    else:
        split = Split.rows({d: 1.0 for d in order})
        shape = "rows"
    gather = edge if edge in devices else max(devices, key=lambda d: (speed[d], d))
    k = fixed_grid_depth(graph)
    # Squeeze-excite pools before k need their own cut (their input must be a segment input to be reduced).
    cuts = (*[c for c in pool_cuts(graph) if c < k], k)
    return Spec("fixed_grid", f"equal {shape} fused to node {k}, rest on {gather}", cuts,
                (split,) * len(cuts) + (Split.whole(gather),))


# --------------------------------------------------------------------------- the planner


def _evaluate(graph, spec: Spec, profiles, links, source, options) -> tuple[Plan, Prediction]:
    plan = build_plan(graph, list(spec.cuts), list(spec.splits), source)
    return plan, predict_plan(graph, plan, profiles, links, source, options)


def _choice(graph, spec, profiles, links, source, options, candidates=()) -> PlanChoice:
    plan, pred = _evaluate(graph, spec, profiles, links, source, options)
    return PlanChoice(plan, spec.strategy, spec.label, list(spec.cuts), list(spec.splits), pred, list(candidates))


def _check_inputs(profiles, source):
    if not profiles:
        raise ValueError("no devices")
    if source not in profiles:
        raise ValueError(f"source {source!r} has no profile")
    for d, p in profiles.items():
        try:
            validate_profile(p)
        except ValueError as e:
            raise ValueError(f"device {d!r}: {e}") from None


def search(graph, profiles: dict[str, dict], links, source: str, options: dict | None = None) -> list[_Estimate]:
    """Every candidate the planner considers with its predicted latency, best first (not built)."""
    options = options or {}
    _check_inputs(profiles, source)
    devices = list(profiles)
    costs = _Costs(graph, profiles)
    speed = {d: 1.0 / costs.whole(d) for d in devices}
    est: list[_Estimate] = []
    for spec in _whole_specs(graph, devices, source):
        est.append(_Estimate(_analytic_two_stage(graph, costs, links, source, spec, options), spec))
    for target in devices:
        if target != source:
            for spec in _partition_offload_specs(graph, source, target):
                est.append(_Estimate(_analytic_two_stage(graph, costs, links, source, spec, options), spec))
    if len(devices) > 1:
        for spec in _baseline_specs(graph, devices, source, options.get("edge"), speed):
            est.append(_Estimate(_evaluate(graph, spec, profiles, links, source, options)[1].total_s, spec))
        for devs in _subsets(devices, source, speed, int(options.get("max_devices", 8))):
            for shape in _shapes(len(devs)):
                for fusion in options.get("fusions", FUSIONS):
                    est += _split_family(graph, costs, profiles, links, source, devs, shape, fusion, options)
    est.sort(key=lambda e: (e.predicted_s, len(e.spec.cuts), e.spec.label))
    return est


def plan_frame(graph, profiles: dict[str, dict], links, source: str, options: dict | None = None) -> PlanChoice:
    """The planner: choose cuts and per-segment splits minimizing predicted frame latency.

    profiles: device -> `tilemesh.runtime.profile` dict (the devices present; a plan may use a subset).
    links: {(a, b): {"rtt_ms", "mbps"}}, symmetric by default (see `costmodel.link_params`).
    options: `default_link`, `per_transfer_s` (cost model); `edge` (the server peer's id, for the
    fixed-grid baseline); `fusions` (subset of FUSIONS); `rebalance_iters` (default 3); `max_devices`
    (largest split considered, default 8); `keep` (how many candidates to report, default 30);
    `margin` (default MARGIN): a plan involving more devices must be predicted faster than the best plan
    with fewer devices by more than this fraction to be chosen.
    """
    options = options or {}
    est = search(graph, profiles, links, source, options)
    # Measured in browsers, the cost model is optimistic by 1.1-1.3x, more so for split plans (tilemesh bench,
    # measured / predicted): a predicted edge smaller than that error is no edge, while every extra device is
    # one more link and one more device that can stall or leave mid-frame. So among the plans within `margin`
    # of the best, the one with the fewest devices wins.
    margin = float(options.get("margin", MARGIN))
    limit = est[0].predicted_s * (1 + margin)
    pool = sorted((e for e in est if e.predicted_s <= limit), key=lambda e: (len(spec_devices(e.spec)), e.predicted_s))
    # The final pick is made on built plans. The search's figures match predict_plan's closely but not always
    # exactly (a few microseconds on tiny graphs), so besides the pool's first three, the search's best plan for
    # each device count is built too, and the margin rule is applied to the built figures: the plan chosen is
    # never predicted slower than a simpler one the search ranked just behind it (e.g. the source alone).
    fewest: dict[int, object] = {}
    for e in est:
        fewest.setdefault(len(spec_devices(e.spec)), e)
    candidates = list(pool[:3]) + [e for e in fewest.values() if all(e is not p for p in pool[:3])]
    built: dict[int, float] = {}
    options_built = []
    for e in candidates:
        plan, pred = _evaluate(graph, e.spec, profiles, links, source, options)
        built[id(e)] = pred.total_s
        options_built.append((plan, pred, e.spec))
    fastest = min(pred.total_s for _, pred, _ in options_built)
    best = min((b for b in options_built if b[1].total_s <= fastest * (1 + margin)),
               key=lambda b: (len(spec_devices(b[2])), b[1].total_s))
    plan, pred, spec = best
    keep = int(options.get("keep", 30))
    seen_strategies: set[str] = set()
    report = []
    for i, e in enumerate(est):
        if i < keep or e.spec.strategy not in seen_strategies:
            # Built plans report their own prediction (the search's equals it up to float rounding).
            report.append({"strategy": e.spec.strategy, "label": e.spec.label,
                           "predicted_s": built.get(id(e), e.predicted_s)})
        seen_strategies.add(e.spec.strategy)
    return PlanChoice(plan, "tilemesh", spec.label, list(spec.cuts), list(spec.splits), pred, report)


def make_plan(strategy: str, graph, profiles: dict[str, dict], links, source: str, edge: str | None = None,
              options: dict | None = None) -> PlanChoice:
    """One strategy's plan and prediction, through the same `PlanChoice` as the planner's.

    single: the source alone. offload: the frame to `edge` (default: the fastest other device), which
    runs everything. partition_offload (Neurosurgeon): the source runs the first k blocks, `edge` the
    rest, best k by the cost model (k = 0 is offload). equal_split (MoDNN): every block split in equal
    rows among all devices. fixed_grid (DeepThings): an equal 2x2 grid (4 devices) or rows fused up
    to `fixed_grid_depth`, the rest on `edge`. tilemesh: `plan_frame`. Strategies that need another
    device fall back to single when the source is alone.
    """
    options = dict(options or {})
    if edge is not None:
        options.setdefault("edge", edge)
    _check_inputs(profiles, source)
    if strategy == "tilemesh":
        return plan_frame(graph, profiles, links, source, options)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; one of {STRATEGIES}")
    devices = list(profiles)
    costs = _Costs(graph, profiles)
    speed = {d: 1.0 / costs.whole(d) for d in devices}
    others = [d for d in devices if d != source]
    if strategy == "single" or not others:
        spec = Spec("single", "source alone", (), (Split.whole(source),))
        ch = _choice(graph, spec, profiles, links, source, options)
        ch.strategy = strategy
        return ch
    target = edge if edge in others else max(others, key=lambda d: (speed[d], d))
    if strategy == "offload":
        return _choice(graph, Spec("offload", f"frame to {target}, {target} runs all", (), (Split.whole(target),)),
                       profiles, links, source, options)
    if strategy == "partition_offload":
        # k = 0 (offload) and k = all (source alone) are Neurosurgeon's end points too.
        specs = [Spec("partition_offload", f"frame to {target}, {target} runs all", (), (Split.whole(target),)),
                 Spec("partition_offload", "source alone", (), (Split.whole(source),))]
        specs += _partition_offload_specs(graph, source, target)
        est = sorted((_Estimate(_analytic_two_stage(graph, costs, links, source, s, options), s) for s in specs),
                     key=lambda e: e.predicted_s)
        cands = [{"strategy": e.spec.strategy, "label": e.spec.label, "predicted_s": e.predicted_s} for e in est]
        ch = _choice(graph, est[0].spec, profiles, links, source, options, cands)
        ch.strategy = "partition_offload"
        return ch
    if strategy == "equal_split":
        return _choice(graph, _equal_split_spec(graph, devices, source), profiles, links, source, options)
    spec = _fixed_grid_spec(graph, devices, source, options.get("edge"), speed)
    if spec is None:  # nothing to fuse up to (a graph without a block boundary): the source alone
        spec = Spec("fixed_grid", "source alone (no block boundary)", (), (Split.whole(source),))
    return _choice(graph, spec, profiles, links, source, options)


# --------------------------------------------------------------------------- scenarios and CLI

# measure_profile inside Pyodide 0.27.7 (numpy 2.0.2, einsum, no BLAS) under node on one core of the
# 2-core development machine; two runs agreed within 10% except the dense stem (0.36-0.47 GMAC/s).
# Its whole-graph prediction was 1.2-1.5x the measured run_graph there (0.37 s). Elementwise work is
# the surprise: Clip runs at ~0.17 G elements/s in Pyodide, about 50x slower than natively.
PYODIDE_LAPTOP = {
    "version": 1,
    "sec_per_mac": {"conv_dense": 1 / 0.42e9, "conv_pointwise": 1 / 1.5e9, "conv_depthwise": 1 / 0.57e9,
                    "elementwise": 1 / 0.165e9, "gemm": 1 / 2.7e9},
    "overhead_s": 1.3e-5,
    "chain_factor": 1.6,
    "name": "Pyodide 0.27.7 numpy, one desktop core",
}


# measure_profile in CPython (numpy with OpenBLAS) on the same machine at a quiet moment: the edge peer.
# Under contention from other processes its BLAS classes dropped 10-100x, so scenarios default to this.
NATIVE_EDGE = {
    "version": 1,
    "sec_per_mac": {"conv_dense": 1 / 2.2e9, "conv_pointwise": 1 / 58e9, "conv_depthwise": 1 / 2.8e9,
                    "elementwise": 1 / 9.2e9, "gemm": 1 / 39e9},
    "overhead_s": 3.4e-6,
    "chain_factor": 1.4,
    "name": "CPython numpy + OpenBLAS, 2 desktop cores",
}


def browser_profile(speed: float = 1.0) -> dict:
    """A browser device `speed` times as fast as PYODIDE_LAPTOP (phones: about 0.25-0.5)."""
    from tilemesh.runtime.profile import scaled_profile

    return scaled_profile(PYODIDE_LAPTOP, speed)


def default_scenarios(native: dict) -> list[dict]:
    """A few rooms: Pyodide browsers (laptop = 1, phones slower) and a native (CPython) edge peer."""
    wifi = {"*": {"rtt_ms": 4.0, "mbps": 200.0}}

    def py(_native, speed=1.0):
        return browser_profile(speed)
    return [
        {"name": "4 equal laptops, Wi-Fi", "source": "p0", "edge": None, "links": wifi,
         "profiles": {f"p{i}": py(native) for i in range(4)}},
        {"name": "phone 1x + 0.5x + 0.25x, Wi-Fi", "source": "phone", "edge": None, "links": wifi,
         "profiles": {"phone": py(native, 1.0), "tab": py(native, 0.5), "old": py(native, 0.25)}},
        {"name": "phone + 2 laptops (2x) + native edge, Wi-Fi", "source": "phone", "edge": "edge", "links": wifi,
         "profiles": {"phone": py(native, 0.5), "lap1": py(native, 1.0), "lap2": py(native, 1.0), "edge": native}},
        {"name": "4 phones, 1 Mbit/s 50 ms links", "source": "p0", "edge": None,
         "links": {"*": {"rtt_ms": 50.0, "mbps": 1.0}}, "profiles": {f"p{i}": py(native, 0.5) for i in range(4)}},
        {"name": "one phone", "source": "phone", "edge": None, "links": wifi, "profiles": {"phone": py(native, 0.5)}},
    ]


def strategy_table(graph, scenarios, options: dict | None = None) -> str:
    """Each scenario: every strategy's predicted latency, its plan and the planner's search time."""
    import time

    lines = []
    for sc in scenarios:
        lines.append(f"== {sc['name']} (source {sc['source']}, devices {', '.join(sc['profiles'])})")
        for strategy in STRATEGIES:
            t0 = time.process_time()
            ch = make_plan(strategy, graph, sc["profiles"], sc["links"], sc["source"], sc.get("edge"), options)
            cpu = time.process_time() - t0
            extra = f" [{cpu * 1e3:.0f} ms CPU to plan]" if strategy == "tilemesh" else ""
            lines.append(f"  {strategy:<18} {ch.predicted_s * 1e3:8.1f} ms  {ch.label}{extra}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json

    from tilemesh.runtime.profile import measure_profile, validate_profile

    ap = argparse.ArgumentParser(prog="python -m tilemesh.planning.planner", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="ONNX file or compact .json (default: the demo model `tilemesh setup` built)")
    ap.add_argument("--profile", default="reference",
                    help="the edge's native profile: 'reference' (NATIVE_EDGE), 'measure' (now) or a JSON file")
    ap.add_argument("--devices", help="custom room: name:speed,... (speed x PYODIDE_LAPTOP, or 'native')")
    ap.add_argument("--source", help="the camera device (default: the first of --devices)")
    ap.add_argument("--edge", help="the edge peer's name, if any")
    ap.add_argument("--rtt", type=float, default=4.0, help="link round trip in ms (custom room)")
    ap.add_argument("--mbps", type=float, default=200.0, help="link bandwidth in Mbit/s (custom room)")
    ap.add_argument("--timeline", action="store_true", help="also draw the tilemesh plan's timeline")
    args = ap.parse_args(argv)

    graph = cli_graph(args.model)
    if args.profile == "reference":
        native = NATIVE_EDGE
    elif args.profile == "measure":
        native = measure_profile(graph)
    else:
        with open(args.profile) as f:
            native = validate_profile(json.load(f))
    print(f"native profile: {predict_graph_seconds_text(native, graph)}")
    if args.devices:
        profs = {}
        for item in args.devices.split(","):
            name, _, speed = item.partition(":")
            profs[name] = native if speed == "native" else browser_profile(float(speed or 1.0))
        scenarios = [{"name": "custom", "source": args.source or next(iter(profs)), "edge": args.edge,
                      "links": {"*": {"rtt_ms": args.rtt, "mbps": args.mbps}}, "profiles": profs}]
    else:
        scenarios = default_scenarios(native)
    print(strategy_table(graph, scenarios))
    if args.timeline:
        from .costmodel import format_timeline

        for sc in scenarios:
            ch = plan_frame(graph, sc["profiles"], sc["links"], sc["source"], {"edge": sc.get("edge")})
            print(f"\n{sc['name']}: {ch.label}\n{format_timeline(ch.prediction)}")
    return 0


def cli_graph(model: str | None):
    """The graph a planning CLI works on: an ONNX file or a compact .json; default: the demo model setup built."""
    from tilemesh.runtime.graph import load_compact, load_onnx

    if model is None:
        from tilemesh.models.demo import MODEL_FILE
        from tilemesh.paths import default_static_dir

        model = str(default_static_dir() / "model" / MODEL_FILE)
    return load_compact(model) if model.endswith(".json") else load_onnx(model)


def predict_graph_seconds_text(profile: dict, graph) -> str:
    from tilemesh.runtime.profile import predict_graph_seconds

    rates = ", ".join(f"{k} {1e-9 / v:.2f} GMAC/s" for k, v in profile["sec_per_mac"].items())
    return f"whole graph {predict_graph_seconds(profile, graph) * 1e3:.1f} ms natively ({rates})"


if __name__ == "__main__":
    raise SystemExit(main())
