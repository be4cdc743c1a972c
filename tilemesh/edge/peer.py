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

Relay: the server's own edge (`tilemesh serve --edge`, the default `--edge-transport relay`) joins with the
hub's relay key and reaches every member through the signaling WebSocket (`link.RelayLink`, binary frames,
see tilemesh.server.signaling.protocol), with no aiortc at all: it is in the server process anyway, and
aiortc's pure-Python DTLS/SCTP costs far more CPU per frame than WebSocket frames do. Any peer (browser or
this class) uses a RelayLink for a roster member marked `relay: true`, and WebRTC for the others.

The links themselves are `link.Link`; with `probes=True` the peer answers `probe.LinkProbe` messages (first
byte 0xB0..0xB4, as in web/mesh.js) itself. Other binary messages starting with the wire magic are reassembled
per sender (`tilemesh.runtime.wire.Inbox`) and handed to `on_tensor(peer_id, Received)` when it is given;
anything else goes raw to `on_message(peer_id, bytes)`. Server messages the peer does not handle itself (`plan`,
`broadcast`, `error`...) go to `on_server(msg)`.

`device.ComputeDevice` makes an EdgePeer a computing member of the room; `manager.EdgeManager` keeps one in every
room of the server (`tilemesh serve --edge`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

import aiohttp
import numpy as np

from tilemesh.runtime import wire
from tilemesh.server.signaling import protocol

from .link import Link, PeerGone, RelayLink
from .probe import PROBE_TAGS, LinkProbe

__all__ = ["EdgePeer", "Link", "PeerGone"]

log = logging.getLogger("tilemesh.edge")

TensorHandler = Callable[[str, wire.Received], Awaitable[None] | None]
MessageHandler = Callable[[str, bytes], Awaitable[None] | None]
PeerHandler = Callable[[str, str], None]
ServerHandler = Callable[[dict], None]


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
        on_server: ServerHandler | None = None,
        probes: bool = False,
        window: int = 4,
        relay_key: str | None = None,
    ):
        self.ws_url, self.room, self.name, self.kind = ws_url, room, name, kind
        # With the hub's relay key (the server's own edge), every link goes through the signaling socket.
        self.relay_key = relay_key
        self.ssl_context = ssl_context
        self.on_tensor, self.on_message, self.on_peer = on_tensor, on_message, on_peer
        self.on_server = on_server
        # With probes, this peer answers web/mesh.js's link probes itself and can run its own.
        self.probe: LinkProbe | None = LinkProbe(self) if probes else None
        self.inbox = wire.Inbox(window=window)
        self.links: dict[str, Link | RelayLink] = {}
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
        self._closing: asyncio.Future | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> EdgePeer:
        self._session = aiohttp.ClientSession()
        try:
            verify = True if self.ssl_context is None else self.ssl_context
            self._ws = await self._session.ws_connect(self.ws_url, ssl=verify, heartbeat=None)
            join = {"type": "join", "room": self.room, "name": self.name, "kind": self.kind}
            if self.relay_key is not None:
                join["relay_key"] = self.relay_key
            await self._send_ws(join)
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
        """Leave and tear down; every caller waits for the one teardown (the read loop may have started it)."""
        if self._closing is None:
            self.closed.set()
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        try:
            if self._ws is not None and not self._ws.closed:
                with contextlib.suppress(Exception):
                    await self._send_ws({"type": "leave"})
                    await self._ws.close()
            links = list(self.links.values())
            self.links.clear()
            for link in links:
                link.gone.set()
                self._emit_peer(link.remote, "gone")
            await asyncio.gather(*(link.close() for link in links), return_exceptions=True)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
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

    async def set_state(self, state: str, **fields) -> None:
        """Report this peer's status (and `profile`, `detail`...) to the room's roster."""
        await self.send_signaling("state", state=state, **fields)

    async def send_signaling(self, msg_type: str, **fields) -> None:
        """Any client message of tilemesh/server/signaling/protocol.py (`plan_request`, `broadcast`...)."""
        if not self.closed.is_set():
            await self._send_ws({"type": msg_type, **fields})

    async def _send_relay(self, to: str, data: bytes) -> None:
        if self._ws is None or self._ws.closed:
            raise ConnectionError("signaling socket closed")
        await self._ws.send_bytes(protocol.relay_frame(to, data))

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
                if msg.type == aiohttp.WSMsgType.BINARY:
                    self._on_relayed(msg.data)
                    continue
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
            self._relay_links()
            # Offer rule: the newcomer offers to everyone already here (relay pairs excepted: no WebRTC there).
            for p in self.roster:
                if p["id"] != self.peer_id and not self._relayed(p):
                    link = self._link(p["id"])
                    self._spawn(link.offer())
        elif t == "roster":
            self.roster = msg.get("peers", [])
            self._relay_links()
            if self.on_server is not None:
                self.on_server(msg)  # the owner's session counts who still boots
        elif t == "signal" and isinstance(self.links.get(msg.get("from")), RelayLink):
            return  # a relay pair has no WebRTC connection
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
            if self.on_server is not None:
                self.on_server(msg)
        elif self.on_server is not None:
            self.on_server(msg)  # plan, broadcast, pong: the owner's business

    # --- links -------------------------------------------------------------------------------------------

    def _relayed(self, entry: dict) -> bool:
        """Whether this peer reaches a roster member through the server (either end is the server's edge)."""
        return self.relay_key is not None or bool(entry.get("relay"))

    def _relay_links(self) -> None:
        """Relay pairs are linked as soon as the roster shows both, and dropped when the remote leaves it."""
        present = {p["id"]: p for p in self.roster if p.get("id") != self.peer_id}
        for remote, link in list(self.links.items()):
            if isinstance(link, RelayLink) and remote not in present:
                self._drop(remote, "left the roster")
        for remote, entry in present.items():
            if remote not in self.links and self._relayed(entry):
                link = self.links[remote] = RelayLink(self, remote)
                link.open()

    def _on_relayed(self, data: bytes) -> None:
        try:
            remote, payload = protocol.parse_relay_frame(data)
        except protocol.ProtocolError as exc:
            log.warning("edge peer: bad relay frame: %s", exc.message)
            return
        if isinstance(self.links.get(remote), RelayLink):
            self._on_data(remote, bytes(payload))

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
        if isinstance(data, str) or not data:
            return  # the mesh is binary only
        if self.probe is not None and data[0] in PROBE_TAGS:
            self.probe.on_message(remote, data)
        elif data[:4] == wire.MAGIC and self.on_tensor is not None:
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

    async def send_tensor(self, remote: str, array: np.ndarray, *, frame: int, tensor: int, plan_id: int = 0,
                          region=None) -> int:
        """Chunk `array` for `remote`'s message size and send it in order; returns the bytes sent."""
        link = self.links.get(remote)
        if link is None:
            raise PeerGone(remote)
        if not link.opened.is_set():
            await link._wait(link.opened)
        chunks = wire.encode(array, frame=frame, tensor=tensor, plan_id=plan_id, region=region,
                             max_message=link.max_message)
        for c in chunks:
            await link.send(c)
        return sum(len(c) for c in chunks)
