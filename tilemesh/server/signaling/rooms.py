"""Room state: one immutable value for the whole server, changed only by small pure functions, one per event.

Nothing here does I/O or reads a clock: callers pass `now` (Unix seconds), so every rule (limits, resume,
grace periods, room expiry) is a plain unit test. `tilemesh.server.signaling.hub` owns the sockets and applies these
functions as events arrive; it replaces its `Rooms` value with the returned one.

A refused event raises `RoomError` whose `code` is the protocol's error code, so the handler can reply as is.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

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

    def peer(self, peer_id: PeerId) -> Member | None:
        return next((p for p in self.peers if p.id == peer_id), None)

    def roster(self) -> list[dict]:
        return [p.public() for p in self.peers]


@dataclass(frozen=True)
class Rooms:
    rooms: MappingProxyType[RoomId, Room] = field(default_factory=lambda: MappingProxyType({}))
    limits: Limits = Limits()

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


def open_room(state: Rooms, room_id: RoomId, now: float) -> Rooms:
    if room_id in state.rooms:
        raise RoomError(protocol.INVALID_FIELD, "room already exists")
    if len(state.rooms) >= state.limits.max_rooms:
        raise RoomError(protocol.SERVER_FULL, f"this server already hosts {state.limits.max_rooms} rooms; "
                        "try again when one has ended")
    return state._with_room(Room(id=room_id, created_at=now, empty_since=now))


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


def _peer(room: Room, peer_id: PeerId) -> Member:
    peer = room.peer(peer_id)
    if peer is None:
        raise RoomError(protocol.UNKNOWN_PEER, "no such peer in this room")
    return peer


def _replace_peer(state: Rooms, room: Room, peer: Member) -> Rooms:
    return state._with_room(replace(room, peers=tuple(peer if p.id == peer.id else p for p in room.peers)))
