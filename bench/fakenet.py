"""An in-memory room for device sessions: links with scripted loss, delay and reordering, on a fake clock.

`FakeRoom` plays every executor's part for a set of `tilemesh.runtime.session.DeviceSession`s, as the browser's
room_engine.js and the edge's device do over real data channels and signaling: it carries `Send` effects over
`FakeLink`s (each chunk delayed by the link's latency plus its bandwidth time plus a seeded jitter, so chunks
overtake each other unless the link is `ordered`; `lose(src, dst, chunk, n)` drops the n-th chunk of that
pair), delivers broadcasts, answers `Probe` with what the scripted link would measure, `Profile` with a given
profile, and `Compute` by running the task with the runtime's own kernels (answered at once, or, for a device
given a speed in `sec_per_gmac` or times by `task_time`, when that device would have finished it: one task at a
time, in arrival order, whichever plan it belongs to; devices mapped to one `cpu` share it). Everything happens
on `now`, a fake clock advanced from one delivery to the next, and a `Tick` reaches every session every `tick`
seconds, so
timeouts fire deterministically and a test of a lossy link takes milliseconds of real time per event.

Faults: `leave(d)` (the server says d left), `cut(d)` (d's network goes silent: nothing to or from it, nobody is
told), `compute_delay[d]` (a device computing slowly: its `Compute` answers come that many seconds late, plus
`sec_per_mac[d]` per multiply-accumulate of the task) and
`tamper[d]` (a device whose computed tiles are wrong: a function of the outputs dict, applied before they are
sent on, so the wire format stays valid and only the values lie).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tilemesh.runtime import session as S
from tilemesh.runtime.tiling import run_steps


@dataclass
class FakeLink:
    """One direction of a link: latency (s), bandwidth (bytes/s), max message size, jitter (s) and order."""

    latency: float = 0.002
    bandwidth: float = 20e6
    max_message: int = 256 * 1024
    jitter: float = 0.001
    ordered: bool = False
    busy_until: float = 0.0


@dataclass
class FakeRoom:
    sessions: dict[str, S.DeviceSession]
    seed: int = 0
    tick: float = 0.5
    lose: Callable[[str, str, bytes, int], bool] = lambda src, dst, chunk, n: False
    links: dict[tuple[str, str], FakeLink] = field(default_factory=dict)
    profiles: dict[str, dict] = field(default_factory=dict)  # what `Profile` answers, per device
    sec_per_gmac: dict[str, float] = field(default_factory=dict)  # compute time of deferred tasks, per device
    now: float = 0.0
    done: dict[str, dict[int, dict]] = field(default_factory=dict)
    failed: dict[str, dict[int, str]] = field(default_factory=dict)
    signals: list[tuple[str, S.Signal]] = field(default_factory=list)
    notices: list[tuple[str, S.Notice]] = field(default_factory=list)
    reports: list[tuple[str, S.ReportProfile]] = field(default_factory=list)
    delivered: int = 0
    dropped: int = 0
    compute_delay: dict[str, float] = field(default_factory=dict)
    sec_per_mac: dict[str, float] = field(default_factory=dict)  # fake compute time of a deferred task
    tamper: dict[str, Callable[[dict], dict]] = field(default_factory=dict)
    silent: set = field(default_factory=set)  # devices cut off the network (see `cut`)
    signal_delay: dict[str, float] = field(default_factory=dict)  # a device's broadcasts take this long (slow path)
    reference_runs: dict[str, int] = field(default_factory=dict)  # whole-model reference runs per device
    cpu: dict[str, str] = field(default_factory=dict)  # devices sharing one CPU (e.g. a server's edge peers)
    task_time: Callable | None = None  # (device, runner, task) -> seconds, instead of `sec_per_gmac`
    zeros: bool = False  # answer `Compute` with zeros of the right shapes (timing studies: no kernels run)
    backends: dict = field(default_factory=dict)  # a device's compute backend (e.g. onnxruntime); default numpy

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        self.queue: list = []  # (time, seq, kind, device, payload)
        self.seq = itertools.count()
        self.sent_counts: dict[tuple[str, str], int] = {}
        self.next_tick = self.tick
        self.busy_until: dict[str, float] = {}  # per CPU (a device's own, or `cpu`): when its queue is empty
        self.cpu_seconds: dict[str, float] = {}  # per device: compute time of its deferred tasks so far
        for a in self.sessions:
            for b in self.sessions:
                if a != b:
                    self.links.setdefault((a, b), FakeLink())

    # --- events in --------------------------------------------------------------------------------------

    def fire(self, device: str, event: S.Event) -> list[S.Effect]:
        """Hand `event` to `device` now and carry out its effects; returns them."""
        effects = self.sessions[device].handle(event, self.now)
        for e in effects:
            self._execute(device, e)
        return effects

    def at(self, delay: float, device: str, event: S.Event) -> None:
        """Deliver `event` to `device` `delay` seconds from now (a plan message on a slow signaling path...)."""
        heapq.heappush(self.queue, (self.now + delay, next(self.seq), device, event))

    def open_links(self) -> None:
        """Every link opens now (each end learns the other's max message size; each end probes)."""
        for (a, b), link in self.links.items():
            self.fire(a, S.LinkOpened(b, self.links[(b, a)].max_message if (b, a) in self.links else link.max_message))

    def run(self, until: float | None = None, max_events: int = 1_000_000) -> None:
        """Deliver everything queued (and what it causes), in time order, ticking sessions on the way; with
        `until`, go on ticking to that time (a tick may queue new events: they are delivered in order too)."""
        for _ in range(max_events):
            head = self.queue[0][0] if self.queue else None
            if head is None and until is None:
                return
            nxt = min(self.next_tick, head) if head is not None else self.next_tick
            if until is not None and nxt > until:
                self.now = max(self.now, until)
                return
            if head is None or self.next_tick <= head:
                self._tick_to(self.next_tick)
                continue
            self.now = head
            _, _, device, event = heapq.heappop(self.queue)
            if device in self.sessions:
                if isinstance(event, S.ChunkIn):
                    self.delivered += 1
                self.fire(device, event)
        raise RuntimeError("fake room did not settle")

    def _tick_to(self, t: float) -> None:
        while self.next_tick <= t:
            self.now = self.next_tick
            self.next_tick += self.tick
            for d in list(self.sessions):
                self.fire(d, S.Tick())

    def leave(self, device: str) -> None:
        """`device` vanishes: nothing more from or to it; every other session hears it left."""
        self.sessions.pop(device)
        self.queue = [q for q in self.queue if q[2] != device and getattr(q[3], "peer", None) != device]
        heapq.heapify(self.queue)
        for d in list(self.sessions):
            self.fire(d, S.PeerLeft(device))

    def cut(self, device: str) -> None:
        """`device`'s network goes silent: what it sends and what is sent to it is lost; nobody is told."""
        self.silent.add(device)

        def touches(q) -> bool:
            ev = q[3]
            if isinstance(ev, S.ChunkIn):
                return q[2] == device or ev.peer == device
            if isinstance(ev, S.BroadcastIn):
                return q[2] == device or ev.sender == device
            return False

        self.queue = [q for q in self.queue if not touches(q)]
        heapq.heapify(self.queue)

    # --- effects out ------------------------------------------------------------------------------------

    def _execute(self, device: str, e: S.Effect) -> None:
        if isinstance(e, S.Send):
            self._send(device, e)
        elif isinstance(e, S.Signal):
            self.signals.append((device, e))
            if e.type == "broadcast" and device not in self.silent:
                for d in self.sessions:
                    if d != device and d not in self.silent:
                        self.at(self.signal_delay.get(device, 0.001), d, S.BroadcastIn(device, e.fields["data"]))
        elif isinstance(e, S.FrameDone):
            self.done.setdefault(device, {})[e.frame] = e.result
        elif isinstance(e, S.FrameFailed):
            self.failed.setdefault(device, {})[e.frame] = e.reason
        elif isinstance(e, S.Notice):
            self.notices.append((device, e))
        elif isinstance(e, S.ReportProfile):
            self.reports.append((device, e))
        elif isinstance(e, S.Probe):
            link = self.links[(device, e.peer)]
            # What a burst would show on this link: round trips of the latency both ways, `total` at bandwidth.
            rtt = 2 * link.latency * 1e3
            seconds = link.latency + e.total / link.bandwidth
            self.at(seconds, device, S.LinkMeasured(e.peer, (rtt,) * e.rtt_count, float(e.total), seconds))
        elif isinstance(e, S.Profile):
            self.at(0.5, device, S.Profiled(self.profiles.get(device, {"sec_per_mac": {}})))
        elif isinstance(e, S.Compute) and e.request.task < 0:  # a reference run (tilemesh.runtime.recovery)
            runtime = self.sessions[device].runtime
            outputs = runtime.reference_numpy(e.plan_id, e.request)
            delay = self.compute_delay.get(device, 0.0) + \
                runtime.model_macs(e.plan_id) * self.sec_per_mac.get(device, 0.0)
            self.reference_runs[device] = self.reference_runs.get(device, 0) + 1
            self.at(delay, device, S.Computed(e.plan_id, e.request.frame, e.request.task, outputs))
        elif isinstance(e, S.Compute):
            runtime = self.sessions[device].runtime
            runner = runtime.runners.get(e.plan_id)
            if runner is None:
                return  # the plan was retired meanwhile: its frames are given up
            task = runner.dplan.tasks[e.request.task]
            if self.zeros:
                outputs = {k: np.zeros(_shape(runner.graph, k, task.deps.regions.get(k)), np.float32)
                           for k in task.owned}
            else:
                outputs = run_steps(runner.graph, task.deps, e.request.inputs, keep=e.request.keep,
                                    backend=self.backends.get(device))
            if device in self.tamper:
                outputs = self.tamper[device](outputs)
            # A device with a speed computes one task at a time, in arrival order, whichever plan it belongs to.
            cpu = self.cpu.get(device, device)
            start = max(self.now, self.busy_until.get(cpu, 0.0))
            took = self.task_time(device, runner, task) if self.task_time is not None else \
                self.sec_per_gmac.get(device, 0.0) * task.macs / 1e9
            self.busy_until[cpu] = start + took
            self.cpu_seconds[device] = self.cpu_seconds.get(device, 0.0) + took
            busy = self.busy_until[cpu]
            delay = self.compute_delay.get(device, 0.0) + task.macs * self.sec_per_mac.get(device, 0.0)
            self.at(busy - self.now + delay, device,
                    S.Computed(e.plan_id, e.request.frame, e.request.task, outputs))

    def _send(self, src: str, e: S.Send) -> None:
        link = self.links[(src, e.dst)]
        for chunk in e.chunks:
            # The sender must respect the limit of the link it was told about.
            assert len(chunk) <= link.max_message, (src, e.dst, len(chunk), link.max_message)
            n = self.sent_counts.get((src, e.dst), 0)
            self.sent_counts[(src, e.dst)] = n + 1
            if self.lose(src, e.dst, chunk, n) or src in self.silent or e.dst in self.silent:
                self.dropped += 1
                continue
            start = max(self.now, link.busy_until)
            link.busy_until = start + len(chunk) / link.bandwidth
            arrive = link.busy_until + link.latency
            if not link.ordered:
                arrive += self.rng.uniform(0, link.jitter)
            self.at(arrive - self.now, e.dst, S.ChunkIn(src, bytes(chunk)))


def _shape(graph, tensor: str, region) -> tuple[int, ...]:
    """The shape a task's output `tensor` has over `region` (a 4-D map's tile, or the whole vector)."""
    shape = tuple(graph.shapes[tensor])
    if len(shape) == 4 and region is not None:
        return (shape[0], shape[1], region.rows, region.cols)
    return shape
