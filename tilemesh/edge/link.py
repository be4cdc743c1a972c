"""One remote peer over aiortc: its RTCPeerConnection and the pre-negotiated data channel (web/mesh.js's Link).

Conventions shared with web/mesh.js: one ordered binary channel per pair, pre-negotiated with id 0, so neither
side waits for an in-band open; messages are at most the remote's advertised `a=max-message-size` (aiortc
refuses larger ones itself); sends wait on `bufferedamountlow` above a high-water mark instead of queueing
without bound.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Protocol

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp

from tilemesh.runtime import session
from tilemesh.server.signaling.protocol import MAX_RELAY_PAYLOAD

log = logging.getLogger("tilemesh.edge")

class LinkOwner(Protocol):
    """What a link reports to (`peer.EdgePeer`): its state changes, messages, outgoing signals and its end."""

    ice_servers: list[dict]

    def _emit_peer(self, remote: str, state: str) -> None: ...
    def _on_data(self, remote: str, data) -> None: ...
    def _signal(self, to: str, data: dict) -> None: ...
    def _drop(self, remote: str | None, reason: str, only: Link | None = None) -> None: ...

CHANNEL_ID = 0
CHANNEL_LABEL = "tilemesh"
# Sends pause above HIGH_WATER buffered bytes and resume below LOW_WATER: a few chunks in flight keep SCTP busy
# without letting a fast producer pile megabytes into the association's queue.
HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024
# RFC 8841: without a max-message-size attribute the remote accepts 64 KiB.
DEFAULT_REMOTE_MAX_MESSAGE = 65536
# ICE candidates that arrive before the remote description are held until it comes; a browser trickles a handful
# per interface, so anything past this bound is a peer that never answers (or means harm) and is dropped.
MAX_EARLY_CANDIDATES = 64
_MAX_MSG_RE = re.compile(r"^a=max-message-size:(\d+)", re.M)


class PeerGone(ConnectionError):
    """The remote peer left (or its connection failed) before a send completed."""


def remote_max_message_size(sdp: str) -> int:
    m = _MAX_MSG_RE.search(sdp)
    if not m:
        return DEFAULT_REMOTE_MAX_MESSAGE
    # 0 means "any size"; the browser still refuses a single send above 256 KiB, so cap there.
    value = int(m.group(1))
    return session.chunk_limit(value)


def ice_servers_from(entries: list[dict]) -> list[RTCIceServer]:
    return [RTCIceServer(urls=e["urls"], username=e.get("username"), credential=e.get("credential"))
            for e in entries or []]


class Link:
    """One remote peer: its RTCPeerConnection and the pre-negotiated data channel."""

    def __init__(self, owner: LinkOwner, remote: str):
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
            elif len(self._early_candidates) < MAX_EARLY_CANDIDATES:
                self._early_candidates.append(data)
            else:
                log.warning("dropping early ICE candidates from %s: more than %d before its description",
                            self.remote, MAX_EARLY_CANDIDATES)
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


class RelayLink:
    """One remote peer reached through the server's signaling socket (protocol: Relay), for the server's own edge.

    Same surface as `Link` (opened, gone, max_message, state, send, close). The server keeps the order of one
    socket's frames and slows a sender to its receiver's pace, so a send only waits for the socket's writer.
    """

    def __init__(self, owner: RelayOwner, remote: str):
        self.owner, self.remote = owner, remote
        self.max_message = MAX_RELAY_PAYLOAD
        self.opened = asyncio.Event()
        self.gone = asyncio.Event()
        self.state = "new"
        self._lock = asyncio.Lock()

    def open(self) -> None:
        if not self.opened.is_set():
            self.opened.set()
            self.state = "open"
            self.owner._emit_peer(self.remote, "open")

    async def send(self, data: bytes) -> None:
        if len(data) > self.max_message:
            raise ValueError(f"{len(data)}-byte message; {self.remote} accepts at most {self.max_message}")
        async with self._lock:  # one frame at a time: concurrent callers keep their order
            if self.gone.is_set():
                raise PeerGone(self.remote)
            try:
                await self.owner._send_relay(self.remote, data)
            except (ConnectionError, RuntimeError) as exc:
                raise PeerGone(self.remote) from exc

    async def close(self) -> None:
        self.gone.set()


class RelayOwner(Protocol):
    def _emit_peer(self, remote: str, state: str) -> None: ...
    async def _send_relay(self, remote: str, data: bytes) -> None: ...
