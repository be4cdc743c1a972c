"""Link probes, the aiortc side of web/mesh.js's LinkProbe: answers the browsers' probes and measures links.

What to measure (message size, burst length) and how to read it (Mbit/s) is the session core's rule
(`tilemesh.runtime.session.ProbeSpec`, `link_figures`); this module only moves the bytes and times them.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from typing import TYPE_CHECKING, Protocol

from .link import PeerGone

if TYPE_CHECKING:
    from tilemesh.runtime.session import Probe


class ProbeOwner(Protocol):
    """What a probe sends through (`peer.EdgePeer`)."""

    async def send(self, remote: str, data: bytes) -> None: ...
    def max_message_size(self, remote: str) -> int: ...
    def _spawn(self, coro) -> asyncio.Task: ...


# Link probes of web/mesh.js's LinkProbe, by first byte: 0xB0 ping (echoed whole as 0xB1), 0xB2 bulk (counted),
# 0xB3 end of a burst (answered 0xB4 + float64 LE byte count). Wire chunks start with b"TMWT", never 0xB*.
PING, PONG, BULK, END, DONE = 0xB0, 0xB1, 0xB2, 0xB3, 0xB4
PROBE_TAGS = frozenset((PING, PONG, BULK, END, DONE))


class LinkProbe:
    """The aiortc side of web/mesh.js's LinkProbe: answers the browsers' probes and measures its own links."""

    def __init__(self, peer: ProbeOwner):
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
        return {"bytes": got, "sent": n * size, "ms": seconds * 1e3}

    async def measure(self, probe: Probe) -> tuple[list[float], float, float]:
        """Run a session's `Probe`: (round trips in ms, bytes the remote counted, seconds) for `LinkMeasured`."""
        rtts = await self.rtt(probe.peer, probe.rtt_size, probe.rtt_count)
        size = min(self.peer.max_message_size(probe.peer), probe.message)
        bulk = await self.throughput(probe.peer, size, probe.total)
        return rtts, bulk["bytes"], bulk["ms"] / 1e3
