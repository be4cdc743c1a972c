"""Multi-view fusion rooms: the room state's fusion events as pure functions, the `view`/`fusion` messages'
validation, and the server over real WebSockets (views in, fused out, stale and stopped views dropped, bad
scores refused with the protocol's error and nothing lost)."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_signaling import make_server  # noqa: F401  (the fixture: aiohttp's test server on a fake clock)

from tilemesh.runtime.classify import answer
from tilemesh.runtime.fusion import MAX_CLASSES, decode_scores, encode_scores, fuse
from tilemesh.runtime.preprocess import softmax
from tilemesh.server.signaling import protocol, rooms
from tilemesh.server.signaling.ids import PeerId, ResumeToken, RoomId

LABELS = ("cat", "dog", "cup", "car", "bike")
ROOM = RoomId.new()


def member(name: str) -> rooms.Member:
    return rooms.Member(id=PeerId.new(), name=name, kind="phone", token=ResumeToken.new(), joined_at=0.0)


DEFAULT_MODE = protocol.FusionMode()


def fusion_room(mode=DEFAULT_MODE, labels=LABELS, n=3):
    state = rooms.open_room(rooms.Rooms(labels=labels), ROOM, 0.0, mode)
    phones = [member(f"Phone {i}") for i in range(n)]
    for p in phones:
        state = rooms.add_peer(state, ROOM, p)
    return state, [p.id for p in phones]


def fused_of(effects) -> dict:
    (effect,) = [e for e in effects if e.message["type"] == "fused"]
    assert effect.room == ROOM
    return effect.message


# --- scores on the wire ------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=2, max_size=300))
def test_scores_round_trip_exactly(values):
    z = np.array(values, dtype=np.float32)
    assert np.array_equal(decode_scores(encode_scores(z)), z)
    assert np.array_equal(decode_scores(encode_scores(z.reshape(1, -1)), classes=z.size), z)


@pytest.mark.parametrize("text, why", [
    (None, "base64 string"),
    ("not base64!!", "not valid base64"),
    (base64.b64encode(b"\0" * 6).decode(), "not whole float32"),
    (encode_scores([1.0]), "2 to"),
    (encode_scores(np.zeros(MAX_CLASSES + 1)), f"holds {MAX_CLASSES + 1} classes; 2 to {MAX_CLASSES}"),
    (encode_scores(np.zeros(MAX_CLASSES + 100)), f"more than {MAX_CLASSES}"),  # refused before decoding
    (encode_scores([1.0, np.nan, 0.0]), "finite"),
    (encode_scores([1.0, np.inf, 0.0]), "finite"),
])
def test_bad_scores_are_refused_with_the_reason(text, why):
    with pytest.raises(ValueError, match=why):
        decode_scores(text)


def test_every_answer_carries_its_scores():
    logits = np.random.default_rng(0).normal(size=(1, 5))
    out = answer(logits, list(LABELS), 3)
    assert [t["label"] for t in out["top"]] == [LABELS[i] for i in np.argsort(-logits[0])[:3]]
    np.testing.assert_array_equal(decode_scores(out["scores"]), logits[0].astype(np.float32))


# --- messages -----------------------------------------------------------------------------------------------


def parse(**fields):
    return protocol.parse(json.dumps({"v": 1, **fields}))


def test_view_and_fusion_messages_parse():
    z = np.arange(5, dtype=np.float32)
    v = parse(type="view", scores=encode_scores(z), frame=7)
    assert isinstance(v, protocol.View) and np.array_equal(v.scores, z) and v.frame == 7 and not v.stop
    assert parse(type="view", stop=True).stop
    assert parse(type="fusion", mode={"method": "max", "window_s": 1.5}).mode == protocol.FusionMode("max", 1.5)
    assert parse(type="fusion", mode={}).mode == protocol.FusionMode("avg", 2.0)  # the defaults
    assert parse(type="fusion", mode=None).mode is None


@pytest.mark.parametrize("fields, code", [
    ({"type": "view"}, protocol.BAD_SCORES),
    ({"type": "view", "scores": 12}, protocol.BAD_SCORES),
    ({"type": "view", "scores": encode_scores([0.0, math.nan])}, protocol.BAD_SCORES),
    ({"type": "view", "scores": encode_scores([0.0, 1.0]), "frame": -1}, protocol.INVALID_FIELD),
    ({"type": "fusion"}, protocol.INVALID_FIELD),
    ({"type": "fusion", "mode": {"method": "median"}}, protocol.INVALID_FIELD),
    ({"type": "fusion", "mode": {"window_s": 0}}, protocol.INVALID_FIELD),
    ({"type": "fusion", "mode": {"window_s": True}}, protocol.INVALID_FIELD),
    ({"type": "fusion", "mode": "avg"}, protocol.INVALID_FIELD),
])
def test_bad_view_and_fusion_messages_get_the_protocols_error(fields, code):
    with pytest.raises(protocol.ProtocolError) as err:
        parse(**fields)
    assert err.value.code == code and err.value.ref == fields["type"]


def test_scores_beyond_the_message_limit_are_too_large():
    big = encode_scores(np.zeros(20000, dtype=np.float32))  # 107 KB of base64
    with pytest.raises(protocol.ProtocolError) as err:
        parse(type="view", scores=big)
    assert err.value.code == protocol.TOO_LARGE


# --- the room state (pure) ------------------------------------------------------------------------------


def test_a_room_made_in_fusion_mode_and_toggled():
    state, _ = fusion_room(protocol.FusionMode("max", 1.0))
    assert state.room(ROOM).fusion == protocol.FusionMode("max", 1.0)
    state, effects = rooms.set_fusion(state, ROOM, None, 1.0)
    assert state.room(ROOM).fusion is None
    assert [e.message for e in effects] == [protocol.fusion(None)]
    state, effects = rooms.set_fusion(state, ROOM, protocol.FusionMode(), 2.0)
    assert effects[0].message == {"v": 1, "type": "fusion", "mode": {"method": "avg", "window_s": 2.0}}
    assert fused_of(effects)["top"] == []  # nobody has sent a view yet
    plain = rooms.open_room(rooms.Rooms(), RoomId.new(), 0.0)
    assert next(iter(plain.rooms.values())).fusion is None


def test_views_fuse_to_the_rule_over_their_softmax_with_each_views_contribution():
    state, (a, b, c) = fusion_room()
    rng = np.random.default_rng(1)
    logits = {a: rng.normal(0, 2, 5), b: rng.normal(0, 2, 5), c: rng.normal(0, 2, 5)}
    for t, (peer, z) in enumerate(logits.items()):
        state, effects = rooms.add_view(state, ROOM, peer, z, 10.0 + 0.1 * t)
    msg = fused_of(effects)
    want = fuse({p: softmax(z) for p, z in logits.items()}, "avg")
    assert [e["index"] for e in msg["top"]] == list(np.argsort(-want)[:5])
    assert msg["top"][0]["p"] == pytest.approx(want.max())
    assert msg["top"][0]["label"] == LABELS[int(np.argmax(want))]
    best = int(np.argmax(want))
    support = {p: softmax(z)[best] for p, z in logits.items()}
    views = {v["peer"]: v for v in msg["views"]}
    assert set(views) == {a, b, c}
    for p, z in logits.items():
        assert views[p]["index"] == int(np.argmax(z)) and views[p]["label"] == LABELS[int(np.argmax(z))]
        assert views[p]["support"] == pytest.approx(support[p])
        assert views[p]["weight"] == pytest.approx(support[p] / sum(support.values()))
    assert views[a]["name"] == "Phone 0" and views[a]["age_s"] == pytest.approx(0.2)
    # The max rule: the view holding the maximum carries the label alone.
    state, effects = rooms.set_fusion(state, ROOM, protocol.FusionMode("max", 2.0), 10.3)
    msg = fused_of(effects)
    want = fuse({p: softmax(z) for p, z in logits.items()}, "max")
    assert msg["top"][0]["index"] == int(np.argmax(want)) and msg["method"] == "max"
    assert sorted(v["weight"] for v in msg["views"]) == [0.0, 0.0, 1.0]


def test_a_views_newest_scores_replace_its_older_ones():
    state, (a, b, _) = fusion_room()
    state, _ = rooms.add_view(state, ROOM, a, np.array([9.0, 0, 0, 0, 0]), 1.0)
    state, _ = rooms.add_view(state, ROOM, b, np.array([0, 1.0, 0, 0, 0]), 1.1)
    state, effects = rooms.add_view(state, ROOM, a, np.array([0, 0, 9.0, 0, 0]), 1.2)
    msg = fused_of(effects)
    assert len(msg["views"]) == 2 and msg["top"][0]["label"] == "cup"


def test_stale_stopped_and_departed_views_drop_out():
    state, (a, b, c) = fusion_room(protocol.FusionMode("avg", 1.0))
    state, _ = rooms.add_view(state, ROOM, a, np.array([5.0, 0, 0, 0, 0]), 10.0)
    state, _ = rooms.add_view(state, ROOM, b, np.array([0, 5.0, 0, 0, 0]), 10.5)
    state, _ = rooms.add_view(state, ROOM, c, np.array([0, 5.0, 0, 0, 0]), 10.6)
    assert state.room(ROOM).views.next_expiry() == 11.0
    same, effects = rooms.expire_views(state, 10.9)
    assert effects == [] and same is state  # nothing went stale: nothing said
    state, effects = rooms.expire_views(state, 11.05)  # a is 1.05 s old
    msg = fused_of(effects)
    assert {v["peer"] for v in msg["views"]} == {b, c}
    state, effects = rooms.drop_view(state, ROOM, b, 11.1)  # b's camera closed
    assert [v["peer"] for v in fused_of(effects)["views"]] == [c]
    assert rooms.drop_view(state, ROOM, b, 11.1) == (state, [])  # not a view any more: nothing to say
    state, effects = rooms.drop_view(state, ROOM, c, 11.2)  # c left the room
    assert fused_of(effects)["top"] == [] and fused_of(effects)["views"] == []


def test_bad_views_are_refused_and_lose_nothing():
    state, (a, b, _) = fusion_room()
    state, _ = rooms.add_view(state, ROOM, a, np.array([5.0, 0, 0, 0, 0]), 1.0)
    for bad, code in [(np.zeros(4), protocol.BAD_SCORES), (np.array([0, 1, np.nan, 0, 0]), protocol.BAD_SCORES)]:
        with pytest.raises(rooms.RoomError) as err:
            rooms.add_view(state, ROOM, b, bad, 1.1)
        assert err.value.code == code
    with pytest.raises(rooms.RoomError) as err:  # a's next scores are broken: its last good ones stay
        rooms.add_view(state, ROOM, a, np.array([np.inf, 0, 0, 0, 0]), 1.2)
    assert set(state.room(ROOM).views.views) == {a}
    assert int(np.argmax(state.room(ROOM).views.views[a][1])) == 0
    off, _ = rooms.set_fusion(state, ROOM, None, 1.3)
    with pytest.raises(rooms.RoomError) as err:
        rooms.add_view(off, ROOM, a, np.zeros(5), 1.4)
    assert err.value.code == protocol.NOT_FUSING


def test_without_labels_views_must_agree_on_their_class_count():
    state, (a, b, _) = fusion_room(labels=None)
    state, effects = rooms.add_view(state, ROOM, a, np.array([0.0, 3.0, 1.0]), 1.0)
    assert fused_of(effects)["top"][0] == {"index": 1, "p": pytest.approx(softmax(np.array([0.0, 3, 1]))[1])}
    with pytest.raises(rooms.RoomError) as err:
        rooms.add_view(state, ROOM, b, np.zeros(4), 1.1)
    assert err.value.code == protocol.BAD_SCORES


# --- the server, over real WebSockets -------------------------------------------------------------------------


async def test_fusion_room_over_websockets(make_server):  # noqa: F811
    server = await make_server()
    server.hub.set_labels(LABELS)
    resp = await server.post("/api/rooms", json={"fusion": {"method": "avg", "window_s": 1.0}})
    assert resp.status == 201 and (await resp.json())["fusion"] == {"method": "avg", "window_s": 1.0}
    room = (await resp.json())["room"]
    host, p1, p2 = [await server.connect() for _ in range(3)]
    welcome = await host.join(room, "Host", "laptop")
    assert welcome["fusion"] == {"method": "avg", "window_s": 1.0}
    await p1.join(room, "Anna", "phone")
    await p2.join(room, "Ben", "phone")
    everyone = (host, p1, p2)

    async def fused_to_all() -> dict:
        msgs = [await c.expect("fused") for c in everyone]
        assert all(m == msgs[0] for m in msgs)
        return msgs[0]

    z1, z2 = np.array([4.0, 1, 0, 0, 0], np.float32), np.array([0.0, 3, 0, 0, 2.5], np.float32)
    await p1.send("view", scores=encode_scores(z1), frame=1)
    msg = await fused_to_all()
    assert msg["top"][0]["label"] == "cat" and [v["name"] for v in msg["views"]] == ["Anna"]
    server.clock.advance(0.5)
    await p2.send("view", scores=encode_scores(z2), frame=1)
    msg = await fused_to_all()
    want = fuse({"a": softmax(z1), "b": softmax(z2)}, "avg")
    assert msg["top"][0]["index"] == int(np.argmax(want)) and msg["top"][0]["p"] == pytest.approx(want.max())
    assert {v["name"]: v["label"] for v in msg["views"]} == {"Anna": "cat", "Ben": "dog"}

    # Malformed scores: the protocol's error to the sender only, and the view's last scores stay.
    for bad in ("%%%", encode_scores([1.0, 2.0]), encode_scores([0, 0, math.inf, 0, 0])):
        await p2.send("view", scores=bad)
        err = await p2.expect("error")
        assert err["code"] == protocol.BAD_SCORES and err["ref"] == "view"
    await host.silent(0.1)
    await p2.send("ping")
    await p2.expect("pong")  # the socket is still usable

    # Anna's view goes stale beyond the window: it leaves the fusion at once, Ben's stays.
    server.advance(0.6)  # Anna's scores are 1.1 s old
    msg = await fused_to_all()
    assert [v["name"] for v in msg["views"]] == ["Ben"] and msg["top"][0]["label"] == "dog"

    # The host switches the rule; then Ben's camera closes: no view is left.
    await host.send("fusion", mode={"method": "max", "window_s": 1.0})
    for c in everyone:
        assert (await c.expect("fusion"))["mode"] == {"method": "max", "window_s": 1.0}
    assert (await fused_to_all())["method"] == "max"
    await p2.send("view", stop=True)
    msg = await fused_to_all()
    assert msg["top"] == [] and msg["views"] == []

    # A view whose phone leaves drops out at once, too.
    await p1.send("view", scores=encode_scores(z1))
    assert len((await fused_to_all())["views"]) == 1
    await p1.send("leave")
    for c in (host, p2):
        msg = await c.expect("fused", skip=("roster", "peer_left"))
        assert msg["views"] == []

    # Fusion off: views are refused with `not_fusing`.
    await host.send("fusion", mode=None)
    assert (await p2.expect("fusion", skip=("roster",)))["mode"] is None
    await p2.send("view", scores=encode_scores(z2))
    assert (await p2.expect("error", skip=("roster", "fusion")))["code"] == protocol.NOT_FUSING


async def test_room_creation_refuses_a_bad_fusion_mode(make_server):  # noqa: F811
    server = await make_server()
    resp = await server.post("/api/rooms", json={"fusion": {"method": "median"}})
    assert resp.status == 400 and "method" in (await resp.json())["message"]
    resp = await server.post("/", data={"fusion": "max"}, allow_redirects=False)
    assert resp.status == 303
    room = resp.headers["Location"].rsplit("/", 1)[1]
    assert server.hub.state.room(RoomId.parse(room)).fusion == protocol.FusionMode("max", 2.0)
    resp = await server.post("/", data={}, allow_redirects=False)
    assert server.hub.state.room(RoomId.parse(resp.headers["Location"].rsplit("/", 1)[1])).fusion is None


async def test_a_stale_view_leaves_when_its_window_ends_not_at_a_janitor_tick(make_server):  # noqa: F811
    """On the real clock, with the janitor idle (its tick is an hour here): the hub's own timer drops the view."""
    import asyncio  # noqa: PLC0415
    import time  # noqa: PLC0415

    server = await make_server()
    server.hub.clock = time.monotonic
    server.hub.set_labels(LABELS)
    room = (await (await server.post("/api/rooms", json={"fusion": {"window_s": 0.3}})).json())["room"]
    phone = await server.connect()
    await phone.join(room, "Anna", "phone")
    await phone.send("view", scores=encode_scores(np.array([4.0, 1, 0, 0, 0], np.float32)))
    assert [v["name"] for v in (await phone.expect("fused"))["views"]] == ["Anna"]
    # (wait_for: aiohttp's receive() restarts its own timeout at each of the server's heartbeat pings)
    dropped = await asyncio.wait_for(phone.expect("fused"), 5.0)
    assert dropped["views"] == [] and dropped["top"] == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "stop", "leave", "tick"]), st.integers(0, 2),
                          st.floats(0.0, 0.8), st.integers(0, 4)), min_size=1, max_size=25))
def test_random_event_sequences_fuse_exactly_the_live_views(events):
    """Whatever happens in whatever order, the last fused answer covers exactly the views that sent scores within
    the window and have not stopped or left since, and names the rule's top-1 over their softmax."""
    state, peers = fusion_room(protocol.FusionMode("avg", 1.0))
    now, last, held, fused = 0.0, {}, {}, None
    for kind, who, dt, top in events:
        now += dt
        peer = peers[who]
        if kind == "add" and state.room(ROOM).peer(peer) is not None:
            z = np.zeros(5)
            z[top] = 3.0
            state, effects = rooms.add_view(state, ROOM, peer, z, now)
            last[peer], held[peer] = now, z
        elif kind == "stop":
            state, effects = rooms.drop_view(state, ROOM, peer, now)
            last.pop(peer, None)
        elif kind == "leave" and state.room(ROOM).peer(peer) is not None:
            state = rooms.remove_peer(state, ROOM, peer, now)
            state, effects = rooms.drop_view(state, ROOM, peer, now)
            last.pop(peer, None)
        else:
            state, effects = rooms.expire_views(state, now)
        live = {p for p, t in last.items() if now - t <= 1.0}
        if effects:
            fused = effects[-1].message
            assert {v["peer"] for v in fused["views"]} == live
            if live:
                want = fuse({p: softmax(held[p]) for p in live}, "avg")
                assert fused["top"][0]["p"] == pytest.approx(want.max())
        assert set(state.room(ROOM).views.live(now)) == live
