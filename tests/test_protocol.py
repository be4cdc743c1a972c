"""Validation of client messages: every malformed input maps to one documented error code, good input parses."""

from __future__ import annotations

import json

import pytest

from tilemesh.server.signaling import protocol
from tilemesh.server.signaling.ids import PeerId, ResumeToken, RoomId

ROOM = RoomId.new()
PEER = PeerId.new()


def msg(mtype: str, **fields) -> str:
    return json.dumps({"v": 1, "type": mtype, **fields}, ensure_ascii=False)


def error_of(text: str | bytes) -> protocol.ProtocolError:
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.parse(text)
    return exc.value


def test_valid_messages_parse():
    token = ResumeToken.new()
    join = protocol.parse(msg("join", room=ROOM, name="  Anna\u0007 ", kind="phone", resume=PEER, token=token))
    assert join == protocol.Join(room=ROOM, name="Anna", kind="phone", resume=PEER, token=token)
    assert type(join.room) is RoomId and type(join.resume) is PeerId
    assert protocol.parse(msg("state", state="booting", progress=0, detail="download")) == \
        protocol.State("booting", 0.0, "download")
    assert protocol.parse(msg("state", state="ready", profile={"cores": 4})).profile == {"cores": 4}
    assert protocol.parse(msg("signal", to=PEER, data={"sdp": "v=0"})) == protocol.Signal(PEER, {"sdp": "v=0"})
    assert protocol.parse(msg("broadcast", data={"plan": [1]})) == protocol.Broadcast({"plan": [1]})
    assert protocol.parse(msg("ping")) == protocol.Ping()
    assert protocol.parse(msg("leave")) == protocol.Leave()
    # A source leaves out devices it caught returning wrong results or stalling.
    assert protocol.parse(msg("plan_request", exclude=[PEER])) == protocol.PlanRequest(exclude=(PeerId(PEER),))
    assert protocol.parse(msg("plan_request")).exclude == ()
    # Unknown extra fields are ignored: newer clients may add optional fields.
    assert protocol.parse(msg("ping", future_field=1)) == protocol.Ping()


@pytest.mark.parametrize(("text", "code"), [
    ("{not json", protocol.BAD_JSON),
    ("", protocol.BAD_JSON),
    (b"\xff\xfe", protocol.BAD_JSON),
    ('{"v": 1, "type": "state", "state": "ready", "progress": NaN}', protocol.BAD_JSON),
    ("[1, 2]", protocol.BAD_MESSAGE),
    ('"ping"', protocol.BAD_MESSAGE),
    ('{"type": "ping"}', protocol.BAD_VERSION),
    ('{"v": 2, "type": "ping"}', protocol.BAD_VERSION),
    ('{"v": true, "type": "ping"}', protocol.BAD_VERSION),
    ('{"v": "1", "type": "ping"}', protocol.BAD_VERSION),
    ('{"v": 1}', protocol.UNKNOWN_TYPE),
    ('{"v": 1, "type": "offer"}', protocol.UNKNOWN_TYPE),
    ('{"v": 1, "type": 7}', protocol.UNKNOWN_TYPE),
])
def test_envelope_errors(text, code):
    assert error_of(text).code == code


@pytest.mark.parametrize(("fields", "needle"), [
    ({"name": "a", "kind": "phone"}, "room"),
    ({"room": "short", "name": "a", "kind": "phone"}, "room"),
    ({"room": 5, "name": "a", "kind": "phone"}, "room"),
    ({"room": ROOM, "name": "a", "kind": "toaster"}, "kind"),
    ({"room": ROOM, "name": "a"}, "kind"),
    ({"room": ROOM, "kind": "phone"}, "name"),
    ({"room": ROOM, "name": 3, "kind": "phone"}, "name"),
    ({"room": ROOM, "name": "x" * 41, "kind": "phone"}, "name"),
    ({"room": ROOM, "name": "a", "kind": "phone", "resume": "../x"}, "resume"),
    ({"room": ROOM, "name": "a", "kind": "phone", "resume": PEER, "token": "t"}, "token"),
])
def test_join_field_errors(fields, needle):
    err = error_of(msg("join", **fields))
    assert err.code == protocol.INVALID_FIELD and err.ref == "join"
    assert needle in err.message


@pytest.mark.parametrize(("mtype", "fields", "needle"), [
    ("state", {}, "state"),
    ("state", {"state": "sleeping"}, "state"),
    ("state", {"state": "booting", "progress": 1.5}, "progress"),
    ("state", {"state": "booting", "progress": -0.1}, "progress"),
    ("state", {"state": "booting", "progress": "half"}, "progress"),
    ("state", {"state": "booting", "progress": True}, "progress"),
    ("state", {"state": "booting", "detail": ["x"]}, "detail"),
    ("signal", {"data": {}}, "to"),
    ("signal", {"to": PEER}, "data"),
    ("signal", {"to": PEER, "data": "sdp"}, "data"),
    ("signal", {"to": ["p"], "data": {}}, "to"),
    ("broadcast", {}, "data"),
    ("broadcast", {"data": [1]}, "data"),
    ("plan_request", {"exclude": "pabcd"}, "exclude"),
    ("plan_request", {"exclude": ["not an id!"]}, "exclude"),
])
def test_message_field_errors(mtype, fields, needle):
    err = error_of(msg(mtype, **fields))
    assert err.code == protocol.INVALID_FIELD and err.ref == mtype
    assert needle in err.message


def test_size_limit_counts_utf8_bytes():
    # 3-byte characters: well under 64 Ki characters but over 64 KiB on the wire.
    big = msg("broadcast", data={"x": "€" * 22_000})
    assert len(big) < protocol.MAX_MESSAGE_BYTES < len(big.encode())
    assert error_of(big).code == protocol.TOO_LARGE
    ok = msg("broadcast", data={"x": "a" * (protocol.MAX_MESSAGE_BYTES - 100)})
    assert isinstance(protocol.parse(ok), protocol.Broadcast)


def test_server_messages_are_versioned_json():
    w = protocol.welcome(PEER, ROOM, [], [{"urls": ["stun:x"]}], ResumeToken.new(), False, 2.0)
    assert json.loads(protocol.encode(w))["type"] == "welcome" and w["v"] == 1
    assert protocol.signal_from(PEER, {"a": 1}) == {"v": 1, "type": "signal", "from": PEER, "data": {"a": 1}}
    assert protocol.error("x", "y") == {"v": 1, "type": "error", "code": "x", "message": "y"}
    assert protocol.error("x", "y", "join")["ref"] == "join"
    with pytest.raises(ValueError):
        protocol.encode({"bad": float("nan")})


def nested(depth: int, leaf: str = "1") -> str:
    """JSON text of `depth` nested objects around `leaf`: {"a":{"a":...1...}}."""
    return '{"a":' * depth + leaf + "}" * depth


@pytest.mark.parametrize("depth", [protocol.MAX_DEPTH + 1, 975, 20_000])
def test_over_deep_message_is_bad_json_not_an_exception(depth):
    # 20,000 levels is 120 KB of brackets: past the size limit, so arrays (2 bytes a level) stay under it.
    text = '{"v":1,"type":"broadcast","data":' + (nested(depth) if depth < 10_000 else "[" * 30_000 + "]" * 30_000) \
        + "}"
    assert len(text.encode()) <= protocol.MAX_MESSAGE_BYTES
    err = error_of(text)
    assert err.code == protocol.BAD_JSON and "nested" in err.message


def test_message_at_the_depth_limit_parses():
    # The envelope is one level, so data may hold MAX_DEPTH - 1.
    text = '{"v":1,"type":"broadcast","data":' + nested(protocol.MAX_DEPTH - 2) + "}"
    assert isinstance(protocol.parse(text), protocol.Broadcast)


@pytest.mark.parametrize("profile", [
    json.loads(nested(protocol.MAX_PROFILE_DEPTH + 1)),  # one level too deep (the profile itself is the first)
    {"links": [[[[[[[[1]]]]]]]]},
    "fast",
    [1, 2],
    {"blob": "x" * 5000},
])
def test_over_deep_profile_is_bad_state(profile):
    err = error_of(msg("state", state="ready", profile=profile))
    assert err.code == protocol.BAD_STATE and err.ref == "state" and "profile" in err.message


def test_real_profile_shape_passes():
    profile = {"compute": {"classes": {"conv_dense": 1.2e9}, "samples": [{"node": "c1", "seconds": 0.01}]},
               "links": {"pabcdef12": {"rtt_ms": 0.5, "mbps": 300.0}}, "kind": "laptop"}
    assert protocol.parse(msg("state", state="ready", profile=profile)).profile == profile
    at_limit = json.loads(nested(protocol.MAX_PROFILE_DEPTH))
    assert protocol.parse(msg("state", state="ready", profile=at_limit)).profile == at_limit
