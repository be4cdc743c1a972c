"""The camera phone's side of a stream: which lane takes the next frame, and results shown in frame order.

A stream plan (`tilemesh.planning.streams`) gives lanes (plan ids), each with a weight (its share of the frames)
and a depth (frames it may hold in flight). `StreamScheduler` is a pure state machine:

* `next_frame(state)` -> (state, lane or None): the lane for a new camera frame, by smooth weighted round robin
  among lanes with a free slot (None: every lane is full; the camera skips this frame rather than queue it, so
  latency never grows with a backlog);
* `finished(state, frame, ok)` -> (state, show): a frame's result (or failure) came back; `show` is False for a
  result older than one already shown (dropped and counted: the label must never jump back in time).

Lanes of different latency would finish frames out of order (a frame sent to a slow lane overtaken by the next
one on a fast lane), and every overtaken result would be dropped. Given the clock (`next_frame(state, now)`), the
scheduler therefore paces frames: a frame goes to a lane only if it is expected to finish no earlier than the
frames already in flight (`horizon`), using each lane's latency (the planner's prediction, then the measured
results, `finished(..., now=...)`); otherwise the camera waits (`wait_s`) rather than compute a result that
could not be shown.

Frame ids increase. Lanes can be replaced (`replan`) while frames are in flight: frames of removed lanes still
finish or fail on their own and free nothing they did not hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class LaneState:
    lane: int  # plan id
    weight: float
    depth: int
    in_flight: frozenset[int] = frozenset()
    credit: float = 0.0
    latency: float = 0.0  # seconds a frame takes on this lane: predicted, then measured (moving average)


@dataclass(frozen=True)
class StreamState:
    lanes: tuple[LaneState, ...] = ()
    next_id: int = 1
    frame_lane: dict[int, int] = field(default_factory=dict)  # frame -> lane, while in flight
    shown: int = 0  # newest frame shown
    dropped_late: int = 0  # results that came back after a newer one was shown
    skipped: int = 0  # camera frames not started because every lane was full
    failed: int = 0
    started_at: dict[int, float] = field(default_factory=dict)  # frame -> when it started (paced streams)
    horizon: float = 0.0  # when the frames in flight are expected to be done (paced streams)
    wait_s: float = 0.0  # after a None from `next_frame`: how long until a lane could take a frame in order


def new_stream(lanes: list[tuple]) -> StreamState:
    """`lanes`: (plan id, weight, depth) or (plan id, weight, depth, latency s) per lane."""
    return replan(StreamState(), lanes)


def replan(state: StreamState, lanes: list[tuple]) -> StreamState:
    """New lanes; frames in flight on lanes that stay keep their slots (and their measured latency)."""
    lanes = [(lane, weight, depth, *(rest or [0.0])) for lane, weight, depth, *rest in lanes]
    if any(depth < 1 or weight <= 0 or latency < 0 for _, weight, depth, latency in lanes):
        raise ValueError(f"every lane needs a positive weight and depth: {lanes}")
    if len({lane[0] for lane in lanes}) != len(lanes):
        raise ValueError(f"lane ids repeat: {lanes}")
    total = sum(lane[1] for lane in lanes) or 1.0
    held = {ln.lane: ln for ln in state.lanes}
    new = tuple(LaneState(lane, w / total, depth, held[lane].in_flight if lane in held else frozenset(),
                          latency=held[lane].latency if lane in held and held[lane].latency > 0 else latency)
                for lane, w, depth, latency in lanes)
    return replace(state, lanes=new)


def next_frame(state: StreamState, now: float | None = None) -> tuple[StreamState, tuple[int, int] | None]:
    """(state, (frame id, lane)) for a new camera frame, or (state, None) when every lane is full or (given
    `now`) no free lane would finish it after the frames in flight (`wait_s` says for how long)."""
    free = [i for i, ln in enumerate(state.lanes) if len(ln.in_flight) < ln.depth]
    if free and now is not None and state.frame_lane:
        early = {i: state.horizon - (now + state.lanes[i].latency) for i in free}
        in_order = [i for i in free if early[i] <= 0]
        if not in_order:
            return replace(state, skipped=state.skipped + 1, wait_s=min(early.values())), None
        free = in_order
    if not free:
        return replace(state, skipped=state.skipped + 1, wait_s=0.0), None
    # Smooth weighted round robin (as nginx): every free lane earns its weight, the richest is picked and pays
    # the free lanes' total, so over many frames each lane gets frames in proportion to its weight.
    lanes = list(state.lanes)
    earned = {i: lanes[i].credit + lanes[i].weight for i in free}
    pick = max(free, key=lambda i: (earned[i], -i))
    paid = sum(lanes[i].weight for i in free)
    for i in free:
        lanes[i] = replace(lanes[i], credit=earned[i] - (paid if i == pick else 0.0))
    frame = state.next_id
    lanes[pick] = replace(lanes[pick], in_flight=lanes[pick].in_flight | {frame})
    paced = {} if now is None else {"started_at": {**state.started_at, frame: now},
                                    "horizon": max(state.horizon, now + lanes[pick].latency)}
    return (replace(state, lanes=tuple(lanes), next_id=frame + 1, wait_s=0.0, **paced,
                    frame_lane={**state.frame_lane, frame: lanes[pick].lane}), (frame, lanes[pick].lane))


def assign(state: StreamState, frame: int, lane: int) -> StreamState:
    """Frame `frame` goes to `lane` (chosen by the caller, not the round robin): it holds one of its slots."""
    lanes = tuple(replace(ln, in_flight=ln.in_flight | {frame}) if ln.lane == lane else ln for ln in state.lanes)
    if lanes == state.lanes and lane not in {ln.lane for ln in state.lanes}:
        raise ValueError(f"no lane {lane} in this stream")
    return replace(state, lanes=lanes, next_id=max(state.next_id, frame + 1),
                   frame_lane={**state.frame_lane, frame: lane})


LATENCY_WEIGHT = 0.3  # a measured result's weight in its lane's moving-average latency


def finished(state: StreamState, frame: int, ok: bool = True, now: float | None = None) -> tuple[StreamState, bool]:
    """A frame's result came back (ok) or it failed; returns (state, whether to show the result). Given `now`, a
    result measures its lane's latency."""
    lane = state.frame_lane.get(frame)
    if lane is None:
        return state, False  # unknown or already finished: nothing to free, nothing to show
    frame_lane = {f: ln for f, ln in state.frame_lane.items() if f != frame}
    started = state.started_at.get(frame)
    took = now - started if ok and now is not None and started is not None else None
    if took is not None and took < 0:
        # A result timed on another clock than its start (the page's and its Worker's disagreed): not a measurement.
        # A lane's latency stays what it was, never negative (pacing and `replan` rely on it).
        took = None

    def done(ln: LaneState) -> LaneState:
        if ln.lane != lane:
            return ln
        latency = ln.latency if took is None else (took if not ln.latency else
                                                   (1 - LATENCY_WEIGHT) * ln.latency + LATENCY_WEIGHT * took)
        return replace(ln, in_flight=ln.in_flight - {frame}, latency=latency)

    state = replace(state, lanes=tuple(done(ln) for ln in state.lanes), frame_lane=frame_lane,
                    started_at={f: t for f, t in state.started_at.items() if f != frame})
    if not frame_lane:
        state = replace(state, horizon=0.0)
    if not ok:
        return replace(state, failed=state.failed + 1), False
    if frame < state.shown:
        return replace(state, dropped_late=state.dropped_late + 1), False
    return replace(state, shown=frame), True


STATS_WINDOW_S = 3.0  # measured figures cover the results shown in the last few seconds
STATS_EVERY_S = 1.0  # and are shared with the room about once a second


def measured(shown: list[tuple[float, float]], now: float) -> dict:
    """Frame rate and latency of the results shown (`(when, latency ms)`, oldest first) within `STATS_WINDOW_S`
    of `now`: {"fps", "p50_ms", "p90_ms", "frames"} (fps 0 until two results are in)."""
    recent = [(t, ms) for t, ms in shown if now - t <= STATS_WINDOW_S]
    lat = sorted(ms for _, ms in recent)
    span = recent[-1][0] - recent[0][0] if len(recent) > 1 else 0.0
    pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: 0.0)
    return {"fps": (len(recent) - 1) / span if span > 0 else 0.0, "p50_ms": pick(0.5), "p90_ms": pick(0.9),
            "frames": len(recent)}
