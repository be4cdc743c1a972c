"""The signaling server end to end over real WebSockets (aiohttp's test server), with short timeouts.

Covers the room pages too, since they share the hub: a room made over HTTP is the one the sockets join.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
from dataclasses import replace

import aiohttp
import pytest

from bench.serverload import open_raw_ws, ws_frame
from tilemesh.server.app import ServerConfig, create_app
from tilemesh.server.signaling import hub as signaling
from tilemesh.server.signaling import protocol, rooms
from tilemesh.server.signaling.ids import PeerId, RoomId

ICE = [{"urls": ["stun:10.99.0.1:3478"]}]
# The hub runs on a FakeClock: time moves only when a test says so, and the test then runs the janitor's tick
# itself. Nothing here sleeps to let a deadline pass. The real janitor is off (its tick is an hour).
FAST = signaling.SignalingConfig(heartbeat=1.0, resume_grace=0.4, room_ttl=60, tick=3600, close_timeout=0.5)


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class WsClient:
    """A test client: sends protocol messages and reads them back one at a time."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.id: PeerId | None = None
        self.token: str | None = None

    async def send(self, mtype: str, **fields) -> None:
        await self.ws.send_str(json.dumps({"v": 1, "type": mtype, **fields}))

    async def recv(self, timeout: float = 3.0) -> dict:
        msg = await self.ws.receive(timeout=timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a message, got {msg}"
        return json.loads(msg.data)

    async def expect(self, mtype: str, timeout: float = 3.0, skip: tuple[str, ...] = ("roster",)) -> dict:
        """The next message of `mtype`, skipping only the types in `skip`."""
        while True:
            got = await self.recv(timeout)
            if got["type"] == mtype:
                return got
            assert got["type"] in skip, f"expected {mtype}, got {got}"

    async def silent(self, seconds: float = 0.3) -> None:
        with pytest.raises(asyncio.TimeoutError):
            got = await self.ws.receive(timeout=seconds)
            pytest.fail(f"expected nothing, got {got}")

    async def join(self, room: str, name: str = "", kind: str = "phone", **extra) -> dict:
        await self.send("join", room=room, name=name, kind=kind, **extra)
        welcome = await self.expect("welcome", skip=())
        self.id, self.token = welcome["peer_id"], welcome["resume_token"]
        return welcome

    async def closed(self, timeout: float = 3.0) -> int:
        """Read until the server closes the socket; the close code."""
        while True:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return self.ws.close_code
            assert msg.type == aiohttp.WSMsgType.TEXT


@pytest.fixture
def make_server(aiohttp_client, tmp_path):
    async def make(config: signaling.SignalingConfig = FAST, public_url: str | None = None, **overrides):
        app = create_app(ServerConfig(static_dir=tmp_path / "static", ice_servers=ICE, public_url=public_url))
        config = copy.copy(config)
        for key, value in overrides.items():
            setattr(config, key, value)
        clock = FakeClock()
        signaling.configure(app, config, clock=clock)
        client = await aiohttp_client(app)
        client.hub = app[signaling.HUB_KEY]
        client.clock = clock

        def advance(seconds: float) -> None:
            """Let `seconds` pass for the hub, then run its janitor once."""
            clock.advance(seconds)
            client.hub.tick()

        client.advance = advance

        async def connect() -> WsClient:
            return WsClient(await client.ws_connect("/ws"))

        async def new_room() -> str:
            resp = await client.post("/api/rooms")
            assert resp.status == 201
            return (await resp.json())["room"]

        client.connect, client.new_room = connect, new_room
        return client

    return make


@pytest.fixture
async def server(make_server):
    return await make_server()


async def test_join_welcome_and_roster_updates(server):
    room = await server.new_room()
    a = await server.connect()
    wa = await a.join(room, "Anna", "laptop")
    assert wa["room"] == room and wa["ice_servers"] == ICE and wa["resumed"] is False
    assert wa["heartbeat"] == FAST.heartbeat
    assert [p["name"] for p in wa["peers"]] == ["Anna"]

    b = await server.connect()
    wb = await b.join(room)
    # The existing peer hears about the newcomer; the newcomer's welcome lists everyone, itself included.
    roster = await a.expect("roster", skip=())
    assert [p["id"] for p in roster["peers"]] == [a.id, b.id]
    assert [p["id"] for p in wb["peers"]] == [a.id, b.id]
    assert wb["peers"][1]["name"] == f"Phone {b.id[-4:]}" and wb["peers"][1]["kind"] == "phone"

    await b.send("state", state="booting", progress=0.25, detail="download", profile={"cores": 8})
    for peer in (a, b):
        entry = (await peer.expect("roster", skip=()))["peers"][1]
        assert (entry["state"], entry["progress"], entry["detail"], entry["profile"]) == \
            ("booting", 0.25, "download", {"cores": 8})
    await b.send("state", state="ready")
    assert (await a.expect("roster", skip=()))["peers"][1]["progress"] == 1.0


async def test_newcomer_offer_arrives_after_the_roster_that_announces_it(server):
    room = await server.new_room()
    a, b = await server.connect(), await server.connect()
    await a.join(room)
    await b.join(room)
    await b.send("signal", to=a.id, data={"type": "offer", "sdp": "v=0"})
    # No skipping: the roster naming b must come first, then b's offer, relayed verbatim.
    first, second = await a.recv(), await a.recv()
    assert first["type"] == "roster" and b.id in [p["id"] for p in first["peers"]]
    assert second == {"v": 1, "type": "signal", "from": b.id, "data": {"type": "offer", "sdp": "v=0"}}
    await b.silent(0.1)


async def test_relay_stays_inside_the_room(server):
    room1, room2 = await server.new_room(), await server.new_room()
    a, b, c = await server.connect(), await server.connect(), await server.connect()
    await a.join(room1)
    await b.join(room1)
    await c.join(room2)
    await a.expect("roster")
    # c knows a's id, but a is in another room: refused, and a hears nothing.
    await c.send("signal", to=a.id, data={"sdp": "evil"})
    err = await c.expect("error")
    assert err["code"] == protocol.UNKNOWN_PEER and err["ref"] == "signal"
    await c.send("signal", to=PeerId.new(), data={})
    assert (await c.expect("error"))["code"] == protocol.UNKNOWN_PEER

    await a.send("broadcast", data={"plan": 1})
    assert await b.expect("broadcast") == {"v": 1, "type": "broadcast", "from": a.id, "data": {"plan": 1}}
    await a.silent(0.2)
    await c.silent(0.1)


async def test_errors_leave_the_connection_usable(server):
    room = await server.new_room()
    p = await server.connect()
    cases = [
        ("{oops", protocol.BAD_JSON, None),
        ('{"v": 2, "type": "ping"}', protocol.BAD_VERSION, "ping"),
        ('{"v": 1, "type": "dance"}', protocol.UNKNOWN_TYPE, "dance"),
        ('{"v": 1, "type": "join", "room": "x", "kind": "phone", "name": ""}', protocol.INVALID_FIELD, "join"),
        (json.dumps({"v": 1, "type": "join", "room": RoomId.new(), "kind": "phone", "name": ""}),
         protocol.UNKNOWN_ROOM, "join"),
        ('{"v": 1, "type": "signal", "to": "pabcdef", "data": {}}', protocol.NOT_JOINED, "signal"),
        ('{"v": 1, "type": "state", "state": "ready"}', protocol.NOT_JOINED, "state"),
    ]
    for text, code, ref in cases:
        await p.ws.send_str(text)
        err = await p.expect("error", skip=())
        assert err["code"] == code, (text, err)
        assert err.get("ref") == ref and err["message"]
    await p.ws.send_bytes(b"\x00\x01")
    assert (await p.expect("error", skip=()))["code"] == protocol.BAD_MESSAGE
    # Pings work before joining (a client may connect while its runtime boots), and joining still works.
    await p.send("ping")
    assert await p.expect("pong", skip=()) == {"v": 1, "type": "pong"}
    await p.join(room)
    await p.send("join", room=room, name="", kind="phone")
    assert (await p.expect("error"))["code"] == protocol.ALREADY_JOINED


async def test_oversized_message_gets_an_error_and_a_flood_closes(server):
    room = await server.new_room()
    p = await server.connect()
    await p.join(room)
    big = json.dumps({"v": 1, "type": "broadcast", "data": {"x": "a" * (70 * 1024)}})
    await p.ws.send_str(big)
    err = await p.expect("error")
    assert err["code"] == protocol.TOO_LARGE and "65536" in err["message"]
    await p.send("ping")
    await p.expect("pong")
    # Each oversized frame costs ten strikes out of a hundred: the eleventh in a row is abuse.
    for _ in range(12):
        await p.ws.send_str(big)
    assert await p.closed() == aiohttp.WSCloseCode.POLICY_VIOLATION


async def test_frame_above_hard_cap_is_cut_off(server):
    p = await server.connect()
    await p.ws.send_str("x" * (FAST.hard_cap + 10))
    assert await p.closed() == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_rate_limit(make_server):
    srv = await make_server(replace(FAST, rate=5, burst=10))
    p = await srv.connect()
    for _ in range(30):
        await p.send("ping")
    got = []
    with pytest.raises(asyncio.TimeoutError):
        while True:
            got.append((await p.recv(timeout=0.3))["type"])
    # The burst goes through; the rest is dropped with one error, not thirty.
    assert 10 <= got.count("pong") <= 12
    assert got.count("error") == 1
    srv.advance(0.5)
    await p.send("ping")
    assert (await p.recv())["type"] == "pong"


async def test_signal_to_a_reconnecting_peer_is_queued_and_delivered_on_resume(server):
    room = await server.new_room()
    a, b = await server.connect(), await server.connect()
    await a.join(room, "A")
    await b.join(room, "B")
    await a.expect("roster")
    await b.send("state", state="ready")
    await a.expect("roster")
    await b.ws.close()  # a drop, not a leave
    detached = await a.expect("roster", skip=())
    assert [p["connected"] for p in detached["peers"]] == [True, False]

    await a.send("signal", to=b.id, data={"candidate": "c1"})
    await a.send("signal", to=b.id, data={"candidate": "c2"})
    await a.silent(0.1)  # queued: no error

    b2 = await server.connect()
    w = await b2.join(room, "B", resume=b.id, token=b.token)
    assert w["resumed"] is True and w["peer_id"] == b.id and w["resume_token"] == b.token
    assert [p["state"] for p in w["peers"]] == ["booting", "ready"], "state survives the drop"
    assert (await b2.expect("signal"))["data"] == {"candidate": "c1"}
    assert (await b2.expect("signal"))["data"] == {"candidate": "c2"}
    back = await a.expect("roster", skip=())
    assert [p["connected"] for p in back["peers"]] == [True, True]
    # Past the grace period nothing happens: the resumed peer stays.
    server.advance(FAST.resume_grace + 0.2)
    await a.silent(0.1)


async def test_resume_takes_over_a_socket_that_has_not_noticed_it_died(server):
    room = await server.new_room()
    a, b = await server.connect(), await server.connect()
    await a.join(room)
    await b.join(room)
    b2 = await server.connect()
    w = await b2.join(room, resume=b.id, token=b.token)
    assert w["resumed"] is True
    assert await b.closed() == signaling.CLOSE_REPLACED
    server.advance(FAST.resume_grace + 0.2)
    assert len(server.hub.state.room(RoomId(room)).peers) == 2
    await b2.send("signal", to=a.id, data={"x": 1})
    assert (await a.expect("signal"))["from"] == b.id


async def test_resume_needs_the_token(server):
    room = await server.new_room()
    a, b = await server.connect(), await server.connect()
    await a.join(room)
    await b.join(room)
    thief = await server.connect()
    await thief.send("join", room=room, name="", kind="phone", resume=b.id, token=a.token)
    assert (await thief.expect("error", skip=()))["code"] == protocol.BAD_RESUME
    await thief.send("join", room=room, name="", kind="phone", resume=b.id)
    assert (await thief.expect("error", skip=()))["code"] == protocol.BAD_RESUME
    await b.send("ping")
    assert (await b.expect("pong"))["type"] == "pong", "the real peer keeps its socket"


async def test_dropped_peer_is_removed_after_the_grace_period(server):
    room = await server.new_room()
    a, b = await server.connect(), await server.connect()
    await a.join(room)
    await b.join(room)
    await a.expect("roster", skip=())  # b joined
    await b.ws.close()
    detached = await a.expect("roster", skip=())
    assert [p["connected"] for p in detached["peers"]] == [True, False]
    server.advance(FAST.resume_grace - 0.1)
    await a.silent(0.05)
    server.advance(0.2)
    left = await a.expect("peer_left", skip=())
    assert left == {"v": 1, "type": "peer_left", "id": b.id, "reason": "disconnected"}
    assert [p["id"] for p in (await a.expect("roster", skip=()))["peers"]] == [a.id]
    # Too late to resume; the client then joins as a new peer.
    b2 = await server.connect()
    await b2.send("join", room=room, name="", kind="phone", resume=b.id, token=b.token)
    assert (await b2.expect("error", skip=()))["code"] == protocol.BAD_RESUME
    w = await b2.join(room)
    assert w["resumed"] is False and w["peer_id"] != b.id


async def test_silent_peer_is_dropped_after_missed_heartbeats(make_server):
    srv = await make_server(replace(FAST, heartbeat=0.15))
    room = await srv.new_room()
    a, b = await srv.connect(), await srv.connect()
    await a.join(room)
    await b.join(room)
    await a.expect("roster")
    silence = 0.15 * FAST.heartbeat_misses
    # b keeps reading, so its WebSocket layer answers the server's pings: like a frozen page, whose browser
    # still pongs while the script sends nothing. Only the app-level heartbeat can catch that.
    srv.advance(silence - 0.01)
    await a.send("ping")
    await a.expect("pong", skip=())
    srv.advance(0.01)
    left = await a.expect("peer_left", skip=())
    assert left["id"] == b.id and left["reason"] == "timeout"
    assert await b.closed() == signaling.CLOSE_TIMEOUT
    roster = await a.expect("roster", skip=())
    assert [p["id"] for p in roster["peers"]] == [a.id]


async def test_leave(server):
    room = await server.new_room()
    a, b = await server.connect(), await server.connect()
    await a.join(room)
    await b.join(room)
    await b.send("leave")
    assert await b.closed() == 1000
    assert (await a.expect("peer_left"))["reason"] == "leave"
    assert [p["id"] for p in (await a.expect("roster", skip=()))["peers"]] == [a.id]
    server.advance(FAST.resume_grace + 0.2)
    await a.silent(0.1)  # no second peer_left after the grace period


async def test_room_full_and_server_full(make_server):
    srv = await make_server(replace(FAST, limits=rooms.Limits(max_peers_per_room=2, max_rooms=2)))
    room = await srv.new_room()
    for _ in range(2):
        await (await srv.connect()).join(room)
    extra = await srv.connect()
    await extra.send("join", room=room, name="", kind="phone")
    err = await extra.expect("error", skip=())
    assert err["code"] == protocol.ROOM_FULL and "2" in err["message"]

    await srv.new_room()
    resp = await srv.post("/api/rooms")
    assert resp.status == 503 and (await resp.json())["error"] == protocol.SERVER_FULL
    page = await srv.post("/", allow_redirects=False)
    assert page.status == 503 and "No room available" in await page.text()


async def test_empty_room_expires(make_server):
    srv = await make_server(replace(FAST, room_ttl=0.3))
    room = await srv.new_room()
    p = await srv.connect()
    await p.join(room)
    await p.send("leave")
    await p.closed()
    assert (await srv.get(f"/room/{room}")).status == 200
    srv.advance(0.5)
    resp = await srv.get(f"/room/{room}")
    assert resp.status == 404 and "does not exist or has ended" in await resp.text()
    late = await srv.connect()
    await late.send("join", room=room, name="", kind="phone")
    assert (await late.expect("error", skip=()))["code"] == protocol.UNKNOWN_ROOM


async def test_pages(make_server):
    srv = await make_server(public_url="https://10.99.0.1:8443/")
    front = await (await srv.get("/")).text()
    assert '<form method="post" action="/">' in front and 'id="new-room"' in front
    resp = await srv.post("/", allow_redirects=False)
    assert resp.status == 303
    host_url = resp.headers["Location"]
    room = host_url.rsplit("/", 1)[1]
    assert host_url == f"/room/{room}" and len(room) >= 22

    html = await (await srv.get(host_url)).text()
    join_url = f"https://10.99.0.1:8443/join/{room}"
    assert join_url in html and "<svg" in html and "/web/room_view.js" in html
    qr = await srv.get(f"/room/{room}/qr.svg")
    assert qr.status == 200 and qr.headers["Content-Type"].startswith("image/svg+xml")
    assert qr.headers["Cross-Origin-Resource-Policy"] == "same-origin"

    phone_ua = {"User-Agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148"}
    phone = await (await srv.get(f"/join/{room}", headers=phone_ua)).text()
    assert '"phone"' in phone and 'value="Phone ' in phone
    laptop = await (await srv.get(f"/join/{room}", headers={"User-Agent": "Mozilla/5.0 (X11; Linux x86_64)"})).text()
    assert '"laptop"' in laptop
    assert '"phone"' in await (await srv.get(f"/join/{room}?kind=phone")).text()

    for path in (f"/join/{RoomId.new()}", f"/room/{RoomId.new()}", "/join/short", f"/room/{RoomId.new()}/qr.svg"):
        resp = await srv.get(path)
        assert resp.status == 404, path
        text = await resp.text()
        assert "Start a new room" in text and '<form method="post" action="/">' in text


async def test_join_url_falls_back_to_the_request_host(server):
    resp = await server.post("/api/rooms")
    body = await resp.json()
    assert body["join_url"] == f"http://{server.host}:{server.port}/join/{body['room']}"


async def test_deep_profile_is_refused_and_newcomers_still_get_welcome(server):
    # The probe's attack: a 2 KB profile nested ~970 deep, under the size limit, used to be stored; building
    # every later roster then raised RecursionError, so newcomers never got `welcome`.
    room = await server.new_room()
    attacker = await server.connect()
    await attacker.join(room)
    deep = '{"a":' * 970 + "1" + "}" * 970
    await attacker.ws.send_str('{"v":1,"type":"state","state":"ready","profile":' + deep + "}")
    err = await attacker.expect("error", skip=())
    assert err["code"] in (protocol.BAD_JSON, protocol.BAD_STATE), err
    await attacker.send("ping")
    await attacker.expect("pong")
    newcomer = await server.connect()
    welcome = await newcomer.join(room)
    assert [p["profile"] for p in welcome["peers"]] == [None, None]


@pytest.mark.parametrize("depth", [980, 5000])
async def test_deep_message_gets_bad_json_and_the_socket_stays(server, depth):
    p = await server.connect()
    await p.ws.send_str('{"v":1,"type":"broadcast","data":' + "[" * depth + "]" * depth + "}")
    err = await p.expect("error", skip=())
    assert err["code"] == protocol.BAD_JSON
    await p.send("ping")
    await p.expect("pong", skip=())


class RawSocket:
    """A WebSocket client that reads nothing unless asked: asyncio stops reading its socket once `limit` bytes
    wait unread, and a small receive buffer makes the kernel stop accepting soon after (a phone stuck behind a
    dead Wi-Fi link, or a client that means harm)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> RawSocket:
        return cls(*await open_raw_ws(host, port))

    def send(self, mtype: str, **fields) -> None:
        self.writer.write(ws_frame({"v": 1, "type": mtype, **fields}))

    async def read_to_eof(self, timeout: float) -> int:
        """Drain everything the server sent until it closes the TCP connection; the byte count."""
        total = 0
        async with asyncio.timeout(timeout):
            try:
                while chunk := await self.reader.read(65536):
                    total += len(chunk)
            except ConnectionResetError:  # an aborted transport sends RST: also the end
                pass
        return total


async def test_slow_reader_is_dropped_and_the_room_hears_it(make_server):
    # The probe's defect: the server said it dropped a socket that reads too slowly, but its close waited on the
    # blocked send, so the peer stayed in the roster, nobody got `peer_left`, and its queue stayed pinned.
    srv = await make_server(send_queue_limit=8, rate=10_000, burst=10_000, strike_budget=10_000)
    room = await srv.new_room()
    a = await srv.connect()
    await a.join(room, "A")
    slow = await RawSocket.open(srv.host, srv.port)
    slow.send("join", room=room, name="slow", kind="phone")
    roster = await a.expect("roster", skip=())
    slow_id = next(p["id"] for p in roster["peers"] if p["name"] == "slow")

    blob = "x" * 60_000
    for i in range(400):  # 24 MB: far more than the loopback socket buffers hold
        await a.send("broadcast", data={"i": i, "blob": blob})
        if i % 50 == 0:
            await asyncio.sleep(0)  # let the server's writers run, as a real sender's pace would
    left = await a.expect("peer_left", timeout=5)
    assert left == {"v": 1, "type": "peer_left", "id": slow_id, "reason": "too_slow"}
    assert [p["id"] for p in (await a.expect("roster", skip=()))["peers"]] == [a.id]
    # The transport is aborted, not left to a close handshake the client will never read.
    await slow.read_to_eof(timeout=5)
    for _ in range(50):
        if len(srv.hub.connections) == 1:
            break
        await asyncio.sleep(0.02)
    assert [c.peer for c in srv.hub.connections] == [a.id]
    assert slow_id not in srv.hub.attached and slow_id not in srv.hub.pending
    slow.writer.close()
    # The room goes on.
    await a.send("ping")
    await a.expect("pong")


async def test_connections_are_capped_per_client_address_and_in_total(make_server):
    srv = await make_server(max_connections_per_client=3, max_connections=100)
    held = [await srv.connect() for _ in range(3)]
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await srv.connect()
    assert refused.value.status == 503
    # A slot frees as soon as a socket closes; the others never noticed.
    await held.pop().ws.close()
    for _ in range(50):
        if len(srv.hub.connections) == 2:
            break
        await asyncio.sleep(0.01)
    p = await srv.connect()
    await p.send("ping")
    await p.expect("pong", skip=())
    for q in held:
        await q.send("ping")
        await q.expect("pong", skip=())

    total = await make_server(max_connections_per_client=100, max_connections=4)
    _ = [await total.connect() for _ in range(4)]
    resp = await total.get("/ws", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                           "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
                                           "Sec-WebSocket-Version": "13"})
    assert resp.status == 503 and (await resp.json())["error"] == protocol.TOO_MANY_CONNECTIONS


async def test_socket_that_never_joins_is_dropped_after_the_deadline(server):
    p = await server.connect()
    for _ in range(int(FAST.join_deadline) - 1):  # pinging (which keeps the heartbeat) is not joining
        server.advance(1)
        await p.send("ping")
        await p.expect("pong", skip=())
    server.advance(1)
    assert await p.closed() == signaling.CLOSE_NO_JOIN
    # A joined peer is not touched by the deadline.
    room = await server.new_room()
    q = await server.connect()
    await q.join(room)
    for _ in range(6):  # 12 s: past the join deadline, with the heartbeat kept
        server.advance(2)
        await q.send("ping")
        assert (await q.expect("pong"))["type"] == "pong"


async def test_closing_socket_that_never_reads_is_cut_by_the_sweep(server):
    # A client that holds TCP open but never reads (nor answers the close frame) must not keep its socket, its
    # queue and its connection slot: the janitor cuts the transport once the close has taken too long.
    raw = await RawSocket.open(server.host, server.port)
    raw.send("ping")
    for _ in range(50):
        if server.hub.connections:
            break
        await asyncio.sleep(0.01)
    server.advance(FAST.join_deadline)  # closes it: no join
    server.advance(FAST.close_timeout)  # still closing: cut
    await raw.read_to_eof(timeout=3)
    raw.writer.close()
    for _ in range(100):
        if not server.hub.connections:
            break
        await asyncio.sleep(0.01)
    assert not server.hub.connections and not server.hub.per_client


async def test_plan_requests_are_bounded_one_per_peer(server):
    # Each plan costs up to a second of CPU off the loop: a peer may not pile them up.
    release = asyncio.Event()
    calls = []

    async def planner(room, requester, request):
        calls.append(requester)
        await release.wait()
        return {"plan_id": len(calls), "source": requester}

    server.hub.planner = planner
    room = await server.new_room()
    p = await server.connect()
    await p.join(room)
    for _ in range(5):
        await p.send("plan_request")
    errors = [await p.expect("error") for _ in range(4)]
    assert {e["code"] for e in errors} == {protocol.PLAN_FAILED} and "still running" in errors[0]["message"]
    release.set()
    assert (await p.expect("plan"))["source"] == p.id
    assert calls == [p.id] and not server.hub._plans


async def test_get_and_head_make_no_room(make_server):
    # The probe filled the room cap with 256 plain GETs in 0.02 s (link previews, prefetchers and crawlers do
    # the same by accident): looking at the front page must not make a room.
    srv = await make_server(limits=rooms.Limits(max_peers_per_room=2, max_rooms=4))
    for _ in range(20):
        assert (await srv.get("/", allow_redirects=False)).status == 200
        assert (await srv.head("/", allow_redirects=False)).status == 200
    assert len(srv.hub.state.rooms) == 0
    resp = await srv.post("/", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"].startswith("/room/")
    assert len(srv.hub.state.rooms) == 1


async def test_room_creation_is_rate_limited_per_client(make_server):
    srv = await make_server(room_burst=3, room_rate=0.1)
    for _ in range(3):
        assert (await srv.post("/", allow_redirects=False)).status == 303
    page = await srv.post("/", allow_redirects=False)
    assert page.status == 429 and "too quickly" in await page.text()
    api = await srv.post("/api/rooms")
    assert api.status == 429 and (await api.json())["error"] == protocol.RATE_LIMITED
    assert len(srv.hub.state.rooms) == 3
    srv.advance(10)  # one token back
    assert (await srv.post("/api/rooms")).status == 201
    assert (await srv.post("/api/rooms")).status == 429


# --- relay: mesh messages to and from the server's own edge peer as binary frames (protocol: Relay) ---------

async def next_binary(client: WsClient, timeout: float = 3.0) -> tuple[str, bytes]:
    """The next binary frame, skipping JSON messages: (peer id from its header, payload)."""
    while True:
        msg = await client.ws.receive(timeout=timeout)
        if msg.type == aiohttp.WSMsgType.BINARY:
            peer, payload = protocol.parse_relay_frame(msg.data)
            return peer, bytes(payload)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg


async def relay_room(srv):
    room = await srv.new_room()
    edge, a, b = await srv.connect(), await srv.connect(), await srv.connect()
    welcome = await edge.join(room, "edge", kind="edge", relay_key=srv.hub.relay_key)
    assert [p["relay"] for p in welcome["peers"]] == [True]
    await a.join(room, "A")
    await b.join(room, "B")
    return room, edge, a, b


async def test_relay_carries_binary_frames_to_and_from_the_edge_only(server):
    room, edge, a, b = await relay_room(server)

    assert {p["name"]: p["relay"] for p in server.hub.state.room(room).roster()} == \
        {"edge": True, "A": False, "B": False}
    payload = os.urandom(protocol.MAX_RELAY_PAYLOAD)
    await a.ws.send_bytes(protocol.relay_frame(edge.id, payload))
    assert await next_binary(edge) == (a.id, payload)
    await edge.ws.send_bytes(protocol.relay_frame(b.id, b"\xb0ping"))
    assert await next_binary(b) == (edge.id, b"\xb0ping")
    # Two ordinary members talk over WebRTC, never through the server.
    await a.ws.send_bytes(protocol.relay_frame(b.id, b"hi"))
    err = await a.expect("error")
    assert err["code"] == protocol.RELAY_REFUSED and err["ref"] == "relay"
    await b.silent(0.2)
    assert server.hub.relayed_bytes == len(payload) + 5


async def test_relay_errors_are_clear_and_the_socket_stays(server):
    room, edge, a, _ = await relay_room(server)
    cases = [
        (protocol.relay_frame(PeerId.new(), b"x"), protocol.UNKNOWN_PEER),
        (protocol.relay_frame(edge.id, bytes(protocol.MAX_RELAY_PAYLOAD + 1)), protocol.TOO_LARGE),
        (b"\x09short", protocol.BAD_MESSAGE),
        (bytes([3]) + b"\xff\xfe\xfd" + b"x", protocol.BAD_MESSAGE),
    ]
    for frame, code in cases:
        await a.ws.send_bytes(frame)
        err = await a.expect("error")
        assert (err["code"], err["ref"]) == (code, "relay"), frame[:8]
    # A relay frame before join, and a join with a forged key, are refused.
    c = await server.connect()
    await c.ws.send_bytes(protocol.relay_frame(edge.id, b"x"))
    assert (await c.expect("error", skip=()))["code"] == protocol.NOT_JOINED
    await c.send("join", room=room, name="fake edge", kind="edge", relay_key="guess")
    err = await c.expect("error", skip=())
    assert (err["code"], err["ref"]) == (protocol.BAD_RELAY_KEY, "join")
    assert [p.relay for p in server.hub.state.room(room).peers if p.name == "fake edge"] == []
    await a.ws.send_bytes(protocol.relay_frame(edge.id, b"still here"))
    assert await next_binary(edge) == (a.id, b"still here")


async def test_relay_slows_a_fast_sender_to_its_receivers_pace_and_loses_nothing(make_server):
    srv = await make_server(send_queue_bytes=1 << 20, relay_wait=10.0)
    _, edge, a, _ = await relay_room(srv)
    frames = [os.urandom(200_000) for _ in range(30)]  # 6 MB through a 1 MiB queue

    async def send_all():
        for f in frames:
            await a.ws.send_bytes(protocol.relay_frame(edge.id, f))

    sender = asyncio.ensure_future(send_all())
    got = []
    for _ in frames:
        await asyncio.sleep(0.01)  # a receiver slower than the sender
        got.append(await next_binary(edge, timeout=10))
    await sender
    assert [p for _, p in got] == frames and {s for s, _ in got} == {a.id}
    assert max(c.queued_bytes for c in srv.hub.connections) <= 1 << 20
    await a.send("ping")
    assert (await a.expect("pong"))["type"] == "pong"  # no error, the sender was never dropped


async def test_relay_to_a_receiver_that_never_reads_is_dropped_with_an_error(make_server):
    srv = await make_server(send_queue_bytes=1 << 20, relay_wait=0.3, rate=10_000, burst=10_000)
    room = await srv.new_room()
    stuck = await RawSocket.open(srv.host, srv.port)
    stuck.send("join", room=room, name="edge", kind="edge", relay_key=srv.hub.relay_key)
    a = await srv.connect()
    welcome = await a.join(room, "A")
    edge_id = next(p["id"] for p in welcome["peers"] if p["relay"])
    blob = bytes(250_000)
    for _ in range(40):  # 10 MB: more than the socket buffers and the queue hold
        await a.ws.send_bytes(protocol.relay_frame(edge_id, blob))
    err = await a.expect("error", timeout=10)
    assert (err["code"], err["ref"]) == (protocol.PEER_UNAVAILABLE, "relay")
    assert max(c.queued_bytes for c in srv.hub.connections) <= 1 << 20
    stuck.writer.close()


async def test_frame_reports_reach_the_observer_and_a_due_replan_sends_only_a_new_plan(server):
    """Learned allocation's wiring: every `frame_report` broadcast is relayed as before and shown to the observer
    (the sender as the socket says); when it says a replan is due, the source's request is planned again with
    `only_if_new`, and a plan goes out only when the planner has a different one."""
    seen, asked = [], []
    answers = [None, {"plan_id": 7}]

    def observer(room, sender, data, now):
        seen.append((sender, data["plan_id"]))
        return (p.id, protocol.PlanRequest(strategy="equal_split"), 1) if data["plan_id"] >= 2 else None

    async def planner(room, requester, request, only_if_new=False, based_on=None):
        asked.append((requester, request.strategy, only_if_new, based_on))
        out = answers.pop(0)
        return None if out is None else {**out, "source": requester}

    server.hub.planner, server.hub.observer = planner, observer
    room = await server.new_room()
    p, q = await server.connect(), await server.connect()
    await p.join(room)
    await q.join(room)
    await q.send("broadcast", data={"kind": "frame_report", "plan_id": 1, "report": {"compute_ms": 5}})
    assert (await p.expect("broadcast"))["data"]["plan_id"] == 1
    await q.send("broadcast", data={"kind": "note", "plan_id": 9})  # not a report: not shown
    await p.expect("broadcast")
    await q.send("broadcast", data={"kind": "frame_report", "plan_id": 2, "report": {}})
    await p.expect("broadcast")
    for _ in range(100):
        if asked and not server.hub._replans:
            break
        await asyncio.sleep(0.01)
    assert seen == [(q.id, 1), (q.id, 2)] and asked == [(p.id, "equal_split", True, 1)]
    await q.send("broadcast", data={"kind": "frame_report", "plan_id": 3, "report": {}})
    await p.expect("broadcast")
    plan = await p.expect("plan")  # the second replan differs: it goes out to the room
    assert plan["plan_id"] == 7 and plan["source"] == p.id


async def test_a_closing_room_frees_its_streams(make_server, demo_model_dir):
    """A camera streamed in a room (the server's per-room stream state), then everyone left without stopping it:
    when the empty room closes, the inference forgets the room's streams, requests and learned picture."""
    from tilemesh.planning import planner
    from tilemesh.runtime import graph as graph_mod
    from tilemesh.server import inference

    srv = await make_server(replace(FAST, room_ttl=0.3))
    inf = srv.app[inference.INFERENCE_KEY]
    inf._graphs[None] = graph_mod.load_onnx(demo_model_dir / "mobilenet_v2.onnx")
    room = await srv.new_room()
    p = await srv.connect()
    await p.join(room)
    phone = {"compute": planner.browser_profile(0.5)}
    members = tuple(rooms.Member(id=PeerId(d), name=d, kind="phone", token=None, joined_at=0.0, state="ready",
                                 profile=phone) for d in (p.id, "pbbbb"))
    (msg,) = inf.choose(rooms.Room(id=RoomId(room), created_at=0, peers=members), PeerId(p.id),
                        protocol.PlanRequest(objective="throughput"))
    assert msg["stream"] and list(inf.streams[room]) == [p.id]
    await p.send("leave")
    await p.closed()
    srv.advance(0.1)
    assert room in inf.streams  # the room is still open (empty for less than its ttl)
    srv.advance(0.5)
    assert (await srv.get(f"/room/{room}")).status == 404
    assert room not in inf.streams and room not in inf.pictures and not [k for k in inf.requests if k[0] == room]


async def test_plans_made_at_once_in_a_room_reach_it_in_the_order_of_their_ids(server):
    # Plan ids are drawn while planning and a device refuses a plan not newer than the newest it adopted: two
    # cameras asking at once once got plan 12 before plan 10 (the first plan took longer to make), and every
    # device refused plan 10. The hub makes one plan at a time per room, sending each before the next starts.
    ids = iter(range(10, 100))

    async def planner(room, requester, request, only_if_new=False, based_on=None):
        plan_id = next(ids)
        if plan_id == 10:  # the first request's plan takes longest
            await asyncio.sleep(0.3)
        return {"plan_id": plan_id, "source": requester}

    server.hub.planner = planner
    room = await server.new_room()
    a, b = await server.connect(), await server.connect()
    await a.join(room, "A")
    await b.join(room, "B")
    await a.send("plan_request")
    await asyncio.sleep(0.05)  # a's plan is being made
    await b.send("plan_request")
    got = [(await a.expect("plan"))["plan_id"], (await a.expect("plan"))["plan_id"]]
    assert got == [10, 11]
    assert [(await b.expect("plan"))["plan_id"], (await b.expect("plan"))["plan_id"]] == [10, 11]
    for _ in range(50):
        if not server.hub._plan_locks:
            break
        await asyncio.sleep(0.01)
    assert not server.hub._plan_locks  # nothing kept once the room's plans are made
