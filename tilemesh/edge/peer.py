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

With `probes=True` the peer answers `LinkProbe` messages (first byte 0xB0..0xB4, as in web/mesh.js) itself.
Other binary messages starting with the wire magic are reassembled per sender (`tilemesh.runtime.wire.Inbox`) and
handed to `on_tensor(peer_id, Received)` when it is given; anything else goes raw to `on_message(peer_id,
bytes)`. Server messages the peer does not handle itself (`plan`, `error`...) go to `on_server(msg)`.

`ComputeDevice` makes an EdgePeer a full compute device of the room, as RoomEngine + the Pyodide worker make a
browser one: it reports `state ready` with `profile {compute, links, kind}`, measures its links, adopts `plan`
messages that include it and runs a `tilemesh.runtime.peer.Peer` on one dedicated thread, chunks in arrival order.

`EdgeManager` (started by `tilemesh serve --edge`) keeps one computing edge device in every room that has a
device in it (the model loaded and profiled once per server), and records the diagnostics page's test tensors
it received, which `/diag/mesh` shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp

from tilemesh.runtime import wire
from tilemesh.runtime.classify import LocalClassifier
from tilemesh.runtime.peer import Peer
from tilemesh.runtime.profile import measure_profile

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


# Link probes of web/mesh.js's LinkProbe, by first byte: 0xB0 ping (echoed whole as 0xB1), 0xB2 bulk (counted),
# 0xB3 end of a burst (answered 0xB4 + float64 LE byte count). Wire chunks start with b"TMWT", never 0xB*.
PING, PONG, BULK, END, DONE = 0xB0, 0xB1, 0xB2, 0xB3, 0xB4
PROBE_TAGS = frozenset((PING, PONG, BULK, END, DONE))
LINK_PROBE_BYTES = 256 * 1024  # the burst RoomEngine uses: enough to see past SCTP's slow start on a LAN
LINK_PROBE_MESSAGE = 65536


class LinkProbe:
    """The aiortc side of web/mesh.js's LinkProbe: answers the browsers' probes and measures its own links."""

    def __init__(self, peer: EdgePeer):
        self.peer = peer
        self.counted: dict[str, int] = {}
        self.waiting: dict[tuple[str, int], asyncio.Future] = {}

    def on_message(self, remote: str, data: bytes) -> None:
        tag = data[0]
        if tag == PING:
            self._reply(remote, bytes([PONG]) + bytes(data[1:]))
        elif tag == BULK:
            self.counted[remote] = self.counted.get(remote, 0) + len(data)
        elif tag == END:
            n, self.counted[remote] = self.counted.get(remote, 0), 0
            self._reply(remote, bytes([DONE]) + struct.pack("<d", n))
        else:
            fut = self.waiting.pop((remote, tag), None)
            if fut is not None and not fut.done():
                fut.set_result(bytes(data))

    def _reply(self, remote: str, data: bytes) -> None:
        async def send():
            with contextlib.suppress(PeerGone):
                await self.peer.send(remote, data)

        self.peer._spawn(send())

    def _expect(self, remote: str, tag: int) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.waiting[(remote, tag)] = fut
        return fut

    async def rtt(self, remote: str, size: int = 64, count: int = 10, timeout: float = 5.0) -> list[float]:
        """Round trips (ms) of `size`-byte messages echoed whole."""
        msg = bytes([PING]) + bytes(size - 1)
        out = []
        for _ in range(count):
            back = self._expect(remote, PONG)
            t0 = time.perf_counter()
            await self.peer.send(remote, msg)
            await asyncio.wait_for(back, timeout)
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    async def throughput(self, remote: str, size: int, total: int, timeout: float = 15.0) -> dict:
        """Send `total` bytes as `size`-byte messages; the rate at which the receiver counted them."""
        msg = bytes([BULK]) + bytes(size - 1)
        n = max(1, round(total / size))
        done = self._expect(remote, DONE)
        t0 = time.perf_counter()
        for _ in range(n):
            await self.peer.send(remote, msg)
        await self.peer.send(remote, bytes([END]))
        reply = await asyncio.wait_for(done, timeout)
        seconds = time.perf_counter() - t0
        got = struct.unpack_from("<d", reply, 1)[0]
        return {"bytes": got, "sent": n * size, "ms": seconds * 1e3, "mbps": got * 8 / 1e6 / seconds}

    async def measure(self, remote: str) -> dict:
        """{"rtt_ms", "mbps"} as RoomEngine reports them: median 64-byte round trip, megabits/s of a burst."""
        rtts = sorted(await self.rtt(remote, 64, 10))
        size = min(self.peer.max_message_size(remote), LINK_PROBE_MESSAGE)
        bulk = await self.throughput(remote, size, LINK_PROBE_BYTES)
        return {"rtt_ms": round(rtts[len(rtts) // 2], 3), "mbps": round(bulk["mbps"], 2)}


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
    ):
        self.ws_url, self.room, self.name, self.kind = ws_url, room, name, kind
        self.ssl_context = ssl_context
        self.on_tensor, self.on_message, self.on_peer = on_tensor, on_message, on_peer
        self.on_server = on_server
        # With probes, this peer answers web/mesh.js's link probes itself and can run its own.
        self.probe: LinkProbe | None = LinkProbe(self) if probes else None
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
        self._closing: asyncio.Future | None = None

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
            await asyncio.gather(*(link.pc.close() for link in links), return_exceptions=True)
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
            if self.on_server is not None:
                self.on_server(msg)
        elif self.on_server is not None:
            self.on_server(msg)  # plan, broadcast, pong: the owner's business

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


# --- a computing room member -----------------------------------------------------------------------------------

# A plan device whose channel has not opened yet gets chunks every browser accepts (16 KiB).
FALLBACK_MAX_MESSAGE = 16 * 1024
MAX_LINKS_REPORTED = 40  # keeps profile JSON under protocol.MAX_PROFILE_BYTES


@dataclass
class ModelRuntime:
    """What a computing device needs: the model (shared, read-only) and its measured compute profile."""

    classifier: LocalClassifier
    compute: dict


_profile_lock = threading.Lock()
_profiles: dict[tuple[str, int], dict] = {}


def measured_profile(model_json: Path, classifier: LocalClassifier) -> dict:
    """`measure_profile` of this model, once per process (about a second of full-speed numpy; blocking)."""
    key = (str(model_json.resolve()), model_json.stat().st_mtime_ns)
    with _profile_lock:
        if key not in _profiles:
            _profiles[key] = measure_profile(classifier.graph, name="edge")
        return _profiles[key]


def load_model_runtime(model_dir: Path) -> ModelRuntime:
    """The served model (its bundle, `tilemesh.server.model`) and this device's profile on it (blocking: call it
    in a thread)."""
    model_json = model_dir / "graph.json"
    classifier = LocalClassifier.from_files(model_json, model_dir / "labels.json", model_dir / "card.json")
    return ModelRuntime(classifier, measured_profile(model_json, classifier))


class ComputeDevice:
    """A room member that computes its part of the room's plans, over an `EdgePeer`.

    What a browser's RoomEngine + worker do, in CPython: it answers link probes and measures its own links
    (reported in `state.profile.links`), adopts `plan` messages that include it, and feeds every other binary
    message to a `tilemesh.runtime.peer.Peer`. Those calls (tens of ms of numpy each) run on one dedicated thread in
    arrival order, so signaling and the data channels stay responsive and chunk order is the channels' order;
    what they return is sent on by one sender per destination, in order, in chunks the destination accepts.

    Messages whose wire header says plan 0 are not plan traffic (plan ids start at 1) but the diagnostics
    page's test tensors: they are reassembled and handed to `on_tensor`.

    `classify` makes this device the camera (the tests' stand-in for a phone); the edge never calls it.
    """

    def __init__(self, ws_url: str, room: str, *, name: str = "edge", kind: str = "edge",
                 ssl_context: ssl.SSLContext | bool | None = None, on_tensor: TensorHandler | None = None):
        self.kind = kind
        self.edge = EdgePeer(ws_url, room, name=name, kind=kind, ssl_context=ssl_context, probes=True,
                             on_message=self._on_binary, on_peer=self._on_peer, on_server=self._on_server)
        self.on_tensor = on_tensor
        self.diag_inbox = wire.Inbox()
        self.model: ModelRuntime | None = None
        self.model_error: str | None = None
        self.peer: Peer | None = None
        self.links: dict[str, dict] = {}
        self.plan: dict | None = None  # the last `plan` message this device adopted
        self.role: dict | None = None
        self.plan_error: str | None = None
        self.plan_id = 0  # of the last plan handed to the compute thread (chunks after it see that plan)
        self.errors: deque[str] = deque(maxlen=32)
        self.error_count = 0
        self.chunks_in = self.chunks_out = 0
        self.tasks_run: dict[int, int] = {}  # plan id -> tasks computed under it (as RoomEngine.tasksRun)
        self.plans = 0
        self._plan_seen = asyncio.Condition()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tilemesh-compute-{room[:6]}")
        self._pipeline: asyncio.Queue = asyncio.Queue()
        self._outboxes: dict[str, asyncio.Queue] = {}
        self._senders: dict[str, asyncio.Task] = {}
        self._waiting: dict[int, asyncio.Future] = {}
        self._frame = 0
        self._measuring: dict[str, asyncio.Task] = {}

    @property
    def peer_id(self) -> str | None:
        return self.edge.peer_id

    async def start(self) -> ComputeDevice:
        await self.edge.start()
        self.edge._spawn(self._drain())
        await self._report()
        return self

    async def close(self) -> None:
        await self.edge.close()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("device closed"))
        self._executor.shutdown(wait=False, cancel_futures=True)
        # Join the compute thread off the loop: a frame in progress finishes in tens of ms.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown), 10)

    async def set_model(self, model: ModelRuntime | None, error: str | None = None) -> None:
        """Attach the model (or say why there is none); the device reports `ready` with its profile."""
        self.model, self.model_error = model, error
        if model is not None:
            self.peer = Peer(model.classifier, device=self.peer_id or "edge")
        await self._report()

    # --- state -------------------------------------------------------------------------------------------

    def profile(self) -> dict:
        links = dict(sorted(self.links.items(), key=lambda kv: kv[1]["rtt_ms"])[:MAX_LINKS_REPORTED])
        prof: dict = {"kind": self.kind, "links": links}
        if self.model is not None:
            prof["compute"] = self.model.compute
        return prof

    async def _report(self) -> None:
        if self.model is None and self.model_error is None:
            await self.edge.set_state("booting", progress=0.5, detail="measuring compute", profile=self.profile())
        else:
            detail = f"no model: {self.model_error}"[:200] if self.model is None else None
            fields = {"detail": detail} if detail else {}
            await self.edge.set_state("ready", profile=self.profile(), **fields)

    def _on_peer(self, remote: str, state: str) -> None:
        if state == "open":
            link = self.edge.links.get(remote)
            if link is not None:
                self._call("max_message", self._set_max_message, remote, link.max_message)
            if remote not in self._measuring:
                self._measuring[remote] = self.edge._spawn(self._measure(remote))
        elif state == "gone":
            task = self._measuring.pop(remote, None)
            if task is not None:
                task.cancel()
            self.diag_inbox.forget(remote)
            sender = self._senders.pop(remote, None)
            self._outboxes.pop(remote, None)
            if sender is not None:
                sender.cancel()
            self._call("forget", self._forget, remote)
            if self.links.pop(remote, None) is not None and not self.edge.closed.is_set():
                self.edge._spawn(self._report())

    async def _measure(self, remote: str) -> None:
        try:
            self.links[remote] = await self.edge.probe.measure(remote)
            log.info("link %s -> %s: %s", self.peer_id, remote, self.links[remote])
            await self._report()
        except (PeerGone, TimeoutError) as exc:
            log.info("link probe to %s abandoned: %r", remote, exc)
        finally:
            if self._measuring.get(remote) is asyncio.current_task():
                del self._measuring[remote]

    # --- plans -------------------------------------------------------------------------------------------

    def _on_server(self, msg: dict) -> None:
        if msg.get("type") == "plan":
            try:
                self._adopt(msg)
            except (KeyError, TypeError, ValueError) as exc:
                self._error(f"unusable plan message: {exc!r}")
        elif msg.get("type") == "error" and msg.get("code") == "plan_failed":
            self.plan_error = str(msg.get("message"))
            self.edge._spawn(self._notify_plan())

    async def _notify_plan(self) -> None:
        async with self._plan_seen:
            self._plan_seen.notify_all()

    def _adopt(self, msg: dict) -> None:
        me = self.peer_id
        if me not in msg["devices"] and msg["source"] != me:
            # Another camera's plan without us: keep running ours (RoomEngine does the same).
            return
        if self.peer is None:
            self._error(f"plan {msg['plan_id']} includes this device, but it has no model")
            return
        spec = msg["spec"]
        plan_id = int(spec["plan_id"])
        max_message = {}
        for d in {*msg["devices"], msg["source"]} - {me}:
            link = self.edge.links.get(d)
            max_message[d] = link.max_message if link is not None else FALLBACK_MAX_MESSAGE
        self._call("plan", self.peer.set_plan, spec, me, max_message)
        # Chunks that outran this message were held by the Peer; adopting the plan replays them (see _drain).
        self.plan, self.plan_id = msg, plan_id
        self.plans += 1

    async def request_plan(self, strategy: str | None = None, timeout: float = 20.0) -> dict:
        """Ask the server's planner for a plan with this device as the source; the plan, once adopted."""
        before, self.plan_error = self.plan_id, None
        fields = {} if strategy is None else {"strategy": strategy}
        await self.edge.send_signaling("plan_request", **fields)
        return await self.wait_plan(lambda p: p["source"] == self.peer_id and p["plan_id"] > before, timeout)

    async def wait_plan(self, predicate: Callable[[dict], bool], timeout: float = 15.0) -> dict:
        """The first adopted plan message satisfying `predicate`; raises the server's `plan_failed`."""
        async with self._plan_seen:
            await asyncio.wait_for(self._plan_seen.wait_for(
                lambda: self.plan_error is not None or (self.plan is not None and predicate(self.plan))), timeout)
            if self.plan_error is not None:
                raise RuntimeError(f"plan_failed: {self.plan_error}")
            return self.plan

    # --- chunks ------------------------------------------------------------------------------------------

    def _on_binary(self, remote: str, data: bytes) -> None:
        data = bytes(data)
        try:
            plan_id = wire.parse_chunk(data)[0].layer
        except wire.WireError:
            plan_id = None  # the runner refuses it too, and its error is logged in one place
        if plan_id == 0:
            self._diag_tensor(remote, data)
        elif self.peer is None:
            self._error(f"chunk from {remote} before the model was loaded")
        else:
            self._feed(remote, data)

    def _feed(self, remote: str, data: bytes) -> None:
        self.chunks_in += 1
        self._call("chunk", self.peer.on_chunk, remote, data)

    def _diag_tensor(self, remote: str, data: bytes) -> None:
        try:
            got = self.diag_inbox.feed(remote, data)
        except wire.WireError as exc:
            self._error(f"bad test tensor chunk from {remote}: {exc}")
            return
        if got is not None and self.on_tensor is not None:
            self.edge._dispatch(self.on_tensor(remote, got))

    def _set_max_message(self, remote: str, size: int) -> None:
        if self.peer is not None:
            self.peer.set_max_message(remote, size)

    def _forget(self, remote: str) -> None:
        if self.peer is not None:
            self.peer.forget_peer(remote)

    def _call(self, what: str, fn, *args) -> None:
        """Run `fn(*args)` on the compute thread after everything queued before it; `_drain` takes the result."""
        if self.edge.closed.is_set():
            return
        fut = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        self._pipeline.put_nowait((what, args, fut))

    async def _drain(self) -> None:
        while True:
            what, args, fut = await self._pipeline.get()
            try:
                res = await fut
            except Exception as exc:  # noqa: BLE001 (a bad chunk or plan costs that message, not the device)
                source = f" from {args[0]}" if what == "chunk" else ""
                self._error(f"{what}{source} refused: {type(exc).__name__}: {exc}")
                if what == "start_frame":
                    self._fail_frame(args[0], exc)
                continue
            if what == "plan":
                self.role = res
                log.info("device %s adopts plan %s as %s (%d tasks)", self.peer_id, res.get("plan_id"),
                         res.get("role"), res.get("tasks", 0))
                async with self._plan_seen:
                    self._plan_seen.notify_all()
            if isinstance(res, dict):
                if "tasks_run" in res:
                    self.tasks_run[res["plan_id"]] = res["tasks_run"]
                for out in res.get("out", []):
                    self._send(out["dst"], out["chunks"])
                for r in res.get("results", []):
                    fut = self._waiting.pop(r["frame"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(r)

    def _send(self, dst: str, chunks: list[bytes]) -> None:
        box = self._outboxes.get(dst)
        if box is None:
            box = self._outboxes[dst] = asyncio.Queue()
            self._senders[dst] = self.edge._spawn(self._sender(dst, box))
        self.chunks_out += len(chunks)
        for c in chunks:
            box.put_nowait(c)

    async def _sender(self, dst: str, box: asyncio.Queue) -> None:
        while True:
            chunk = await box.get()
            try:
                await self.edge.send(dst, chunk)
            except PeerGone:
                self._error(f"{dst} left with {box.qsize() + 1} chunks unsent")
                while not box.empty():
                    box.get_nowait()
            except ValueError as exc:  # larger than the channel accepts: a plan built before the link was known
                self._error(str(exc))

    def _error(self, text: str) -> None:
        self.error_count += 1
        self.errors.append(text)
        log.error("device %s in room %s: %s", self.peer_id, self.edge.room, text)

    # --- the camera's side (tests' phone stand-in) -------------------------------------------------------

    async def classify(self, data: bytes, height: int, width: int, timeout: float = 30.0) -> dict:
        """Run one RGB(A) frame through the adopted plan as its source; the Peer's result (top-5, report)."""
        self._frame += 1
        frame = self._frame
        fut = self._waiting[frame] = asyncio.get_running_loop().create_future()
        self._call("start_frame", self._start_frame, frame, bytes(data), height, width)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(frame, None)

    def _start_frame(self, frame: int, data: bytes, height: int, width: int) -> dict:
        assert self.peer is not None
        return self.peer.start_frame(frame, data, height, width)

    def _fail_frame(self, frame: int, exc: BaseException) -> None:
        fut = self._waiting.pop(frame, None)
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def describe(self) -> dict:
        return {
            "ready": self.model is not None, "model_error": self.model_error,
            "plan_id": self.plan_id or None, "role": (self.role or {}).get("role"), "plans": self.plans,
            "tasks_run": self.tasks_run,
            "links": dict(self.links), "chunks_in": self.chunks_in, "chunks_out": self.chunks_out,
            "errors": self.error_count, "last_errors": list(self.errors)[-5:],
        }


# --- the server's edge peers (`tilemesh serve --edge`) --------------------------------------------------------


@dataclass
class EdgeRoom:
    device: ComputeDevice
    received: deque = field(default_factory=lambda: deque(maxlen=64))

    @property
    def peer(self) -> EdgePeer:
        return self.device.edge


def tensor_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


class EdgeManager:
    """Keeps one computing edge device in every room that has a device, and drops it when only the edge is left.

    `rooms()` returns {room_id: [roster entries]}; the manager polls it, which keeps it independent of how
    the signaling module stores rooms (and a poll every half second costs nothing). The model is loaded, and
    its compute profile measured, once per server on a worker thread; the edge joins a room at once (state
    `booting`) and reports `ready` with the profile when that is done. Without `model_dir` (the served model's
    bundle) the edge still joins and moves test tensors, but reports no compute profile.
    """

    def __init__(self, ws_url: str, rooms: Callable[[], dict[str, list[dict]]], *,
                 ssl_context: ssl.SSLContext | bool | None = None, poll: float = 0.5,
                 model_dir: Path | None = None):
        self.ws_url, self.rooms, self.ssl_context, self.poll = ws_url, rooms, ssl_context, poll
        self.model_dir = model_dir
        self.edges: dict[str, EdgeRoom] = {}
        self._task: asyncio.Task | None = None
        self._joining: set[str] = set()
        self._model: asyncio.Future | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def model(self) -> asyncio.Future:
        """The server's ModelRuntime, loaded and profiled once, off the event loop."""
        if self._model is None:
            if self.model_dir is None:
                self._model = asyncio.get_running_loop().create_future()
                self._model.set_exception(FileNotFoundError("the server has no model for the edge peer"))
            else:
                self._model = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(
                    None, load_model_runtime, self.model_dir))
        return self._model

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(e.device.close() for e in self.edges.values()), return_exceptions=True)
        self.edges.clear()
        if self._model is not None and not self._model.done():
            self._model.cancel()

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
                await edge.device.close()
        for room_id, roster in rooms.items():
            if room_id in self.edges or room_id in self._joining:
                continue
            if any(p.get("kind") != "edge" and p.get("connected", True) for p in roster):
                self._joining.add(room_id)
                asyncio.ensure_future(self._join(room_id))

    async def _join(self, room_id: str) -> None:
        edge = EdgeRoom(device=None)  # type: ignore[arg-type]

        def on_tensor(remote: str, got: wire.Received) -> None:
            h = got.header
            edge.received.append({"from": remote, "frame": h.frame, "tensor": h.tensor, "layer": h.layer,
                                  "shape": list(h.shape), "dtype": h.dtype.name, "sha256": tensor_digest(got.array),
                                  "at": time.time()})

        try:
            edge.device = ComputeDevice(self.ws_url, room_id, name="edge (server)", ssl_context=self.ssl_context,
                                        on_tensor=on_tensor)
            await edge.device.start()
            self.edges[room_id] = edge
        except Exception as exc:  # noqa: BLE001
            log.warning("edge peer could not join room %s: %r", room_id, exc)
            return
        finally:
            self._joining.discard(room_id)
        try:
            model, error = await asyncio.shield(self.model()), None
        except Exception as exc:  # noqa: BLE001 (no model: the edge still relays test tensors)
            log.warning("edge peer has no model: %r", exc)
            model, error = None, repr(exc)
        if not edge.peer.closed.is_set():
            await edge.device.set_model(model, error)

    def describe(self, room_id: str) -> dict:
        edge = self.edges.get(room_id)
        if edge is None:
            return {"room": room_id, "joined": False}
        p = edge.peer
        return {
            "room": room_id, "joined": True, "peer_id": p.peer_id,
            "links": {r: {"state": link.state, "max_message": link.max_message} for r, link in p.links.items()},
            "received": list(edge.received), "wire_errors": p.wire_errors,
            "compute": edge.device.describe(),
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
    from tilemesh.server.signaling.hub import HUB_KEY  # noqa: PLC0415  (signaling imports app, which imports features)

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
    from tilemesh.server.context import render  # noqa: PLC0415

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
    from tilemesh.server.context import CONFIG_KEY, MODEL_KEY  # noqa: PLC0415

    app.router.add_get("/diag/mesh", diag_page)
    app.router.add_get("/diag/mesh/edge/{room}", diag_edge)
    app.router.add_post("/diag/mesh/edge/{room}/send", diag_edge_send)
    config = app[CONFIG_KEY]
    if config.edge_peer:
        # Our own certificate is self-signed, and this connection never leaves the host: no verification.
        bundle = app.get(MODEL_KEY)
        app[EDGE_KEY] = EdgeManager(own_ws_url(config), _rooms_of(app), ssl_context=False,
                                    model_dir=bundle.dir if bundle is not None else None)
        app.on_startup.append(_start_edge)
        app.on_shutdown.append(_stop_edge)
