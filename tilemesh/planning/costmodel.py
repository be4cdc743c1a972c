"""Predict one frame's latency for a tiling plan: an event simulation over its tasks and transfers.

The model, in the order a frame happens:

* t = 0: the source device (the phone with the camera) gets the frame and first pays its per-frame work
  (`profile.frame_overhead_seconds`: the crop, normalisation and top-k in its Python runtime); then it
  holds the whole graph input. It sends every
  input piece other devices need as uint8 RGB (1 byte per channel-pixel, a quarter of float32: the
  receiver normalizes), one after another on its uplink.
* Each device runs its tasks serially in segment order; a task starts when the device is free and
  every piece in its `recv` list has arrived. Its time is the sum, over its node steps, of
  `profile.predict_node_seconds` for the step's region, so redundant halo compute is included, plus the
  device's fixed cost per task (`profile.task_overhead_seconds`: an engine call, copies, bookkeeping).
* After a task, its `send` pieces (float32) queue on the device's uplink: sends from one device are
  serialized (a phone's radio is shared) and each occupies the uplink for bytes / bandwidth, then
  arrives one-way latency (rtt / 2) later. Sending overlaps computing: the browser's main thread owns
  the data channels while a Worker computes. A device sending to itself is free.
* The frame ends when the final output (logits, float32) has reached the source.

Links come from a matrix `{(a, b): {"rtt_ms": .., "mbps": ..}}` (mbps = megabits per second); a
missing (a, b) falls back to (b, a), then to `default_link` (options). Everything here is pure: no
clocks, no I/O, so placement cases are plain unit tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tilemesh.runtime.profile import frame_overhead_seconds, predict_node_seconds, task_overhead_seconds
from tilemesh.runtime.regions import Region, is_spatial

DEFAULT_LINK = {"rtt_ms": 4.0, "mbps": 200.0}  # room Wi-Fi, browser to browser (measured: 16-40 MB/s)
INPUT_ITEMSIZE = 1  # the source ships camera pixels as uint8
ACT_ITEMSIZE = 4  # activations and logits travel as float32


def link_params(links: dict | None, a: str, b: str, default: dict | None = None) -> tuple[float, float]:
    """(one-way latency in s, bytes per s) of the a -> b link; (0, inf) from a device to itself."""
    if a == b:
        return 0.0, float("inf")
    links = links or {}
    spec = links.get((a, b)) or links.get((b, a)) or links.get(f"{a}|{b}") or links.get(f"{b}|{a}")
    spec = spec or links.get("*") or default or DEFAULT_LINK
    mbps = float(spec["mbps"])
    if mbps <= 0:
        raise ValueError(f"link {a}->{b} has no bandwidth")
    return float(spec["rtt_ms"]) / 2000.0, mbps * 1e6 / 8.0


def tensor_bytes(graph, tensor: str, region, itemsize: int = ACT_ITEMSIZE) -> int:
    shape = graph.shapes[tensor]
    channels = int(shape[1]) if is_spatial(shape) else 1
    cells = region.area if is_spatial(shape) else int(_prod(shape))
    return cells * channels * itemsize


def transfer_bytes(graph, tr, itemsize: int = ACT_ITEMSIZE) -> int:
    """Bytes of one `tiling.Transfer`: its region of the tensor, or one pooled vector for a partial reduction."""
    if getattr(tr, "reduce", None):
        return tensor_bytes(graph, tr.tensor, Region(0, 1, 0, 1), itemsize)
    return tensor_bytes(graph, tr.tensor, tr.region, itemsize)


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


@dataclass
class Interval:
    """One bar of a device's timeline: compute (a segment task), send (uplink busy) or wait (idle,
    blocked on a piece not yet arrived)."""

    kind: str
    start: float
    end: float
    segment: int | None = None
    peer: str | None = None
    tensor: str | None = None
    nbytes: int = 0

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "start": self.start, "end": self.end}
        for k in ("segment", "peer", "tensor"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.nbytes:
            d["bytes"] = self.nbytes
        return d


@dataclass
class Prediction:
    total_s: float
    source: str
    timeline: dict[str, list[Interval]] = field(default_factory=dict)
    compute_s: dict[str, float] = field(default_factory=dict)
    bytes_sent: dict[str, int] = field(default_factory=dict)
    macs: dict[str, int] = field(default_factory=dict)
    finish_s: dict[str, float] = field(default_factory=dict)  # end of each device's last compute

    @property
    def source_compute_s(self) -> float:
        return self.compute_s.get(self.source, 0.0)

    def time_in(self, device: str, kind: str) -> float:
        """Seconds `device` spends in intervals of `kind` ("compute", "send", "wait") during the frame."""
        return sum(i.end - i.start for i in self.timeline.get(device, ()) if i.kind == kind)

    def wait_s(self, device: str) -> float:
        return self.time_in(device, "wait")

    @classmethod
    def from_dict(cls, d: dict) -> Prediction:
        devs = d["devices"]
        return cls(
            float(d["total_s"]),
            d["source"],
            {k: [Interval(i["kind"], i["start"], i["end"], i.get("segment"), i.get("peer"), i.get("tensor"),
                          int(i.get("bytes", 0))) for i in v["timeline"]] for k, v in devs.items()},
            {k: float(v["compute_s"]) for k, v in devs.items()},
            {k: int(v["bytes_sent"]) for k, v in devs.items()},
            {k: int(v["macs"]) for k, v in devs.items()},
            {k: float(v["finish_s"]) for k, v in devs.items()},
        )

    def to_dict(self) -> dict:
        return {
            "total_s": self.total_s,
            "source": self.source,
            "source_compute_s": self.source_compute_s,
            "devices": {
                d: {
                    "compute_s": self.compute_s.get(d, 0.0),
                    "wait_s": self.wait_s(d),
                    "bytes_sent": self.bytes_sent.get(d, 0),
                    "macs": self.macs.get(d, 0),
                    "finish_s": self.finish_s.get(d, 0.0),
                    "timeline": [i.to_dict() for i in self.timeline.get(d, ())],
                }
                for d in self.timeline
            },
        }


class LinkSim:
    """Device clocks and uplinks; the shared core of `predict_plan` and the planner's fast search."""

    def __init__(self, links, default_link=None, record: bool = True, per_transfer_s: float = 0.0):
        self.links = links
        self.default_link = default_link
        self.record = record
        self.per_transfer_s = per_transfer_s
        self.free: dict[str, float] = {}
        self.uplink: dict[str, float] = {}
        self.timeline: dict[str, list[Interval]] = {}
        self.bytes_sent: dict[str, int] = {}
        self._lp: dict[tuple[str, str], tuple[float, float]] = {}

    def _link(self, a, b):
        lp = self._lp.get((a, b))
        if lp is None:
            lp = self._lp[(a, b)] = link_params(self.links, a, b, self.default_link)
        return lp

    def send(self, src: str, dst: str, nbytes: int, ready: float, tensor: str | None = None,
             uplink: dict | None = None) -> float:
        """Queue a transfer on src's uplink at time `ready`; return its arrival time at dst."""
        if src == dst:
            return ready
        up = self.uplink if uplink is None else uplink
        lat, bw = self._link(src, dst)
        start = max(ready, up.get(src, 0.0))
        end = start + nbytes / bw
        up[src] = end
        if uplink is None:
            self.bytes_sent[src] = self.bytes_sent.get(src, 0) + nbytes
            if self.record:
                self.timeline.setdefault(src, []).append(
                    Interval("send", start, end, peer=dst, tensor=tensor, nbytes=nbytes))
        return end + lat + self.per_transfer_s

    def compute(self, dev: str, ready: float, seconds: float, segment: int | None = None) -> float:
        """Run `seconds` of work on dev once it is free and `ready`; return the end time."""
        free = self.free.get(dev, 0.0)
        start = max(free, ready)
        if self.record:
            tl = self.timeline.setdefault(dev, [])
            if start > free:
                tl.append(Interval("wait", free, start, segment=segment))
            tl.append(Interval("compute", start, start + seconds, segment=segment))
        self.free[dev] = start + seconds
        return start + seconds


def task_seconds(graph, task, profile: dict, by_name: dict | None = None) -> float:
    """Predicted compute time of one DeviceTask on a device with `profile`."""
    by_name = by_name or {n.name: n for n in graph.nodes}
    t = sum(predict_node_seconds(profile, graph, by_name[s.node], s.macs, s.out) for s in task.deps.steps)
    t += task_overhead_seconds(profile) if task.deps.steps else 0.0
    return t + sum(reduced_pool_seconds(graph, p, own, profile) for p, (_, _, own) in task.deps.reduced.items())


def reduced_pool_seconds(graph, pooled: str, own, profile: dict) -> float:
    """A distributed pool as one device sees it: pooling its own part (`own`, or nothing) and combining."""
    node = graph.producer(pooled)
    channels = int(graph.shapes[node.inputs[0]][1])
    return predict_node_seconds(profile, graph, node, own.area * channels if own else 0, Region(0, 1, 0, 1))


def predict_plan(graph, plan, profiles: dict[str, dict], links: dict | None, source: str,
                 options: dict | None = None) -> Prediction:
    """Predict `plan`'s frame latency and per-device timeline (see the module docstring).

    options: `default_link` ({"rtt_ms", "mbps"}) for pairs missing from `links`; `per_transfer_s`, a
    fixed cost added to every transfer's arrival (message handling), 0 by default.
    """
    options = options or {}
    missing = [d for d in plan.devices if d not in profiles]
    if missing:
        raise ValueError(f"no profile for devices {missing}")
    sim = LinkSim(links, options.get("default_link"), True, float(options.get("per_transfer_s", 0.0)))
    by_name = {n.name: n for n in graph.nodes}
    for d in plan.devices:
        sim.timeline.setdefault(d, [])
    sim.timeline.setdefault(source, [])

    arrival: dict = {}
    # The source's per-frame work first; then the input pieces leave it, in plan order.
    frame_s = frame_overhead_seconds(profiles[source]) if source in profiles else 0.0
    start = sim.compute(source, 0.0, frame_s) if frame_s > 0 else 0.0
    for tr in plan.input_send:
        arrival[tr] = sim.send(tr.src, tr.dst, tensor_bytes(graph, tr.tensor, tr.region, INPUT_ITEMSIZE), start,
                               tr.tensor)
    compute_s: dict[str, float] = {}
    macs: dict[str, int] = {}
    out_ready: dict[str, float] = {}
    for task in plan.tasks:
        ready = max((arrival[tr] for tr in task.recv), default=start)
        secs = task_seconds(graph, task, profiles[task.device], by_name)
        end = sim.compute(task.device, ready, secs, task.segment)
        compute_s[task.device] = compute_s.get(task.device, 0.0) + secs
        macs[task.device] = macs.get(task.device, 0) + task.macs
        for tr in task.send:
            arrival[tr] = sim.send(tr.src, tr.dst, transfer_bytes(graph, tr), end, tr.tensor)
        if plan.output_tensor in task.owned:
            out_ready[task.device] = end
    total = 0.0
    for dev, region in plan.owners[plan.output_tensor].items():
        t = out_ready.get(dev, 0.0)
        if dev != source:
            t = sim.send(dev, source, tensor_bytes(graph, plan.output_tensor, region), t, plan.output_tensor)
        total = max(total, t)
    return Prediction(total, source, sim.timeline, compute_s, sim.bytes_sent, macs, dict(sim.free))


def format_timeline(pred: Prediction, width: int = 60) -> str:
    """A text Gantt chart of a prediction: '#' compute, '>' send, '.' wait (for logs and the bench)."""
    scale = width / pred.total_s if pred.total_s > 0 else 0.0
    lines = []
    for dev, ivs in pred.timeline.items():
        row = [" "] * width
        for iv in ivs:
            ch = {"compute": "#", "send": ">", "wait": "."}[iv.kind]
            a = min(width - 1, int(iv.start * scale))
            b = max(a + 1, min(width, int(round(iv.end * scale))))
            for i in range(a, b):
                if row[i] == " " or ch == "#":
                    row[i] = ch
        lines.append(f"{dev:>10} |{''.join(row)}| {pred.compute_s.get(dev, 0.0) * 1e3:7.1f} ms compute, "
                     f"{pred.bytes_sent.get(dev, 0) / 1e3:8.1f} kB sent")
    return "\n".join(lines)
