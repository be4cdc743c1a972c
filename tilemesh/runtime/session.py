"""One device's session in a room, as events in and effects out: the core the browser's worker and the edge share.

A device (a phone's browser tab, a laptop's, the server's aiortc edge peer) hears things: the server's `plan`
message, a chunk from a peer, a link opening (with the remote's max message size), a link measured, a peer
leaving, a frame from the camera, a compute result, a broadcast from a peer, a timer tick. For each it must do
things: send chunks to a peer, send a signaling message (its state and profile, a plan request, a broadcast),
hand a result or a failure to the UI, profile itself, run a link probe, run a compute request. This module
decides all of that and does none of it: `DeviceSession.handle(event, now)` returns the effects, and the
executor next to it (`web/room_engine.js` in a browser, `tilemesh.edge.device` on the edge) carries them out
and feeds the outcomes back as events. It performs no I/O, reads no clock (time comes in as `now`, seconds on
any monotonic clock), and imports nothing of the browser or the server, so every rule is a plain unit test and
the same rules hold on every device.

The rules, each in one place:
- plan adoption (`PlanIn`): a device runs several plans at once, keyed by plan id (a camera's lanes, other
  cameras' streams; `lanes.PlanSlot` per plan): chunks that outrun their plan are held and replayed
  (`peer.PlanRuntime`); a device not in a plan ignores it and keeps running its own; a source's newer plan
  message retires its older plans, which still finish the frames they have in flight (`lanes.expired`);
- streams (`FrameIn` without a lane): the camera's scheduler (`stream`) hands each frame to a lane with a free
  slot, or fails it at once as "busy" when every lane is full; results older than one already shown come back
  with `shown` false (dropped and counted), so the label never jumps back in time;
- per-link max message size (`LinkOpened`, `LinkUpdated`): recorded whenever it is known or changes, applied to
  the running plan, and `UNKNOWN_MAX_MESSAGE` (what every browser accepts) for a plan device with no open link;
- link probes (`Probe` effect, `LinkMeasured` event): one set of parameters, and one unit: megabits per second;
- provisional measurements (`RoomChanged`): a link measured before this device's first profile (while it boots
  and profiles itself), or while another device of the room is still booting, and a profile taken while one is
  booting (or that says itself it is `provisional`: its engine has not chosen its thread count yet), read low
  (3-20x for links in a boot storm, 1.5-6x apart for equal phones, measured). The device is ready with them, and
  takes each once more when the room has settled (no device booting): the profile first, then the links; the
  new figures replace the old (a `refining` notice says what is pending);
- frames (`FrameIn`, `Tick`): a frame without a plan fails at once, one that takes longer than `FRAME_TIMEOUT_S`
  fails at the next tick;
- faults within a frame (`tilemesh.runtime.recovery`), per plan: a device of a plan that leaves, or a frame with
  no result within `recovery.stall_bound`, has its missing pieces recomputed from the frame by the plan's source
  (asked with a `rescue` broadcast naming the plan) while the room replans in the background; a lane that lost a
  device takes no new frames when the stream has other lanes; a device that stalls again and again is left out
  of the next plan (with hysteresis); spot checks compare pieces with the source's own copy, and overlap
  cross-checks (`tilemesh.runtime.overlap`) the halo rows two devices both compute (the source holds an answer
  until its digests agree); a device whose copy disagrees is excluded and named (`wrong_result` broadcast); a
  source whose single plan is replaced with frames in flight finishes them alone (a stream's retired lanes
  finish theirs where they are); a camera
  hearing another stream's camera leave asks the room again (its devices are free);
- reports: every `REPORT_EVERY`-th frame's timings go to the room (`frame_report` broadcast), with what this
  device measured of its incoming links since its last report (`links`: bytes and seconds of every multi-chunk
  message from a peer, first chunk to last, on the executor's clock); the server learns from them
  (`tilemesh.planning.refine`);
- drift: a device whose measured compute stays `DRIFT_FACTOR` off the planner's prediction for `DRIFT_FRAMES`
  frames profiles itself again (at most once per `DRIFT_COOLDOWN_S`) and tells the room (`profile_changed`);
  a source hearing that from a device of its plan asks for a new plan and keeps running the old one meanwhile.

Events and effects are small frozen dataclasses; `event_from_dict` / `effect_to_dict` convert them for the
browser's worker boundary (`handle` at the bottom of this module is the worker's entry point).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from . import lanes as lanes_mod
from . import overlap, recovery, wire
from . import stream as stream_mod
from .classify import LocalClassifier, answer
from .lanes import PlanSlot
from .peer import PlanRuntime
from .runner import ComputeRequest

# --- the rules' numbers ---------------------------------------------------------------------------------------

FRAME_TIMEOUT_S = 8.0
REPORT_EVERY = 4
DRIFT_FACTOR = 2.0
DRIFT_FRAMES = 5
DRIFT_COOLDOWN_S = 30.0
# A plan device whose link is not open yet (so its size is unknown) gets chunks every browser accepts.
UNKNOWN_MAX_MESSAGE = 16 * 1024
# Chromium refuses a single send above this whatever the remote advertises.
SEND_LIMIT = 256 * 1024
MAX_RESCUE_PIECES = 256  # pieces one rescue request may ask for
MAX_LINKS_REPORTED = 40  # keeps the profile JSON under the signaling protocol's MAX_PROFILE_BYTES


@dataclass(frozen=True)
class ProbeSpec:
    """How every device measures a link: `rtt_count` round trips of `rtt_size` bytes, then `total` bytes as
    messages of `message` bytes (capped by the link's max message size). A 1 MiB burst gets past SCTP's slow
    start (a 256 KiB burst read 3-4x low in browsers; 64 KiB messages read several times low again)."""

    rtt_size: int = 64
    rtt_count: int = 10
    message: int = 256 * 1024
    total: int = 1024 * 1024


LINK_PROBE = ProbeSpec()


def link_figures(rtts_ms: list[float], nbytes: float, seconds: float) -> dict:
    """A probe's raw outcome as the planner reads it: median round trip (ms) and megabits per second."""
    if not rtts_ms or seconds <= 0 or nbytes < 0:
        raise ValueError(f"unusable link probe: {len(rtts_ms)} round trips, {nbytes} bytes in {seconds} s")
    ordered = sorted(rtts_ms)
    return {"rtt_ms": round(float(ordered[len(ordered) // 2]), 3), "mbps": round(nbytes * 8 / 1e6 / seconds, 2)}


def chunk_limit(advertised: int | None) -> int:
    """The chunk size for a link from the remote's advertised SCTP max message size (0 or None: any size)."""
    if not advertised or advertised <= 0:
        return SEND_LIMIT
    return min(int(advertised), SEND_LIMIT)


def plan_max_messages(devices, me: str, links: dict[str, int]) -> dict[str, int]:
    """Chunk size towards every other device of a plan: the link's when it is known, else `UNKNOWN_MAX_MESSAGE`."""
    return {d: links.get(d, UNKNOWN_MAX_MESSAGE) for d in devices if d != me}


def should_report(frame: int) -> bool:
    """Every device reports the same frames (chosen by id), so the host's timeline has every device's view."""
    return frame % REPORT_EVERY == 1


@dataclass(frozen=True)
class Drift:
    """Recent measured/predicted compute ratios and when the device last profiled itself."""

    ratios: tuple[float, ...] = ()
    profiled_at: float | None = None


def drift_step(drift: Drift, measured_ms: float, predicted_s: float, now: float) -> tuple[Drift, float | None]:
    """Add one frame's measured compute; returns the new state and the median ratio when it is time to re-profile."""
    if not predicted_s or predicted_s <= 0 or not measured_ms:
        return drift, None
    ratios = (*drift.ratios, measured_ms / (predicted_s * 1e3))[-DRIFT_FRAMES:]
    drift = Drift(ratios, drift.profiled_at)
    median = sorted(ratios)[len(ratios) // 2]
    off = median > DRIFT_FACTOR or median < 1 / DRIFT_FACTOR
    cooled = drift.profiled_at is None or now - drift.profiled_at >= DRIFT_COOLDOWN_S
    if len(ratios) < DRIFT_FRAMES or not off or not cooled:
        return drift, None
    return Drift((), now), median


# --- events ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = ""


@dataclass(frozen=True)
class ModelLoaded(Event):
    """The model is in memory (the session cannot adopt plans before)."""

    kind: ClassVar[str] = "model_loaded"
    classifier: Any


@dataclass(frozen=True)
class PlanIn(Event):
    """The server's `plan` message; `me` is this device's current peer id."""

    kind: ClassVar[str] = "plan"
    msg: dict
    me: str


@dataclass(frozen=True)
class ChunkIn(Event):
    kind: ClassVar[str] = "chunk"
    peer: str
    data: Any  # bytes-like


@dataclass(frozen=True)
class LinkOpened(Event):
    """The data channel to `peer` is open; `max_message` is the remote's advertised SCTP max message size."""

    kind: ClassVar[str] = "link_opened"
    peer: str
    max_message: int = 0


@dataclass(frozen=True)
class LinkUpdated(Event):
    """The remote's advertised max message size became known or changed (a renegotiated SDP)."""

    kind: ClassVar[str] = "link_updated"
    peer: str
    max_message: int = 0


@dataclass(frozen=True)
class LinkMeasured(Event):
    """The outcome of a `Probe`: round trips (ms) and `nbytes` counted by the remote in `seconds`."""

    kind: ClassVar[str] = "link_measured"
    peer: str
    rtts_ms: tuple = ()
    nbytes: float = 0.0
    seconds: float = 0.0


@dataclass(frozen=True)
class ProbeFailed(Event):
    kind: ClassVar[str] = "probe_failed"
    peer: str
    reason: str = ""


@dataclass(frozen=True)
class PeerLeft(Event):
    kind: ClassVar[str] = "peer_left"
    peer: str


@dataclass(frozen=True)
class Roster(Event):
    """The room's roster changed: `ready` are the peers that are ready and have reported a compute profile."""

    kind: ClassVar[str] = "roster"
    ready: tuple = ()


@dataclass(frozen=True)
class RoomChanged(Event):
    """The roster changed: `booting` other devices of the room are still joining (their CPU and links busy)."""

    kind: ClassVar[str] = "room"
    booting: int = 0


@dataclass(frozen=True)
class FrameIn(Event):
    """A camera frame (RGBA or RGB bytes, `height` x `width`) to classify with the room's plan as frame `frame`;
    on lane `plan_id`, or (None) on the one the stream's scheduler picks."""

    kind: ClassVar[str] = "frame"
    frame: int
    data: Any
    height: int
    width: int
    plan_id: int | None = None


@dataclass(frozen=True)
class Computed(Event):
    """The executor's answer to a `Compute` effect."""

    kind: ClassVar[str] = "computed"
    plan_id: int
    frame: int
    task: int
    outputs: dict


@dataclass(frozen=True)
class Profiled(Event):
    """This device's compute profile (tilemesh.runtime.profile.measure_profile), first or after a `Profile`."""

    kind: ClassVar[str] = "profiled"
    compute: dict


@dataclass(frozen=True)
class BroadcastIn(Event):
    kind: ClassVar[str] = "broadcast"
    sender: str
    data: dict


@dataclass(frozen=True)
class RequestPlan(Event):
    """Ask the server's planner for a plan: a benchmark `strategy`, or a stream for `objective` ("throughput",
    "latency"; "stop" ends this camera's stream so the room re-divides), `private` keeping pixels here."""

    kind: ClassVar[str] = "request_plan"
    strategy: str | None = None
    variant: str | None = None  # one of the model card's variants (e.g. "heavy"); None: the model as served
    devices: tuple[str, ...] | None = None  # plan over these devices only (and this one); None: every ready one
    # {"kind": "fps" | "latency", "value": x}: the planner picks the variant that meets it (context-aware
    # scaling); `variant` is then the one in use, and background replans (a device left, drift) ask again
    target: dict | None = None
    objective: str | None = None
    private: bool = False
    latency_factor: float | None = None  # the throughput objective's bound (default the planner's, 1.2)


@dataclass(frozen=True)
class Tick(Event):
    kind: ClassVar[str] = "tick"


# --- effects --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Effect:
    kind: ClassVar[str] = ""


@dataclass(frozen=True)
class Send(Effect):
    """Send `chunks` to `dst`, one data-channel message each, in order."""

    kind: ClassVar[str] = "send"
    dst: str
    chunks: list
    tensor: str = ""
    nbytes: int = 0


@dataclass(frozen=True)
class Signal(Effect):
    """A client message of the signaling protocol (`plan_request`, `broadcast`...)."""

    kind: ClassVar[str] = "signal"
    type: str
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ReportProfile(Effect):
    """Report this device's profile to the roster (the executor adds what only it knows: kind, cores...)."""

    kind: ClassVar[str] = "report_profile"
    compute: dict | None
    links: dict


@dataclass(frozen=True)
class FrameDone(Effect):
    kind: ClassVar[str] = "frame_done"
    frame: int
    result: dict


@dataclass(frozen=True)
class FrameFailed(Effect):
    """`frame` was not classified by the room; a "busy" one was not started (every lane full, or the lanes free
    now would finish it before the frames in flight): the camera may try again after `retry_s`."""

    kind: ClassVar[str] = "frame_failed"
    frame: int
    reason: str
    retry_s: float = 0.0


@dataclass(frozen=True)
class Profile(Effect):
    """Measure this device's compute profile and answer with `Profiled`."""

    kind: ClassVar[str] = "profile"
    reason: str = ""


@dataclass(frozen=True)
class Probe(Effect):
    """Measure the link to `peer` (see `ProbeSpec`) and answer with `LinkMeasured` or `ProbeFailed`."""

    kind: ClassVar[str] = "probe"
    peer: str
    rtt_size: int
    rtt_count: int
    message: int
    total: int


@dataclass(frozen=True)
class Compute(Effect):
    """Run `request` (a `runner.ComputeRequest`) and answer with `Computed` (sessions built `deferred=True`)."""

    kind: ClassVar[str] = "compute"
    plan_id: int
    request: ComputeRequest


@dataclass(frozen=True)
class Notice(Effect):
    """For the UI and logs: `plan` (adopted: plan message and role), `replanning` (the plan runs on while a new
    one is asked for), `recovering` (a device of a plan is gone: its pieces are rescued), `stalled` (the
    source rescued a device's pieces of a frame that made no progress within the stall bound), `straggler` (devices
    left out of the next plan for stalling), `mismatch` (a checked piece disagreed; the source judges),
    `audit`, `wrong_result` (a device convicted of wrong results), `drift`, `report` (timings shared with the
    room), `timings` (every frame's, kept on this device), `tasks_run` (tasks computed under a plan so far),
    `stream_stats` (the camera's stream, measured, about once a second), `error`."""

    kind: ClassVar[str] = "notice"
    what: str
    detail: dict = field(default_factory=dict)


# --- the session ----------------------------------------------------------------------------------------------


class DeviceSession:
    """One device's session. `handle(event, now)` returns the effects; state lives in the attributes below."""

    def __init__(self, classifier: LocalClassifier | None = None, *, backend=None, deferred: bool = False,
                 check_rate: float = recovery.CHECK_RATE, seed: int = 0, audit_first: bool | str = "uncovered"):
        self.backend, self.deferred = backend, deferred
        self.check_rate = float(check_rate)
        # The first frame of a plan audited (every piece from another device checked before use), which catches a
        # device wrong from the start at once, for a first frame about 2.8x slower (bench.verify): True for every
        # plan, "uncovered" (the default) for plans holding a device no overlap check covers (its work would
        # otherwise be seen only by spot checks), False never.
        if audit_first not in (True, False, "uncovered"):
            raise ValueError(f"audit_first must be True, False or 'uncovered', not {audit_first!r}")
        self.audit_first = audit_first
        self.first_audited: set[int] = set()  # plan ids whose first frame here was audited
        self.ready: set[str] = set()  # peers the roster shows ready with a profile
        self.known: set[str] = set()  # ready peers as of this source's last plan request (newcomers: the others)
        self.alone_reason: dict[tuple[int, int], tuple[int, str]] = {}  # (plan, its frame) finishing alone on the
        # engine -> (stream frame, why)
        self.corrupt = 0.0  # tests only: added to every computed tile (a device that returns wrong results)
        self.rng = random.Random(seed)
        self.straggle = recovery.Straggle()
        self.excluded: dict[str, tuple[str, float | None]] = {}  # device -> (why, until when or None: for good)
        # rescue_macs: spent on the numpy kernels; reference_pieces: served by a reference run on the engine
        self.faults = {"rescue_requests": 0, "rescued_pieces": 0, "rescue_macs": 0, "reference_pieces": 0,
                       "checks": 0, "compared": 0, "caught": 0, "finished_alone": 0,
                       # overlap cross-checks (tilemesh.runtime.overlap), judged here when this is the source
                       "overlap_mismatches": 0, "overlap_truth_macs": 0, "held_for_digests": 0, "unverified": 0}
        self.runtime: PlanRuntime | None = None
        self.max_message: dict[str, int] = {}  # peer -> chunk size, for every open link
        self.links: dict[str, dict] = {}  # peer -> {"rtt_ms", "mbps"} (megabits/s), as the planner reads them
        self.probing: dict[str, bool] = {}  # peer -> whether its probe started with the room settled
        self.room_booting = 0  # other devices of the room still booting (`RoomChanged`)
        self.provisional: set[str] = set()  # "compute" and links measured while the room was not settled
        self.compute: dict | None = None
        self.plan: dict | None = None  # the plan (stream) message this device is the source of, while usable
        self.last_plan: dict | None = None  # the last plan message adopted (any role)
        self.parts: list[dict] = []
        self.slots: dict[int, PlanSlot] = {}  # plan id -> this device's part in it (live or retired)
        self.stream: stream_mod.StreamState | None = None  # the camera's scheduler over its live lanes
        self.request: dict = {}  # the last plan_request's fields (asked again to replan or re-divide the room)
        self.cameras: set[str] = set()  # other devices streaming in this room (their plan messages seen)
        self.waiting: dict[int, float] = {}  # frames started here -> when
        self.frame_plan: dict[int, tuple[int, int]] = {}  # frames started here -> (plan id, wire frame id)
        self.shown: list[tuple[float, float]] = []  # the stream's results shown: (when, latency ms)
        self.stats_at: float | None = None  # when the stream's figures were last shared
        self.last_frame = 0
        self.drift = Drift()
        self.last_slowdown = 1.0  # `slowdown()`'s last figure
        self.pending_drift: float | None = None  # a re-profile asked for by drift, until `Profiled`
        self.tasks_run: dict[int, int] = {}  # plan id -> tasks this device computed under it
        self.rx_open: dict[str, list] = {}  # peer -> [first chunk's time, bytes after it] of a message arriving
        self.rx: dict[str, list] = {}  # peer -> [bytes, seconds] measured since the last report
        self.errors: list[str] = []
        if classifier is not None:
            self._load(classifier)

    def _load(self, classifier) -> None:
        self.runtime = PlanRuntime(classifier, backend=self.backend, deferred=self.deferred)

    # --- dispatch -------------------------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Effect]:
        method = getattr(self, f"_on_{event.kind}", None)
        if method is None:
            raise TypeError(f"not a session event: {event!r}")
        return method(event, float(now))

    # --- model, profile, links ------------------------------------------------------------------------------

    def _on_model_loaded(self, ev: ModelLoaded, now: float) -> list[Effect]:
        if self.runtime is None:
            self._load(ev.classifier)
        return []

    def _settled(self) -> bool:
        """Measurements taken now are final: this device has its first profile and no other device is booting."""
        return self.compute is not None and self.room_booting == 0

    def _on_profiled(self, ev: Profiled, now: float) -> list[Effect]:
        self.compute = ev.compute
        if self.runtime is not None:  # which engine rescues run on: the profile's predicted model times
            self.runtime.engines = (ev.compute or {}).get("engines") if isinstance(ev.compute, dict) else None
        provisional = self.room_booting > 0 or bool(isinstance(ev.compute, dict) and ev.compute.get("provisional"))
        was = set(self.provisional)
        if provisional:
            self.provisional.add("compute")
        else:
            self.provisional.discard("compute")
        out: list[Effect] = [self._report()]
        if self.pending_drift is not None:
            out.append(Signal("broadcast", {"data": {"kind": "profile_changed", "ratio": self.pending_drift}}))
            self.pending_drift = None
        if self._settled():
            # The profile is what a settled device measures first; then its provisional links, one probe each
            # (one in flight is measured again when it answers: it started before the room settled).
            if "compute" in self.provisional:
                out.append(Profile("settled"))
            else:
                out += [self._probe(peer) for peer in sorted(self.provisional - {"compute"})
                        if peer in self.links and peer not in self.probing]
        return out + self._refining(was)

    def _refining(self, was: set[str]) -> list[Effect]:
        """A notice when what is pending re-measurement changed (the roster shows the device as refining)."""
        if self.compute is None or was == self.provisional:
            return []
        return [Notice("refining", {"pending": sorted(self.provisional)})]

    def _on_room(self, ev: RoomChanged, now: float) -> list[Effect]:
        settled = self._settled()
        self.room_booting = max(0, int(ev.booting))
        if settled or not self._settled():
            return []
        # The room has just settled: what was measured while it was busy is measured again, the profile first.
        if "compute" in self.provisional:
            return [Profile("settled")]
        return [self._probe(peer) for peer in sorted(self.provisional) if peer in self.links
                and peer not in self.probing]

    def _probe(self, peer: str) -> Probe:
        self.probing[peer] = self._settled()
        spec = LINK_PROBE
        return Probe(peer, spec.rtt_size, spec.rtt_count, min(spec.message, self.max_message[peer]), spec.total)

    def _report(self) -> ReportProfile:
        links = dict(sorted(self.links.items(), key=lambda kv: kv[1]["rtt_ms"])[:MAX_LINKS_REPORTED])
        return ReportProfile(self.compute, links)

    def _on_link_opened(self, ev: LinkOpened, now: float) -> list[Effect]:
        self._set_max_message(ev.peer, ev.max_message)
        if ev.peer in self.probing or ev.peer in self.links:
            return []
        return [self._probe(ev.peer)]

    def _on_link_updated(self, ev: LinkUpdated, now: float) -> list[Effect]:
        self._set_max_message(ev.peer, ev.max_message)
        return []

    def _set_max_message(self, peer: str, advertised: int) -> None:
        size = chunk_limit(advertised)
        self.max_message[peer] = size
        if self.runtime is not None:
            self.runtime.set_max_message(peer, size)

    def _on_link_measured(self, ev: LinkMeasured, now: float) -> list[Effect]:
        started_settled = self.probing.pop(ev.peer, False)
        if ev.peer not in self.max_message:
            return []  # the link closed while it was measured
        try:
            self.links[ev.peer] = link_figures(list(ev.rtts_ms), ev.nbytes, ev.seconds)
        except ValueError as exc:
            return self._error(f"link to {ev.peer}: {exc}")
        was = set(self.provisional)
        if started_settled and self._settled():
            self.provisional.discard(ev.peer)
            return [self._report(), *self._refining(was)]
        self.provisional.add(ev.peer)
        if self._settled() and "compute" not in self.provisional:  # it started before the room settled: again
            return [self._report(), self._probe(ev.peer), *self._refining(was)]
        return [self._report(), *self._refining(was)]

    def _on_probe_failed(self, ev: ProbeFailed, now: float) -> list[Effect]:
        self.probing.pop(ev.peer, None)
        was = set(self.provisional)
        self.provisional.discard(ev.peer)
        return self._refining(was)

    def _on_peer_left(self, ev: PeerLeft, now: float) -> list[Effect]:
        out: list[Effect] = []
        self.max_message.pop(ev.peer, None)
        self.probing.pop(ev.peer, None)
        self.provisional.discard(ev.peer)
        self.rx_open.pop(ev.peer, None)
        self.rx.pop(ev.peer, None)
        if self.runtime is not None:
            self.runtime.forget_peer(ev.peer)
        if self.links.pop(ev.peer, None) is not None:
            out.append(self._report())
        # A plan whose source left cannot finish its frames anywhere: it stops here.
        for pid in [p for p, slot in self.slots.items() if slot.source == ev.peer]:
            out += self._drop_slot(pid, f"device {ev.peer} left")
        self.ready.discard(ev.peer)
        self.known.discard(ev.peer)  # if it comes back, it is a newcomer again
        lost = self._lost_everywhere(ev.peer, "left", now)
        out += lost
        if ev.peer in self.cameras:
            self.cameras.discard(ev.peer)
            if self.plan is not None and self.request.get("objective") and not lost:
                out.append(self._plan_request(now))  # its devices are free: re-divide the room
        return out

    def _on_roster(self, ev: Roster, now: float) -> list[Effect]:
        """On a camera with a running stream: a device that became ready since the last plan request is used
        from the next plan, asked for now in the background (the running plans keep taking frames meanwhile)."""
        self.ready = {str(p) for p in ev.ready}
        return self._newcomers(now, "joined")

    def _newcomers(self, now: float, why: str) -> list[Effect]:
        """A background plan request when ready devices are in none of this camera's live plans and its last
        request did not know them (`recovery.newcomers`)."""
        mine = [s for s in self.slots.values() if s.role == "source" and s.live]
        if self.plan is None or not mine:
            return []
        excluded = [d for d, (_, until) in self.excluded.items() if until is None or now < until]
        me = self._runner(mine[0].plan_id).device
        new = recovery.newcomers(self.known | {d for s in mine for d in s.devices}, self.ready - {me}, excluded)
        if not new:
            return []
        return [Notice("replanning", {"reason": f"{', '.join(new)} {why}", "devices": new}),
                self._plan_request(now)]

    def _exclusions_over(self, now: float) -> list[Effect]:
        """Devices left out for stalling whose `recovery.EXCLUDE_S` is over may come back: they count as newcomers
        again (before, nothing asked for a plan with them, and an honest device starved for a moment stayed out
        until some other replan)."""
        back = sorted(d for d, (_, until) in self.excluded.items() if until is not None and now >= until)
        for d in back:
            del self.excluded[d]
            self.known.discard(d)
        return self._newcomers(now, "may come back (excluded for stalls until now)") if back else []

    @property
    def variant(self) -> str | None:
        """The model variant of this camera's last request (with a target: the one the planner chose)."""
        return self.request.get("variant")

    @property
    def target(self) -> dict | None:
        """The frame-rate or latency target of this camera's last request (background replans carry it)."""
        return self.request.get("target")

    # --- plans held at once ---------------------------------------------------------------------------------

    def _runner(self, plan_id: int):
        return self.runtime.runners.get(plan_id) if self.runtime is not None else None

    def _is_source(self, plan_id: int) -> bool:
        slot = self.slots.get(plan_id)
        return slot is not None and slot.role == "source"

    def _drop_slot(self, plan_id: int, reason: str) -> list[Effect]:
        """Stop running `plan_id` now; its frames started here fail."""
        slot = self.slots.pop(plan_id)
        if self.runtime is not None:
            self.runtime.retire(plan_id)
        if self.stream is not None:
            self._unschedule(plan_id)
        return [self._fail(f, f"{reason} during frame {f}") for f in sorted(slot.frames.values())]

    def _unschedule(self, plan_id: int) -> None:
        """The camera's scheduler gives `plan_id` no more frames (its frames in flight still finish or fail)."""
        keep = [(ln.lane, ln.weight, ln.depth, ln.latency) for ln in self.stream.lanes if ln.lane != plan_id]
        self.stream = stream_mod.replan(self.stream, keep)

    def _fail(self, frame: int, reason: str) -> FrameFailed:
        self.waiting.pop(frame, None)
        plan_id, seq = self.frame_plan.pop(frame, (None, None))
        slot = self.slots.get(plan_id)
        if slot is not None:
            slot.frames.pop(seq, None)
        if self.stream is not None:
            self.stream, _ = stream_mod.finished(self.stream, frame, ok=False)
        return FrameFailed(frame, reason)

    def _finish_alone(self, reason: str, now: float, frames=None) -> list[Effect]:
        """Frames started here (stream frame ids; default all in flight) computed whole here from the frame,
        never lost: their plan was replaced, or a device of it returned wrong results."""
        out: list[Effect] = []
        for f in sorted(self.waiting if frames is None else frames):
            if f not in self.waiting:
                continue
            plan_id, seq = self.frame_plan.get(f, (None, None))
            logits = self.runtime.alone_from_reference(plan_id, seq) if plan_id is not None else None
            if logits is None and plan_id is not None:
                asked = self.runtime.alone_request(plan_id, seq)  # on the engine: the answer comes with its run
                if asked is not None:
                    self.alone_reason[(plan_id, seq)] = (f, reason)
                    slot = self.slots.get(plan_id)
                    if slot is not None:
                        slot.frames.pop(seq, None)  # its plan's answer no longer counts; the frame outlives it
                    out += [Compute(plan_id, c) for c in asked]
                    continue
                logits = self.runtime.finish_alone(plan_id, seq)
            if logits is None:
                out.append(self._fail(f, f"{reason} during frame {f}"))
                continue
            out += self._alone_done(f, logits, reason, now)
        return out

    def _alone_done(self, f: int, logits, reason: str, now: float) -> list[Effect]:
        """Frame `f` (a stream frame id) finished alone here with `logits`."""
        t0 = self.waiting.pop(f)
        plan_id, seq = self.frame_plan.pop(f, (None, None))
        slot = self.slots.get(plan_id)
        if slot is not None:
            slot.frames.pop(seq, None)
        shown = True
        if self.stream is not None:
            self.stream, shown = stream_mod.finished(self.stream, f)
        self.faults["finished_alone"] += 1
        return [FrameDone(f, {"frame": f, **answer(logits, self.runtime.classifier.labels, 5),
                              "ms": (now - t0) * 1e3, "report": None,
                              "parts": [], "plan": plan_summary(self.plan), "recovered": reason,
                              "plan_id": plan_id, "seq": seq, "shown": shown, "stream": self.stream_counts()})]

    # --- faults within a frame (tilemesh.runtime.recovery), per plan ----------------------------------------

    def _lost_everywhere(self, device: str, why: str, now: float) -> list[Effect]:
        """`device` is gone (left, or convicted) from every plan this device runs with it: each plan rescues
        what it still owes; the camera asks the room for new plans once."""
        out: list[Effect] = []
        replan = False
        for pid in sorted(self.slots):
            effects, ask = self._lost(pid, device, why, now)
            out += effects
            replan = replan or ask
        if replan:
            out.append(self._plan_request(now))
        return out

    def _lost(self, plan_id: int, device: str, why: str, now: float) -> tuple[list[Effect], bool]:
        """`device` of plan `plan_id` is gone: rescue what it still owes; returns (effects, whether the source
        should ask for a new plan). A stream's lane that lost a device takes no new frames when the stream has
        other lanes (its frames in flight are rescued)."""
        slot, r = self.slots.get(plan_id), self._runner(plan_id)
        if slot is None or r is None or device not in r.members or device in (r.device, r.source) \
                or device in slot.gone:
            return [], False
        out: list[Effect] = []
        slot.gone.add(device)
        was_live = slot.live
        out += self._reply(self.runtime.release_held(plan_id, device), now)
        if not self._is_source(plan_id):
            for f in list(r.frames):
                out += self._ask(plan_id, f, device, why, now)
            return out, False
        for f in list(r.frames):
            out += self._rescue_here(plan_id, f, [t for t in r.outstanding(f) if t.src == device], now)
        out.append(Notice("recovering", {"device": device, "why": why, "plan_id": plan_id,
                                         "frames": sorted(slot.frames.values())}))
        if self.stream is not None and was_live and any(ln.lane != plan_id for ln in self.stream.lanes):
            slot.retired_at = now
            self._unschedule(plan_id)
        return out, was_live

    def _plan_request(self, now: float | None = None) -> Signal:
        """The camera's last request asked again (a background replan), leaving out excluded devices."""
        self.known |= self.ready
        exclude = sorted(d for d, (_, until) in self.excluded.items() if until is None or now is None or now < until)
        fields = {k: v for k, v in self.request.items()
                  if k not in ("exclude", "devices") and not (k == "strategy" and v == "tilemesh")}
        if self.request.get("devices") is not None:
            fields["devices"] = [d for d in self.request["devices"] if d not in exclude]
        if exclude:
            fields["exclude"] = exclude
        return Signal("plan_request", fields)

    def _ask(self, plan_id: int, frame: int, device: str, why: str, now: float, pieces=None) -> list[Effect]:
        """Ask the source for `device`'s missing pieces of `frame` (or `pieces`); watch them for a late copy."""
        slot, r = self.slots[plan_id], self._runner(plan_id)
        if pieces is None:
            pieces = [t for t in r.outstanding(frame) if t.src == device]
        if not pieces:
            return []
        slot.asked[(frame, device)] = now
        self.faults["rescue_requests"] += 1
        for t in pieces:
            r.watch(frame, t, hold=why == "check")
        data = {"kind": "rescue", "plan_id": plan_id, "frame": frame, "why": why,
                "pieces": [[t.src, t.tensor, *t.region.to_list()] for t in pieces]}
        return [Signal("broadcast", {"data": data})]

    def _rescue_here(self, plan_id: int, frame: int, pieces, now: float, again: bool = False) -> list[Effect]:
        """On the source: compute `pieces` of `frame` from the frame and send or take them (each once, unless
        `again`: a spot check, or a piece asked for again after its copy was lost)."""
        slot, r = self.slots[plan_id], self._runner(plan_id)
        if not again:
            pieces = [t for t in pieces if (frame, r.key(t), t.dst) not in slot.rescued]
        if not pieces:
            return []
        slot.rescued |= {(frame, r.key(t), t.dst) for t in pieces}
        # Kept after the frame finished here: a device still waiting for it may ask again.
        for key in [k for k in slot.rescued if k[0] < slot.seq - 2 * r.window]:
            slot.rescued.discard(key)
        res = self.runtime.rescue(plan_id, frame, pieces)
        self.faults["rescued_pieces"] += res["rescued"]
        self.faults["rescue_macs"] += res["macs"]
        self.faults["reference_pieces"] += res.get("reference", 0)
        return self._reply(res, now)

    def _on_rescue(self, sender: str, data: dict, now: float) -> list[Effect]:
        """On the source: a device asks for pieces another device owes it (gone, stalled, or a spot check)."""
        plan_id = data.get("plan_id")
        if not isinstance(plan_id, int) or not self._is_source(plan_id) or self._runner(plan_id) is None:
            return []
        slot = self.slots[plan_id]
        try:
            frame, why = int(data["frame"]), str(data.get("why", ""))
            pieces = list(data["pieces"])
            if len(pieces) > MAX_RESCUE_PIECES or any(len(p) != 6 for p in pieces):
                raise ValueError(f"pieces must be at most {MAX_RESCUE_PIECES} [src, tensor, r0, r1, c0, c1]")
            wanted = {(str(p[0]), str(p[1]), tuple(int(v) for v in p[2:6])) for p in pieces}
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            return self._error(f"unusable rescue request from {sender}: {exc!r}")
        owed = [t for t in self.runtime.plans[plan_id].transfers
                if t.dst == sender and (t.src, t.tensor, tuple(t.region.to_list())) in wanted]
        if why == "stall":
            blocked = slot.blocked.setdefault(frame, set())
            blocked.add(sender)
            # A device that itself waits for a rescue will send its pieces once it has it.
            owed = [t for t in owed if t.src not in blocked or t.src in slot.gone]
            slot.stalled.setdefault(frame, set()).update(t.src for t in owed)
        if why == "check":
            self.faults["checks"] += 1
        # A piece is rescued once per frame and receiver: a device asking again (its copy is slow to come, the
        # source busy) would get a duplicate message. Only a spot check asks for the source's own copy again.
        return self._rescue_here(plan_id, frame, owed, now, again=why == "check")

    def _mismatch(self, plan_id: int, frame: int, device: str, tensor: str, err: float, audited: bool,
                  now: float) -> list[Effect]:
        """On the source: `device`'s piece of `tensor` disagreed with the source's own copy. That convicts
        `device` when its inputs were surely right: they all come from the source, or the frame was audited
        (the receiver held every piece until the source's copy came). Otherwise a liar upstream may have fed it
        wrong inputs: the next `recovery.AUDIT_FRAMES` frames of the plan are audited to find who. The frame
        finishes alone."""
        slot, r = self.slots[plan_id], self._runner(plan_id)
        if frame in slot.frames:
            slot.tainted.add(frame)
        plan = self.runtime.plans[plan_id]
        if audited or all(t.src == r.source for t in plan.transfers if t.dst == device):
            return self._convict(device, frame, tensor, err, now)
        return self._start_audit(plan_id, device)

    def _start_audit(self, plan_id: int, device: str) -> list[Effect]:
        """The next `recovery.AUDIT_FRAMES` frames of plan `plan_id` are audited, to find who computes wrong."""
        slot = self.slots[plan_id]
        if slot.audit is not None and slot.audit[1] > slot.seq:
            return []  # an audit is under way
        first = slot.seq + 1
        slot.audit = (first, first + recovery.AUDIT_FRAMES - 1)
        detail = {"kind": "audit", "plan_id": plan_id, "first": first, "last": slot.audit[1], "suspect": device}
        return [Notice("audit", detail), Signal("broadcast", {"data": detail})]

    def _convict(self, device: str, frame: int, tensor: str, err: float, now: float) -> list[Effect]:
        """`device` sent a piece that disagrees with the source's copy: exclude it from plans, name it."""
        if device in self.excluded and self.excluded[device][1] is None:
            return []
        self.faults["caught"] += 1
        self.excluded[device] = ("wrong results", None)
        # Its other pieces of frames in flight may be wrong too: those frames finish alone.
        for slot in self.slots.values():
            if slot.role == "source" and device in slot.devices:
                slot.tainted |= set(slot.frames)
        detail = {"kind": "wrong_result", "device": device, "frame": frame, "tensor": tensor,
                  "max_err": err if err != float("inf") else -1.0}
        out: list[Effect] = [Notice("wrong_result", detail), Signal("broadcast", {"data": detail})]
        return out + self._lost_everywhere(device, "wrong results", now)

    def _after(self, plan_id: int, now: float) -> list[Effect]:
        """After plan `plan_id`'s runner moved: note frames first seen (and pick spot checks), judge copies."""
        slot, r = self.slots.get(plan_id), self._runner(plan_id)
        if slot is None or r is None:
            return []
        out: list[Effect] = []
        for f in [f for f in slot.seen if f not in r.frames]:
            del slot.seen[f]
        for f in r.frames:
            if f in slot.seen:
                continue
            slot.seen[f] = now
            if not self._is_source(plan_id):  # a frame first seen after a device of the plan left: ask at once
                for d in sorted(slot.gone):
                    out += self._ask(plan_id, f, d, "left", now)
            if slot.audit is not None and slot.audit[0] <= f <= slot.audit[1]:
                out += self._check_all(plan_id, f, now)
            elif self.audit_first and plan_id not in self.first_audited and self._audit_first_here(plan_id):
                self.first_audited.add(plan_id)
                out += self._check_all(plan_id, f, now)
            elif self.check_rate > 0 and self.rng.random() < self.check_rate:
                out += self._spot_check(plan_id, f, now)
        if self._is_source(plan_id):
            out += self._overlap_mismatches(plan_id, now) + self._release_verified(plan_id, now)
        for frame, tr, (p1, a1), (p2, a2) in r.take_comparisons():
            self.faults["compared"] += 1
            ok, err = recovery.agree(a1, a2)
            if ok:
                continue
            culprit = p2 if p1 == r.source else p1
            if self._is_source(plan_id):
                out += self._mismatch(plan_id, frame, culprit, tr.tensor, err, frame in slot.audited, now)
            else:  # told to the source, which judges
                detail = {"kind": "mismatch", "plan_id": plan_id, "device": culprit, "frame": frame,
                          "tensor": tr.tensor, "max_err": err if err != float("inf") else -1.0,
                          "audited": frame in slot.audited}
                out += [Notice("mismatch", detail), Signal("broadcast", {"data": detail})]
        return out

    def _audit_first_here(self, plan_id: int) -> bool:
        """Whether plan `plan_id`'s first frame is audited here (`audit_first`)."""
        if self.audit_first is True:
            return True
        r, slot = self._runner(plan_id), self.slots[plan_id]
        return bool(overlap.uncovered(slot.devices, r.checks.values(), r.source))

    def _check_all(self, plan_id: int, frame: int, now: float) -> list[Effect]:
        """An audited frame: every piece from another device (not the source) is held for the source's copy."""
        slot, r = self.slots[plan_id], self._runner(plan_id)
        pieces = [t for t in r.outstanding(frame) if t.src not in (r.source, r.device)]
        slot.audited.add(frame)
        for old in [f for f in slot.audited if f < frame - 4 * r.window]:
            slot.audited.discard(old)
        if not self._is_source(plan_id):
            out: list[Effect] = []
            for src in sorted({t.src for t in pieces}):
                out += self._ask(plan_id, frame, src, "check", now, [t for t in pieces if t.src == src])
            return out
        for t in pieces:
            r.watch(frame, t, hold=True)
        self.faults["checks"] += len(pieces)
        return self._rescue_here(plan_id, frame, pieces, now, again=True)

    def _spot_check(self, plan_id: int, frame: int, now: float) -> list[Effect]:
        r = self._runner(plan_id)
        pieces = [t for t in r.outstanding(frame) if t.src not in (r.source, r.device)]
        if not pieces:
            return []
        tr = pieces[self.rng.randrange(len(pieces))]
        if not self._is_source(plan_id):
            return self._ask(plan_id, frame, tr.src, "check", now, [tr])
        r.watch(frame, tr, hold=True)
        self.faults["checks"] += 1
        return self._rescue_here(plan_id, frame, [tr], now, again=True)

    def slowdown(self) -> float:
        """How far this device's compute runs behind its prediction lately (median measured/predicted of its recent
        frames, `drift_step`; 1.0 before any): the stall bound grows with it."""
        ratios = sorted(self.drift.ratios)
        if ratios:  # a re-profile empties them: the last figure holds until the next frame measures again
            self.last_slowdown = ratios[len(ratios) // 2]
        return self.last_slowdown

    def _stalls(self, plan_id: int, now: float) -> list[Effect]:
        """Frames of plan `plan_id` here without a result within the stall bound: ask (or, on the source,
        compute) the missing pieces."""
        slot, r = self.slots.get(plan_id), self._runner(plan_id)
        if slot is None or r is None:
            return []
        bound = recovery.stall_bound(slot.lane, self.slowdown())
        level = self.runtime.levels.get(plan_id, {})
        depth = max(level.values(), default=0)
        source = self._is_source(plan_id)
        out: list[Effect] = []
        for f in list(r.frames):
            waited = now - slot.seen.get(f, now)
            if waited < bound:
                continue
            by_src: dict[str, list] = {}
            due: set[str] = set()  # senders with a piece overdue: all their missing pieces are asked for
            for t in r.outstanding(f):
                if t.src != r.source:
                    by_src.setdefault(t.src, []).append(t)
                    if waited >= recovery.piece_wait(bound, level.get(t.of or t.tensor, 0), depth):
                        due.add(t.src)
            for src in sorted(due):
                pieces = by_src[src]
                if now - slot.asked.get((f, src), -1e9) < bound:
                    continue
                if source:
                    if src in slot.blocked.get(f, set()) and src not in slot.gone:
                        continue
                    slot.asked[(f, src)] = now
                    slot.stalled.setdefault(f, set()).add(src)
                    for t in pieces:
                        r.watch(f, t)
                    out.append(Notice("stalled", {"plan_id": plan_id, "frame": f, "device": src,
                                                  "waited_ms": round(waited * 1e3, 1)}))
                    out += self._rescue_here(plan_id, f, pieces, now)
                else:
                    out += self._ask(plan_id, f, src, "stall", now, pieces)
        for key in [k for k in slot.asked if k[0] not in r.frames]:
            del slot.asked[key]
        return out

    def _finished(self, plan_id: int, seq: int, now: float) -> list[Effect]:
        """On the source, a frame of plan `plan_id` done: its stalls are judged `recovery.judge_after` later."""
        slot = self.slots.get(plan_id)
        if slot is None:
            return []
        slot.judging[seq] = now
        return self._judge(plan_id, now)

    def _judge(self, plan_id: int, now: float) -> list[Effect]:
        """Straggler bookkeeping of plan `plan_id` (replan without a device that keeps stalling), for its frames
        finished at least `recovery.judge_after` ago. A device that asked for rescues in a frame was itself
        blocked upstream: it is not blamed for that frame. Judging later lets its request arrive first."""
        slot, r = self.slots.get(plan_id), self._runner(plan_id)
        if slot is None or r is None or slot.role != "source" or not slot.judging:
            return []
        levels = max(self.runtime.levels.get(plan_id, {}).values(), default=0)
        grace = recovery.judge_after(recovery.stall_bound(slot.lane, self.slowdown()), levels)
        out: list[Effect] = []
        for f in sorted(f for f, t in slot.judging.items() if now - t >= grace):
            del slot.judging[f]
            stalled = slot.stalled.pop(f, set()) - slot.blocked.pop(f, set()) - slot.gone
            devices = [d for d in slot.devices if d != r.device and d not in slot.gone]
            self.straggle, slow = recovery.straggle_step(self.straggle, devices, stalled, now)
            if not slow:
                continue
            out.append(Notice("straggler", {"devices": slow, "exclude_s": recovery.EXCLUDE_S}))
            for d in slow:
                self.excluded[d] = ("stalls", now + recovery.EXCLUDE_S)
                for pid in sorted(self.slots):
                    out += self._lost(pid, d, "stalls", now)[0]
            out.append(self._plan_request(now))
        for f in [f for f in (*slot.stalled, *slot.blocked) if f < slot.seq - 8 * r.window]:
            slot.stalled.pop(f, None)  # frames that never finished here (failed, replaced)
            slot.blocked.pop(f, None)
        return out

    # --- plans ----------------------------------------------------------------------------------------------

    def _on_request_plan(self, ev: RequestPlan, now: float) -> list[Effect]:
        self.known |= self.ready
        fields: dict = {k: v for k, v in (("strategy", ev.strategy), ("variant", ev.variant),
                                          ("devices", list(ev.devices) if ev.devices is not None else None),
                                          ("target", dict(ev.target) if ev.target is not None else None))
                        if v is not None}
        if ev.objective is not None:
            fields |= {"objective": ev.objective, "private": bool(ev.private)}
            if ev.latency_factor is not None:
                fields["latency_factor"] = float(ev.latency_factor)
        if ev.objective != "stop":
            # background replans (faults, drift, newcomers, re-divisions) ask the same, target included (the
            # default strategy left implicit)
            self.request = fields
            sig = self._plan_request(now)
            return [Signal("plan_request", {**({"strategy": ev.strategy} if ev.strategy else {}), **sig.fields})]
        # The stream ends: its frames in flight still finish on the retired lanes; the devices hear it (they
        # retire its plans too) and the server re-divides the room among the other cameras.
        self.request = {}
        for slot in self.slots.values():
            if slot.role == "source" and slot.live:
                slot.retired_at = now
        self.plan, self.stream = None, None
        return [Signal("plan_request", fields), Signal("broadcast", {"data": {"kind": "stream_stopped"}})]

    def _on_plan(self, ev: PlanIn, now: float) -> list[Effect]:
        msg, me = ev.msg, ev.me
        try:
            source = msg["source"]
            lanes = lanes_mod.lanes_of(msg)
        except (KeyError, TypeError, ValueError) as exc:
            return self._error(f"unusable plan message: {exc!r}")
        if source != me and msg.get("stream") is not None:
            self.cameras.add(source)
        keep = {lane["plan_id"] for lane in lanes}
        out: list[Effect] = []
        if msg.get("stream") is None:
            # One plan (a benchmark baseline): it replaces the camera's plans at once, as before streams, on
            # every device (their late chunks are dropped as stale); the camera finishes the frames they had in
            # flight alone, from the frame (never lost).
            old = [p for p, slot in self.slots.items() if slot.source == source and p not in keep]
            if old and source == me:
                frames = [f for f, (pid, _) in self.frame_plan.items() if pid in old]
                out += self._finish_alone(f"plan replaced by plan {msg.get('plan_id')}", now, frames=frames)
            for pid in old:
                out += self._drop_slot(pid, f"plan replaced by plan {msg.get('plan_id')}")
        out += self._retire(source, keep, now)
        mine = [lane for lane in lanes if me in lane["devices"] or source == me]
        if not mine:
            # Another camera's plan without us: keep running ours.
            return [*out, Notice("plan", {"plan": msg, "role": {"role": "idle", "plan_id": msg.get("plan_id")}})]
        if self.runtime is None:
            return [*out, *self._error(f"plan {msg.get('plan_id')} includes this device, but it has no model")]
        roles = []
        for lane in mine:
            devices = {*lane["devices"], source}
            try:
                role = self.runtime.set_plan(lane["spec"], me, plan_max_messages(devices, me, self.max_message))
            except (KeyError, TypeError, ValueError) as exc:
                out += self._error(f"adopting plan {lane['plan_id']} failed: {exc}")
                continue
            self.slots[lane["plan_id"]] = PlanSlot(lane["plan_id"], source, frozenset(lane["devices"]), lane,
                                                   role["role"], role.get("parts", []))
            out += [self._error_notice(e) for e in role.pop("errors", [])]
            out += self._reply(role, now)  # chunks that outran this plan message, replayed now
            roles.append({k: v for k, v in role.items() if k not in ("out", "compute", "results", "reports")})
        if not roles:
            return out
        self.last_plan = msg
        if source == me:
            live = [(lane["plan_id"], lane["weight"], lane["depth"], float(lane.get("predicted_ms") or 0) / 1e3)
                    for lane in mine if lane["plan_id"] in self.slots]
            self.stream = stream_mod.replan(self.stream or stream_mod.StreamState(), live)
            self.plan = msg
            if self.request.get("target") is not None:  # scaling: the planner chose this variant; replans start from it
                chosen = mine[0]["spec"].get("variant")
                self.request = {k: v for k, v in self.request.items() if k != "variant"}
                if chosen:
                    self.request["variant"] = chosen
            self.parts = roles[0].get("parts", [])
        summary = {**roles[0], "lanes": roles, "capacity": sum(lane["depth"] for lane in mine)}
        out.append(Notice("plan", {"plan": msg, "role": summary}))
        # A plan asked for before a device was excluded (two background replans at once: the server runs one per
        # peer and refuses the other) may still hold it: the camera adopts it, rescues the excluded device's
        # share up front, and asks again.
        excluded = {d for d, (_, until) in self.excluded.items() if until is None or now < until}
        stale = sorted(excluded & {d for lane in mine for d in lane["devices"]}) if source == me else []
        if stale:
            for lane in mine:
                if lane["plan_id"] in self.slots:
                    self.slots[lane["plan_id"]].gone |= set(stale) & set(lane["devices"])
            out += [Notice("replanning", {"reason": f"plan {msg.get('plan_id')} holds excluded {', '.join(stale)}",
                                          "devices": stale}), self._plan_request(now)]
        return out

    def _retire(self, source: str, keep: set[int], now: float) -> list[Effect]:
        """A newer plan message of `source`: its plans not in `keep` stop taking frames; they finish the ones they
        have (`lanes.expired` drops them later)."""
        for pid, slot in self.slots.items():
            if slot.source == source and slot.live and pid not in keep:
                slot.retired_at = now
        return self._expire(now)

    def _expire(self, now: float) -> list[Effect]:
        out: list[Effect] = []
        for pid in lanes_mod.expired(self.slots, now):
            out += self._drop_slot(pid, f"plan {pid} retired")
        return out

    def _on_broadcast(self, ev: BroadcastIn, now: float) -> list[Effect]:
        data = ev.data if isinstance(ev.data, dict) else {}
        kind = data.get("kind")
        if kind == "rescue":
            return self._on_rescue(ev.sender, data, now)
        if kind == "stream_stopped":
            self.cameras.discard(ev.sender)
            return self._retire(ev.sender, set(), now)
        if kind in ("mismatch", "audit"):
            plan_id = data.get("plan_id")
            r = self._runner(plan_id) if isinstance(plan_id, int) else None
            if r is None:
                return []  # not a plan this device runs
            device = data.get("device")
            if kind == "mismatch" and self._is_source(plan_id) and ev.sender in r.members and device in r.members:
                try:
                    frame, err = int(data.get("frame")), float(data.get("max_err"))
                except (TypeError, ValueError):
                    return self._error(f"unusable mismatch report from {ev.sender}")
                return self._mismatch(plan_id, frame, device, str(data.get("tensor")), err,
                                      data.get("audited") is True, now)
            if kind == "audit" and not self._is_source(plan_id) and ev.sender == r.source:
                try:
                    self.slots[plan_id].audit = (int(data["first"]), int(data["last"]))
                except (KeyError, TypeError, ValueError):
                    return self._error(f"unusable audit from {ev.sender}")
            return []
        mine = {d for slot in self.slots.values() if slot.role == "source" and slot.live for d in slot.devices}
        if kind == "profile_changed" and self.plan is not None and ev.sender in mine:
            try:
                ratio = float(data.get("ratio"))
            except (TypeError, ValueError):
                ratio = 0.0
            # The plans keep running while the room replans in the background: no frame is dropped.
            return [Notice("replanning", {"reason": f"device {ev.sender} changed speed (x{ratio:.1f})"}),
                    self._plan_request(now)]
        return []

    # --- frames and chunks ----------------------------------------------------------------------------------

    def _on_frame(self, ev: FrameIn, now: float) -> list[Effect]:
        frame = int(ev.frame)
        if self.plan is None or self.runtime is None or self.stream is None or not self.stream.lanes:
            return [FrameFailed(frame, "no plan yet")]
        if frame <= self.last_frame:
            return [FrameFailed(frame, f"frame {frame} is not newer than frame {self.last_frame}")]
        if ev.plan_id is None:
            self.stream, picked = stream_mod.next_frame(replace(self.stream, next_id=frame), now)
            if picked is None:
                wait = self.stream.wait_s
                why = f"the free lanes would finish before the frames in flight ({wait * 1e3:.0f} ms)" if wait \
                    else "every lane has its frames in flight"
                return [FrameFailed(frame, f"busy: {why}", retry_s=wait)]
            plan_id = picked[1]
        else:
            plan_id = int(ev.plan_id)
            if plan_id not in {ln.lane for ln in self.stream.lanes}:
                return [FrameFailed(frame, f"plan {plan_id} is not a lane of this camera's stream")]
            self.stream = stream_mod.assign(self.stream, frame, plan_id)
        self.last_frame = frame
        slot = self.slots[plan_id]
        seq = slot.start(frame)
        self.waiting[frame] = now
        self.frame_plan[frame] = (plan_id, seq)
        try:
            res = self.runtime.start_frame(seq, ev.data, int(ev.height), int(ev.width), plan_id=plan_id)
        except (RuntimeError, ValueError) as exc:
            return [self._fail(frame, str(exc))]
        out = self._reply(res, now)
        if slot.gone and frame in self.waiting:
            # Until the new plan comes: what gone devices would have sent, computed here up front, unless that
            # costs more than the whole frame (a gone device held a late segment): then alone.
            owed = [t for d in sorted(slot.gone) for t in self.runtime.owed(plan_id, d) if t.dst not in slot.gone]
            if self._up_front_pays(plan_id, owed):
                out += self._rescue_here(plan_id, seq, owed, now)
            else:
                out += self._finish_alone("a device of the plan is gone", now, frames=[frame])
        return out

    def _up_front_pays(self, plan_id: int, owed) -> bool:
        """`recovery.up_front_pays` with this device's predicted whole-model times per engine (its profile);
        without them, by MAC count (the rescue and this device's own tasks against one whole model)."""
        model = self.runtime.model_macs(plan_id)
        cost = self.runtime.rescue_cost(plan_id, owed)
        engines = (self.compute or {}).get("engines") if isinstance(self.compute, dict) else None
        numpy_ms = float((engines or {}).get("numpy") or 0)
        engine_ms = min((float(v) for k, v in (engines or {}).items() if k != "numpy" and v), default=0.0)
        if not numpy_ms and not engine_ms:
            own = sum(t.macs for t in self._runner(plan_id).dplan.tasks)
            return cost + own < model
        alone_ms = engine_ms or numpy_ms
        rescue_ms = numpy_ms * cost / model if numpy_ms else engine_ms
        if engine_ms and self.runtime.deferred and self.runtime.reference_ok:
            rescue_ms = min(rescue_ms, engine_ms)  # one reference run on the engine serves every piece
        return recovery.up_front_pays(rescue_ms, self.slots[plan_id].lane.get("predicted_ms"), alone_ms)

    def _rx(self, peer: str, chunk, now: float) -> None:
        """Link accounting: a message of several chunks from `peer` times the link from its first chunk to its last
        (the bytes after the first over that time; one-chunk messages say nothing of throughput)."""
        pos = wire.peek_chunking(chunk)
        if pos is None or pos[1] < 2:
            return
        index, count = pos
        if index == 0:
            self.rx_open[peer] = [now, 0]
            return
        acc = self.rx_open.get(peer)
        if acc is None:
            return
        acc[1] += len(chunk)
        if index == count - 1:
            del self.rx_open[peer]
            if now > acc[0]:
                total = self.rx.setdefault(peer, [0, 0.0])
                total[0] += acc[1]
                total[1] += now - acc[0]

    def _on_chunk(self, ev: ChunkIn, now: float) -> list[Effect]:
        if self.runtime is None:
            return self._error(f"chunk from {ev.peer} before the model was loaded")
        self._rx(ev.peer, ev.data, now)
        try:
            res = self.runtime.on_chunk(ev.peer, ev.data)
        except ValueError as exc:  # a bad chunk costs that chunk, never the session
            return self._error(f"chunk from {ev.peer} refused: {type(exc).__name__}: {exc}")
        return self._reply(res, now)

    def _on_computed(self, ev: Computed, now: float) -> list[Effect]:
        if self.runtime is None:
            return []
        outputs = ev.outputs
        if self.corrupt:  # a test's lying device (`corrupt_for_test`): wrong values, valid wire format
            outputs = {k: (v + self.corrupt).astype(v.dtype) if getattr(v, "ndim", 0) == 4 else v
                       for k, v in outputs.items()}
        try:
            res = self.runtime.computed(ev.plan_id, ev.frame, ev.task, outputs)
        except ValueError as exc:
            return self._error(f"compute result refused: {exc}")
        return self._reply(res, now)

    def _on_tick(self, ev: Tick, now: float) -> list[Effect]:
        late = [f for f, t0 in self.waiting.items() if now - t0 > FRAME_TIMEOUT_S]
        out: list[Effect] = [self._fail(f, f"frame {f} timed out after {FRAME_TIMEOUT_S:g} s") for f in sorted(late)]
        for pid in sorted(self.slots):
            out += self._stalls(pid, now) + self._judge(pid, now)
            if self._is_source(pid):
                out += self._release_verified(pid, now)
        return out + self._expire(now) + self._exclusions_over(now)

    def _reply(self, res: dict, now: float | None = None) -> list[Effect]:
        """Effects of what the plan runtime answered: sends, compute requests, finished frames, reports, drift,
        and the plan's fault bookkeeping."""
        out: list[Effect] = [Send(o["dst"], o["chunks"], o["tensor"], o["nbytes"]) for o in res.get("out", [])]
        plan_id = res.get("plan_id")
        if plan_id is not None and "tasks_run" in res and self.tasks_run.get(int(plan_id)) != int(res["tasks_run"]):
            self.tasks_run[int(plan_id)] = int(res["tasks_run"])
            out.append(Notice("tasks_run", {"plan_id": int(plan_id), "tasks_run": int(res["tasks_run"])}))
        out += [Compute(int(plan_id), c) for c in res.get("compute", [])]
        slot = self.slots.get(int(plan_id)) if plan_id is not None else None
        for r in res.get("results", []):
            seq = r["frame"]
            frame = slot.frames.get(seq) if slot is not None else None
            if frame is None or frame not in self.waiting:
                continue  # failed or finished meanwhile (timeout, a device left): its caller was told already
            if seq in slot.tainted:  # a device of its plan lied meanwhile: the frame is computed again, alone
                slot.tainted.discard(seq)
                out += self._finish_alone("a device of its plan returned wrong results", now or 0.0, frames=[frame])
                continue
            verdict = self._verdict(int(plan_id), seq)
            if verdict == "pending":  # shown when its overlap digests are in (`_release_verified`)
                self.faults["held_for_digests"] += 1
                slot.verifying[seq] = (r, now or 0.0)
                continue
            if verdict == "bad":
                out += self._finish_alone("its overlap checks disagreed", now or 0.0, frames=[frame])
                continue
            out += self._show(int(plan_id), slot, seq, frame, r, now)
        for seq, logits in res.get("alone", []):  # frames finished alone on the engine (a reference run)
            frame, reason = self.alone_reason.pop((int(plan_id), seq), (None, "finished alone"))
            if frame is not None and frame in self.waiting:
                out += self._alone_done(frame, logits, reason, now or self.waiting[frame])
        for report in res.get("reports", []):
            out += self._on_report(int(plan_id), report, now)
        if now is not None and plan_id is not None:
            out += self._after(int(plan_id), now)
        return out

    def _show(self, plan_id: int, slot: PlanSlot, seq: int, frame: int, r: dict, now: float | None) -> list[Effect]:
        """Frame `frame` (wire id `seq` of plan `plan_id`) answered by the room: hand it to the UI."""
        slot.frames.pop(seq, None)
        t0 = self.waiting.pop(frame)
        self.frame_plan.pop(frame, None)
        shown = True
        if self.stream is not None:
            self.stream, shown = stream_mod.finished(self.stream, frame, now=now)
        ms = (now - t0) * 1e3 if now is not None else r.get("ms", 0.0)
        out: list[Effect] = [FrameDone(frame, {**r, "frame": frame, "seq": seq, "plan_id": int(plan_id),
                                               "ms": ms, "shown": shown, "parts": slot.parts,
                                               "plan": plan_summary(self.plan), "stream": self.stream_counts()})]
        if now is not None:
            out += self._finished(int(plan_id), seq, now)
            if shown:
                out += self._stats(now, ms)
        return out

    # --- overlap cross-checks (tilemesh.runtime.overlap), on the source -----------------------------------

    @staticmethod
    def _feeders(plan, device: str, segment: int) -> set[str]:
        """Devices whose pieces `device` used in the plan's segments up to `segment`."""
        return {tr.src for task in plan.tasks if task.device == device and task.segment <= segment
                for tr in task.recv} - {device}

    def _verdict(self, plan_id: int, seq: int) -> str:
        """"ok", "pending" or "bad": the overlap checks of frame `seq` of plan `plan_id` (pairs with a device gone
        or rescued for stalling in that frame are not waited for)."""
        slot, r = self.slots.get(plan_id), self._runner(plan_id)
        if slot is None or r is None or not r.checks or slot.role != "source":
            return "ok"
        return r.verdict(seq, slot.gone | slot.stalled.get(seq, set()))

    def _release_verified(self, plan_id: int, now: float) -> list[Effect]:
        """Frames held for their overlap digests: shown once every check agreed, finished alone when one did
        not, or when a digest is still missing after the plan's stall bound (counted as unverified)."""
        slot = self.slots.get(plan_id)
        if slot is None or not slot.verifying:
            return []
        out: list[Effect] = []
        grace = recovery.stall_bound(slot.lane, self.slowdown())  # a loaded machine's digests come late too
        for seq in sorted(slot.verifying):
            r, since = slot.verifying[seq]
            frame = slot.frames.get(seq)
            if frame is None or frame not in self.waiting:
                del slot.verifying[seq]
                continue
            verdict = "bad" if seq in slot.tainted else self._verdict(plan_id, seq)
            if verdict == "pending" and now - since < grace:
                continue
            del slot.verifying[seq]
            if verdict == "bad":
                slot.tainted.discard(seq)
                out += self._finish_alone("its overlap checks disagreed", now, frames=[frame])
                continue
            if verdict == "pending":
                # A digest that never came proves nothing: the frame finishes alone (its answer is the camera's
                # own), and a device that keeps withholding them has its next frames audited.
                self.faults["unverified"] += 1
                out += self._withheld(plan_id, slot, seq)
                out += self._finish_alone("an overlap digest did not come", now, frames=[frame])
                continue
            out += self._show(plan_id, slot, seq, frame, r, now)
        return out

    def _withheld(self, plan_id: int, slot, seq: int) -> list[Effect]:
        """Frame `seq` was shown unverified: a device whose digests keep not coming escapes the overlap checks
        (a liar could withhold them), so after `recovery.WITHHELD_AUDIT` such frames its next frames are audited."""
        out: list[Effect] = []
        r = self._runner(plan_id)
        for device in r.missing(seq, slot.gone | slot.stalled.get(seq, set())) if r is not None else ():
            if device == r.source:
                continue
            slot.withheld[device] = slot.withheld.get(device, 0) + 1
            if slot.withheld[device] >= recovery.WITHHELD_AUDIT:
                slot.withheld[device] = 0
                out += self._start_audit(plan_id, device)
        return out

    def _overlap_mismatches(self, plan_id: int, now: float) -> list[Effect]:
        """Pairs of overlap digests that disagreed. The frame finishes alone. The first disagreement of a frame is
        settled by a copy computed from the frame alone (the source's own, when everything it used up to that
        segment was its own, else a third computation here): a device whose copy differs and whose inputs up to
        that segment all came from the source computed wrong and is convicted; one fed by another device may only
        have used a liar's halo, so it is not blamed when a feeder is already caught, else the next frames are
        audited (`_start_audit`), which shows who."""
        slot, r = self.slots[plan_id], self._runner(plan_id)
        plan = self.runtime.plans[plan_id]
        out: list[Effect] = []
        for frame, check, copies, err in sorted(r.take_digest_mismatches(), key=lambda m: (m[0], m[1].segment)):
            if slot.gone & set(check.devices):
                continue  # a device already left out of this plan (its frames are rescued or finish alone)
            self.faults["overlap_mismatches"] += 1
            out.append(Notice("mismatch", {"kind": "overlap", "plan_id": plan_id, "frame": frame,
                                           "tensor": check.tensor, "devices": list(check.devices),
                                           "max_err": err if err != float("inf") else -1.0}))
            if frame in slot.frames:
                slot.tainted.add(frame)
            if frame in slot.overlap_judged:
                continue  # one settling per frame (a liar's error spreads to every later check of the frame)
            slot.overlap_judged.add(frame)
            for old in [f for f in slot.overlap_judged if f < frame - 8 * r.window]:
                slot.overlap_judged.discard(old)
            truth = copies.get(r.source) if not self._feeders(plan, r.source, check.segment) else None
            if truth is None:
                got = self.runtime.overlap_truth(plan_id, frame, check)
                if got is None:  # the frame's pixels are gone: audits of the next frames show who
                    out += self._start_audit(plan_id, check.devices[0])
                    continue
                truth, macs = got
                self.faults["overlap_truth_macs"] += macs
            cells = overlap.cells(r.graph, check)
            caught = {d for d, (why, _) in self.excluded.items() if why == "wrong results"} | slot.gone
            for device, d in sorted(copies.items()):
                if device == r.source:
                    continue
                ok, e = overlap.agree_digests(d, truth, cells)
                if ok:
                    continue
                fed = self._feeders(plan, device, check.segment) - {r.source}
                if not fed:
                    out += self._convict(device, frame, check.tensor, e, now)
                elif not fed & caught:
                    out += self._start_audit(plan_id, device)
        return out

    def _on_report(self, plan_id: int, report: dict, now: float | None) -> list[Effect]:
        out: list[Effect] = [Notice("timings", {"plan_id": plan_id, "report": report})]  # every frame, locally
        if should_report(int(report["frame"])):
            if self.rx:
                report = {**report, "links": {p: {"bytes": b, "seconds": round(t, 6)} for p, (b, t) in self.rx.items()}}
                self.rx = {}
            out.append(Signal("broadcast", {"data": {"kind": "frame_report", "plan_id": plan_id, "report": report}}))
            out.append(Notice("report", {"plan_id": plan_id, "report": report}))
        slot = self.slots.get(plan_id)
        plan = slot.lane if slot is not None else None
        if plan is None or now is None:
            return out
        predicted = (((plan.get("timeline") or {}).get("devices") or {}).get(report.get("device")) or {})
        self.drift, ratio = drift_step(self.drift, float(report.get("compute_ms") or 0),
                                       float(predicted.get("compute_s") or 0), now)
        if ratio is not None:
            self.pending_drift = ratio
            out += [Notice("drift", {"ratio": ratio}), Profile("drift")]
        return out

    def _stats(self, now: float, ms: float) -> list[Effect]:
        """Measured figures of this camera's stream, beside the planner's, about once a second: for this page
        (`stream_stats` notice) and the room's host page (a `stream_stats` broadcast)."""
        self.shown = [(t, v) for t, v in self.shown if now - t <= stream_mod.STATS_WINDOW_S] + [(now, ms)]
        if self.plan is None or (self.stats_at is not None and now - self.stats_at < stream_mod.STATS_EVERY_S):
            return []
        self.stats_at = now
        planned = self.plan.get("stream") or {}
        figures = {**stream_mod.measured(self.shown, now), **self.stream_counts(),
                   "plan_id": self.plan.get("plan_id"), "objective": planned.get("objective"),
                   "private": bool(planned.get("private")), "predicted_fps": planned.get("predicted_fps"),
                   "predicted_ms": self.plan.get("predicted_ms"),
                   "devices": sorted({d for s in self.slots.values() if s.role == "source" and s.live
                                      for d in s.devices})}
        return [Notice("stream_stats", figures), Signal("broadcast", {"data": {"kind": "stream_stats", **figures}})]

    def stream_counts(self) -> dict:
        """The camera's stream so far: frames dropped late, skipped (every lane busy), failed; lanes and depth."""
        st = self.stream
        if st is None:
            return {}
        return {"dropped_late": st.dropped_late, "skipped": st.skipped, "failed": st.failed, "lanes": len(st.lanes),
                "capacity": sum(ln.depth for ln in st.lanes), "in_flight": len(st.frame_lane)}

    # --- errors ---------------------------------------------------------------------------------------------

    def _error_notice(self, text: str) -> Notice:
        self.errors.append(text)
        del self.errors[:-32]
        return Notice("error", {"message": text})

    def _error(self, text: str) -> list[Effect]:
        return [self._error_notice(text)]


# --- the browser worker's boundary ----------------------------------------------------------------------------

EVENTS = {cls.kind: cls for cls in (ModelLoaded, PlanIn, ChunkIn, LinkOpened, LinkUpdated, LinkMeasured,
                                     ProbeFailed, PeerLeft, Roster, RoomChanged, FrameIn, Computed, Profiled,
                                     BroadcastIn, RequestPlan, Tick)}


PLAN_SUMMARY_KEYS = ("plan_id", "source", "strategy", "label", "devices", "predicted_ms", "variant", "scaling",
                     "stream")


def plan_summary(plan: dict | None) -> dict | None:
    """What a finished frame says of its plan. Not the whole plan message: its timeline and candidates (the host
    page has them from the plan notice) cost the worker milliseconds per frame to hand over on a slow phone."""
    if plan is None:
        return None
    return {**{k: plan[k] for k in PLAN_SUMMARY_KEYS if k in plan},
            **({"lanes": len(plan["lanes"])} if isinstance(plan.get("lanes"), list) else {})}


def event_from_dict(d: dict) -> Event:
    """`{"on": kind, **fields}` (as the worker receives it from JS) -> the event; unknown kinds or fields raise."""
    d = dict(d)
    kind = d.pop("on", None)
    cls = EVENTS.get(kind)
    if cls is None or cls is ModelLoaded:
        raise ValueError(f"unknown session event {kind!r}")
    names = {f.name for f in fields(cls)}
    extra = set(d) - names
    if extra:
        raise ValueError(f"{kind} event has unknown fields {sorted(extra)}")
    if cls is RequestPlan and d.get("devices") is not None:
        d["devices"] = tuple(str(x) for x in d["devices"])
    if cls is Roster and "ready" in d:
        d["ready"] = tuple(str(x) for x in d["ready"])
    if cls is LinkMeasured and "rtts_ms" in d:
        d["rtts_ms"] = tuple(d["rtts_ms"])
    if cls is Computed and isinstance(d.get("outputs"), dict):
        d["outputs"] = {k: array_from_dict(v) if isinstance(v, dict) else v for k, v in d["outputs"].items()}
    return cls(**d)


def array_to_dict(a) -> dict:
    """An array as plain values for JS: `{"shape", "dtype", "data"}` (little-endian bytes)."""
    return {"shape": list(a.shape), "dtype": str(a.dtype), "data": a.tobytes()}


def array_from_dict(d: dict):
    """The inverse of `array_to_dict`, checked: the byte count must match the shape and dtype."""
    import numpy as np

    dtype = np.dtype(str(d["dtype"])).newbyteorder("<")
    shape = tuple(int(n) for n in d["shape"])
    data = bytes(d["data"])
    if len(data) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise ValueError(f"{len(data)} bytes cannot hold a {dtype} array of shape {shape}")
    return np.frombuffer(data, dtype).reshape(shape)


def effect_to_dict(e: Effect) -> dict:
    """`{"do": kind, **fields}` with plain values for JS (a compute request's arrays as shape/dtype/bytes)."""
    if isinstance(e, Compute):
        r = e.request
        return {"do": e.kind, "plan_id": e.plan_id, "frame": r.frame, "task": r.task, "segment": r.segment,
                "keep": list(r.keep),
                "inputs": {k: array_to_dict(a) for k, a in r.inputs.items()}}
    return {"do": e.kind, **{f.name: getattr(e, f.name) for f in fields(e)}}


_session: DeviceSession | None = None


def session() -> DeviceSession:
    global _session
    if _session is None:
        _session = DeviceSession()
    return _session


def load(model_json: str, labels_json: str, card_json: str | None = None) -> dict:
    """Worker entry: load the model once (shared with single-device classification); the card gives its
    preprocessing (`tilemesh.models.card`; default: ImageNet's)."""
    s = session()
    if s.runtime is None:
        s.handle(ModelLoaded(LocalClassifier.from_files(model_json, labels_json, card_json)), 0.0)
    g = s.runtime.graph
    return {"nodes": len(g.nodes), "classes": len(s.runtime.classifier.labels)}


def handle(event: dict, now: float) -> list[dict]:
    """Worker entry: one event (a dict from JS, `now` in seconds) -> the effects as dicts."""
    return [effect_to_dict(e) for e in session().handle(event_from_dict(event), now)]


def state() -> dict:
    """What the page shows and tests read: current plans, tasks run, errors, links."""
    s = session()
    return {"plan": s.plan, "last_plan": s.last_plan, "tasks_run": s.tasks_run, "errors": list(s.errors),
            "links": s.links, "max_message": s.max_message, "waiting": sorted(s.waiting), "faults": s.faults,
            "excluded": {d: why for d, (why, _) in s.excluded.items()},
            # overlap cross-checks judged here: digest pairs compared and the largest relative difference seen
            "overlap": {pid: {"pairs": r.digest_pairs, "max_err": r.digest_max_err}
                        for pid, r in (s.runtime.runners.items() if s.runtime is not None else ()) if r.digest_pairs},
            "plans": {pid: {"role": sl.role, "live": sl.live, "source": sl.source} for pid, sl in s.slots.items()},
            "stream": s.stream_counts(), "slowdown": s.slowdown()}


def set_check_rate(rate: float) -> float:
    """Worker entry: the share of frames in which this device spot-checks one piece (`recovery.CHECK_RATE`)."""
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"check rate must be within 0..1, got {rate}")
    session().check_rate = rate
    return rate


def corrupt_for_test(offset: float) -> float:
    """Worker entry for fault-injection tests: this device adds `offset` to every tile it computes from now on,
    as a broken or malicious device would (the wire format stays valid). Its peers' checks must catch it."""
    session().corrupt = float(offset)
    return session().corrupt


def profile(numpy: bool = True) -> dict:
    """This device's compute profile on the loaded model's own layers (a second or two on numpy). Without
    `numpy`, only what Python does whatever the engine (`frame_s`, the camera device's per-frame work): a device
    with a faster engine (onnxruntime-web) measures that engine instead and never computes on numpy."""
    from .profile import measure_profile

    s = session()
    if s.runtime is None:
        raise RuntimeError("model not loaded: call tilemesh.runtime.session.load first")
    prof = measure_profile(s.runtime.graph) if numpy else {}
    prof["frame_s"] = measure_frame_seconds(s.runtime.classifier)
    return prof


def measure_frame_seconds(classifier, budget_s: float = 0.1, seed: int = 0) -> float:
    """Median seconds this device's session spends on one frame it takes with its camera, outside the engine:
    the frame in, the centre crop, the runner's bookkeeping and normalisation, the engine's request and answer,
    the top-5 and the effects as the worker hands them to the page (`effect_to_dict`).

    Timed on a scratch session (the real one is untouched) holding a one-device plan in deferred mode, whose
    compute requests are answered with zeros at once: what is left is the per-frame cost the cost model adds
    on the camera device (`frame_s`). Measured in Pyodide it is several ms on a throttled phone; the engine's
    own time is measured apart (the profile's whole-model run)."""
    import time  # a measurement at the worker's edge: the session core itself never reads a clock

    import numpy as np

    from .profile import median_seconds, sustained_samples

    graph = classifier.graph
    scratch = DeviceSession(classifier, deferred=True)
    whole = {"devices": [["me"]], "row_shares": None, "col_shares": None}
    spec = {"plan_id": 1, "source": "me", "cuts": [], "splits": [whole]}
    msg = {"plan_id": 1, "source": "me", "devices": ["me"], "spec": spec, "strategy": "single",
           "label": "frame cost probe", "predicted_ms": 0.0}
    scratch.handle(PlanIn(msg, "me"), 0.0)
    side = classifier.pre.resize_shorter_side
    data = np.random.default_rng(seed).integers(0, 256, (side, side, 4), dtype=np.uint8).tobytes()
    frame = [0]

    def one() -> None:
        frame[0] += 1
        pending = scratch.handle(FrameIn(frame[0], data, side, side), time.perf_counter())
        done = False
        while pending:
            e = pending.pop(0)
            if isinstance(e, Compute):
                task = scratch.runtime.runner.dplan.tasks[e.request.task]
                for a in e.request.inputs.values():
                    np.ascontiguousarray(a, np.float32)
                outs = {k: np.zeros((1, graph.shapes[k][1], r.rows, r.cols) if len(graph.shapes[k]) == 4
                                    else graph.shapes[k], np.float32)
                        for k in task.owned for r in (task.deps.regions[k],)}
                pending += scratch.handle(Computed(e.plan_id, e.request.frame, e.request.task, outs),
                                          time.perf_counter())
            else:
                effect_to_dict(e)
                done = done or isinstance(e, FrameDone)
        if not done:
            raise RuntimeError("the frame cost probe did not finish its frame")

    return median_seconds(sustained_samples(one, budget_s))


def classify_local(data, height: int, width: int, k: int = 5) -> dict:
    s = session()
    if s.runtime is None:
        raise RuntimeError("model not loaded: call tilemesh.runtime.session.load first")
    return s.runtime.classifier.classify(data, height, width, k)
