"""Room state: one immutable value for the whole server, changed only by small pure functions, one per event.

Nothing here does I/O or reads a clock: callers pass `now` (Unix seconds), so every rule (limits, resume,
grace periods, room expiry) is a plain unit test. `tilemesh.server.signaling.hub` owns the sockets and applies these
functions as events arrive; it replaces its `Rooms` value with the returned one.

A refused event raises `RoomError` whose `code` is the protocol's error code, so the handler can reply as is.

Multi-view fusion: a room may be in fusion mode (`Room.fusion`, set at creation or by `set_fusion`); it then holds
a window of its camera phones' newest class scores (`Room.views`, tilemesh.runtime.fusion). The fusion events
(`set_fusion`, `add_view`, `drop_view`, `expire_views`) are (state, event) -> (state, effects): each effect is a
message for everyone in one room (`ToRoom`), which the hub sends.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import numpy as np

from tilemesh.runtime.fusion import FusionWindow
from tilemesh.server.signaling import protocol
from tilemesh.server.signaling.ids import PeerId, ResumeToken, RoomId


class RoomError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Limits:
    max_peers_per_room: int = 16
    max_rooms: int = 256


@dataclass(frozen=True)
class Member:
    """A device in a room (the signaling view of it: id, name, kind, state, profile); not a WebRTC peer."""

    id: PeerId
    name: str
    kind: protocol.Kind
    token: ResumeToken
    joined_at: float
    state: protocol.PeerState = "booting"
    progress: float = 0.0
    detail: str = ""
    profile: Any = None
    # Set while the peer's socket is gone and it may still resume; None while connected.
    detached_at: float | None = None
    # The server's own edge peer: mesh messages to and from it go through the signaling socket (protocol: Relay).
    relay: bool = False

    @property
    def connected(self) -> bool:
        return self.detached_at is None

    def public(self) -> dict:
        """The roster entry: everything but the resume token."""
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "state": self.state,
            "progress": self.progress,
            "detail": self.detail,
            "profile": self.profile,
            "joined_at": self.joined_at,
            "connected": self.connected,
            "relay": self.relay,
        }


@dataclass(frozen=True)
class Room:
    id: RoomId
    created_at: float
    peers: tuple[Member, ...] = ()
    # When the room last became (or was created) empty; None while anyone is in it.
    empty_since: float | None = None
    # Multi-view fusion: the mode (None: off) and the views' newest scores (peer id -> (time, softmax)).
    fusion: protocol.FusionMode | None = None
    views: FusionWindow = field(default_factory=FusionWindow)

    def peer(self, peer_id: PeerId) -> Member | None:
        return next((p for p in self.peers if p.id == peer_id), None)

    def roster(self) -> list[dict]:
        return [p.public() for p in self.peers]


@dataclass(frozen=True)
class Rooms:
    rooms: MappingProxyType[RoomId, Room] = field(default_factory=lambda: MappingProxyType({}))
    limits: Limits = Limits()
    # The served model's class names (fused answers name their classes; views must hold this many scores).
    labels: tuple[str, ...] | None = None

    def room(self, room_id: RoomId) -> Room:
        room = self.rooms.get(room_id)
        if room is None:
            raise RoomError(protocol.UNKNOWN_ROOM, "this room does not exist or has ended")
        return room

    def _with_room(self, room: Room) -> Rooms:
        return replace(self, rooms=MappingProxyType({**self.rooms, room.id: room}))

    def _without_room(self, room_id: RoomId) -> Rooms:
        return replace(self, rooms=MappingProxyType({k: v for k, v in self.rooms.items() if k != room_id}))


def default_name(kind: str, peer_id: PeerId) -> str:
    return f"{kind.capitalize()} {peer_id[-4:]}"


def open_room(state: Rooms, room_id: RoomId, now: float, fusion: protocol.FusionMode | None = None) -> Rooms:
    if room_id in state.rooms:
        raise RoomError(protocol.INVALID_FIELD, "room already exists")
    if len(state.rooms) >= state.limits.max_rooms:
        raise RoomError(protocol.SERVER_FULL, f"this server already hosts {state.limits.max_rooms} rooms; "
                        "try again when one has ended")
    views = FusionWindow(fusion.window_s) if fusion is not None else FusionWindow()
    return state._with_room(Room(id=room_id, created_at=now, empty_since=now, fusion=fusion, views=views))


def add_peer(state: Rooms, room_id: RoomId, peer: Member) -> Rooms:
    room = state.room(room_id)
    if room.peer(peer.id) is not None:
        raise RoomError(protocol.ALREADY_JOINED, "peer id already in this room")
    if len(room.peers) >= state.limits.max_peers_per_room:
        raise RoomError(protocol.ROOM_FULL, f"this room is full ({state.limits.max_peers_per_room} devices)")
    if not peer.name:
        peer = replace(peer, name=default_name(peer.kind, peer.id))
    return state._with_room(replace(room, peers=(*room.peers, peer), empty_since=None))


def resume_peer(state: Rooms, room_id: RoomId, peer_id: PeerId, token: ResumeToken | None) -> Rooms:
    """A new socket takes over an existing peer, connected or not (the old socket may not have noticed yet)."""
    room = state.room(room_id)
    peer = room.peer(peer_id)
    # One message for both cases, and a constant-time compare: a resume must not reveal which peer ids exist.
    if peer is None or token is None or not hmac.compare_digest(peer.token, token):
        raise RoomError(protocol.BAD_RESUME, "cannot resume: that peer has left or the token does not match")
    return _replace_peer(state, room, replace(peer, detached_at=None))


def set_state(state: Rooms, room_id: RoomId, peer_id: PeerId, update: protocol.State) -> Rooms:
    room = state.room(room_id)
    peer = _peer(room, peer_id)
    changes: dict[str, Any] = {"state": update.state}
    if update.progress is not None:
        changes["progress"] = update.progress
    elif update.state == "ready":
        changes["progress"] = 1.0
    if update.detail is not None:
        changes["detail"] = update.detail
    if update.profile is not None:
        changes["profile"] = update.profile
    if update.name:
        changes["name"] = update.name
    return _replace_peer(state, room, replace(peer, **changes))


def detach_peer(state: Rooms, room_id: RoomId, peer_id: PeerId, now: float) -> Rooms:
    """The peer's socket closed without `leave`: keep it for the resume grace period."""
    room = state.room(room_id)
    return _replace_peer(state, room, replace(_peer(room, peer_id), detached_at=now))


def remove_peer(state: Rooms, room_id: RoomId, peer_id: PeerId, now: float) -> Rooms:
    room = state.room(room_id)
    _peer(room, peer_id)
    peers = tuple(p for p in room.peers if p.id != peer_id)
    return state._with_room(replace(room, peers=peers, empty_since=now if not peers else None))


def expired_detached(state: Rooms, now: float, grace: float) -> list[tuple[RoomId, PeerId]]:
    """Peers whose socket has been gone longer than the grace period: the caller removes them."""
    return [(room.id, p.id) for room in state.rooms.values() for p in room.peers
            if p.detached_at is not None and now - p.detached_at >= grace]


def close_idle_rooms(state: Rooms, now: float, ttl: float) -> tuple[Rooms, list[RoomId]]:
    """Drop rooms empty for at least `ttl` seconds (a fresh room counts as empty since its creation)."""
    idle = [r.id for r in state.rooms.values() if r.empty_since is not None and now - r.empty_since >= ttl]
    for room_id in idle:
        state = state._without_room(room_id)
    return state, idle


# --- multi-view fusion: (state, event) -> (state, effects) ---------------------------------------------------


@dataclass(frozen=True)
class ToRoom:
    """Effect: send `message` to everyone in room `room`."""

    room: RoomId
    message: dict


def set_fusion(state: Rooms, room_id: RoomId, mode: protocol.FusionMode | None,
               now: float) -> tuple[Rooms, list[ToRoom]]:
    """Turn fusion on (or change its rule or window: views held stay, judged by the new window) or off (views go).
    Everyone hears the mode, and, while on, the fused answer under it."""
    room = state.room(room_id)
    views = FusionWindow(mode.window_s, room.views.views) if mode is not None else FusionWindow()
    room = replace(room, fusion=mode, views=views)
    effects = [ToRoom(room_id, protocol.fusion(mode))]
    if mode is not None:
        room, fused = _refresh(room, now, state.labels)
        effects.append(fused)
    return state._with_room(room), effects


def add_view(state: Rooms, room_id: RoomId, peer_id: PeerId, scores: np.ndarray,
             now: float) -> tuple[Rooms, list[ToRoom]]:
    """A camera phone's logits for the frame it just showed: its view's newest scores, and a fused answer out.
    Refused (RoomError, nothing changes) when the room is not fusing or the scores do not fit the model."""
    room = state.room(room_id)
    _peer(room, peer_id)
    if room.fusion is None:
        raise RoomError(protocol.NOT_FUSING, "this room is not in fusion mode; the host page turns it on")
    z = np.asarray(scores).reshape(-1)
    classes = len(state.labels) if state.labels is not None else \
        next((p.size for v, (_, p) in room.views.views.items() if v != peer_id), None)
    if classes is not None and z.size != classes:
        raise RoomError(protocol.BAD_SCORES, f"view: 'scores' holds {z.size} classes; this room's model has {classes}")
    try:
        views = room.views.add(peer_id, now, z)
    except ValueError as exc:
        raise RoomError(protocol.BAD_SCORES, f"view: {exc}") from None
    room, fused = _refresh(replace(room, views=views), now, state.labels)
    return state._with_room(room), [fused]


def drop_view(state: Rooms, room_id: RoomId, peer_id: PeerId, now: float) -> tuple[Rooms, list[ToRoom]]:
    """The view stopped (its camera closed, its phone left or lost its socket): out of the fusion at once."""
    room = state.rooms.get(room_id)
    if room is None or peer_id not in room.views.views:
        return state, []
    room, fused = _refresh(replace(room, views=room.views.remove(peer_id)), now, state.labels)
    return state._with_room(room), [fused]


def expire_views(state: Rooms, now: float) -> tuple[Rooms, list[ToRoom]]:
    """Views whose newest scores are older than their room's window leave it; each room that lost one hears."""
    effects = []
    for room in state.rooms.values():
        if room.views.views and set(room.views.live(now)) != set(room.views.views):
            room, fused = _refresh(room, now, state.labels)
            state = state._with_room(room)
            effects.append(fused)
    return state, effects


def fused_fields(room: Room, now: float, labels: tuple[str, ...] | None) -> dict:
    """The `fused` message's fields: the rule, the window, the fused top-5 and each live view's contribution."""
    mode = room.fusion or protocol.FusionMode()
    out = {"method": mode.method, "window_s": mode.window_s, "top": [], "views": []}
    result = room.views.result(now, mode.method, k=5)
    if result is None:
        return out

    def name(i: int) -> dict:
        return {"label": labels[i]} if labels is not None and 0 <= i < len(labels) else {}

    times = room.views.times()
    out["top"] = [{"index": i, **name(i), "p": p} for i, p in result.top]
    for v in sorted(result.views, key=lambda v: (-result.weights[v], v)):
        member = room.peer(v)
        out["views"].append({"peer": v, "name": member.name if member is not None else v,
                             "index": result.view_top1[v], **name(result.view_top1[v]),
                             "p": result.view_top1_p[v], "support": result.views[v], "weight": result.weights[v],
                             "age_s": round(max(0.0, now - times[v]), 3)})
    return out


def _refresh(room: Room, now: float, labels: tuple[str, ...] | None) -> tuple[Room, ToRoom]:
    """Drop the room's stale views and say what the fusion now is."""
    room = replace(room, views=room.views.expire(now))
    return room, ToRoom(room.id, protocol.fused(fused_fields(room, now, labels)))


def _peer(room: Room, peer_id: PeerId) -> Member:
    peer = room.peer(peer_id)
    if peer is None:
        raise RoomError(protocol.UNKNOWN_PEER, "no such peer in this room")
    return peer


def _replace_peer(state: Rooms, room: Room, peer: Member) -> Rooms:
    return state._with_room(replace(room, peers=tuple(peer if p.id == peer.id else p for p in room.peers)))
