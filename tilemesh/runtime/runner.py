"""One device's side of distributed inference: an event-driven runner for the frames of one plan.

The browser's worker and the aiortc edge peer run the same class. It is fed wire chunks from other devices
(`on_chunk`) and, on the device with the camera, frames (`start_frame`); it runs each `DeviceTask` of its
`DevicePlan` as soon as every piece the task waits for has arrived, and answers with the wire messages to
send on (`Outgoing`). The transport stays outside: a data channel, an aiortc channel or an in-memory fake.

Frame identity: every chunk carries the frame id and the plan id (in the wire header), so a
late halo of an old frame or of a replaced plan is never mixed into a new one. Per-frame state is bounded by
`window` frames; older unfinished frames are dropped (the requester's timeout reports them).

The graph input travels as uint8 pixels (a quarter of float32) and is normalised where it lands; the
normalisation is elementwise, so the distributed result equals single-device inference bit for bit up to
float summation order in the kernels.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from . import overlap, wire
from .preprocess import normalize_u8
from .regions import Region, plane
from .tiling import DevicePlan, Transfer, crop, finish_task, run_steps, task_inputs

MAX_PENDING_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Outgoing:
    """Chunks for one destination device (each at most that link's max message size)."""

    dst: str
    chunks: list[bytes]
    tensor: str
    nbytes: int


@dataclass(frozen=True)
class ComputeRequest:
    """A task whose inputs are all here, for an engine outside Python to run (runner built with `deferred=True`).

    `inputs`: each segment input's needed region, assembled (`tiling.task_inputs`); the engine returns, through
    `DeviceRunner.on_computed`, the tile of every tensor in `keep` (each holding `task.deps.regions[t]`).
    """

    frame: int
    task: int  # index into the device plan's tasks
    segment: int
    inputs: dict[str, np.ndarray]
    keep: tuple[str, ...]


@dataclass
class TaskTiming:
    segment: int
    ready_ms: float  # when its last input arrived, relative to the frame's first event on this device
    start_ms: float
    end_ms: float
    macs: int


@dataclass
class FrameState:
    frame: int
    t0: float
    store: dict[str, list] = field(default_factory=dict)  # tensor -> [(Region, array)]
    arrived: set = field(default_factory=set)  # (src, tensor, Region) pieces received
    next_task: int = 0
    timings: list[TaskTiming] = field(default_factory=list)
    ready_at: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    output: np.ndarray | None = None
    done: bool = False
    computing: int | None = None  # deferred mode: the task handed out and not yet answered
    compute_ready: float = 0.0
    compute_start: float = 0.0
    watch: set = field(default_factory=set)  # pieces whose first copy is kept, to compare with a later one
    hold: set = field(default_factory=set)  # pieces not used until a second copy (a spot check) is here
    copies: dict = field(default_factory=dict)  # piece key -> [(sender, array)] for watched/held pieces


class PlanMismatch(ValueError):
    """A message for another plan or a tensor this device's plan does not expect."""


class DeviceRunner:
    """Runs `dplan` (this device's part of a plan) for a stream of frames.

    source: the device holding the camera; it starts frames and receives the final output.
    max_message: per-destination wire chunk limit (the remote's SCTP maxMessageSize); default 256 KiB.
    deferred: instead of computing a runnable task itself, return a `ComputeRequest` among the effects and go on
        when `on_computed` brings its result (an engine that runs asynchronously, e.g. onnxruntime-web); one task
        per frame is out at a time, in plan order.
    """

    def __init__(self, graph, dplan: DevicePlan, plan_id: int, source: str, backend=None, window: int = 4,
                 max_message: dict[str, int] | None = None, clock=time.perf_counter, deferred: bool = False,
                 normalize=normalize_u8, members=(), output_from: str | None = None, checks=()):
        self.graph = graph
        self.normalize = normalize  # uint8 camera pixels -> the model's input values (its card's mean/std)
        self.dplan = dplan
        self.device = dplan.device
        self.plan_id = int(plan_id)
        self.source = source
        self.backend = backend
        self.window = window
        self.max_message = dict(max_message or {})
        self.clock = clock
        self.deferred = deferred
        # Tensor ids on the wire: position in the graph, the same on every device running the same model.
        self.tensor_ids = {graph.input: 0, **{n.output: i + 1 for i, n in enumerate(graph.nodes)}}
        self.tensor_names = {i: t for t, i in self.tensor_ids.items()}
        # Per sending peer. The largest piece of the demo model is a few MB (a 112x112x96 float32 band); a peer
        # announcing more must not make a phone (Pyodide tops out near 2 GB) allocate it.
        self.inbox = wire.Inbox(window=window, max_pending_bytes=MAX_PENDING_BYTES)
        self.frames: OrderedDict[int, FrameState] = OrderedDict()
        self.finished: OrderedDict[int, FrameState] = OrderedDict()
        self.errors: list[str] = []
        self.tasks_run = 0  # over the runner's life: shows a device really took part (UI, tests)
        self.newly_finished: list[int] = []  # frames finished since the caller last took them (for reports)
        # What this device must hear from each peer before its tasks can run, per tensor: for validation.
        self.expected = {(t.src, t.tensor, t.region) for task in dplan.tasks for t in task.recv}
        self.output_tensor = graph.output
        # Every piece this device waits for, by what it is (tensor, region): any device of the plan may deliver
        # it (a rescue of a device that vanished or straggles, a spot check), the first copy is used.
        self.incoming: dict[tuple, Transfer] = {(t.tensor, t.region): t for task in dplan.tasks for t in task.recv}
        if self.device == source and output_from is not None and output_from != self.device:
            full = Region.full(*plane(graph.shapes[graph.output]))
            self.output_piece = Transfer(output_from, self.device, self.output_tensor, full)
            self.incoming[(self.output_tensor, None)] = self.output_piece
        else:
            self.output_piece = None
        self.members = set(members) | {t.src for t in self.incoming.values()} | {source}
        self.comparisons: list[tuple] = []  # (frame, Transfer, (sender, array), (sender, array)) to judge
        # needed_from[i]: what tasks i.. still read or send, and the output; fixed by the plan, so computed once.
        self.needed_from: list[set[str]] = []
        tail: set[str] = {self.output_tensor}
        for task in reversed(dplan.tasks):
            tail = tail | set(task.deps.inputs) | {tr.tensor for tr in task.send}
            self.needed_from.append(tail)
        self.needed_from.reverse()
        self.needed_from.append({self.output_tensor})
        # Overlap cross-checks (tilemesh.runtime.overlap): every check of the plan (the source judges them all),
        # and per task of this device the ones it reports a digest for.
        self.checks = overlap.merged(checks)
        self.task_checks = [[c for c in self.checks.values() if c.segment == t.segment and self.device in c.devices]
                            for t in dplan.tasks]
        self.digests: OrderedDict[int, dict[tuple, dict[str, np.ndarray]]] = OrderedDict()  # source: frame ->
        # check key -> device -> digest
        self.digest_bad: dict[int, list[tuple]] = {}  # source: frame -> [(Check, {device: digest}, error)]
        self.digest_news: list[tuple] = []  # source: (frame, Check, copies, error) mismatches not yet taken
        self.digests_sent = 0  # digest messages sent (bytes on the wire: `digest_bytes`)
        self.digest_bytes = 0
        self.digest_pairs = 0  # source: pairs compared, and the largest relative error seen (honest engines' spread)
        self.digest_max_err = 0.0

    # ------------------------------------------------------------------ frames

    def _frame(self, frame: int) -> FrameState | None:
        """State of `frame`, created on first sight; None for a finished frame or one older than the window.

        A frame more than `window` frames behind the newest is given up: its missing pieces are not coming
        (a peer vanished or a chunk was lost) and holding its tensors would exhaust a phone's memory.
        """
        st = self.frames.get(frame)
        if st is not None:
            return st
        if frame in self.finished:
            return None
        newest = max([frame, *self.frames, *self.finished])
        floor = newest - self.window + 1
        if frame < floor:
            return None
        st = self.frames[frame] = FrameState(frame, self.clock())
        for old in [f for f in self.frames if f < floor]:
            del self.frames[old]
            self.errors.append(f"frame {old} dropped unfinished on {self.device}")
        return st

    def start_frame(self, frame: int, pixels: np.ndarray) -> list[Outgoing]:
        """On the source: `pixels` is the (1, 3, H, W) uint8 crop the model sees. Sends everyone their part."""
        if self.device != self.source:
            raise ValueError(f"{self.device} is not the source {self.source}: it cannot start frames")
        want = tuple(self.graph.shapes[self.graph.input])
        if pixels.dtype != np.uint8 or pixels.shape != want:
            raise ValueError(f"frame must be uint8 {want}, got {pixels.dtype} {pixels.shape}")
        st = self._frame(frame)
        if st is None:
            raise ValueError(f"frame {frame} is not newer than the frames in flight")
        full = Region.full(*pixels.shape[2:])
        out = []
        if self.dplan.input_owned is not None:
            own = crop(pixels, full, self.dplan.input_owned)
            st.store.setdefault(self.graph.input, []).append((self.dplan.input_owned, self.normalize(own)))
        for tr in self.dplan.input_send:
            out.append(self._encode(st, tr.dst, tr.tensor, tr.region, crop(pixels, full, tr.region)))
        return out + self._advance(st)

    def on_chunk(self, peer: str, chunk) -> list[Outgoing]:
        """Feed one wire chunk from `peer`; returns what to send as a consequence (maybe nothing)."""
        got = self.inbox.feed(peer, chunk)
        if got is None:
            return []
        h = got.header
        if h.plan_id != self.plan_id:
            raise PlanMismatch(f"chunk from {peer} for plan {h.plan_id}, running plan {self.plan_id}")
        if h.flags & wire.FLAG_DIGEST:
            return self._on_digest(peer, h, got.array)
        tensor = self.tensor_names.get(h.tensor)
        if tensor is None:
            raise PlanMismatch(f"unknown tensor id {h.tensor} from {peer}")
        region = Region(*h.region)
        if tensor == self.output_tensor and self.device == self.source:
            tr = self.output_piece
            if tr is None:  # no single known sender (a runner made without `output_from`): first copy counts
                st = self._frame(h.frame)
                if st is not None:
                    st.output = np.array(got.array)
                    return self._advance(st)
                return []
        else:
            tr = self.incoming.get((tensor, region))
            if tr is None:
                raise PlanMismatch(f"{self.device} did not expect {tensor} {region} from {peer}")
        if peer != tr.src and peer not in self.members:
            raise PlanMismatch(f"{peer} is not in plan {self.plan_id}: it cannot deliver {tensor} {region}")
        st = self._frame(h.frame)
        if st is None:
            done = self.finished.get(h.frame)
            if done is not None and self.key(tr) in done.watch:  # a straggler's late copy: still compared
                self._piece(done, tr, peer, got.array)
            return []
        st.bytes_received += got.array.nbytes
        array = got.array
        if tensor == self.graph.input:
            array = self.normalize(array)
        return self._piece(st, tr, peer, array)

    @staticmethod
    def key(tr: Transfer) -> tuple:
        return (tr.src, tr.tensor, tr.region)

    def _piece(self, st: FrameState, tr: Transfer, peer: str, array) -> list:
        """One copy of an expected piece, from its planned sender or from a stand-in: the first copy is used
        (a held piece waits for two), a watched piece's copies are kept and handed out for comparison."""
        key = self.key(tr)
        if key in st.watch or key in st.hold:
            copies = st.copies.setdefault(key, [])
            if any(p == peer for p, _ in copies):
                return []
            copies.append((peer, np.array(array)))
            if len(copies) >= 2:
                self.comparisons.append((st.frame, tr, copies[0], copies[-1]))
            if key in st.hold:
                if len(copies) < 2:
                    return []
                st.hold.discard(key)
                # The camera's own copy (computed from the frame) is the reference when the two disagree.
                array = next((a for p, a in copies if p == self.source), copies[0][1])
                st.arrived.discard(key)
        if key in st.arrived or st.done:
            return []  # a later copy: the first one was used
        st.arrived.add(key)
        if tr is self.output_piece:
            st.output = np.array(array)
            return self._advance(st)
        st.store.setdefault(tr.tensor, []).append((tr.region, array))
        st.ready_at = self.clock()
        return self._advance(st)

    def deliver(self, frame: int, tr: Transfer, peer: str, array) -> list:
        """A piece computed here on behalf of `tr.src` (a rescue or a spot check on this device)."""
        st = self._frame(frame)
        if st is None:
            return []
        return self._piece(st, tr, peer, array)

    def outstanding(self, frame: int) -> list[Transfer]:
        """The pieces of a frame in flight here that have not arrived (none for a frame not in flight)."""
        st = self.frames.get(frame)
        if st is None:
            return []
        return [tr for tr in self.incoming.values()
                if self.key(tr) not in st.arrived or self.key(tr) in st.hold]

    def watch(self, frame: int, tr: Transfer, hold: bool = False) -> None:
        """Keep the copies of piece `tr` of `frame` for comparison; `hold`: use it only once two are here."""
        st = self._frame(frame)
        if st is None:
            return
        key = self.key(tr)
        (st.hold if hold else st.watch).add(key)

    def release_held(self, device: str) -> list:
        """`device` is gone: pieces held for a second copy because it was to send one (an audit, a spot check)
        wait no more; the copy here from the source is used now, or the source's when it comes."""
        out: list = []
        for st in list(self.frames.values()):
            for key in [k for k in st.hold if k[0] == device]:
                st.hold.discard(key)
                own = next((a for p, a in st.copies.get(key, ()) if p == self.source), None)
                tr = next((t for t in self.incoming.values() if self.key(t) == key), None)
                if own is not None and tr is not None:
                    st.copies.pop(key, None)
                    out += self._piece(st, tr, self.source, own)
        return out

    def take_comparisons(self) -> list[tuple]:
        out, self.comparisons = self.comparisons, []
        return out

    def encode_piece(self, frame: int, dst: str, tensor: str, region: Region, array: np.ndarray) -> Outgoing:
        """A piece this device computed on another's behalf, on the wire as that device would send it."""
        chunks = wire.encode(
            array, frame=frame, tensor=self.tensor_ids[tensor], plan_id=self.plan_id, region=region.to_list(),
            max_message=self.max_message.get(dst, wire.DEFAULT_MAX_MESSAGE),
        )
        return Outgoing(dst, chunks, tensor, int(array.nbytes))

    def _encode(self, st: FrameState, dst: str, tensor: str, region: Region, array: np.ndarray) -> Outgoing:
        chunks = wire.encode(
            array, frame=st.frame, tensor=self.tensor_ids[tensor], plan_id=self.plan_id, region=region.to_list(),
            max_message=self.max_message.get(dst, wire.DEFAULT_MAX_MESSAGE),
        )
        st.bytes_sent += array.nbytes
        return Outgoing(dst, chunks, tensor, int(array.nbytes))

    def _runnable(self, st: FrameState, task) -> bool:
        return all((t.src, t.tensor, t.region) in st.arrived for t in task.recv)

    def _advance(self, st: FrameState) -> list:
        """Run every task whose inputs are all here, in plan order; collect sends; finish the frame.

        Returns `Outgoing` messages and, in deferred mode, at most one `ComputeRequest` for this frame.
        """
        out: list = []
        tasks = self.dplan.tasks
        while st.computing is None and st.next_task < len(tasks) and self._runnable(st, tasks[st.next_task]):
            task = tasks[st.next_task]
            ready = max(st.ready_at, st.t0)
            start = self.clock()
            if self.deferred:
                st.computing, st.compute_ready, st.compute_start = st.next_task, ready, start
                inputs = task_inputs(self.graph, task, st.store)
                out.append(ComputeRequest(st.frame, st.next_task, task.segment, inputs,
                                          self.compute_keep(st.next_task)))
                return out
            index = st.next_task
            vals = run_steps(self.graph, task.deps, task_inputs(self.graph, task, st.store),
                             keep=self.compute_keep(index), backend=self.backend)
            digests = self._digests(index, vals)
            owned, outgoing = finish_task(task, vals)
            out += self._complete(st, task, owned, outgoing, ready, start)
            out += self._send_digests(st.frame, digests)
        if st.next_task == len(tasks):
            final = st.store.get(self.output_tensor)
            if self.device == self.source:
                if final:
                    st.output = final[-1][1]
                if st.output is not None:
                    self._finish(st)
            else:
                if final:
                    region, arr = final[-1]
                    out.append(self._encode(st, self.source, self.output_tensor, region, arr))
                self._finish(st)
        return out

    def _complete(self, st: FrameState, task, owned, outgoing, ready: float, start: float) -> list[Outgoing]:
        end = self.clock()
        st.timings.append(TaskTiming(task.segment, (ready - st.t0) * 1e3, (start - st.t0) * 1e3,
                                     (end - st.t0) * 1e3, task.macs))
        for tensor, piece in owned.items():
            st.store.setdefault(tensor, []).append(piece)
        out = [self._encode(st, tr.dst, tr.tensor, tr.region, arr) for tr, arr in outgoing]
        st.next_task += 1
        self.tasks_run += 1
        self._release(st)
        return out

    def on_computed(self, frame: int, task: int, outputs: dict[str, np.ndarray]) -> list:
        """Deferred mode: the engine's result for `ComputeRequest(frame, task)`; returns the effects that follow.

        A result for a frame given up meanwhile (window, replaced plan) is dropped, as a late chunk is.
        """
        st = self.frames.get(frame)
        if st is None or st.computing != task:
            return []
        t = self.dplan.tasks[task]
        missing = [k for k in t.owned if k not in outputs]
        if missing:
            raise ValueError(f"computed task {task} of frame {frame} lacks {missing}")
        for k in t.owned:
            want, got = t.deps.regions[k], outputs[k].shape[2:]
            if outputs[k].ndim == 4 and got != (want.rows, want.cols):
                raise ValueError(f"computed {k} of frame {frame} has {got}, the plan computes {want}")
        st.computing = None
        digests = self._digests(task, outputs)
        owned, outgoing = finish_task(t, outputs)
        out = self._complete(st, t, owned, outgoing, st.compute_ready, st.compute_start)
        return out + self._send_digests(frame, digests) + self._advance(st)

    # ------------------------------------------------------------------ overlap cross-checks

    def compute_keep(self, index: int) -> tuple[str, ...]:
        """What task `index` returns: its owned tensors and the tensors of its overlap checks."""
        task = self.dplan.tasks[index]
        extra = [c.tensor for c in self.task_checks[index] if c.tensor not in task.owned]
        return tuple(task.owned) + tuple(dict.fromkeys(extra))

    def check_slices(self, index: int) -> list[tuple[str, Region]]:
        """The overlap regions task `index` hands out on an engine with task models (`overlap.output_name`)."""
        return [(c.tensor, c.region) for c in self.task_checks[index]]

    def _digests(self, index: int, outputs: dict) -> list[tuple]:
        """Task `index`'s digests of its overlap checks, from its outputs: the region itself (an engine's task
        model outputs it as `overlap.output_name`) or the tensor's whole computed region, cropped."""
        task = self.dplan.tasks[index]
        out = []
        for c in self.task_checks[index]:
            arr = outputs.get(overlap.output_name(c.tensor, c.region))
            if arr is None:
                whole = outputs.get(c.tensor)
                if whole is None:
                    continue  # an engine that could not return it: this check is not made
                arr = crop(whole, task.deps.regions[c.tensor], c.region)
            if arr.ndim != 4 or arr.shape[2:] != (c.region.rows, c.region.cols):
                raise ValueError(f"overlap {c.tensor} {c.region} has shape {arr.shape}")
            out.append((c, overlap.digest(arr)))
        return out

    def _send_digests(self, frame: int, digests) -> list[Outgoing]:
        """Digests go to the source (which judges them); the source's own are recorded here."""
        out = []
        for c, d in digests:
            if self.device == self.source:
                self._record_digest(frame, c, self.device, d)
                continue
            chunks = wire.encode(d, frame=frame, tensor=self.tensor_ids[c.tensor], plan_id=self.plan_id,
                                 region=c.region.to_list(), flags=wire.FLAG_DIGEST,
                                 max_message=self.max_message.get(self.source, wire.DEFAULT_MAX_MESSAGE))
            self.digests_sent += 1
            self.digest_bytes += sum(len(ch) for ch in chunks)
            out.append(Outgoing(self.source, chunks, c.tensor, int(d.nbytes)))
        return out

    def _on_digest(self, peer: str, h, array) -> list:
        if self.device != self.source:
            raise PlanMismatch(f"a digest from {peer}: only the source {self.source} judges them")
        tensor = self.tensor_names.get(h.tensor)
        c = self.checks.get((tensor, Region(*h.region)))
        if c is None or peer not in c.devices:
            raise PlanMismatch(f"{peer} has no overlap check of {tensor} {h.region} in plan {self.plan_id}")
        if array.shape != (2, len(overlap.groups_of(self.graph.shapes[c.tensor][1]))):
            raise PlanMismatch(f"digest of {tensor} from {peer} has shape {array.shape}")
        if h.frame > max([0, *self.frames, *self.finished]):  # would push real frames' digests out of the window
            raise PlanMismatch(f"a digest from {peer} of frame {h.frame}, which {self.source} has not started")
        self._record_digest(h.frame, c, peer, np.array(array))
        return []

    def _record_digest(self, frame: int, c, device: str, d: np.ndarray) -> None:
        if frame not in self.digests:
            if self.digests and frame < min(self.digests) - 4 * self.window:
                return  # far too late to matter
            self.digests[frame] = {}
            while len(self.digests) > 8 * self.window:
                old, _ = self.digests.popitem(last=False)
                self.digest_bad.pop(old, None)
        copies = self.digests[frame].setdefault(c.key, {})
        if device in copies:
            return
        first = next(iter(copies.values()), None)
        copies[device] = d
        if first is not None:  # each copy after the first is compared with the first (a check of 2 or more)
            ok, err = overlap.agree_digests(first, d, overlap.cells(self.graph, c))
            self.digest_pairs += 1
            self.digest_max_err = max(self.digest_max_err, err)
            if not ok:
                self.digest_bad.setdefault(frame, []).append((c, dict(copies), err))
                self.digest_news.append((frame, c, dict(copies), err))

    def take_digest_mismatches(self) -> list[tuple]:
        out, self.digest_news = self.digest_news, []
        return out

    def verdict(self, frame: int, gone=()) -> str:
        """On the source, a frame's overlap checks: "bad" (a pair disagreed), "pending" (a digest of a pair
        with no device gone has not come), else "ok"."""
        if self.digest_bad.get(frame):
            return "bad"
        return "pending" if self.missing(frame, gone) else "ok"

    def missing(self, frame: int, gone=()) -> list[str]:
        """On the source, the devices (not gone) whose digest of some check of `frame` has not come."""
        have = self.digests.get(frame, {})
        out: set[str] = set()
        for key, c in self.checks.items():
            live = [d for d in c.devices if d not in gone]
            if len(live) >= 2:
                out |= {d for d in live if d not in have.get(key, ())}
        return sorted(out)

    def _release(self, st: FrameState) -> None:
        """Free tensors no remaining task reads (a 112x112 map is megabytes; phones are short of memory)."""
        needed = self.needed_from[st.next_task]
        for tensor in list(st.store):
            if tensor not in needed:
                del st.store[tensor]

    def _finish(self, st: FrameState) -> None:
        st.done = True
        self.newly_finished.append(st.frame)
        self.frames.pop(st.frame, None)
        self.finished[st.frame] = st
        while len(self.finished) > self.window:
            self.finished.popitem(last=False)

    # ------------------------------------------------------------------ results

    def result(self, frame: int) -> np.ndarray | None:
        st = self.finished.get(frame)
        return None if st is None else st.output

    def report(self, frame: int) -> dict | None:
        """JSON-able timings of this device for a finished frame (the host page's timeline)."""
        st = self.finished.get(frame)
        if st is None:
            return None
        return {
            "device": self.device,
            "frame": frame,
            "tasks": [t.__dict__ for t in st.timings],
            "compute_ms": sum(t.end_ms - t.start_ms for t in st.timings),
            "bytes_sent": st.bytes_sent,
            "bytes_received": st.bytes_received,
        }

    def take_finished(self) -> list[int]:
        done, self.newly_finished = self.newly_finished, []
        return done

    def forget_peer(self, peer: str) -> None:
        self.inbox.forget(peer)
