"""The plans a device session runs at once, each in its own small record, and how a `plan` message names them.

A `plan` message is either one plan (`{plan_id, source, devices, spec, timeline, ...}`, what the benchmark
strategies ask for) or a camera's stream: the same fields for its first lane plus `lanes`, a list of plans of
the same source, each `{plan_id, devices, spec, timeline, weight, depth, ...}`, and `stream` (the objective and
the predicted figures, `tilemesh.planning.streams.StreamPlan.to_dict`). `lanes_of` reads both as lanes.

A source's newer stream message retires its older plans (a single plan replaces them on the source at once, failing
their frames, as before streams): devices keep a retired plan until its frames in flight are
done or `RETIRE_AFTER_S` has passed (so a re-division among cameras does not fail frames that can still
finish), and never more than `MAX_PLANS` plans at once (oldest retired first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

RETIRE_AFTER_S = 8.0  # as the session's frame timeout: no frame of a retired plan can still be waited for
MAX_PLANS = 8
MAX_LANES = 8
MAX_DEPTH = 4


def lanes_of(msg: dict) -> list[dict]:
    """The plan message's lanes, each a full plan message of its own (`source` and `timeline` filled in);
    raises ValueError (KeyError, TypeError) on a malformed message."""
    source = msg["source"]
    raw = msg.get("lanes")
    if raw is None:  # one plan: frames in flight are up to the camera's loop (as before streams)
        raw = [{k: msg[k] for k in ("plan_id", "devices", "spec", "predicted_ms") if k in msg}
               | {"timeline": msg.get("timeline"), "depth": MAX_DEPTH}]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_LANES:
        raise ValueError(f"a plan message has 1 to {MAX_LANES} lanes, not {raw!r:.80}")
    lanes = []
    for lane in raw:
        plan_id, devices, spec = int(lane["plan_id"]), [str(d) for d in lane["devices"]], lane["spec"]
        if not isinstance(spec, dict) or int(spec["plan_id"]) != plan_id or spec["source"] != source:
            raise ValueError(f"lane {plan_id}: its spec names another plan or source")
        weight, depth = float(lane.get("weight", 1.0)), int(lane.get("depth", 1))
        if not weight > 0 or not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"lane {plan_id}: weight {weight} must be positive, depth {depth} in 1..{MAX_DEPTH}")
        lanes.append({**lane, "plan_id": plan_id, "source": source, "devices": devices, "weight": weight,
                      "depth": depth, "timeline": lane.get("timeline") or {}})
    ids = [lane["plan_id"] for lane in lanes]
    if sorted(set(ids)) != ids:
        raise ValueError(f"lane plan ids must increase: {ids}")
    return lanes


@dataclass
class PlanSlot:
    """One plan this device takes part in (as its source or a worker), with its fault bookkeeping.

    The source numbers a lane's frames 1, 2, 3... (`seq`, the frame id on the wire and in the runner, so each
    runner's window of frames in flight holds whatever share of the stream its lane gets) and maps them back to
    the stream's frame ids (`frames`)."""

    plan_id: int
    source: str
    devices: frozenset[str]
    lane: dict  # the lane's plan message (`lanes_of`)
    role: str  # "source" or "worker"
    parts: list = field(default_factory=list)
    retired_at: float | None = None
    seq: int = 0
    frames: dict[int, int] = field(default_factory=dict)  # wire frame id (seq) -> stream frame id, in flight
    # Faults within a frame (tilemesh.runtime.recovery), per plan; frames here are the plan's wire frame ids.
    gone: set[str] = field(default_factory=set)  # devices of this plan that left or were excluded
    seen: dict[int, float] = field(default_factory=dict)  # frames in flight here -> when first seen
    asked: dict[tuple[int, str], float] = field(default_factory=dict)  # (frame, device) -> when its pieces were asked
    rescued: set[tuple] = field(default_factory=set)  # source: (frame, piece key) computed here already
    blocked: dict[int, set[str]] = field(default_factory=dict)  # source: frame -> devices that asked for rescues
    stalled: dict[int, set[str]] = field(default_factory=dict)  # source: frame -> devices rescued for stalling
    tainted: set[int] = field(default_factory=set)  # source: frames in flight when a device was caught lying
    audit: tuple[int, int] | None = None  # (first, last frame): every piece of these frames is checked
    withheld: dict[str, int] = field(default_factory=dict)  # source: device -> frames shown unverified lately
    # for want of its digest (WITHHELD_AUDIT of them: its next frames are audited)
    audited: set[int] = field(default_factory=set)  # frames whose every piece from another device was held
    judging: dict[int, float] = field(default_factory=dict)  # source: frames finished -> when (stalls judged later)
    # source: frames computed whose overlap digests are not all here yet -> (their result, since when)
    verifying: dict[int, tuple[dict, float]] = field(default_factory=dict)
    overlap_judged: set[int] = field(default_factory=set)  # source: frames whose overlap disagreement was settled

    @property
    def live(self) -> bool:
        return self.retired_at is None

    def start(self, frame: int) -> int:
        self.seq += 1
        self.frames[self.seq] = frame
        return self.seq


def expired(slots: dict[int, PlanSlot], now: float) -> list[int]:
    """Retired plans to drop now: done with their frames (nothing in flight) or retired `RETIRE_AFTER_S` ago,
    then the oldest retired beyond `MAX_PLANS` plans in all."""
    gone = [pid for pid, s in slots.items() if s.retired_at is not None
            and (now - s.retired_at >= RETIRE_AFTER_S or (s.role == "source" and not s.frames))]
    left = sorted((pid for pid in slots if pid not in gone), key=lambda p: (slots[p].live, p))
    return gone + left[:max(len(left) - MAX_PLANS, 0)]
