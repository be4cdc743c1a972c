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
import hmac
import logging
import os
import secrets
import time
from collections import Counter, deque
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
CLOSE_NO_JOIN = 4002  # no `join` within the deadline
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
    # Messages (and their bytes) waiting to be written to one socket before it counts as too slow and is dropped:
    # the bytes bound what one stuck client can pin (a roster of 16 peers with full profiles is about 70 KB).
    send_queue_limit: int = 2048
    send_queue_bytes: int = 2 * 1024 * 1024
    # A closing socket gets this long for its close handshake; then its transport is aborted.
    close_timeout: float = 2.0
    # A socket must send `join` within this many seconds of connecting (the browser joins on open).
    join_deadline: float = 10.0
    # WebSocket connections open at once: per client address, and in total.
    max_connections_per_client: int = 32
    max_connections: int = 1024
    # Room creation (`POST /` from the host page, `POST /api/rooms`): a token bucket per client address.
    room_rate: float = 0.2
    room_burst: float = 8.0
    # Client addresses whose room bucket is remembered (buckets that refilled are forgotten every tick).
    room_clients: int = 4096
    # Plans being made at once, in the whole server (one per requesting peer).
    max_plans: int = 4
    # A relayed binary frame waits at most this long for room in its receiver's queue, then is dropped.
    relay_wait: float = 5.0
    tick: float = 0.5
    limits: rooms.Limits = field(default_factory=rooms.Limits)


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now


class Connection:
    """One WebSocket: its bounded outbound queue, its budgets, and which peer (if any) it speaks for.

    `on_overflow(conn)` is called (once) when the queue is full: the hub then drops the socket as too slow.
    """

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.BaseTransport | None, client: str,
                 config: SignalingConfig, now: float, on_overflow: Callable[[Connection], None]):
        self.ws, self.transport, self.client = ws, transport, client
        self.config = config
        self.room: RoomId | None = None
        self.peer: PeerId | None = None
        self.opened_at = self.last_seen = now
        self.bucket = TokenBucket(config.rate, config.burst, now)
        self.strikes = TokenBucket(config.strike_refill, config.strike_budget, now)
        self.last_rate_error = -1e9
        self.out: deque[str | bytes | tuple[int, str]] = deque()
        self.queued_bytes = 0
        self._ready = asyncio.Event()
        self._drained = asyncio.Event()
        self.closing = False
        self.closing_since: float | None = None
        self.on_overflow = on_overflow
        loop = asyncio.get_running_loop()
        self.writer = loop.create_task(self._write())
        self.closer: asyncio.Task | None = None

    def send(self, message: dict | str) -> None:
        if self.closing:
            return
        text = message if isinstance(message, str) else protocol.encode(message)
        if len(self.out) >= self.config.send_queue_limit or \
                self.queued_bytes + len(text) > self.config.send_queue_bytes:
            self.on_overflow(self)
            return
        self.out.append(text)
        self.queued_bytes += len(text)
        self._ready.set()

    def send_bytes(self, frame: bytes) -> None:
        """Queue a relayed binary frame (the hub waited for room first: see `wait_room`)."""
        if self.closing:
            return
        self.out.append(frame)
        self.queued_bytes += len(frame)
        self._ready.set()

    async def wait_room(self, size: int, timeout: float) -> bool:
        """Wait until `size` more bytes fit below half the queue's byte limit; False on timeout or close. A relay
        sender waits here, so its own reads stop and TCP slows it to the receiver's pace."""
        limit = self.config.send_queue_bytes // 2
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.closing and self.queued_bytes + size > limit and self.out:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), left)
        return not self.closing

    def close(self, code: int, reason: str, now: float) -> None:
        """Close after everything already queued has been written (bounded: see `Hub.tick`)."""
        if self.closing:
            return
        self.closing, self.closing_since = True, now
        self.out.append((code, reason))
        self._ready.set()

    def abort(self, code: int, reason: str, now: float) -> None:
        """Drop the queue, try a close frame for `close_timeout` seconds, then cut the TCP connection."""
        if self.closer is not None:
            return
        self.closing = True
        self.closing_since = self.closing_since if self.closing_since is not None else now
        self.out.clear()
        self.queued_bytes = 0
        self._drained.set()
        self.writer.cancel()
        # Kept on self: the event loop holds only weak references to tasks.
        self.closer = asyncio.get_running_loop().create_task(self._close_or_abort(code, reason))

    def cut(self) -> None:
        """Abort the transport now: the reader sees the connection lost and the handler cleans up."""
        self.out.clear()
        self.queued_bytes = 0
        self.writer.cancel()
        if self.transport is not None:
            self.transport.abort()

    async def _close_or_abort(self, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()), self.config.close_timeout)
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            self.cut()

    async def _write(self) -> None:
        try:
            while True:
                if not self.out:
                    self._ready.clear()
                    await self._ready.wait()
                    continue
                item = self.out.popleft()
                if isinstance(item, tuple):
                    code, reason = item
                    await self.ws.close(code=code, message=reason.encode())
                    return
                self.queued_bytes -= len(item)
                if isinstance(item, bytes):
                    await self.ws.send_bytes(item)
                else:
                    await self.ws.send_str(item)
                if self.queued_bytes <= self.config.send_queue_bytes // 2:
                    self._drained.set()
        except (ConnectionError, RuntimeError):
            # The socket died under us; the reader side notices and cleans up.
            pass


class Hub:
    """`clock` (monotonic seconds) times everything: heartbeats, grace periods, room expiry, rate limits; `wall`
    (Unix seconds) only stamps `joined_at` for people to read. Tests pass a fake clock and call `tick()`."""

    def __init__(self, config: SignalingConfig | None = None, ice_servers: list[dict] | None = None, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.config = config or SignalingConfig()
        self.ice_servers = ice_servers or []
        self.clock, self.wall = clock, wall
        self.state = rooms.Rooms(limits=self.config.limits)
        self.attached: dict[PeerId, Connection] = {}
        self.pending: dict[PeerId, deque[str]] = {}
        self.connections: set[Connection] = set()
        self.per_client: Counter[str] = Counter()
        self.room_buckets: dict[str, TokenBucket] = {}
        self._janitor: asyncio.Task | None = None
        # Answers `plan_request`: async (room, requester, request) -> plan fields, or a list of them (one per
        # stream of a re-divided room); tilemesh.server.inference sets it.
        # Kept as a hook so signaling knows nothing of models; None means planning is off on this server.
        self.planner: Callable[[rooms.Room, PeerId, protocol.PlanRequest], Awaitable[dict]] | None = None
        self._plans: dict[PeerId, asyncio.Task] = {}
        # Sees every `frame_report` broadcast: (room, sender, data, now) -> (source, PlanRequest, running plan id)
        # when the source's plan should be made again (learned allocation), else None. None: nobody watches.
        self.observer: Callable[[rooms.Room, PeerId, dict, float], tuple | None] | None = None
        self._replans: dict[PeerId, asyncio.Task] = {}  # replans the observer asked for, one per source
        # One plan made at a time per room, and sent before the next starts: plan ids are drawn while planning,
        # and a device refuses a plan not newer than the newest it adopted, so two plans made at once (two cameras'
        # requests, a replan beside a request) must reach the devices in the order of their ids.
        self._plan_locks: dict[RoomId, tuple[asyncio.Lock, int]] = {}  # room -> (lock, tasks using it)
        self.room_closed: Callable[[RoomId], None] | None = None  # told when a room closes (its picture goes)
        # Given to this process's own edge peer (and nobody else): joining with it makes a relay member.
        # TILEMESH_RELAY_KEY sets it instead, for an edge in another process of the same host (benchmarks).
        self.relay_key = os.environ.get("TILEMESH_RELAY_KEY") or secrets.token_urlsafe(24)
        self.relayed_bytes = 0
        self._expiry: dict[RoomId, asyncio.TimerHandle] = {}  # fusion rooms: when their next view goes stale

    def set_labels(self, labels) -> None:
        """The served model's class names: fused answers name their classes, and views must hold one score each."""
        self.state = replace(self.state, labels=None if labels is None else tuple(labels))

    # --- used by the HTTP pages ---------------------------------------------------------------------------

    def create_room(self, client: str = "", fusion: protocol.FusionMode | None = None) -> RoomId:
        """A new room for `client` (its address), within its rate limit, in multi-view fusion mode when `fusion`
        is given; RoomError `rate_limited` or `server_full` otherwise."""
        now = self.clock()
        bucket = self.room_buckets.get(client)
        if bucket is None:
            if len(self.room_buckets) >= self.config.room_clients:
                self._forget_room_buckets(now)
            if len(self.room_buckets) >= self.config.room_clients:
                raise rooms.RoomError(protocol.RATE_LIMITED, "too many clients are opening rooms; try again soon")
            bucket = self.room_buckets[client] = TokenBucket(self.config.room_rate, self.config.room_burst, now)
        if not bucket.take(now):
            raise rooms.RoomError(protocol.RATE_LIMITED, "you opened rooms too quickly; try again in a minute")
        room_id = RoomId.new()
        self.state = rooms.open_room(self.state, room_id, now, fusion)
        log.info("room %s… opened%s", room_id[:6], " (fusion)" if fusion else "")
        return room_id

    def room_exists(self, room_id: RoomId) -> bool:
        return room_id in self.state.rooms

    def _forget_room_buckets(self, now: float) -> None:
        for client in [c for c, b in self.room_buckets.items() if b.full(now)]:
            del self.room_buckets[client]

    # --- the socket --------------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        client = request.remote or ""
        if len(self.connections) >= self.config.max_connections:
            return _refuse(f"this server already holds {self.config.max_connections} connections")
        if self.per_client[client] >= self.config.max_connections_per_client:
            return _refuse(f"at most {self.config.max_connections_per_client} connections per client address")
        # aiohttp's own ping/pong catches dead TCP connections; the app-level `ping` catches frozen pages.
        ws = web.WebSocketResponse(heartbeat=self.config.heartbeat * 2, max_msg_size=self.config.hard_cap)
        await ws.prepare(request)  # a request that is no WebSocket upgrade gets its HTTP error here
        conn = Connection(ws, request.transport, client, self.config, self.clock(), self._too_slow)
        self.connections.add(conn)
        self.per_client[client] += 1
        try:
            async for msg in ws:
                conn.last_seen = self.clock()
                if msg.type == WSMsgType.TEXT:
                    self._receive(conn, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await self._relay_binary(conn, msg.data)
                if conn.closing:
                    break
        finally:
            self.connections.discard(conn)
            self.per_client[client] -= 1
            if self.per_client[client] <= 0:
                del self.per_client[client]
            self._socket_gone(conn)
            await self._finish(conn)
        return ws

    async def _finish(self, conn: Connection) -> None:
        """Let queued messages and a close frame out for `close_timeout`, then cut; never waits longer."""
        if not conn.closing:
            conn.close(CLOSE_LEFT, "", self.clock())
        if conn.closer is None:
            _, stuck = await asyncio.wait({conn.writer}, timeout=self.config.close_timeout)
            if stuck:
                conn.cut()
        else:
            await asyncio.wait({conn.closer}, timeout=self.config.close_timeout * 2)
        conn.out.clear()
        if not conn.ws.closed:
            conn.cut()

    def _too_slow(self, conn: Connection) -> None:
        """The socket's queue is full: the client reads too slowly (or not at all). It leaves the room now,
        its queue is freed, and its transport is aborted if the close frame cannot get through in time."""
        if conn.closer is not None:
            return
        log.warning("peer %s reads too slowly; dropping its socket", conn.peer)
        room_id, peer_id = conn.room, conn.peer
        conn.peer = None
        conn.abort(WSCloseCode.POLICY_VIOLATION, "too slow", self.clock())
        if peer_id is not None and room_id is not None and self.attached.get(peer_id) is conn \
                and self.room_exists(room_id):
            self._remove(room_id, peer_id, "too_slow")

    def _receive(self, conn: Connection, text: str) -> None:
        now = self.clock()
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

    async def _relay_binary(self, conn: Connection, data: bytes) -> None:
        """Carry one mesh message to or from the server's edge peer (protocol: Relay); errors go to the sender."""
        try:
            to, payload = protocol.parse_relay_frame(data)
            if conn.peer is None or conn.room is None or not self.room_exists(conn.room):
                raise protocol.ProtocolError(protocol.NOT_JOINED, "send join first", "relay")
            room = self.state.room(conn.room)
            sender, target = room.peer(conn.peer), room.peer(PeerId(to))
            if target is None or sender is None:
                raise protocol.ProtocolError(protocol.UNKNOWN_PEER, f"no peer {to} in this room", "relay")
            if not (sender.relay or target.relay):
                raise protocol.ProtocolError(protocol.RELAY_REFUSED, "the server relays mesh messages only to and "
                                             "from its own edge peer; other peers talk over WebRTC", "relay")
            if len(payload) > protocol.MAX_RELAY_PAYLOAD:
                self._strike(conn, self.clock(), weight=10)
                raise protocol.ProtocolError(protocol.TOO_LARGE, f"relayed payload of {len(payload)} bytes; at most "
                                             f"{protocol.MAX_RELAY_PAYLOAD}", "relay")
            dest = self.attached.get(target.id)
            frame = protocol.relay_frame(conn.peer, payload)
            if dest is None or dest.closing or not await dest.wait_room(len(frame), self.config.relay_wait) \
                    or self.attached.get(target.id) is not dest:
                raise protocol.ProtocolError(protocol.PEER_UNAVAILABLE, f"peer {to} is not reading; message dropped",
                                             "relay")
        except protocol.ProtocolError as exc:
            conn.send(protocol.error(exc.code, exc.message, exc.ref))
            return
        dest.send_bytes(frame)
        self.relayed_bytes += len(payload)

    def _strike(self, conn: Connection, now: float, weight: int = 1) -> None:
        for _ in range(weight):
            if not conn.strikes.take(now):
                log.warning("closing abusive socket (peer %s)", conn.peer)
                conn.close(WSCloseCode.POLICY_VIOLATION, "too many oversized or rate-limited messages", now)
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
                if self.observer is not None and isinstance(data, dict) and data.get("kind") == "frame_report":
                    self._observe(conn.room, conn.peer, data)
            case protocol.PlanRequest():
                if self.planner is None:
                    raise protocol.ProtocolError(protocol.PLAN_FAILED, "this server has no planner")
                if conn.peer in self._plans:
                    raise protocol.ProtocolError(protocol.PLAN_FAILED, "your previous plan_request is still running")
                stale = self._replans.pop(conn.peer, None)
                if stale is not None:  # the source's own request supersedes a replan the server started for it
                    stale.cancel()
                if len(self._plans) >= self.config.max_plans:
                    raise protocol.ProtocolError(protocol.PLAN_FAILED, "the planner is busy; try again in a moment")
                # Planning takes up to a second of CPU: it runs beside the loop, never inside a message handler.
                peer = conn.peer
                task = asyncio.get_running_loop().create_task(self._plan(conn.room, peer, message))
                self._plans[peer] = task
                task.add_done_callback(lambda _: self._plans.pop(peer, None))
            case protocol.Leave():
                room, peer = conn.room, conn.peer
                self._remove(room, peer, "leave")
                conn.close(CLOSE_LEFT, "left", self.clock())
            case protocol.SetFusion(mode=mode):
                self.state, effects = rooms.set_fusion(self.state, conn.room, mode, self.clock())
                self._apply(effects)
            case protocol.View(stop=True):
                self.state, effects = rooms.drop_view(self.state, conn.room, conn.peer, self.clock())
                self._apply(effects)
            case protocol.View(scores=scores):
                self.state, effects = rooms.add_view(self.state, conn.room, conn.peer, scores, self.clock())
                self._apply(effects)

    def _apply(self, effects: list[rooms.ToRoom]) -> None:
        """Carry out the room state's effects (messages to a room), then time each touched room's next view expiry
        (a stale view leaves the fusion when its window ends, not at the next tick)."""
        for e in effects:
            if not self.room_exists(e.room):
                continue
            text = protocol.encode(e.message)
            for peer in self.state.room(e.room).peers:
                if peer.connected and not peer.relay:  # the server's own edge has no page to show it on
                    self._deliver(peer.id, text)
        for room_id in {e.room for e in effects}:
            self._arm_expiry(room_id)

    def _arm_expiry(self, room_id: RoomId) -> None:
        old = self._expiry.pop(room_id, None)
        if old is not None:
            old.cancel()
        room = self.state.rooms.get(room_id)
        due = room.views.next_expiry() if room is not None else None
        if due is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the loop (unit tests): the janitor's tick expires views instead
            return
        self._expiry[room_id] = loop.call_later(max(0.0, due - self.clock()) + 0.005, self._expire_views)

    def _expire_views(self) -> None:
        self.state, effects = rooms.expire_views(self.state, self.clock())
        self._apply(effects)

    def _observe(self, room_id: RoomId, sender: PeerId, data: dict) -> None:
        """A frame report for the observer; a replan it asks for runs like a plan request of the source's,
        and its plan goes out only if it differs from the running one."""
        due = self.observer(self.state.room(room_id), sender, data, self.clock())
        if due is None or self.planner is None:
            return
        source, request, based_on = due
        busy = len(self._plans) + len(self._replans)
        if (source in self._plans or source in self._replans or busy >= self.config.max_plans
                or self.state.room(room_id).peer(source) is None):
            return
        task = asyncio.get_running_loop().create_task(
            self._plan(room_id, source, request, only_if_new=True, based_on=based_on))
        self._replans[source] = task
        task.add_done_callback(lambda t: self._replans.pop(source, None) if self._replans.get(source) is t else None)

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
                old.close(CLOSE_REPLACED, "resumed on another socket", self.clock())
        else:
            relay = join.relay_key is not None
            if relay and not hmac.compare_digest(join.relay_key.encode(), self.relay_key.encode()):
                raise protocol.ProtocolError(protocol.BAD_RELAY_KEY, "wrong relay_key", "join")
            peer_id, resumed = PeerId.new(), False
            peer = rooms.Member(id=peer_id, name=join.name, kind=join.kind, token=ResumeToken.new(),
                                joined_at=round(self.wall(), 3), relay=relay)
            self.state = rooms.add_peer(self.state, join.room, peer)
        conn.room, conn.peer = join.room, peer_id
        self.attached[peer_id] = conn
        room = self.state.room(join.room)
        self._send_roster(join.room, exclude=peer_id)
        conn.send(protocol.welcome(peer_id, join.room, room.roster(), self.ice_servers,
                                   room.peer(peer_id).token, resumed, self.config.heartbeat, room.fusion))
        for text in self.pending.pop(peer_id, ()):
            conn.send(text)
        log.info("peer %s %s room %s… (%d peers)", peer_id, "resumed" if resumed else "joined", join.room[:6],
                 len(room.peers))

    async def _plan(self, room_id: RoomId, requester: PeerId, request: protocol.PlanRequest,
                    only_if_new: bool = False, based_on: int | None = None) -> None:
        lock, users = self._plan_locks.get(room_id, (None, 0))
        lock = lock or asyncio.Lock()
        self._plan_locks[room_id] = (lock, users + 1)
        try:
            async with lock:
                await self._plan_now(room_id, requester, request, only_if_new, based_on)
        finally:
            lock, users = self._plan_locks[room_id]
            if users <= 1:
                del self._plan_locks[room_id]
            else:
                self._plan_locks[room_id] = (lock, users - 1)

    async def _plan_now(self, room_id: RoomId, requester: PeerId, request: protocol.PlanRequest,
                        only_if_new: bool, based_on: int | None) -> None:
        try:
            if only_if_new:
                fields = await self.planner(self.state.room(room_id), requester, request, only_if_new=True,
                                            based_on=based_on)
                if fields is None:
                    return
            else:
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
        for one in fields if isinstance(fields, list) else [fields]:  # a re-division answers several streams
            text = protocol.encode(protocol.plan(one))
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
        if conn is None and not any(peer_id == p.id for r in self.state.rooms.values() for p in r.peers):
            return False  # a removed peer's messages go nowhere (its queue would never be freed)
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
        self.state = rooms.detach_peer(self.state, room_id, peer_id, self.clock())
        self._send_roster(room_id)
        self.state, effects = rooms.drop_view(self.state, room_id, peer_id, self.clock())  # a lost view leaves now
        self._apply(effects)

    def _remove(self, room_id: RoomId, peer_id: PeerId, reason: str) -> None:
        self.state = rooms.remove_peer(self.state, room_id, peer_id, self.clock())
        self.attached.pop(peer_id, None)
        self.pending.pop(peer_id, None)
        notice = protocol.encode(protocol.peer_left(peer_id, reason))
        for peer in self.state.room(room_id).peers:
            self._deliver(peer.id, notice)
        self._send_roster(room_id)
        self.state, effects = rooms.drop_view(self.state, room_id, peer_id, self.clock())
        self._apply(effects)
        log.info("peer %s left room %s… (%s)", peer_id, room_id[:6], reason)

    def _send_roster(self, room_id: RoomId, exclude: PeerId | None = None) -> None:
        room = self.state.room(room_id)
        text = protocol.encode(protocol.roster(room.roster()))
        for peer in room.peers:
            if peer.id != exclude and peer.connected:
                self._deliver(peer.id, text)

    # --- time-driven events -------------------------------------------------------------------------------

    def tick(self) -> None:
        """Drop silent sockets and sockets that never joined, cut sockets stuck closing, expire peers past their
        resume grace, close long-empty rooms, forget refilled room-creation buckets."""
        now = self.clock()
        silence = self.config.heartbeat * self.config.heartbeat_misses
        for conn in list(self.connections):
            if conn.closing:
                # A close waits on the client to read what was queued; a client that never reads would hold it
                # (and its queue) forever.
                if conn.closing_since is not None and now - conn.closing_since >= self.config.close_timeout:
                    conn.cut()
                continue
            if conn.peer is None and now - conn.opened_at >= self.config.join_deadline:
                conn.close(CLOSE_NO_JOIN, "join first", now)
                continue
            if now - conn.last_seen < silence:
                continue
            room_id, peer_id = conn.room, conn.peer
            conn.peer = None
            if peer_id is not None and self.attached.get(peer_id) is conn:
                self._remove(room_id, peer_id, "timeout")
            conn.close(CLOSE_TIMEOUT, "missed heartbeats", now)
        for room_id, peer_id in rooms.expired_detached(self.state, now, self.config.resume_grace):
            self._remove(room_id, peer_id, "disconnected")
        self.state, effects = rooms.expire_views(self.state, now)
        self._apply(effects)
        self.state, closed = rooms.close_idle_rooms(self.state, now, self.config.room_ttl)
        for room_id in closed:
            timer = self._expiry.pop(room_id, None)
            if timer is not None:
                timer.cancel()
            log.info("room %s… closed after %g s empty", room_id[:6], self.config.room_ttl)
            if self.room_closed is not None:
                self.room_closed(room_id)
        self._forget_room_buckets(now)

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
            conn.close(WSCloseCode.GOING_AWAY, "server shutting down", self.clock())

    async def on_cleanup(self, app: web.Application) -> None:
        for task in list(self._plans.values()):
            task.cancel()
        for timer in self._expiry.values():
            timer.cancel()
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor


def _refuse(message: str) -> web.Response:
    """Over the connection caps: refused before the upgrade, cheaply (a browser's WebSocket then retries)."""
    return web.json_response({"error": protocol.TOO_MANY_CONNECTIONS, "message": message}, status=503,
                             headers={"Retry-After": "5"})


HUB_KEY = web.AppKey("signaling_hub", Hub)


def setup(app: web.Application, config: SignalingConfig | None = None, *,
          clock: Callable[[], float] = time.monotonic) -> Hub:
    hub = Hub(config, app[CONFIG_KEY].ice_servers, clock=clock)
    app[HUB_KEY] = hub
    app.router.add_get("/ws", hub.handle)
    app.on_startup.append(hub.on_startup)
    app.on_shutdown.append(hub.on_shutdown)
    app.on_cleanup.append(hub.on_cleanup)
    return hub


def configure(app: web.Application, config: SignalingConfig, clock: Callable[[], float] | None = None) -> Hub:
    """Swap in other timeouts and limits (tests use short ones), and a clock, before the app starts serving."""
    hub = app[HUB_KEY]
    hub.config = config
    if clock is not None:
        hub.clock = clock
    hub.state = replace(hub.state, limits=config.limits)
    return hub
