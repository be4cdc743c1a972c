"""The camera phone's side of a stream: which lane takes the next frame, and results shown in frame order.

A stream plan (`tilemesh.planning.streams`) gives lanes (plan ids), each with a weight (its share of the frames)
and a depth (frames it may hold in flight). `StreamScheduler` is a pure state machine:

* `next_frame(state)` -> (state, lane or None): the lane for a new camera frame, by smooth weighted round robin
  among lanes with a free slot (None: every lane is full; the camera skips this frame rather than queue it, so
  latency never grows with a backlog);
* `finished(state, frame, ok)` -> (state, show): a frame's result (or failure) came back; `show` is False for a
  result older than one already shown (dropped and counted: the label must never jump back in time).

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


@dataclass(frozen=True)
class StreamState:
    lanes: tuple[LaneState, ...] = ()
    next_id: int = 1
    frame_lane: dict[int, int] = field(default_factory=dict)  # frame -> lane, while in flight
    shown: int = 0  # newest frame shown
    dropped_late: int = 0  # results that came back after a newer one was shown
    skipped: int = 0  # camera frames not started because every lane was full
    failed: int = 0


def new_stream(lanes: list[tuple[int, float, int]]) -> StreamState:
    """`lanes`: (plan id, weight, depth) per lane."""
    return replan(StreamState(), lanes)


def replan(state: StreamState, lanes: list[tuple[int, float, int]]) -> StreamState:
    """New lanes; frames in flight on lanes that stay keep their slots."""
    if any(depth < 1 or weight <= 0 for _, weight, depth in lanes):
        raise ValueError(f"every lane needs a positive weight and depth: {lanes}")
    if len({lane for lane, _, _ in lanes}) != len(lanes):
        raise ValueError(f"lane ids repeat: {lanes}")
    total = sum(w for _, w, _ in lanes) or 1.0
    held = {ln.lane: ln for ln in state.lanes}
    new = tuple(LaneState(lane, w / total, depth, held[lane].in_flight if lane in held else frozenset())
                for lane, w, depth in lanes)
    return replace(state, lanes=new)


def next_frame(state: StreamState) -> tuple[StreamState, tuple[int, int] | None]:
    """(state, (frame id, lane)) for a new camera frame, or (state, None) when every lane is full."""
    free = [i for i, ln in enumerate(state.lanes) if len(ln.in_flight) < ln.depth]
    if not free:
        return replace(state, skipped=state.skipped + 1), None
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
    return (replace(state, lanes=tuple(lanes), next_id=frame + 1,
                    frame_lane={**state.frame_lane, frame: lanes[pick].lane}), (frame, lanes[pick].lane))


def finished(state: StreamState, frame: int, ok: bool = True) -> tuple[StreamState, bool]:
    """A frame's result came back (ok) or it failed; returns (state, whether to show the result)."""
    lane = state.frame_lane.get(frame)
    if lane is None:
        return state, False  # unknown or already finished: nothing to free, nothing to show
    frame_lane = {f: ln for f, ln in state.frame_lane.items() if f != frame}
    lanes = tuple(replace(ln, in_flight=ln.in_flight - {frame}) if ln.lane == lane else ln for ln in state.lanes)
    state = replace(state, lanes=lanes, frame_lane=frame_lane)
    if not ok:
        return replace(state, failed=state.failed + 1), False
    if frame < state.shown:
        return replace(state, dropped_late=state.dropped_late + 1), False
    return replace(state, shown=frame), True
