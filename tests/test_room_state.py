"""Room state rules as plain functions: joins, limits, resume, grace periods and room expiry, no sockets."""

from __future__ import annotations

import pytest

from tilemesh.server.signaling import protocol, rooms
from tilemesh.server.signaling.ids import PeerId, ResumeToken, RoomId

T0 = 1_700_000_000.0


def peer(name: str = "", kind: str = "phone", **kw) -> rooms.Member:
    return rooms.Member(id=PeerId.new(), name=name, kind=kind, token=ResumeToken.new(), joined_at=T0, **kw)


@pytest.fixture
def room_id() -> RoomId:
    return RoomId.new()


@pytest.fixture
def state(room_id) -> rooms.Rooms:
    return rooms.open_room(rooms.Rooms(limits=rooms.Limits(max_peers_per_room=3, max_rooms=2)), room_id, T0)


def test_ids_are_distinct_types_and_room_ids_carry_128_bits():
    r, p = RoomId.new(), PeerId.new()
    assert type(r) is RoomId and type(p) is PeerId
    assert repr(r).startswith("RoomId(")
    # token_urlsafe(16): 16 random bytes as 22 base64url characters.
    assert len(r) == 22 and len({RoomId.new() for _ in range(100)}) == 100
    with pytest.raises(ValueError):
        RoomId.parse("short")
    with pytest.raises(ValueError):
        RoomId.parse("a" * 21 + "/")
    with pytest.raises(ValueError):
        PeerId.parse(42)
    assert RoomId.parse(str(r)) == r


def test_open_room_is_empty_and_counts_against_the_server_limit(state, room_id):
    assert state.room(room_id).peers == ()
    state = rooms.open_room(state, RoomId.new(), T0)
    with pytest.raises(rooms.RoomError) as exc:
        rooms.open_room(state, RoomId.new(), T0)
    assert exc.value.code == protocol.SERVER_FULL
    with pytest.raises(rooms.RoomError) as exc:
        state.room(RoomId.new())
    assert exc.value.code == protocol.UNKNOWN_ROOM


def test_join_appends_in_order_and_names_unnamed_peers(state, room_id):
    a, b = peer("Anna", "laptop"), peer("")
    after = rooms.add_peer(rooms.add_peer(state, room_id, a), room_id, b)
    roster = after.room(room_id).roster()
    assert [e["id"] for e in roster] == [a.id, b.id]
    assert roster[0]["name"] == "Anna"
    assert roster[1]["name"] == f"Phone {b.id[-4:]}"
    assert roster[1] == {"id": b.id, "name": f"Phone {b.id[-4:]}", "kind": "phone", "state": "booting",
                         "progress": 0.0, "detail": "", "profile": None, "joined_at": T0, "connected": True,
                         "relay": False}
    assert all("token" not in e for e in roster), "the resume token must never reach other peers"
    # Pure: the original state is untouched.
    assert state.room(room_id).peers == ()
    assert after.room(room_id).empty_since is None


def test_room_full(state, room_id):
    for _ in range(3):
        state = rooms.add_peer(state, room_id, peer())
    with pytest.raises(rooms.RoomError) as exc:
        rooms.add_peer(state, room_id, peer())
    assert exc.value.code == protocol.ROOM_FULL


def test_join_unknown_room(state):
    with pytest.raises(rooms.RoomError) as exc:
        rooms.add_peer(state, RoomId.new(), peer())
    assert exc.value.code == protocol.UNKNOWN_ROOM


def test_state_updates_merge_and_ready_means_full_progress(state, room_id):
    p = peer()
    state = rooms.add_peer(state, room_id, p)
    state = rooms.set_state(state, room_id, p.id, protocol.State("booting", progress=0.4, detail="download",
                                                                  profile={"cores": 8}))
    state = rooms.set_state(state, room_id, p.id, protocol.State("booting", progress=0.6))
    got = state.room(room_id).peer(p.id)
    assert (got.progress, got.detail, got.profile) == (0.6, "download", {"cores": 8})
    state = rooms.set_state(state, room_id, p.id, protocol.State("ready", name="Kitchen phone"))
    got = state.room(room_id).peer(p.id)
    assert (got.state, got.progress, got.name) == ("ready", 1.0, "Kitchen phone")
    with pytest.raises(rooms.RoomError) as exc:
        rooms.set_state(state, room_id, PeerId.new(), protocol.State("ready"))
    assert exc.value.code == protocol.UNKNOWN_PEER


def test_detach_then_resume_keeps_identity_and_state(state, room_id):
    p = peer()
    state = rooms.add_peer(state, room_id, p)
    state = rooms.set_state(state, room_id, p.id, protocol.State("ready"))
    state = rooms.detach_peer(state, room_id, p.id, T0 + 5)
    assert state.room(room_id).peer(p.id).public()["connected"] is False
    state = rooms.resume_peer(state, room_id, p.id, p.token)
    back = state.room(room_id).peer(p.id)
    assert back.connected and back.state == "ready" and back.token == p.token


@pytest.mark.parametrize("case", ["wrong_token", "no_token", "unknown_peer"])
def test_resume_refused(state, room_id, case):
    p = peer()
    state = rooms.add_peer(state, room_id, p)
    target, token = {
        "wrong_token": (p.id, ResumeToken.new()),
        "no_token": (p.id, None),
        "unknown_peer": (PeerId.new(), p.token),
    }[case]
    with pytest.raises(rooms.RoomError) as exc:
        rooms.resume_peer(state, room_id, target, token)
    assert exc.value.code == protocol.BAD_RESUME


def test_grace_period_expiry_lists_only_long_detached_peers(state, room_id):
    a, b, c = peer(), peer(), peer()
    for p in (a, b, c):
        state = rooms.add_peer(state, room_id, p)
    state = rooms.detach_peer(state, room_id, a.id, T0 + 10)
    state = rooms.detach_peer(state, room_id, b.id, T0 + 12)
    assert rooms.expired_detached(state, T0 + 12.9, grace=3) == []
    assert rooms.expired_detached(state, T0 + 13, grace=3) == [(room_id, a.id)]
    assert set(rooms.expired_detached(state, T0 + 20, grace=3)) == {(room_id, a.id), (room_id, b.id)}


def test_leave_and_room_expiry(state, room_id):
    a = peer()
    state = rooms.add_peer(state, room_id, a)
    # A room with people in it never expires.
    assert rooms.close_idle_rooms(state, T0 + 10_000, ttl=60)[1] == []
    state = rooms.remove_peer(state, room_id, a.id, T0 + 100)
    assert state.room(room_id).empty_since == T0 + 100
    kept, closed = rooms.close_idle_rooms(state, T0 + 159, ttl=60)
    assert closed == [] and room_id in kept.rooms
    gone, closed = rooms.close_idle_rooms(state, T0 + 160, ttl=60)
    assert closed == [room_id] and room_id not in gone.rooms
    with pytest.raises(rooms.RoomError) as exc:
        rooms.remove_peer(state, room_id, a.id, T0 + 200)
    assert exc.value.code == protocol.UNKNOWN_PEER


def test_fresh_room_expires_if_nobody_joins(state, room_id):
    assert rooms.close_idle_rooms(state, T0 + 600, ttl=600)[1] == [room_id]
