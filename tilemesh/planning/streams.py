"""Streams: the room schedules frames, not just splits. Pure functions of (graph, profiles, links, objective).

A camera's stream runs on one or more *lanes*. A lane is one plan of `planner` (a frame whole on one device, or
split across a group) over its own devices; lanes share no device, so frames on different lanes run at the same
time, and each lane keeps up to `depth` frames in flight (pipelining: while the last device of a frame finishes,
the first starts the next). The camera hands each new frame to a lane with a free slot, in proportion to the
lanes' rates (`runtime.stream.StreamScheduler`).

Predictions, from the cost model's per-device timeline of one frame (`costmodel.Prediction`):
* latency of a lane: the frame's predicted total;
* a lane's rate: min(depth / latency, 1 / busy), where busy is its most loaded resource per frame (a device's
  compute, or a device's uplink);
* the stream: the lanes' rates added, then capped by what the camera phone itself can do (its uplink carries every
  lane's input pixels, its compute its own lane's share) and by the camera (`max_fps`).

Objectives (`objective`):
* "throughput" (default): the highest frame rate whose latency stays within `latency_factor` (default 1.2) times
  the fastest single-device latency (the frame whole on the best single device, sent there if need be);
* "latency": the planner's fastest answer for one frame, one frame in flight ("fastest answer").
Lanes searched for "throughput": the fastest answer's plan (`planner.plan_frame`) pipelined; every device fast
enough alone taking whole frames (with and without the camera computing); devices too slow alone joining the camera
on one split lane; and groups sharing frames (`split_lane_candidates`: the devices cut into groups of 2-3, each
group one split lane, `group_lane`), since `plan_frame` keeps a frame whole unless a split answers it faster by its
margin, while a split lane two frames deep can nearly double the rate within the bound.
A privacy option (`private`): raw pixels never leave the camera phone. Every lane's first segment then runs there
(partition plans that start on the source), and only features travel; `plan_stream` reports what it costs.

Several cameras (`divide_devices`): every stream keeps its own camera; the other devices go, one by one, fastest
first, to the stream predicted slowest so far, so no stream starves; each stream is then planned on its share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tilemesh.runtime.tiling import Split

from .planner import PlanChoice, Spec, _choice, make_plan, plan_frame, spec_devices

OBJECTIVES = ("throughput", "latency")
LATENCY_FACTOR = 1.2
DEPTH = 2
DEPTH_SLACK = 0.1  # a lane whose latency is within 10% of its bottleneck keeps one frame in flight
MAX_FPS = 30.0


@dataclass(frozen=True)
class Lane:
    choice: PlanChoice
    devices: frozenset[str]
    latency_s: float
    busy_s: float
    depth: int
    source_send_s: float  # the camera phone's uplink time per frame of this lane
    source_compute_s: float  # the camera phone's compute per frame of this lane

    @property
    def fps(self) -> float:
        return min(self.depth / self.latency_s, 1.0 / self.busy_s)

    def to_dict(self) -> dict:
        return {"label": self.choice.label, "strategy": self.choice.strategy, "devices": sorted(self.devices),
                "latency_s": self.latency_s, "busy_s": self.busy_s, "depth": self.depth, "fps": self.fps}


@dataclass(frozen=True)
class StreamPlan:
    source: str
    objective: str
    lanes: tuple[Lane, ...]
    weights: tuple[float, ...]  # share of the stream's frames per lane, summing to 1
    fps: float
    latency_s: float  # the slowest lane's predicted latency
    bound_s: float  # the latency bound the throughput objective kept to
    single_s: float  # the fastest single-device latency (what the bound is relative to)
    private: bool = False

    @property
    def devices(self) -> set[str]:
        return {d for lane in self.lanes for d in lane.devices}

    def to_dict(self) -> dict:
        return {"source": self.source, "objective": self.objective, "private": self.private,
                "lanes": [lane.to_dict() for lane in self.lanes], "weights": list(self.weights), "fps": self.fps,
                "latency_s": self.latency_s, "bound_s": self.bound_s, "single_s": self.single_s}


def lane_of(choice: PlanChoice, depth: int = DEPTH) -> Lane:
    """A plan as a lane: its latency, its bottleneck per frame, and what it costs the camera phone. `depth` is
    the most frames it may hold in flight; it holds only as many as raise its predicted rate (a frame whole on
    one device gains nothing from a second in flight, which would only wait there and double the latency)."""
    pred = choice.prediction
    sends = {dev: pred.time_in(dev, "send") for dev in pred.timeline}
    devices = frozenset(spec_devices(Spec(choice.strategy, choice.label, tuple(choice.cuts), tuple(choice.splits))))
    busy = max([*pred.compute_s.values(), *sends.values(), 1e-9])
    useful = max(1, math.ceil(pred.total_s / busy - DEPTH_SLACK))
    return Lane(choice, devices, pred.total_s, busy, min(depth, useful), sends.get(pred.source, 0.0),
                pred.compute_s.get(pred.source, 0.0))


def combine(source: str, objective: str, lanes: list[Lane], bound_s: float, single_s: float,
            max_fps: float = MAX_FPS, private: bool = False) -> StreamPlan:
    """Lanes run side by side: rates add, then the camera phone's uplink and compute and the camera cap them.

    The camera phone runs one thing at a time (its worker): while it computes a frame of one lane, the frames of
    the others wait to be sent or finished there, so each lane's latency grows by the longest compute the camera
    does for another lane (measured in browsers: a phone computing its own lane beside an offload lane took the
    offloaded frames from ~250 to ~500 ms)."""
    raw = sum(lane.fps for lane in lanes)
    send = sum(lane.fps * lane.source_send_s for lane in lanes)
    comp = sum(lane.fps * lane.source_compute_s for lane in lanes)
    scale = min(1.0, *(1.0 / x for x in (send, comp) if x > 1.0), max_fps / raw)
    weights = tuple(lane.fps / raw for lane in lanes)
    latency = max(lane.latency_s + max((o.source_compute_s for o in lanes if o is not lane), default=0.0)
                  for lane in lanes)
    return StreamPlan(source, objective, tuple(lanes), weights, raw * scale, latency, bound_s, single_s, private)


def single_lanes(graph, profiles, links, source: str, options: dict | None = None) -> dict[str, Lane]:
    """For every device, the frame whole on it (sent there from the camera if it is not the camera)."""
    out = {}
    for d in profiles:
        if d == source:
            choice = make_plan("single", graph, profiles, links, source, options=options)
        else:
            choice = _choice(graph, Spec("offload", f"frame to {d}, {d} runs all", (), (Split.whole(d),)),
                             profiles, links, source, dict(options or {}))
        out[d] = lane_of(choice)
    return out


def group_lane(graph, profiles, links, source: str, group, options: dict | None = None,
               depth: int = DEPTH) -> Lane | None:
    """A frame split across exactly the devices of `group` (two or more; the camera among them or not): the
    planner's split-then-gather candidates over those devices (`planner._split_family`: rows or grids, each
    fusion, shares rebalanced, the tail on one of them), the few best built and predicted with every profile
    (the camera's per-frame work and uplink included). None when no split of the group can be built.

    `plan_frame` picks the fastest answer for one frame and prefers fewer devices unless more are faster by its
    margin, so for a stream it may keep a frame whole where a split lane, pipelined (`depth`), doubles the rate
    within the latency bound: the stream planner therefore searches split lanes itself."""
    from .planner import FUSIONS, _Costs, _order, _shapes, _split_family  # noqa: PLC0415

    options = dict(options or {})
    group = list(dict.fromkeys(group))
    if len(group) < 2:
        return None
    sub = {d: profiles[d] for d in group}  # endings ("rest on g") only on the group's own devices
    costs = _Costs(graph, sub)
    devs = _order(group, source, {d: 1.0 / costs.whole(d) for d in group})
    est = []
    for shape in _shapes(len(devs)):
        for fusion in options.get("fusions", FUSIONS):
            est += _split_family(graph, costs, sub, links, source, devs, shape, fusion, options)
    est = sorted((e for e in est if spec_devices(e.spec) == set(group)),
                 key=lambda e: (e.predicted_s, len(e.spec.cuts), e.spec.label))
    built = []
    for e in est[:3]:
        try:
            built.append(_choice(graph, e.spec, profiles, links, source, options))
        except ValueError:
            continue
    if not built:
        return None
    return lane_of(min(built, key=lambda c: (c.predicted_s, c.label)), depth)


def _chunks(items: list, k: int) -> list[list]:
    return [items[i:i + k] for i in range(0, len(items), k)]


def split_lane_candidates(graph, profiles, links, source: str, singles: dict[str, Lane], options: dict,
                          depth: int, max_group: int = 3) -> list[list[Lane]]:
    """Lane sets made of groups sharing frames: the devices (camera first, then fastest first) cut into groups
    of k = 2..`max_group`, each group one split lane (a group of one: the frame whole on it), with the camera in
    the first group, computing alone beside the groups, or only dispatching to them."""
    costs = {d: lane.busy_s for d, lane in singles.items()}
    others = sorted((d for d in profiles if d != source), key=lambda d: (costs[d], d))
    cache: dict[frozenset, Lane | None] = {}

    def lane(grp: list[str]) -> Lane | None:
        if len(grp) == 1:
            return singles[grp[0]]
        key = frozenset(grp)
        if key not in cache:
            cache[key] = group_lane(graph, profiles, links, source, grp, options, depth)
        return cache[key]

    out: list[list[Lane]] = []
    for k in range(2, min(max_group, len(profiles)) + 1):
        layouts = [[[source, *others[:k - 1]], *_chunks(others[k - 1:], k)],  # the camera in the first group
                   [[source], *_chunks(others, k)],  # the camera alone beside the groups
                   _chunks(others, k)]  # the camera only dispatches
        for groups in layouts:
            lanes = [lane(grp) for grp in groups if grp]
            if lanes and all(ln is not None for ln in lanes) and any(len(grp) > 1 for grp in groups):
                out.append(lanes)
    return out


def plan_stream(graph, profiles: dict[str, dict], links, source: str, objective: str = "throughput",
                options: dict | None = None) -> StreamPlan:
    """The stream's lanes for `objective` (see the module doc). `options` as `planner.plan_frame`'s, plus
    `latency_factor`, `depth`, `max_fps` and `private`."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: one of {OBJECTIVES}")
    options = dict(options or {})
    private = bool(options.pop("private", False))
    depth = int(options.pop("depth", DEPTH))
    max_fps = float(options.pop("max_fps", MAX_FPS))
    factor = float(options.pop("latency_factor", LATENCY_FACTOR))
    if private:
        return _private_stream(graph, profiles, links, source, objective, options, depth, max_fps, factor)
    singles = single_lanes(graph, profiles, links, source, options)
    single_s = min(lane.latency_s for lane in singles.values())
    bound = factor * single_s
    fastest = lane_of(plan_frame(graph, profiles, links, source, options), depth=1)
    if objective == "latency":
        return combine(source, objective, [fastest], bound, single_s, max_fps)

    candidates: list[StreamPlan] = []
    split = lane_of(fastest.choice, depth)
    candidates.append(combine(source, objective, [split], bound, single_s, max_fps))
    # Data-parallel: every device fast enough alone takes whole frames.
    ok = sorted((lane for lane in singles.values() if lane.latency_s <= bound), key=lambda lane: lane.latency_s)
    if ok:
        candidates.append(combine(source, objective, ok, bound, single_s, max_fps))
        # The camera only dispatches: every other device fast enough takes whole frames.
        others = [lane for lane in ok if lane.source_compute_s == 0.0]
        if others and len(others) < len(ok):
            candidates.append(combine(source, objective, others, bound, single_s, max_fps))
    # Mixed: devices too slow alone join forces on one split lane beside the single lanes.
    slow = [d for d, lane in singles.items() if lane.latency_s > bound]
    if slow and ok:
        fast = [lane for lane in ok if lane.devices != frozenset({source})]
        group = {d: profiles[d] for d in (*slow, source)}
        joint = lane_of(plan_frame(graph, group, links, source, options), depth)
        if not joint.devices & {d for lane in fast for d in lane.devices}:
            candidates.append(combine(source, objective, [joint, *fast], bound, single_s, max_fps))
    # Groups sharing frames: split lanes (pipelined) where a whole frame elsewhere costs too much latency.
    for lanes in split_lane_candidates(graph, profiles, links, source, singles, options, depth):
        candidates.append(combine(source, objective, lanes, bound, single_s, max_fps))
        kept = [ln for ln in lanes if ln.latency_s <= bound]  # the same without lanes too slow for the bound
        if kept and len(kept) < len(lanes):
            candidates.append(combine(source, objective, kept, bound, single_s, max_fps))
    within = [c for c in candidates if c.latency_s <= bound * (1 + 1e-9)]
    pool = within or [min(candidates, key=lambda c: c.latency_s)]
    # Highest rate; on a tie (within 2%) fewer devices, then lower latency.
    best_fps = max(c.fps for c in pool)
    return min((c for c in pool if c.fps >= 0.98 * best_fps), key=lambda c: (len(c.devices), c.latency_s))


def _private_stream(graph, profiles, links, source, objective, options, depth, max_fps, factor) -> StreamPlan:
    """Raw pixels stay on the camera phone: the source alone, or partition-offload to another device where the
    source runs at least the first block (then only features travel), best split point per device by the cost
    model. Lanes all run their prefix on the source, so `combine` caps them by the source's compute."""
    from .planner import _analytic_two_stage, _Costs, _partition_offload_specs  # noqa: PLC0415

    costs = _Costs(graph, profiles)
    choices = [make_plan("single", graph, profiles, links, source, options=options)]
    for d in profiles:
        if d != source:
            specs = _partition_offload_specs(graph, source, d)
            best = min(specs, key=lambda sp: _analytic_two_stage(graph, costs, links, source, sp, options))
            choices.append(_choice(graph, best, profiles, links, source, dict(options)))
    lanes = [lane_of(c, depth) for c in choices]
    if not all(_keeps_pixels(lane.choice, source) for lane in lanes):
        raise AssertionError("a private lane sends camera pixels away")
    single_s = lanes[0].latency_s
    bound = factor * min(lane.latency_s for lane in lanes)
    fastest = min(lanes, key=lambda lane: lane.latency_s)
    if objective == "latency":
        return combine(source, objective, [lane_of(fastest.choice, 1)], bound, single_s, max_fps, private=True)
    ok = [lane for lane in lanes if lane.latency_s <= bound] or [fastest]
    candidates = [combine(source, objective, [lane], bound, single_s, max_fps, private=True) for lane in ok]
    candidates.append(combine(source, objective, ok, bound, single_s, max_fps, private=True))
    return max(candidates, key=lambda p: (p.fps, -len(p.devices)))


def _keeps_pixels(choice: PlanChoice, source: str) -> bool:
    """True when no device but the source receives any part of the graph input."""
    return all(tr.dst == source for tr in choice.plan.input_send)


def divide_devices(graph, profiles: dict[str, dict], links, sources: list[str],
                   options: dict | None = None, graphs: dict | None = None) -> dict[str, list[str]]:
    """Split the room's devices among camera streams: each keeps its camera; the rest go one by one (fastest
    first) to the stream whose predicted rate is lowest so far. `graphs`: a camera's own graph (a model variant,
    e.g. heavy mode) where it is not `graph`; rates are frames of each stream's own graph. Deterministic."""
    if not sources:
        return {}
    if len(set(sources)) != len(sources) or any(s not in profiles for s in sources):
        raise ValueError(f"streams {sources} must be distinct devices of the room")
    from .planner import _Costs  # noqa: PLC0415

    graphs = {s: (graphs or {}).get(s, graph) for s in sources}
    costs = {id(g): _Costs(g, profiles) for g in graphs.values()}
    fps = {s: {d: 1.0 / costs[id(graphs[s])].whole(d) for d in profiles} for s in sources}  # frames/s per device
    share = {s: [s] for s in sources}
    rate = {s: fps[s][s] for s in sources}
    speed = fps[sources[0]]  # the order in which devices are handed out: fastest first (on any one graph)
    for d in sorted((d for d in profiles if d not in share), key=lambda d: (-speed[d], d)):
        s = min(sources, key=lambda s: (rate[s], sources.index(s)))
        share[s].append(d)
        rate[s] += fps[s][d]
    return share


def plan_streams(graph, profiles: dict[str, dict], links, sources: list[str], objective: str = "throughput",
                 options: dict | None = None) -> dict[str, StreamPlan]:
    """Every camera's stream plan, each on its share of the devices (`divide_devices`)."""
    shares = divide_devices(graph, profiles, links, sources, options)
    return {s: plan_stream(graph, {d: profiles[d] for d in devs}, links, s, objective, options)
            for s, devs in shares.items()}


def main(argv=None) -> int:
    """Print stream plans (rate, latency, lanes) for rooms of equal phones, mixed rooms and two cameras."""
    import argparse  # noqa: PLC0415

    from .planner import browser_profile, cli_graph  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", help="ONNX file or compact .json (default: the demo model `tilemesh setup` built)")
    args = ap.parse_args(argv)
    g = cli_graph(args.model)
    wifi = {"*": {"rtt_ms": 4.0, "mbps": 200.0}}
    phone = browser_profile(0.5)

    def show(name, sp: StreamPlan):
        lanes = "; ".join(f"{lane.choice.label} ({lane.fps:.1f}/s)" for lane in sp.lanes)
        print(f"{name:<34} {sp.objective:<10} {sp.fps:6.2f} fps {sp.latency_s * 1e3:6.0f} ms "
              f"(bound {sp.bound_s * 1e3:.0f})  {lanes}")

    one = None
    for n in (1, 2, 3, 4):
        profiles = {f"p{i}": phone for i in range(n)}
        for obj in OBJECTIVES:
            sp = plan_stream(g, profiles, wifi, "p0", obj)
            show(f"{n} equal phones", sp)
            if obj == "throughput":
                one = one or sp
                print(f"{'':<34} rate {sp.fps / one.fps:.2f}x one phone, latency {sp.latency_s / one.latency_s:.2f}x")
    mixed = {"phone": phone, "laptop": browser_profile(1.0), "tablet": browser_profile(0.25)}
    for private in (False, True):
        show(f"phone+laptop+tablet{' (private)' if private else ''}",
             plan_stream(g, mixed, wifi, "phone", options={"private": private}))
    four = {f"p{i}": phone for i in range(4)}
    for src, sp in plan_streams(g, four, wifi, ["p0", "p1"]).items():
        show(f"two cameras, stream of {src}", sp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
