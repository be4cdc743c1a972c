"""The server's edge devices (`tilemesh serve --edge`): one computing `ComputeDevice` in every room with a device,
and the diagnostics routes that show what the edge received and make it send a test tensor."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiohttp import web

from tilemesh.runtime import wire

from .device import ComputeDevice, load_model_runtime
from .link import PeerGone
from .peer import EdgePeer

log = logging.getLogger("tilemesh.edge")


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
                 ssl_context: ssl.SSLContext | bool | None = None, poll: float = 0.5, relay_key: str | None = None,
                 model_dir: Path | None = None):
        self.ws_url, self.rooms, self.ssl_context, self.poll = ws_url, rooms, ssl_context, poll
        self.relay_key = relay_key
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
            edge.received.append({"from": remote, "frame": h.frame, "tensor": h.tensor, "plan_id": h.plan_id,
                                  "shape": list(h.shape), "dtype": h.dtype.name, "sha256": tensor_digest(got.array),
                                  "at": time.time()})

        try:
            edge.device = ComputeDevice(self.ws_url, room_id, name="edge (server)", ssl_context=self.ssl_context,
                                        on_tensor=on_tensor, relay_key=self.relay_key)
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


def _diag_send_request(body: object) -> dict:
    """The send route's body, validated: {to: str, shape: [1..4 positive ints], seed, frame, tensor: ints}."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    to = body.get("to")
    if not isinstance(to, str) or not 1 <= len(to) <= 64:
        raise ValueError("'to' must be a peer id")
    shape = body.get("shape", [64, 56, 56])
    if not isinstance(shape, list) or not 1 <= len(shape) <= wire.MAX_NDIM \
            or not all(type(v) is int and v > 0 for v in shape):
        raise ValueError(f"'shape' must be a list of 1 to {wire.MAX_NDIM} positive integers")
    if int(np.prod(shape, dtype=np.int64)) > MAX_DIAG_ELEMENTS:
        raise ValueError(f"'shape' holds more than {MAX_DIAG_ELEMENTS} elements")
    out = {"to": to, "shape": tuple(shape)}
    for key in ("seed", "frame", "tensor"):
        value = body.get(key, 0)
        if type(value) is not int or not 0 <= value < 2**31:
            raise ValueError(f"'{key}' must be an integer from 0 to 2**31-1")
        out[key] = value
    return out


async def diag_edge_send(request: web.Request) -> web.Response:
    """Make the edge peer send a deterministic test tensor to one peer (no data of the caller's choosing)."""
    try:
        args = _diag_send_request(await request.json())
    except ValueError as exc:  # json.JSONDecodeError included
        return web.json_response({"error": str(exc)}, status=400)
    if EDGE_KEY not in request.app:
        return web.json_response({"error": "the edge peer is off"}, status=404)
    busy = request.app[DIAG_SEND_KEY]
    if busy.locked():
        return web.json_response({"error": "another test tensor is being sent; try again"}, status=429)
    async with busy:
        try:
            out = await asyncio.wait_for(request.app[EDGE_KEY].send_pattern(request.match_info["room"], **args), 30)
        except (KeyError, PeerGone, TimeoutError) as exc:
            return web.json_response({"error": repr(exc)}, status=409)
    return web.json_response(out)


# The diagnostics route's test tensor: at most this many float32 elements (4 MiB; the mesh test sends 0.8 MiB),
# and one such send at a time per server.
MAX_DIAG_ELEMENTS = 1 << 20
DIAG_SEND_KEY = web.AppKey("diag_send_lock", asyncio.Lock)


def setup(app: web.Application) -> None:
    """The edge manager when ServerConfig.edge_peer is set; the diagnostics routes only when
    ServerConfig.diagnostics is (`tilemesh serve --diagnostics`, or a test's app): they show peer ids and link
    stats to anyone holding a room id, and make the edge send test tensors."""
    from tilemesh.server.context import CONFIG_KEY, MODEL_KEY  # noqa: PLC0415

    config = app[CONFIG_KEY]
    if config.diagnostics:
        app[DIAG_SEND_KEY] = asyncio.Lock()
        app.router.add_get("/diag/mesh", diag_page)
        app.router.add_get("/diag/mesh/edge/{room}", diag_edge)
        app.router.add_post("/diag/mesh/edge/{room}/send", diag_edge_send)
    if config.edge_peer:
        # Our own certificate is self-signed, and this connection never leaves the host: no verification.
        from tilemesh.server.signaling.hub import HUB_KEY  # noqa: PLC0415

        bundle = app.get(MODEL_KEY)
        relay_key = app[HUB_KEY].relay_key if config.edge_transport == "relay" else None
        app[EDGE_KEY] = EdgeManager(own_ws_url(config), _rooms_of(app), ssl_context=False, relay_key=relay_key,
                                    model_dir=bundle.dir if bundle is not None else None)
        app.on_startup.append(_start_edge)
        app.on_shutdown.append(_stop_edge)
