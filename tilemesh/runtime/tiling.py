"""Fused-segment tiling plans and exact tiled execution.

A plan cuts the graph into consecutive segments (`deps.make_segments`) and, for every segment, gives
each device a rectangle of each segment output to own. From the dependency table it derives each
device's `DeviceTask` per segment: which input regions it needs, which pieces it must receive and from
whom, the node steps (output region, input regions, per-tile pads) to run, and which pieces of its own
output it must send on. A segment owned whole by one device is a "gather": everyone sends it their part.

The graph input is owned like any other tensor (normally whole by the device with the camera), so the
first segment's input halo arrives through the same transfer list as every later halo.

`run_task` is the one per-device step that the browsers also call:
    (task, pieces this device holds) -> (its owned outputs, outgoing (Transfer, array) pairs)
`simulate` runs a whole plan in-process with per-device stores and mailboxes; it must equal full
inference. Plans are plain dataclasses with to_dict/from_dict for JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .deps import Segment, SegmentDeps, make_segments, segment_deps, segment_is_spatial
from .regions import Region, check_partition, grid_split, is_spatial, plane


@dataclass(frozen=True)
class Split:
    """How one segment's outputs are divided: a grid of device ids with optional uneven shares.

    `Split.rows({"a": 50, "b": 30, "c": 20})`, `Split.grid([["a", "b"], ["c", "d"]])`, `Split.whole("a")`.
    Applied to each output tensor's own H x W, so it works across resolutions.
    """

    devices: tuple[tuple[str, ...], ...]
    row_shares: tuple[float, ...] | None = None
    col_shares: tuple[float, ...] | None = None

    @classmethod
    def grid(cls, devices, row_shares=None, col_shares=None) -> Split:
        return cls(
            tuple(tuple(r) for r in devices),
            tuple(row_shares) if row_shares else None,
            tuple(col_shares) if col_shares else None,
        )

    @classmethod
    def rows(cls, shares: dict[str, float]) -> Split:
        return cls(tuple((d,) for d in shares), tuple(shares.values()), None)

    @classmethod
    def whole(cls, device: str) -> Split:
        return cls(((device,),))

    def partition(self, h: int, w: int) -> dict[str, Region]:
        return grid_split(h, w, [list(r) for r in self.devices], self.row_shares, self.col_shares)

    def to_dict(self) -> dict:
        return {
            "devices": [list(r) for r in self.devices],
            "row_shares": list(self.row_shares) if self.row_shares else None,
            "col_shares": list(self.col_shares) if self.col_shares else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Split:
        return cls.grid(d["devices"], d.get("row_shares"), d.get("col_shares"))


@dataclass(frozen=True)
class Transfer:
    """`src` sends rows/cols `region` of `tensor` (all channels) to `dst`.

    A partial reduction (`reduce` = "mean" or "max") instead carries src's pooled part of tensor `of`:
    the sum (or max) over `region`, src's own rectangle of `of`, per channel, shaped like the pooled
    `tensor` (1, C, 1, 1). Every device that needs `tensor` combines the partials of all owners of `of`.
    """

    src: str
    dst: str
    tensor: str
    region: Region
    reduce: str | None = None
    of: str | None = None

    def nbytes(self, graph, itemsize: int = 4) -> int:
        shape = graph.shapes[self.tensor]
        channels = int(shape[1]) if is_spatial(shape) else int(np.prod(shape))
        return (1 if self.reduce else self.region.area) * channels * itemsize

    def to_dict(self) -> dict:
        d = {"src": self.src, "dst": self.dst, "tensor": self.tensor, "region": self.region.to_list()}
        if self.reduce:
            d.update(reduce=self.reduce, of=self.of)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Transfer:
        return cls(d["src"], d["dst"], d["tensor"], Region.from_list(d["region"]), d.get("reduce"), d.get("of"))


def partial_pool(arr: np.ndarray, kind: str) -> np.ndarray:
    """One device's contribution to a distributed global pool: per-channel sum (for "mean") or max."""
    if kind == "mean":
        return arr.sum(axis=(2, 3), keepdims=True, dtype=np.float64).astype(np.float32)
    return arr.max(axis=(2, 3), keepdims=True).astype(np.float32)


def combine_pool(partials, kind: str, cells: int) -> np.ndarray:
    """The pooled vector from every owner's partial: the same on every device that combines them."""
    if kind == "mean":
        total = np.sum([p.astype(np.float64) for p in partials], axis=0)
        return (total / cells).astype(np.float32)
    return np.maximum.reduce(list(partials)).astype(np.float32)


@dataclass(frozen=True)
class DeviceTask:
    """One device's work in one segment."""

    device: str
    segment: int
    deps: SegmentDeps  # steps to run; deps.inputs = needed region of each segment input
    owned: dict[str, Region]  # segment output -> the rectangle this device owns (keeps, serves)
    recv: tuple[Transfer, ...]  # pieces to wait for before running
    send: tuple[Transfer, ...]  # pieces of `owned` to send after running

    @property
    def macs(self) -> int:
        return self.deps.macs

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "segment": self.segment,
            "deps": self.deps.to_dict(),
            "owned": {k: v.to_list() for k, v in self.owned.items()},
            "recv": [t.to_dict() for t in self.recv],
            "send": [t.to_dict() for t in self.send],
        }

    @classmethod
    def from_dict(cls, d: dict) -> DeviceTask:
        return cls(
            d["device"],
            int(d["segment"]),
            SegmentDeps.from_dict(d["deps"]),
            {k: Region.from_list(v) for k, v in d["owned"].items()},
            tuple(Transfer.from_dict(t) for t in d["recv"]),
            tuple(Transfer.from_dict(t) for t in d["send"]),
        )


@dataclass(frozen=True)
class DevicePlan:
    """Everything one browser needs: the graph-input piece it holds and sends, and its tasks in order."""

    device: str
    input_tensor: str
    input_owned: Region | None  # part of the graph input this device starts with
    input_send: tuple[Transfer, ...]  # pieces of that part to send before anything runs
    tasks: tuple[DeviceTask, ...]
    output_tensor: str
    output_owned: Region | None  # part of the final output this device ends up owning

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "input_tensor": self.input_tensor,
            "input_owned": self.input_owned.to_list() if self.input_owned else None,
            "input_send": [t.to_dict() for t in self.input_send],
            "tasks": [t.to_dict() for t in self.tasks],
            "output_tensor": self.output_tensor,
            "output_owned": self.output_owned.to_list() if self.output_owned else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DevicePlan:
        return cls(
            d["device"],
            d["input_tensor"],
            Region.from_list(d["input_owned"]) if d["input_owned"] else None,
            tuple(Transfer.from_dict(t) for t in d["input_send"]),
            tuple(DeviceTask.from_dict(t) for t in d["tasks"]),
            d["output_tensor"],
            Region.from_list(d["output_owned"]) if d["output_owned"] else None,
        )


@dataclass
class Plan:
    segments: list[Segment]
    owners: dict[str, dict[str, Region]]  # graph input and every segment output -> device -> owned part
    tasks: list[DeviceTask]  # ordered by segment
    input_send: list[Transfer]
    input_tensor: str
    output_tensor: str
    full_macs: list[int] = field(default_factory=list)  # per segment, computed untiled by one device

    @property
    def devices(self) -> list[str]:
        seen: list[str] = []
        for part in self.owners.values():
            for d in part:
                if d not in seen:
                    seen.append(d)
        return seen

    @property
    def transfers(self) -> list[Transfer]:
        return list(self.input_send) + [t for task in self.tasks for t in task.send]

    def device_plan(self, device: str) -> DevicePlan:
        return DevicePlan(
            device,
            self.input_tensor,
            self.owners[self.input_tensor].get(device),
            tuple(t for t in self.input_send if t.src == device),
            tuple(t for t in self.tasks if t.device == device),
            self.output_tensor,
            self.owners[self.output_tensor].get(device),
        )

    def stats(self, graph) -> list[dict]:
        """Per segment: full MACs, summed tile MACs, redundant %, halo cells and bytes received."""
        out = []
        for seg in self.segments:
            tasks = [t for t in self.tasks if t.segment == seg.index]
            tile_macs = sum(t.macs for t in tasks)
            full = self.full_macs[seg.index]
            halo_cells = 0
            for t in tasks:
                for tensor, need in t.deps.inputs.items():
                    if tensor in t.deps.reduced:
                        continue
                    own = self.owners[tensor].get(t.device)
                    halo_cells += need.area - (need.intersect(own).area if own else 0)
            recv_bytes = sum(tr.nbytes(graph) for t in tasks for tr in t.recv)
            out.append(
                {
                    "segment": seg.index,
                    "nodes": len(seg.nodes),
                    "devices": len(tasks),
                    "full_macs": full,
                    "tile_macs": tile_macs,
                    "redundant_pct": 100.0 * (tile_macs - full) / full if full else 0.0,
                    "halo_cells": halo_cells,
                    "recv_bytes": recv_bytes,
                }
            )
        return out

    def to_dict(self) -> dict:
        return {
            "segments": [s.to_dict() for s in self.segments],
            "owners": {t: {d: r.to_list() for d, r in p.items()} for t, p in self.owners.items()},
            "tasks": [t.to_dict() for t in self.tasks],
            "input_send": [t.to_dict() for t in self.input_send],
            "input_tensor": self.input_tensor,
            "output_tensor": self.output_tensor,
            "full_macs": list(self.full_macs),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(
            [Segment.from_dict(s) for s in d["segments"]],
            {t: {dv: Region.from_list(r) for dv, r in p.items()} for t, p in d["owners"].items()},
            [DeviceTask.from_dict(t) for t in d["tasks"]],
            [Transfer.from_dict(t) for t in d["input_send"]],
            d["input_tensor"],
            d["output_tensor"],
            [int(m) for m in d["full_macs"]],
        )


def _pieces_for(tensor: str, need: Region, dst: str, owners: dict[str, Region]) -> list[Transfer]:
    """Transfers bringing `need` of `tensor` to `dst` from every other owner (sorted for determinism)."""
    out = []
    for src in sorted(owners):
        if src == dst:
            continue
        piece = need.intersect(owners[src])
        if not piece.empty:
            out.append(Transfer(src, dst, tensor, piece))
    return out


def _with_own_parts(deps: SegmentDeps, owners, dev: str) -> SegmentDeps:
    """Record this device's own part of each reduced tensor, and make sure it keeps that part as an input."""
    if not deps.reduced:
        return deps
    inputs, regions, reduced = dict(deps.inputs), dict(deps.regions), {}
    for p, (x, kind, _) in deps.reduced.items():
        own = owners[x].get(dev)
        reduced[p] = (x, kind, own)
        if own is not None:
            inputs[x] = inputs.get(x, own).hull(own)
            regions[x] = regions.get(x, own).hull(own)
    return SegmentDeps(deps.steps, regions, inputs, reduced)


def build_plan(graph, cuts, splits, source) -> Plan:
    """Build a plan.

    cuts: node indices where a new segment starts (see `deps.cut_candidates`).
    splits: one per segment; a `Split`, or a dict tensor -> {device: Region} for exact control over
        each segment output (must partition the tensor).
    source: who holds the graph input at the start: a device id (owns it whole), a `Split`, or a
        {device: Region} partition.
    """
    segments = make_segments(graph, cuts)
    if len(splits) != len(segments):
        raise ValueError(f"{len(segments)} segments but {len(splits)} splits")
    nodes_by_name = {n.name: n for n in graph.nodes}

    def as_partition(spec, tensor: str) -> dict[str, Region]:
        h, w = plane(graph.shapes[tensor])
        part = spec.partition(h, w) if isinstance(spec, Split) else dict(spec)
        part = {d: r for d, r in part.items() if not r.empty}
        check_partition(part, h, w)
        return part

    owners: dict[str, dict[str, Region]] = {}
    if isinstance(source, str):
        source = Split.whole(source)
    owners[graph.input] = as_partition(source, graph.input)

    tasks_by_seg: list[list[DeviceTask]] = []
    recv_by_key: dict[tuple[int, str], list[Transfer]] = {}
    full_macs = []
    producer_seg: dict[str, int] = {graph.input: -1}
    for seg, spec in zip(segments, splits, strict=True):
        nodes = [nodes_by_name[n] for n in seg.nodes]
        for t in seg.outputs:
            owners[t] = as_partition(spec[t] if isinstance(spec, dict) else spec, t)
            producer_seg[t] = seg.index
            if not segment_is_spatial(graph, seg) and len(owners[t]) > 1:
                raise ValueError(f"segment {seg.index} has a global op: it must be whole to one device")
        full = segment_deps(graph, nodes, {t: Region.full(*plane(graph.shapes[t])) for t in seg.outputs})
        full_macs.append(full.macs)
        devices = []
        for t in seg.outputs:
            devices += [d for d in owners[t] if d not in devices]
        seg_tasks = []
        for dev in devices:
            owned = {t: owners[t][dev] for t in seg.outputs if dev in owners[t]}
            deps = _with_own_parts(segment_deps(graph, nodes, owned), owners, dev)
            recv = []
            for tensor, need in deps.inputs.items():
                if tensor in deps.reduced:
                    x, kind, _ = deps.reduced[tensor]
                    recv += [Transfer(src, dev, tensor, r, kind, x) for src, r in sorted(owners[x].items())
                             if src != dev]
                else:
                    recv += _pieces_for(tensor, need, dev, owners[tensor])
            for tr in recv:
                recv_by_key.setdefault((producer_seg[tr.of or tr.tensor], tr.src), []).append(tr)
            seg_tasks.append(DeviceTask(dev, seg.index, deps, owned, tuple(recv), ()))
        tasks_by_seg.append(seg_tasks)

    # Sends are attached to the producer's task so a device ships each piece as soon as it has it.
    tasks = []
    for seg_tasks in tasks_by_seg:
        for t in seg_tasks:
            send = tuple(recv_by_key.get((t.segment, t.device), ()))
            tasks.append(DeviceTask(t.device, t.segment, t.deps, t.owned, t.recv, send))
    input_send = [tr for (s, _), trs in sorted(recv_by_key.items()) if s == -1 for tr in trs]
    return Plan(segments, owners, tasks, input_send, graph.input, graph.output, full_macs)


# ---------------------------------------------------------------------------------------------------
# Execution


def crop(arr: np.ndarray, have: Region, want: Region) -> np.ndarray:
    """The `want` part of an array holding region `have` of a tensor (non-NCHW arrays pass whole)."""
    if arr.ndim != 4:
        return arr
    if not have.contains(want):
        raise ValueError(f"have {have}, want {want}")
    rs, cs = want.relative_to(have)
    return arr[:, :, rs, cs]


def assemble(pieces, want: Region, shape: tuple[int, ...]) -> np.ndarray:
    """Build region `want` of a tensor from (region, array) pieces; raise if any cell is missing."""
    pieces = list(pieces)
    if not is_spatial(shape):
        for r, a in pieces:
            if r.contains(want):
                return a
        raise ValueError("non-spatial tensor missing")
    for r, a in pieces:
        if r.contains(want):
            return np.ascontiguousarray(crop(a, r, want))
    dtype = pieces[0][1].dtype if pieces else np.float32
    out = np.empty((shape[0], shape[1], want.rows, want.cols), dtype=dtype)
    covered = np.zeros((want.rows, want.cols), dtype=bool)
    for r, a in pieces:
        part = r.intersect(want)
        if part.empty:
            continue
        rs, cs = part.relative_to(want)
        out[:, :, rs, cs] = crop(a, r, part)
        covered[rs, cs] = True
    if not covered.all():
        raise ValueError(f"pieces do not cover {want}: {int((~covered).sum())} cells missing")
    return out


def _is_whole(graph, deps: SegmentDeps) -> bool:
    return all(r == Region.full(*plane(graph.shapes[t])) for t, r in deps.regions.items())


def run_steps(graph, deps: SegmentDeps, inputs: dict[str, np.ndarray], keep=(), backend=None) -> dict[str, np.ndarray]:
    """Run a segment's steps on one tile. `inputs[t]` holds exactly `deps.inputs[t]` of segment input t.

    Returns the tensors named in `keep`, each array holding `deps.regions[t]`; other intermediates are
    freed after their last reader (a 112x112 tile of an early MobileNetV2 segment is megabytes each).
    `backend` is a `backend.Backend` (numpy kernels by default).
    """
    if backend is None:
        from .backend import NumpyBackend

        backend = NumpyBackend(graph)
    nodes = {n.name: n for n in graph.nodes}
    seg_nodes = [nodes[s.node] for s in deps.steps]
    keep = set(keep)
    if not seg_nodes:  # e.g. a segment that is only a distributed pool: its result is already an input
        return {t: inputs[t] for t in keep if t in inputs}
    if hasattr(backend, "run_segment"):
        # An engine running a whole tile's steps as one model (onnxruntime: `task_model`, per-tile pads built in).
        from .backend import NumpyBackend, segment_keep
        from .task_model import NotLowerable

        try:
            return backend.run_segment(deps, inputs, segment_keep(deps, list(keep)))
        except NotLowerable:  # an op the ONNX writer does not lower: this tile runs on the numpy kernels
            backend = NumpyBackend(graph)
    if _is_whole(graph, deps):
        # Untiled (a gather or a lone device): no pads to override, so the backend may fuse the run.
        return backend.run_nodes(seg_nodes, inputs, [t for t in keep if t in deps.regions])
    last = {t: i for i, n in enumerate(seg_nodes) for t in n.inputs}
    vals: dict[str, tuple[Region, np.ndarray]] = {t: (deps.inputs[t], a) for t, a in inputs.items()}
    for i, (step, node) in enumerate(zip(deps.steps, seg_nodes, strict=True)):
        args = [crop(vals[t][1], vals[t][0], r) for t, r in zip(node.inputs, step.ins, strict=True)]
        y = backend.run_node(node, args, pads=step.pads)
        if y.ndim == 4 and y.shape[2:] != (step.out.rows, step.out.cols):
            raise AssertionError(f"{node.name}: got {y.shape[2:]}, planned {step.out}")
        vals[node.output] = (step.out, y)
        for t in node.inputs:
            if last[t] == i and t not in keep:
                vals.pop(t, None)
    return {t: vals[t][1] for t in keep if t in vals}


def run_task(graph, task: DeviceTask, pieces: dict[str, list], backend=None):
    """The per-device step.

    pieces: tensor -> list of (Region, array) this device holds (its own earlier outputs and what it
        received). Only the regions in `task.deps.inputs` are read.
    Returns (owned, outgoing): owned = tensor -> (Region, array) for `task.owned`; outgoing = list of
    (Transfer, array) to deliver to other devices.
    """
    inputs = task_inputs(graph, task, pieces)
    return finish_task(task, run_steps(graph, task.deps, inputs, keep=task.owned, backend=backend))


def task_inputs(graph, task: DeviceTask, pieces: dict[str, list]) -> dict[str, np.ndarray]:
    """The first half of `run_task`: each segment input's needed region (`task.deps.inputs`) assembled from
    pieces; a reduced (pooled) input combined from the partials received and this device's own part."""
    out = {}
    for t, r in task.deps.inputs.items():
        if t in task.deps.reduced:
            continue
        out[t] = assemble(pieces.get(t, ()), r, graph.shapes[t])
    for p, (x, kind, own) in task.deps.reduced.items():
        parts = [a for _, a in pieces.get(p, ())]
        if own is not None:
            parts.append(partial_pool(crop(out[x], task.deps.inputs[x], own), kind))
        expected = sum(1 for tr in task.recv if tr.tensor == p) + (own is not None)
        if len(parts) != expected:
            raise ValueError(f"{task.device}: {len(parts)} partials of {p}, expected {expected}")
        h, w = plane(graph.shapes[x])
        out[p] = combine_pool(parts, kind, h * w)
    return out


def finish_task(task: DeviceTask, vals: dict[str, np.ndarray]):
    """The second half of `run_task`: from the computed tile of each owned tensor (`vals[t]` holds
    `task.deps.regions[t]`), what this device keeps and what it sends. An engine that computes elsewhere
    (onnxruntime-web in the browser) takes `task_inputs` and hands its results back here."""
    owned = {t: (r, np.ascontiguousarray(crop(vals[t], task.deps.regions[t], r))) for t, r in task.owned.items()}
    outgoing = [
        (tr, partial_pool(crop(owned[tr.of][1], owned[tr.of][0], tr.region), tr.reduce) if tr.reduce
         else np.ascontiguousarray(crop(owned[tr.tensor][1], owned[tr.tensor][0], tr.region))) for tr in task.send
    ]
    return owned, outgoing


def input_pieces(dplan: DevicePlan, x: np.ndarray):
    """What a device holding the graph input does first: keep its part, send the pieces others need."""
    full = Region.full(*plane(x.shape))
    if dplan.input_owned is None:
        return {}, []
    own = np.ascontiguousarray(crop(x, full, dplan.input_owned))
    sends = [(tr, np.ascontiguousarray(crop(x, full, tr.region))) for tr in dplan.input_send]
    return {dplan.input_tensor: (dplan.input_owned, own)}, sends


def simulate(graph, plan: Plan, x: np.ndarray, backend=None, roundtrip_json: bool = False) -> np.ndarray:
    """Run every device's plan in-process, each with only its own store and mailbox; stitch the output.

    With roundtrip_json each device's plan goes through to_dict/JSON/from_dict first, as in the browser.
    """
    import json

    stores: dict[str, dict[str, list]] = {d: {} for d in plan.devices}
    dplans = {d: plan.device_plan(d) for d in plan.devices}
    if roundtrip_json:
        dplans = {d: DevicePlan.from_dict(json.loads(json.dumps(p.to_dict()))) for d, p in dplans.items()}

    def deliver(outgoing):
        for tr, arr in outgoing:
            stores[tr.dst].setdefault(tr.tensor, []).append((tr.region, arr))

    for d, dp in dplans.items():
        owned, sends = input_pieces(dp, x)
        for t, piece in owned.items():
            stores[d].setdefault(t, []).append(piece)
        deliver(sends)
    # Segment order is a valid schedule: every recv of segment s comes from a segment before s.
    for seg in plan.segments:
        for d, dp in dplans.items():
            for task in dp.tasks:
                if task.segment != seg.index:
                    continue
                owned, sends = run_task(graph, task, stores[d], backend)
                for t, piece in owned.items():
                    stores[d].setdefault(t, []).append(piece)
                deliver(sends)
    shape = graph.shapes[graph.output]
    parts = [stores[d][graph.output][-1] for d in plan.owners[graph.output]]
    return assemble(parts, Region.full(*plane(shape)), shape)


# ---------------------------------------------------------------------------------------------------
# Figures for planners and people


def fused_tiling_report(graph, split: Split | None = None, cuts=None) -> list[dict]:
    """For each cut (default: every single-tensor cut), the figures of one fused segment from the graph
    input up to it, tiled by `split` (default 2x2) with the input sent from one source device:
    cumulative stride and receptive-field halo of the cut tensor, summed tile MACs over untiled MACs
    (redundant %), and the input bytes every tile receives (its region plus halo).

    Stops at the first cut whose prefix is no longer spatial (global ops).
    """
    from .deps import cut_candidates, input_halo, live_tensors

    split = split or Split.grid([["a", "b"], ["c", "d"]])
    rows = []
    for k in cut_candidates(graph) if cuts is None else cuts:
        seg = make_segments(graph, [k])[0]
        if not segment_is_spatial(graph, seg):
            break
        (tensor,) = live_tensors(graph, k)
        stride, halo = input_halo(graph, tensor)
        source = "_source"
        plan = build_plan(graph, [k], [split, Split.whole(source)], source)
        s0 = plan.stats(graph)[0]
        rows.append(
            {
                "cut": k,
                "tensor": tensor,
                "shape": tuple(graph.shapes[tensor]),
                "stride": stride,
                "halo_px": halo,
                "full_macs": s0["full_macs"],
                "tile_macs": s0["tile_macs"],
                "redundant_pct": s0["redundant_pct"],
                "input_bytes": s0["recv_bytes"],
            }
        )
    return rows
