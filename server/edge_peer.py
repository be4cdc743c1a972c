"""The edge peer: the server joins a room as one more device, with aiortc data channels and CPython numpy.

It speaks the same signaling protocol as the browsers, as a real WebSocket client of `/ws` (so it cannot
depend on server internals the browsers do not have), and the same mesh conventions as `web/mesh.js`:

- one RTCPeerConnection per remote peer, no ICE servers unless the room's `welcome` lists some (aiortc's
  default adds a public STUN server and stalls);
- the newcomer offers to everyone in its `welcome`, existing peers answer;
- one ordered binary data channel per pair, pre-negotiated with id 0 (`negotiated: true`), so neither side
  waits for an in-band open;
- signal `data` is `{"kind": "offer"|"answer", "sdp"}`, `{"kind": "candidate", "candidate", "sdpMid",
  "sdpMLineIndex"}` (trickled by browsers; aiortc puts all of its candidates in the SDP), `{"kind": "bye"}`,
  or `{"kind": "hello"}`: "I have no connection to you, offer again" (a mesh created after its page joined);
- messages are at most the remote's advertised `a=max-message-size` (aiortc refuses larger ones itself) and
  sends wait on `bufferedamountlow` above a high-water mark instead of queueing without bound.

Binary messages starting with the wire magic are reassembled per sender (`peer_runtime.wire.Inbox`) and
handed to `on_tensor(peer_id, Received)`; anything else goes to `on_message(peer_id, bytes)`.

`EdgeManager` (started by `tilemesh serve --edge`) keeps one `EdgePeer` in every room that has a device in
it, and records what each received, which the `/diag/mesh` diagnostics page shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp

from peer_runtime import wire

log = logging.getLogger("tilemesh.edge")

CHANNEL_ID = 0
CHANNEL_LABEL = "tilemesh"
# Sends pause above HIGH_WATER buffered bytes and resume below LOW_WATER: a few chunks in flight keep SCTP busy
# without letting a fast producer pile megabytes into the association's queue.
HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024
# RFC 8841: without a max-message-size attribute the remote accepts 64 KiB.
DEFAULT_REMOTE_MAX_MESSAGE = 65536
_MAX_MSG_RE = re.compile(r"^a=max-message-size:(\d+)", re.M)


class PeerGone(ConnectionError):
    """The remote peer left (or its connection failed) before a send completed."""


def remote_max_message_size(sdp: str) -> int:
    m = _MAX_MSG_RE.search(sdp)
    if not m:
        return DEFAULT_REMOTE_MAX_MESSAGE
    value = int(m.group(1))
    # 0 means "any size"; the browser still refuses a single send above 256 KiB, so cap there.
    return wire.DEFAULT_MAX_MESSAGE if value == 0 else min(value, wire.DEFAULT_MAX_MESSAGE)


def ice_servers_from(entries: list[dict]) -> list[RTCIceServer]:
    return [RTCIceServer(urls=e["urls"], username=e.get("username"), credential=e.get("credential"))
            for e in entries or []]


class Link:
    """One remote peer: its RTCPeerConnection and the pre-negotiated data channel."""

    def __init__(self, owner: EdgePeer, remote: str):
        self.owner, self.remote = owner, remote
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=ice_servers_from(owner.ice_servers)))
        self.channel = self.pc.createDataChannel(CHANNEL_LABEL, negotiated=True, id=CHANNEL_ID, ordered=True)
        self.channel.bufferedAmountLowThreshold = LOW_WATER
        self.max_message = DEFAULT_REMOTE_MAX_MESSAGE
        self.opened = asyncio.Event()
        self.gone = asyncio.Event()
        self._low = asyncio.Event()
        self._remote_set = False
        self._early_candidates: list[dict] = []
        self.state = "new"
        self.channel.on("open", self._on_open)
        self.channel.on("close", lambda: self.owner._drop(self.remote, "channel closed", only=self))
        self.channel.on("message", lambda data: self.owner._on_data(self.remote, data))
        self.channel.on("bufferedamountlow", self._low.set)
        self.pc.on("connectionstatechange", self._on_state)

    def _on_open(self) -> None:
        self.opened.set()
        self._set_state("open")

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.owner._emit_peer(self.remote, state)

    async def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self.owner._drop(self.remote, f"connection {self.pc.connectionState}", only=self)
        elif self.pc.connectionState == "connecting" and self.state == "new":
            self._set_state("connecting")

    async def offer(self) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.owner._signal(self.remote, {"kind": "offer", "sdp": self.pc.localDescription.sdp})

    async def on_signal(self, data: dict) -> None:
        kind = data.get("kind")
        if kind in ("offer", "answer"):
            sdp = data.get("sdp")
            if not isinstance(sdp, str):
                raise ValueError("offer/answer without sdp")
            self.max_message = remote_max_message_size(sdp)
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
            self._remote_set = True
            if kind == "offer":
                await self.pc.setLocalDescription(await self.pc.createAnswer())
                self.owner._signal(self.remote, {"kind": "answer", "sdp": self.pc.localDescription.sdp})
            for c in self._early_candidates:
                await self._add_candidate(c)
            self._early_candidates.clear()
        elif kind == "candidate":
            if self._remote_set:
                await self._add_candidate(data)
            else:
                self._early_candidates.append(data)
        elif kind == "bye":
            self.owner._drop(self.remote, "bye", only=self)

    async def _add_candidate(self, data: dict) -> None:
        text = data.get("candidate") or ""
        if not text:
            return  # end-of-candidates: aiortc needs no marker once the SDP is set
        cand = candidate_from_sdp(text.split(":", 1)[1] if text.startswith("candidate:") else text)
        cand.sdpMid = data.get("sdpMid")
        cand.sdpMLineIndex = data.get("sdpMLineIndex")
        await self.pc.addIceCandidate(cand)

    async def send(self, data: bytes) -> None:
        if len(data) > self.max_message:
            raise ValueError(f"{len(data)}-byte message; {self.remote} accepts at most {self.max_message}")
        if not self.opened.is_set():
            await self._wait(self.opened)
        while self.channel.bufferedAmount > HIGH_WATER:
            self._low.clear()
            await self._wait(self._low)
        if self.gone.is_set() or self.channel.readyState != "open":
            raise PeerGone(self.remote)
        self.channel.send(data)

    async def _wait(self, event: asyncio.Event) -> None:
        waiter = asyncio.ensure_future(event.wait())
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            gone.cancel()
        if self.gone.is_set():
            raise PeerGone(self.remote)

    async def close(self) -> None:
        self.gone.set()
        await self.pc.close()


TensorHandler = Callable[[str, wire.Received], Awaitable[None] | None]
MessageHandler = Callable[[str, bytes], Awaitable[None] | None]
PeerHandler = Callable[[str, str], None]


class EdgePeer:
    """A room member over a WebSocket to `/ws` and aiortc links to every other member."""

    def __init__(
        self,
        ws_url: str,
        room: str,
        *,
        name: str = "edge",
        kind: str = "edge",
        ssl_context: ssl.SSLContext | bool | None = None,
        on_tensor: TensorHandler | None = None,
        on_message: MessageHandler | None = None,
        on_peer: PeerHandler | None = None,
        window: int = 4,
    ):
        self.ws_url, self.room, self.name, self.kind = ws_url, room, name, kind
        self.ssl_context = ssl_context
        self.on_tensor, self.on_message, self.on_peer = on_tensor, on_message, on_peer
        self.inbox = wire.Inbox(window=window)
        self.links: dict[str, Link] = {}
        self.roster: list[dict] = []
        self.peer_id: str | None = None
        self.ice_servers: list[dict] = []
        self.wire_errors = 0
        self.closed = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks: set[asyncio.Task] = set()
        self._welcome = asyncio.Event()
        self._heartbeat = 10.0

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> EdgePeer:
        self._session = aiohttp.ClientSession()
        try:
            verify = True if self.ssl_context is None else self.ssl_context
            self._ws = await self._session.ws_connect(self.ws_url, ssl=verify, heartbeat=None)
            await self._send_ws({"type": "join", "room": self.room, "name": self.name, "kind": self.kind})
            self._spawn(self._read_loop())
            await asyncio.wait_for(self._welcome.wait(), timeout)
        except BaseException:
            await self.close()
            raise
        if self.peer_id is None:
            await self.close()
            raise ConnectionError(f"could not join room {self.room}")
        self._spawn(self._heartbeat_loop())
        return self

    async def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        if self._ws is not None and not self._ws.closed:
            with contextlib.suppress(Exception):
                await self._send_ws({"type": "leave"})
                await self._ws.close()
        links = list(self.links.values())
        self.links.clear()
        for link in links:
            link.gone.set()
            self._emit_peer(link.remote, "gone")
        await asyncio.gather(*(link.pc.close() for link in links), return_exceptions=True)
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.gather(*[t for t in self._tasks if t is not asyncio.current_task()], return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("edge peer task failed: %r", task.exception())

    # --- signaling ---------------------------------------------------------------------------------------

    async def _send_ws(self, msg: dict) -> None:
        assert self._ws is not None
        await self._ws.send_str(json.dumps({"v": 1, **msg}, separators=(",", ":")))

    def _signal(self, to: str, data: dict) -> None:
        if not self.closed.is_set():
            self._spawn(self._send_ws({"type": "signal", "to": to, "data": data}))

    async def _heartbeat_loop(self) -> None:
        while not self.closed.is_set():
            await asyncio.sleep(self._heartbeat)
            await self._send_ws({"type": "ping"})

    async def _read_loop(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                try:
                    await self._on_ws(json.loads(msg.data))
                except Exception:  # noqa: BLE001 (one bad signal must not end the peer)
                    log.exception("edge peer: handling %s", msg.data[:200])
        finally:
            self._welcome.set()
            if not self.closed.is_set():
                self._spawn(self.close())

    async def _on_ws(self, msg: dict) -> None:
        t = msg.get("type")
        if t == "welcome":
            self.peer_id = msg["peer_id"]
            self.ice_servers = msg.get("ice_servers") or []
            self._heartbeat = float(msg.get("heartbeat") or 10.0)
            self.roster = msg.get("peers", [])
            self._welcome.set()
            # Offer rule: the newcomer offers to everyone already here.
            for p in self.roster:
                if p["id"] != self.peer_id:
                    link = self._link(p["id"])
                    self._spawn(link.offer())
        elif t == "roster":
            self.roster = msg.get("peers", [])
        elif t == "signal":
            remote = msg.get("from")
            data = msg.get("data") or {}
            if not remote or remote == self.peer_id:
                return
            if data.get("kind") == "hello":
                # The remote's mesh started after our offer went out and lost it: offer again.
                self._drop(remote, "hello")
                self._spawn(self._link(remote).offer())
                return
            link = self.links.get(remote)
            if link is None:
                if data.get("kind") != "offer":
                    return  # candidates for a link we already dropped
                link = self._link(remote)
            await link.on_signal(data)
        elif t == "peer_left":
            self._drop(msg.get("id"), f"left ({msg.get('reason')})")
        elif t == "error":
            log.warning("signaling error: %s", msg)
            if not self._welcome.is_set():
                self._welcome.set()

    # --- links -------------------------------------------------------------------------------------------

    def _link(self, remote: str) -> Link:
        link = self.links.get(remote)
        if link is None:
            link = self.links[remote] = Link(self, remote)
        return link

    def _drop(self, remote: str | None, reason: str, only: Link | None = None) -> None:
        """Forget the link to `remote`; with `only`, just if it is still that link (not a newer one)."""
        link = self.links.get(remote) if remote else None
        if link is None or (only is not None and link is not only):
            return
        del self.links[remote]
        log.info("edge peer %s: %s gone (%s)", self.peer_id, remote, reason)
        link.gone.set()
        self.inbox.forget(remote)
        self._emit_peer(remote, "gone")
        self._spawn(link.close())

    def _emit_peer(self, remote: str, state: str) -> None:
        if self.on_peer is not None:
            self.on_peer(remote, state)

    def _on_data(self, remote: str, data: bytes | str) -> None:
        if isinstance(data, str):
            return  # the mesh is binary only
        if data[:4] == wire.MAGIC:
            try:
                got = self.inbox.feed(remote, data)
            except wire.WireError as exc:
                self.wire_errors += 1
                log.warning("bad chunk from %s: %s", remote, exc)
                return
            if got is not None and self.on_tensor is not None:
                self._dispatch(self.on_tensor(remote, got))
        elif self.on_message is not None:
            self._dispatch(self.on_message(remote, data))

    def _dispatch(self, result) -> None:
        if asyncio.iscoroutine(result):
            self._spawn(result)

    # --- sending -----------------------------------------------------------------------------------------

    async def wait_open(self, remote: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while remote not in self.links:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no link to {remote}")
            await asyncio.sleep(0.02)
        await asyncio.wait_for(self.links[remote].opened.wait(), max(0.01, deadline - time.monotonic()))

    def max_message_size(self, remote: str) -> int:
        return self.links[remote].max_message

    def open_peers(self) -> list[str]:
        return [r for r, link in self.links.items() if link.opened.is_set() and not link.gone.is_set()]

    async def send(self, remote: str, data: bytes) -> None:
        link = self.links.get(remote)
        if link is None:
            raise PeerGone(remote)
        await link.send(data)

    async def send_tensor(self, remote: str, array: np.ndarray, *, frame: int, tensor: int, layer: int = 0,
                          region=None) -> int:
        """Chunk `array` for `remote`'s message size and send it in order; returns the bytes sent."""
        link = self.links.get(remote)
        if link is None:
            raise PeerGone(remote)
        if not link.opened.is_set():
            await link._wait(link.opened)
        chunks = wire.encode(array, frame=frame, tensor=tensor, layer=layer, region=region,
                             max_message=link.max_message)
        for c in chunks:
            await link.send(c)
        return sum(len(c) for c in chunks)


# --- the server's edge peers (`tilemesh serve --edge`) --------------------------------------------------------


@dataclass
class EdgeRoom:
    peer: EdgePeer
    received: deque = field(default_factory=lambda: deque(maxlen=64))


def tensor_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


class EdgeManager:
    """Keeps one EdgePeer in every room that has a device, and drops it when only the edge is left.

    `rooms()` returns {room_id: [roster entries]}; the manager polls it, which keeps it independent of how
    the signaling module stores rooms (and a poll every half second costs nothing).
    """

    def __init__(self, ws_url: str, rooms: Callable[[], dict[str, list[dict]]], *,
                 ssl_context: ssl.SSLContext | bool | None = None, poll: float = 0.5):
        self.ws_url, self.rooms, self.ssl_context, self.poll = ws_url, rooms, ssl_context, poll
        self.edges: dict[str, EdgeRoom] = {}
        self._task: asyncio.Task | None = None
        self._joining: set[str] = set()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(e.peer.close() for e in self.edges.values()), return_exceptions=True)
        self.edges.clear()

    async def _run(self) -> None:
        while True:
            try:
                await self._reconcile()
            except Exception:  # noqa: BLE001 (keep serving rooms after one failure)
                log.exception("edge manager")
            await asyncio.sleep(self.poll)

    async def _reconcile(self) -> None:
        rooms = self.rooms()
        for room_id, edge in list(self.edges.items()):
            others = [p for p in rooms.get(room_id, []) if p.get("id") != edge.peer.peer_id
                      and p.get("kind") != "edge"]
            if edge.peer.closed.is_set() or not others:
                del self.edges[room_id]
                await edge.peer.close()
        for room_id, roster in rooms.items():
            if room_id in self.edges or room_id in self._joining:
                continue
            if any(p.get("kind") != "edge" and p.get("connected", True) for p in roster):
                self._joining.add(room_id)
                asyncio.ensure_future(self._join(room_id))

    async def _join(self, room_id: str) -> None:
        edge = EdgeRoom(peer=None)  # type: ignore[arg-type]

        def on_tensor(remote: str, got: wire.Received) -> None:
            h = got.header
            edge.received.append({"from": remote, "frame": h.frame, "tensor": h.tensor, "layer": h.layer,
                                  "shape": list(h.shape), "dtype": h.dtype.name, "sha256": tensor_digest(got.array),
                                  "at": time.time()})

        try:
            edge.peer = EdgePeer(self.ws_url, room_id, name="edge (server)", ssl_context=self.ssl_context,
                                 on_tensor=on_tensor)
            await edge.peer.start()
            self.edges[room_id] = edge
        except Exception as exc:  # noqa: BLE001
            log.warning("edge peer could not join room %s: %r", room_id, exc)
        finally:
            self._joining.discard(room_id)

    def describe(self, room_id: str) -> dict:
        edge = self.edges.get(room_id)
        if edge is None:
            return {"room": room_id, "joined": False}
        p = edge.peer
        return {
            "room": room_id, "joined": True, "peer_id": p.peer_id,
            "links": {r: {"state": link.state, "max_message": link.max_message} for r, link in p.links.items()},
            "received": list(edge.received), "wire_errors": p.wire_errors,
        }

    async def send_pattern(self, room_id: str, to: str, *, seed: int, shape: tuple[int, ...], frame: int,
                           tensor: int) -> dict:
        """Send `wire.test_pattern(shape, seed)` to `to`: the diagnostics page's edge -> browser transfer."""
        edge = self.edges.get(room_id)
        if edge is None:
            raise KeyError(room_id)
        arr = wire.test_pattern(shape, seed)
        await edge.peer.wait_open(to)
        sent = await edge.peer.send_tensor(to, arr, frame=frame, tensor=tensor)
        return {"sent": sent, "sha256": tensor_digest(arr), "max_message": edge.peer.max_message_size(to)}


# --- wiring into the app ---------------------------------------------------------------------------------------

EDGE_KEY = web.AppKey("edge_manager", EdgeManager)


def own_ws_url(config) -> str:
    """Where this server's /ws is reachable from inside the process (any-address binds -> loopback)."""
    scheme = "wss" if (config.public_url or "").startswith("https") else "ws"
    host = "127.0.0.1" if config.host in ("", "0.0.0.0", "::") else config.host
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{config.port}/ws"


def _rooms_of(app: web.Application) -> Callable[[], dict[str, list[dict]]]:
    from server.signaling import HUB_KEY  # noqa: PLC0415  (signaling imports app, which imports features)

    def rooms() -> dict[str, list[dict]]:
        return {rid: room.roster() for rid, room in app[HUB_KEY].state.rooms.items()}

    return rooms


async def _start_edge(app: web.Application) -> None:
    app[EDGE_KEY].start()


async def _stop_edge(app: web.Application) -> None:
    if EDGE_KEY in app:
        await app[EDGE_KEY].stop()


async def diag_page(request: web.Request) -> web.Response:
    """Diagnostics: a bare page that boots the runtime and joins a room's mesh (tests and link benchmarks)."""
    from server.app import render  # noqa: PLC0415

    return render(request, "meshtest.html", title="tilemesh mesh diagnostics",
                  room=request.query.get("room", ""), name=request.query.get("name", ""))


async def diag_edge(request: web.Request) -> web.Response:
    if EDGE_KEY not in request.app:
        return web.json_response({"error": "the edge peer is off (tilemesh serve --edge)"}, status=404)
    return web.json_response(request.app[EDGE_KEY].describe(request.match_info["room"]))


async def diag_edge_send(request: web.Request) -> web.Response:
    """Make the edge peer send a deterministic test tensor to one peer (no data of the caller's choosing)."""
    if EDGE_KEY not in request.app:
        return web.json_response({"error": "the edge peer is off"}, status=404)
    body = await request.json()
    shape = tuple(int(v) for v in body.get("shape", (64, 56, 56)))
    if len(shape) > wire.MAX_NDIM or int(np.prod(shape)) > 16 * 1024 * 1024:
        raise web.HTTPBadRequest(text="shape too large")
    try:
        out = await asyncio.wait_for(request.app[EDGE_KEY].send_pattern(
            request.match_info["room"], str(body["to"]), seed=int(body.get("seed", 0)), shape=shape,
            frame=int(body.get("frame", 0)), tensor=int(body.get("tensor", 0))), 30)
    except (KeyError, PeerGone, TimeoutError) as exc:
        return web.json_response({"error": repr(exc)}, status=409)
    return web.json_response(out)


def setup(app: web.Application) -> None:
    """Diagnostics routes always; the edge manager when ServerConfig.edge_peer is set."""
    from server.app import CONFIG_KEY  # noqa: PLC0415

    app.router.add_get("/diag/mesh", diag_page)
    app.router.add_get("/diag/mesh/edge/{room}", diag_edge)
    app.router.add_post("/diag/mesh/edge/{room}/send", diag_edge_send)
    config = app[CONFIG_KEY]
    if config.edge_peer:
        # Our own certificate is self-signed, and this connection never leaves the host: no verification.
        app[EDGE_KEY] = EdgeManager(own_ws_url(config), _rooms_of(app), ssl_context=False)
        app.on_startup.append(_start_edge)
        app.on_shutdown.append(_stop_edge)
