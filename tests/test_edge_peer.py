"""The aiortc edge peer over the real signaling server: tensors cross bit-exact, vanished peers are noticed.

aiortc never uses loopback, so each test runs its event loop on a thread moved into a fresh network namespace
(`playwright/netns.py`), where the veth address is the only interface: no packet can reach another host.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import numpy as np
import pytest
from aiohttp import web

from bench import netns
from tilemesh.edge.link import PeerGone, remote_max_message_size
from tilemesh.edge.manager import EDGE_KEY, own_ws_url, tensor_digest
from tilemesh.edge.peer import EdgePeer
from tilemesh.runtime import wire
from tilemesh.server.app import ServerConfig, create_app
from tilemesh.server.signaling.hub import HUB_KEY


def run_in_netns(body, timeout: float = 60.0):
    """Run `await body(ns)` on a thread inside a new namespace; re-raise whatever it raised."""
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    out: dict = {}
    with netns.NetNS() as ns:
        def target():
            try:
                ns.enter_current_thread()
                out["value"] = asyncio.run(asyncio.wait_for(body(ns), timeout))
            except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
                out["error"] = exc

        t = threading.Thread(target=target, name=f"netns-{ns.name}")
        t.start()
        t.join(timeout + 15)
        assert not t.is_alive(), "namespace thread hung"
    if "error" in out:
        raise out["error"]
    return out.get("value")


class Server:
    """The real app (signaling included) on the namespace's address."""

    def __init__(self, ns, edge: bool = False, edge_transport: str = "relay"):
        with socket.socket() as s:
            s.bind((ns.inner, 0))
            port = s.getsockname()[1]
        self.config = ServerConfig(host=ns.inner, port=port, public_url=f"http://{ns.inner}:{port}/", edge_peer=edge,
                                   edge_transport=edge_transport)
        self.app = create_app(self.config)
        self.ws_url = own_ws_url(self.config)

    async def __aenter__(self):
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.config.host, self.config.port).start()
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()

    def new_room(self) -> str:
        return self.app[HUB_KEY].create_room()


class Recorder:
    """Collects what an EdgePeer hands to its callbacks."""

    def __init__(self):
        self.tensors: list[tuple[str, wire.Received]] = []
        self.peer_events: list[tuple[str, str, float]] = []
        self.changed = asyncio.Event()

    def on_tensor(self, remote, got):
        self.tensors.append((remote, got))
        self.changed.set()

    def on_peer(self, remote, state):
        self.peer_events.append((remote, state, time.monotonic()))
        self.changed.set()

    async def until(self, predicate, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("condition not reached")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    def peer(self, name: str, srv: Server, room: str, kind: str = "laptop") -> EdgePeer:
        return EdgePeer(srv.ws_url, room, name=name, kind=kind, on_tensor=self.on_tensor, on_peer=self.on_peer)


def test_remote_max_message_size_from_sdp():
    assert remote_max_message_size("v=0\r\na=max-message-size:262144\r\n") == 262144
    assert remote_max_message_size("v=0\r\na=max-message-size:65536\r\n") == 65536
    assert remote_max_message_size("v=0\r\n") == 65536  # RFC 8841 default
    assert remote_max_message_size("a=max-message-size:0\r\n") == wire.DEFAULT_MAX_MESSAGE
    cfg = ServerConfig(host="0.0.0.0", port=9, public_url="https://192.168.1.5:9/")
    assert own_ws_url(cfg) == "wss://127.0.0.1:9/ws"


def test_two_aiortc_peers_exchange_tensors_bit_exact():
    async def body(ns):
        async with Server(ns) as srv:
            room = srv.new_room()
            ra, rb = Recorder(), Recorder()
            a = await ra.peer("a", srv, room).start()
            b = await rb.peer("b", srv, room, kind="phone").start()  # newcomer: offers to a
            try:
                await b.wait_open(a.peer_id)
                await a.wait_open(b.peer_id)
                # Both ends are aiortc here; each chunks by what the other advertised.
                assert a.max_message_size(b.peer_id) == b.max_message_size(a.peer_id) > 16 * 1024
                ta, tb = wire.test_pattern((64, 56, 56), 1), wire.test_pattern((24, 56, 56), 2, np.float16)
                await asyncio.gather(
                    a.send_tensor(b.peer_id, ta, frame=3, tensor=7, plan_id=2, region=(0, 56, 0, 56)),
                    b.send_tensor(a.peer_id, tb, frame=3, tensor=8, plan_id=5, region=(-1, 55, 0, 56)),
                )
                await rb.until(lambda: rb.tensors)
                await ra.until(lambda: ra.tensors)
                (src, got_b), (src2, got_a) = rb.tensors[0], ra.tensors[0]
                assert src == a.peer_id and src2 == b.peer_id
                assert got_b.array.tobytes() == ta.tobytes() and got_b.array.shape == ta.shape
                assert got_a.array.tobytes() == tb.tobytes() and got_a.array.dtype == np.float16
                assert (got_b.header.frame, got_b.header.tensor, got_b.header.plan_id) == (3, 7, 2)
                assert got_a.header.region == (-1, 55, 0, 56)
                assert a.wire_errors == b.wire_errors == 0
                assert ("open" in [s for r, s, _ in ra.peer_events if r == b.peer_id])
            finally:
                await asyncio.gather(a.close(), b.close())

    run_in_netns(body)


def test_vanished_peer_is_dropped_and_pending_sends_fail():
    async def body(ns):
        async with Server(ns) as srv:
            room = srv.new_room()
            ra, rb = Recorder(), Recorder()
            a = await ra.peer("a", srv, room).start()
            b = await rb.peer("b", srv, room).start()
            await a.wait_open(b.peer_id)
            await b.wait_open(a.peer_id)
            big = wire.test_pattern((64, 56, 56), 3)

            async def flood():
                for frame in range(1000):
                    await a.send_tensor(b.peer_id, big, frame=frame, tensor=0)

            sending = asyncio.ensure_future(flood())
            await rb.until(lambda: rb.tensors)  # mid-transfer
            b_id = b.peer_id
            t0 = time.monotonic()
            await b.close()
            with pytest.raises(PeerGone):
                await asyncio.wait_for(sending, 10)
            await ra.until(lambda: any(r == b_id and s == "gone" for r, s, _ in ra.peer_events))
            gone_at = next(t for r, s, t in ra.peer_events if r == b_id and s == "gone")
            assert gone_at - t0 < 3.0
            assert b_id not in a.links
            await a.close()

    run_in_netns(body)


@pytest.mark.parametrize("transport", ["relay", "webrtc"])
def test_edge_manager_joins_rooms_and_moves_tensors(transport):
    """`serve --edge`: the server's own peer joins a room with a device in it and trades tensors with it, through
    the signaling socket (relay, the default) or over aiortc (webrtc)."""
    async def body(ns):
        async with Server(ns, edge=True, edge_transport=transport) as srv:
            room = srv.new_room()
            rec = Recorder()
            dev = await rec.peer("laptop", srv, room).start()
            manager = srv.app[EDGE_KEY]
            await rec.until(lambda: any(s == "open" for _, s, _ in rec.peer_events), timeout=15)
            for _ in range(300):  # the relay link opens before the manager files its edge
                if manager.describe(room).get("peer_id") is not None:
                    break
                await asyncio.sleep(0.05)
            edge_id = manager.describe(room)["peer_id"]
            assert [(p["kind"], p["relay"]) for p in dev.roster if p["id"] == edge_id] == \
                [("edge", transport == "relay")]
            link = dev.links[edge_id]
            assert type(link).__name__ == ("RelayLink" if transport == "relay" else "Link")

            sent = wire.test_pattern((64, 56, 56), 11)
            await dev.send_tensor(edge_id, sent, frame=1, tensor=4)
            for _ in range(100):
                if manager.describe(room)["received"]:
                    break
                await asyncio.sleep(0.05)
            got = manager.describe(room)["received"][0]
            assert got["sha256"] == tensor_digest(sent) and got["from"] == dev.peer_id
            assert got["shape"] == [64, 56, 56] and got["dtype"] == "float32"

            out = await manager.send_pattern(room, dev.peer_id, seed=12, shape=(64, 56, 56), frame=2, tensor=9)
            await rec.until(lambda: rec.tensors)
            assert tensor_digest(rec.tensors[0][1].array) == out["sha256"] == tensor_digest(
                wire.test_pattern((64, 56, 56), 12))

            # The last device leaves: the edge peer leaves too rather than sit alone in the room.
            await dev.close()
            for _ in range(100):
                if not manager.describe(room)["joined"]:
                    break
                await asyncio.sleep(0.05)
            assert not manager.describe(room)["joined"]

    run_in_netns(body)
