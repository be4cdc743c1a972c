"""Fuzzing the signaling protocol with hypothesis: message shapes, sizes and nesting.

Two levels: `protocol.parse` over arbitrary frames (fast, many examples) raises nothing but a documented
`ProtocolError`; and a live server (aiohttp's test server, one per example) answers every fuzzed frame as the
protocol promises (a documented `error` code, or the message's own reply), logs no unhandled exception, and stays
usable: the fuzzing socket still gets `pong`, an observer in the same room still gets `pong`, and a newcomer can
still join that room and get `welcome`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tilemesh.server.app import ServerConfig, create_app
from tilemesh.server.signaling import hub as signaling
from tilemesh.server.signaling import protocol

ERROR_CODES = {
    protocol.BAD_JSON, protocol.BAD_MESSAGE, protocol.BAD_VERSION, protocol.UNKNOWN_TYPE, protocol.INVALID_FIELD,
    protocol.TOO_LARGE, protocol.RATE_LIMITED, protocol.NOT_JOINED, protocol.ALREADY_JOINED, protocol.UNKNOWN_ROOM,
    protocol.UNKNOWN_PEER, protocol.ROOM_FULL, protocol.SERVER_FULL, protocol.BAD_RESUME, protocol.BAD_STATE,
    protocol.PEER_UNAVAILABLE, protocol.PLAN_FAILED,
}
SERVER_TYPES = {"welcome", "roster", "signal", "broadcast", "peer_left", "plan", "error", "pong"}
TYPES = ["join", "state", "signal", "broadcast", "ping", "leave", "plan_request"]
# Placeholders the live test swaps for the real room and peer ids, so fuzzed messages also reach the deep paths.
ROOM, PEER = "$ROOM", "$PEER"

scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=30) | st.sampled_from([ROOM, PEER, "ready", "booting", "busy", "phone", "laptop", "edge"])
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=25)
field_names = st.sampled_from(["room", "name", "kind", "resume", "token", "state", "progress", "detail", "profile",
                               "to", "data", "strategy", "devices"]) | st.text(max_size=10)
messages = st.builds(
    lambda v, t, fields: {**fields, "v": v, "type": t},
    st.sampled_from([1, 1, 1, 2, "1", True, None]),
    st.sampled_from(TYPES) | st.text(max_size=12),
    st.dictionaries(field_names, json_values, max_size=6),
)


def nested_text(depth: int, opener: str) -> str:
    closer = "]" if opener == "[" else "}"
    inner = "[" * depth + "]" * depth if opener == "[" else '{"a":' * depth + "1" + closer * depth
    return '{"v":1,"type":"state","state":"ready","profile":{"x":' + inner + "}}"


frames = st.one_of(
    messages.map(json.dumps),
    st.builds(nested_text, st.integers(1, 30_000), st.sampled_from(["[", "{"])),
    st.builds(lambda n: json.dumps({"v": 1, "type": "broadcast", "data": {"x": "a" * n}}),
              st.integers(0, 200_000)),
    st.text(max_size=300),
    st.binary(max_size=300),
)


@settings(max_examples=400, deadline=None)
@given(frames)
def test_parse_raises_only_documented_protocol_errors(frame):
    try:
        protocol.parse(frame)
    except protocol.ProtocolError as exc:
        assert exc.code in ERROR_CODES and exc.message
        assert exc.ref is None or (isinstance(exc.ref, str) and len(exc.ref) <= 32)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def substitute(text: str | bytes, room: str, peer: str) -> str | bytes:
    if isinstance(text, bytes):
        return text
    return text.replace(json.dumps(ROOM), json.dumps(room)).replace(json.dumps(PEER), json.dumps(peer))


async def recv_json(ws: aiohttp.ClientWebSocketResponse) -> dict | None:
    msg = await ws.receive(timeout=5)
    if msg.type != aiohttp.WSMsgType.TEXT:
        return None
    return json.loads(msg.data)


async def pong_after(ws: aiohttp.ClientWebSocketResponse) -> list[dict]:
    """Ping, then read to the pong: everything the server sent before it (None in the list: the socket closed)."""
    await ws.send_str(json.dumps({"v": 1, "type": "ping"}))
    seen = []
    while True:
        got = await recv_json(ws)
        seen.append(got)
        if got is None or got["type"] == "pong":
            return seen


async def run_session(sequence: list[str | bytes], join_first: bool) -> None:
    handler = Collect()
    for name in ("aiohttp", "tilemesh"):
        logging.getLogger(name).addHandler(handler)
    static = tempfile.TemporaryDirectory()
    app = create_app(ServerConfig(static_dir=Path(static.name)))
    signaling.configure(app, signaling.SignalingConfig(tick=3600))
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        room = (await (await client.post("/api/rooms")).json())["room"]
        observer = await client.ws_connect("/ws")
        await observer.send_str(json.dumps({"v": 1, "type": "join", "room": room, "name": "obs", "kind": "laptop"}))
        observer_id = (await recv_json(observer))["peer_id"]
        fuzzer = await client.ws_connect("/ws")
        if join_first:
            await fuzzer.send_str(json.dumps({"v": 1, "type": "join", "room": room, "name": "fz", "kind": "phone"}))
            assert (await recv_json(fuzzer))["type"] == "welcome"
        for frame in sequence:
            if fuzzer.closed:
                break
            frame = substitute(frame, room, observer_id)
            try:
                is_leave = isinstance(protocol.parse(frame), protocol.Leave)
            except protocol.ProtocolError:
                is_leave = False
            await (fuzzer.send_bytes(frame) if isinstance(frame, bytes) else fuzzer.send_str(frame))
            for got in await pong_after(fuzzer):
                if got is None:  # only a `leave` closes the socket (8 frames are no flood)
                    assert is_leave and fuzzer.close_code == 1000, (frame[:200], fuzzer.close_code)
                    break
                assert got["v"] == 1 and got["type"] in SERVER_TYPES, got
                if got["type"] == "error":
                    assert got["code"] in ERROR_CODES and isinstance(got["message"], str), got
        # The room stays usable for everyone else.
        for got in await pong_after(observer):
            assert got is not None and got["type"] in SERVER_TYPES
        newcomer = await client.ws_connect("/ws")
        await newcomer.send_str(json.dumps({"v": 1, "type": "join", "room": room, "name": "new", "kind": "phone"}))
        welcome = await recv_json(newcomer)
        assert welcome is not None and welcome["type"] == "welcome", welcome
        json.dumps(welcome)  # what every browser will parse
        for ws in (observer, fuzzer, newcomer):
            await ws.close()
        assert not handler.records, [r.getMessage() for r in handler.records]
    finally:
        await client.close()
        static.cleanup()
        for name in ("aiohttp", "tilemesh"):
            logging.getLogger(name).removeHandler(handler)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames, min_size=1, max_size=8), st.booleans())
def test_live_server_answers_per_protocol_and_stays_usable(sequence, join_first):
    asyncio.run(run_session(sequence, join_first))
