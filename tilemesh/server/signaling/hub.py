"""The signaling WebSocket at `/ws`: sockets, heartbeats, limits and queues around the pure room state.

`Hub` is the only owner of I/O. Each event (a message, a closed socket, a janitor tick) becomes one pure call
in `tilemesh.server.signaling.rooms`; the hub swaps in the new state and then tells the room what changed. The
wire format and its rules are documented in `tilemesh.server.signaling.protocol`.

Every socket gets its own outbound queue and writer task, so a slow phone never stalls a broadcast to the
others, and the messages one socket sees keep the order in which the hub produced them. That ordering is what
lets the offer rule work: existing peers receive the new roster before the newcomer receives `welcome`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from aiohttp import WSCloseCode, WSMsgType, web

from tilemesh.server.context import CONFIG_KEY
from tilemesh.server.signaling import protocol, rooms
from tilemesh.server.signaling.ids import PeerId, ResumeToken, RoomId

log = logging.getLogger("tilemesh.signaling")

# Application close codes (4000-4999 are ours by RFC 6455); the browser client reads them to decide whether
# reconnecting makes sense.
CLOSE_REPLACED = 4000  # another socket resumed this peer
CLOSE_TIMEOUT = 4001  # missed heartbeats
CLOSE_LEFT = 1000


@dataclass
class SignalingConfig:
    # Seconds between the client's `ping`s (sent to clients in `welcome`); `heartbeat_misses` of silence drop it.
    heartbeat: float = 2.0
    heartbeat_misses: int = 3
    # How long a peer whose socket closed without `leave` may come back with `resume`.
    resume_grace: float = 3.0
    # How long a room outlives its last peer (a fresh room counts as empty from its creation).
    room_ttl: float = 600.0
    rate: float = 50.0
    burst: float = 200.0
    # Oversized and rate-limited messages are strikes; a socket that exhausts this budget is closed.
    strike_budget: float = 100.0
    strike_refill: float = 1.0
    # Frames above this are cut off by aiohttp itself (close 1009); between it and the protocol limit the
    # client gets a polite `too_large`.
    hard_cap: int = 1024 * 1024
    # Relayed messages kept for a peer that is reconnecting.
    pending_limit: int = 256
    # Messages waiting to be written to one socket before it counts as too slow and is dropped.
    send_queue_limit: int = 2048
    tick: float = 0.5
    limits: rooms.Limits = field(default_factory=rooms.Limits)


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Connection:
    """One WebSocket: its outbound queue, its budget, and which peer (if any) it speaks for."""

    def __init__(self, ws: web.WebSocketResponse, config: SignalingConfig, now: float):
        self.ws = ws
        self.room: RoomId | None = None
        self.peer: PeerId | None = None
        self.last_seen = now
        self.bucket = TokenBucket(config.rate, config.burst, now)
        self.strikes = TokenBucket(config.strike_refill, config.strike_budget, now)
        self.last_rate_error = -1e9
        self.out: asyncio.Queue[str | tuple[int, str]] = asyncio.Queue(config.send_queue_limit)
        self.closing = False
        self.writer = asyncio.get_running_loop().create_task(self._write())

    def send(self, message: dict | str) -> None:
        if self.closing:
            return
        text = message if isinstance(message, str) else protocol.encode(message)
        try:
            self.out.put_nowait(text)
        except asyncio.QueueFull:
            log.warning("peer %s reads too slowly; dropping its socket", self.peer)
            self._close_now(WSCloseCode.POLICY_VIOLATION, "too slow")

    def close(self, code: int, reason: str) -> None:
        """Close after everything already queued has been written."""
        if self.closing:
            return
        try:
            self.out.put_nowait((code, reason))
            self.closing = True
        except asyncio.QueueFull:
            self._close_now(code, reason)

    def _close_now(self, code: int, reason: str) -> None:
        self.closing = True
        self.writer.cancel()
        # Kept on self: the event loop holds only weak references to tasks.
        self.closer = asyncio.get_running_loop().create_task(self.ws.close(code=code, message=reason.encode()))

    async def _write(self) -> None:
        try:
            while True:
                item = await self.out.get()
                if isinstance(item, tuple):
                    code, reason = item
                    await self.ws.close(code=code, message=reason.encode())
                    return
                await self.ws.send_str(item)
        except (ConnectionError, RuntimeError):
            # The socket died under us; the reader side notices and cleans up.
            pass


class Hub:
    def __init__(self, config: SignalingConfig | None = None, ice_servers: list[dict] | None = None):
        self.config = config or SignalingConfig()
        self.ice_servers = ice_servers or []
        self.state = rooms.Rooms(limits=self.config.limits)
        self.attached: dict[PeerId, Connection] = {}
        self.pending: dict[PeerId, deque[str]] = {}
        self.connections: set[Connection] = set()
        self._janitor: asyncio.Task | None = None
        # Answers `plan_request`: async (room, requester, request) -> plan fields (tilemesh.server.inference sets it).
        # Kept as a hook so signaling knows nothing of models; None means planning is off on this server.
        self.planner: Callable[[rooms.Room, PeerId, protocol.PlanRequest], Awaitable[dict]] | None = None
        self._plans: set[asyncio.Task] = set()

    # --- used by the HTTP pages ---------------------------------------------------------------------------

    def create_room(self) -> RoomId:
        room_id = RoomId.new()
        self.state = rooms.open_room(self.state, room_id, time.time())
        log.info("room %s… opened", room_id[:6])
        return room_id

    def room_exists(self, room_id: RoomId) -> bool:
        return room_id in self.state.rooms

    # --- the socket --------------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        # aiohttp's own ping/pong catches dead TCP connections; the app-level `ping` catches frozen pages.
        ws = web.WebSocketResponse(heartbeat=self.config.heartbeat * 2, max_msg_size=self.config.hard_cap)
        await ws.prepare(request)
        loop = asyncio.get_running_loop()
        conn = Connection(ws, self.config, loop.time())
        self.connections.add(conn)
        try:
            async for msg in ws:
                conn.last_seen = loop.time()
                if msg.type == WSMsgType.TEXT:
                    self._receive(conn, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    conn.send(protocol.error(protocol.BAD_MESSAGE, "binary frames are not part of the protocol"))
                if conn.closing:
                    break
        finally:
            self.connections.discard(conn)
            self._socket_gone(conn)
            if not conn.closing:
                conn.closing = True
                conn.writer.cancel()
            # A dead client can leave the writer stuck in drain; do not hold the handler hostage to it.
            _, stuck = await asyncio.wait({conn.writer}, timeout=5)
            for task in stuck:
                task.cancel()
            if not ws.closed:
                await ws.close()
        return ws

    def _receive(self, conn: Connection, text: str) -> None:
        now = asyncio.get_running_loop().time()
        if not conn.bucket.take(now):
            # One error per second at most: answering every dropped message would amplify the flood.
            if now - conn.last_rate_error >= 1.0:
                conn.last_rate_error = now
                conn.send(protocol.error(protocol.RATE_LIMITED,
                                         f"more than {self.config.rate:g} messages/s; message dropped"))
            self._strike(conn, now)
            return
        try:
            message = protocol.parse(text)
        except protocol.ProtocolError as exc:
            if exc.code == protocol.TOO_LARGE:
                self._strike(conn, now, weight=10)
            conn.send(protocol.error(exc.code, exc.message, exc.ref))
            return
        try:
            self._dispatch(conn, message)
        except (protocol.ProtocolError, rooms.RoomError) as exc:
            conn.send(protocol.error(exc.code, exc.message, protocol.type_of(message)))

    def _strike(self, conn: Connection, now: float, weight: int = 1) -> None:
        for _ in range(weight):
            if not conn.strikes.take(now):
                log.warning("closing abusive socket (peer %s)", conn.peer)
                conn.close(WSCloseCode.POLICY_VIOLATION, "too many oversized or rate-limited messages")
                return

    def _dispatch(self, conn: Connection, message: protocol.ClientMessage) -> None:
        if isinstance(message, protocol.Ping):
            conn.send(protocol.pong())
            return
        if isinstance(message, protocol.Join):
            self._on_join(conn, message)
            return
        if conn.peer is None or conn.room is None:
            raise protocol.ProtocolError(protocol.NOT_JOINED, "send join first")
        match message:
            case protocol.State():
                self.state = rooms.set_state(self.state, conn.room, conn.peer, message)
                self._send_roster(conn.room)
            case protocol.Signal(to=to, data=data):
                self._relay(conn, to, protocol.signal_from(conn.peer, data))
            case protocol.Broadcast(data=data):
                text = protocol.encode(protocol.broadcast_from(conn.peer, data))
                for peer in self.state.room(conn.room).peers:
                    if peer.id != conn.peer:
                        self._deliver(peer.id, text)
            case protocol.PlanRequest():
                if self.planner is None:
                    raise protocol.ProtocolError(protocol.PLAN_FAILED, "this server has no planner")
                # Planning takes up to a second of CPU: it runs beside the loop, never inside a message handler.
                task = asyncio.get_running_loop().create_task(self._plan(conn.room, conn.peer, message))
                self._plans.add(task)
                task.add_done_callback(self._plans.discard)
            case protocol.Leave():
                room, peer = conn.room, conn.peer
                self._remove(room, peer, "leave")
                conn.close(CLOSE_LEFT, "left")

    def _on_join(self, conn: Connection, join: protocol.Join) -> None:
        if conn.peer is not None:
            raise protocol.ProtocolError(protocol.ALREADY_JOINED, "this socket already joined a room")
        room = self.state.room(join.room)
        if join.resume is not None:
            self.state = rooms.resume_peer(self.state, join.room, join.resume, join.token)
            peer_id, resumed = join.resume, True
            old = self.attached.get(peer_id)
            if old is not None and old is not conn:
                old.peer = None  # so its close handler does not detach the peer we just resumed
                old.close(CLOSE_REPLACED, "resumed on another socket")
        else:
            peer_id, resumed = PeerId.new(), False
            peer = rooms.Member(id=peer_id, name=join.name, kind=join.kind, token=ResumeToken.new(),
                              joined_at=round(time.time(), 3))
            self.state = rooms.add_peer(self.state, join.room, peer)
        conn.room, conn.peer = join.room, peer_id
        self.attached[peer_id] = conn
        room = self.state.room(join.room)
        self._send_roster(join.room, exclude=peer_id)
        conn.send(protocol.welcome(peer_id, join.room, room.roster(), self.ice_servers,
                                   room.peer(peer_id).token, resumed, self.config.heartbeat))
        for text in self.pending.pop(peer_id, ()):
            conn.send(text)
        log.info("peer %s %s room %s… (%d peers)", peer_id, "resumed" if resumed else "joined", join.room[:6],
                 len(room.peers))

    async def _plan(self, room_id: RoomId, requester: PeerId, request: protocol.PlanRequest) -> None:
        try:
            fields = await self.planner(self.state.room(room_id), requester, request)
        except (rooms.RoomError, protocol.ProtocolError, ValueError) as exc:
            self._deliver(requester, protocol.encode(protocol.error(protocol.PLAN_FAILED, str(exc), "plan_request")))
            return
        except Exception as exc:  # noqa: BLE001  (a planner bug must reach the requester, not kill the hub)
            log.exception("planner failed for room %s…", room_id[:6])
            text = protocol.encode(protocol.error(protocol.PLAN_FAILED, f"planner error: {exc}", "plan_request"))
            self._deliver(requester, text)
            return
        if not self.room_exists(room_id):
            return
        text = protocol.encode(protocol.plan(fields))
        for peer in self.state.room(room_id).peers:
            self._deliver(peer.id, text)

    def _relay(self, conn: Connection, to: PeerId, message: dict) -> None:
        room = self.state.room(conn.room)
        if room.peer(to) is None:
            raise rooms.RoomError(protocol.UNKNOWN_PEER, f"no peer {to} in this room")
        if not self._deliver(to, protocol.encode(message)):
            raise rooms.RoomError(protocol.PEER_UNAVAILABLE,
                                  f"peer {to} is reconnecting and has too many messages waiting")

    def _deliver(self, peer_id: PeerId, text: str) -> bool:
        """Send now, or queue while the peer is between sockets; False when that queue is full."""
        conn = self.attached.get(peer_id)
        if conn is not None and not conn.closing:
            conn.send(text)
            return True
        queue = self.pending.setdefault(peer_id, deque())
        if len(queue) >= self.config.pending_limit:
            return False
        queue.append(text)
        return True

    def _socket_gone(self, conn: Connection) -> None:
        peer_id, room_id = conn.peer, conn.room
        if peer_id is None or room_id is None or self.attached.get(peer_id) is not conn:
            return
        del self.attached[peer_id]
        if not self.room_exists(room_id) or self.state.room(room_id).peer(peer_id) is None:
            return
        self.state = rooms.detach_peer(self.state, room_id, peer_id, time.time())
        self._send_roster(room_id)

    def _remove(self, room_id: RoomId, peer_id: PeerId, reason: str) -> None:
        self.state = rooms.remove_peer(self.state, room_id, peer_id, time.time())
        self.attached.pop(peer_id, None)
        self.pending.pop(peer_id, None)
        notice = protocol.encode(protocol.peer_left(peer_id, reason))
        for peer in self.state.room(room_id).peers:
            self._deliver(peer.id, notice)
        self._send_roster(room_id)
        log.info("peer %s left room %s… (%s)", peer_id, room_id[:6], reason)

    def _send_roster(self, room_id: RoomId, exclude: PeerId | None = None) -> None:
        room = self.state.room(room_id)
        text = protocol.encode(protocol.roster(room.roster()))
        for peer in room.peers:
            if peer.id != exclude and peer.connected:
                self._deliver(peer.id, text)

    # --- time-driven events -------------------------------------------------------------------------------

    def tick(self) -> None:
        """Drop silent sockets, expire peers past their resume grace, close long-empty rooms."""
        loop_now, now = asyncio.get_running_loop().time(), time.time()
        silence = self.config.heartbeat * self.config.heartbeat_misses
        for conn in list(self.connections):
            if conn.closing or loop_now - conn.last_seen < silence:
                continue
            room_id, peer_id = conn.room, conn.peer
            conn.peer = None
            if peer_id is not None and self.attached.get(peer_id) is conn:
                self._remove(room_id, peer_id, "timeout")
            conn.close(CLOSE_TIMEOUT, "missed heartbeats")
        for room_id, peer_id in rooms.expired_detached(self.state, now, self.config.resume_grace):
            self._remove(room_id, peer_id, "disconnected")
        self.state, closed = rooms.close_idle_rooms(self.state, now, self.config.room_ttl)
        for room_id in closed:
            log.info("room %s… closed after %g s empty", room_id[:6], self.config.room_ttl)

    async def _run_janitor(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick)
            try:
                self.tick()
            except Exception:  # a bug in one tick must not stop heartbeats for the whole server
                log.exception("signaling janitor tick failed")

    async def on_startup(self, app: web.Application) -> None:
        self._janitor = asyncio.get_running_loop().create_task(self._run_janitor())

    async def on_shutdown(self, app: web.Application) -> None:
        for conn in list(self.connections):
            conn.close(WSCloseCode.GOING_AWAY, "server shutting down")

    async def on_cleanup(self, app: web.Application) -> None:
        for task in list(self._plans):
            task.cancel()
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor


HUB_KEY = web.AppKey("signaling_hub", Hub)


def setup(app: web.Application, config: SignalingConfig | None = None) -> Hub:
    hub = Hub(config, app[CONFIG_KEY].ice_servers)
    app[HUB_KEY] = hub
    app.router.add_get("/ws", hub.handle)
    app.on_startup.append(hub.on_startup)
    app.on_shutdown.append(hub.on_shutdown)
    app.on_cleanup.append(hub.on_cleanup)
    return hub


def configure(app: web.Application, config: SignalingConfig) -> Hub:
    """Swap in other timeouts and limits (tests use short ones) before the app starts serving."""
    hub = app[HUB_KEY]
    hub.config = config
    hub.state = replace(hub.state, limits=config.limits)
    return hub
