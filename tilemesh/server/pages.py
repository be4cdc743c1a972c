"""HTTP side of rooms: `/` offers to start a room (a POST makes it), `/room/<id>` is the host's page with the QR
code, `/join/<id>` the phone's.

Only an explicit POST makes a room (`POST /` from the front page's button, `POST /api/rooms` for scripts), within a
per-client rate limit (`SignalingConfig.room_rate`/`room_burst`): a GET, which link previews, prefetchers and
crawlers send freely, never does.

The room id in these URLs is the only credential a room has (see `tilemesh.server.signaling.ids`), so the QR
code carries it and nothing else; everything live happens over the signaling socket (`tilemesh.server.signaling.hub`).
"""

from __future__ import annotations

import re
import secrets

import segno
from aiohttp import web
from markupsafe import Markup

from tilemesh.server.context import CONFIG_KEY, render
from tilemesh.server.signaling import protocol, rooms
from tilemesh.server.signaling.hub import HUB_KEY
from tilemesh.server.signaling.ids import RoomId

# Tablets count as phones: they join by QR code and have the same thermal and battery limits.
_MOBILE_UA = re.compile(r"Mobi|Android|iPhone|iPad|iPod|Windows Phone", re.IGNORECASE)


def guess_kind(user_agent: str) -> str:
    return "phone" if _MOBILE_UA.search(user_agent or "") else "laptop"


def join_url(request: web.Request, room_id: RoomId) -> str:
    """What phones open: built on the configured public URL, since the host's own address may be loopback."""
    base = request.app[CONFIG_KEY].public_url or f"{request.scheme}://{request.host}/"
    if not base.endswith("/"):
        base += "/"
    return f"{base}join/{room_id}"


def qr_svg(url: str) -> str:
    # Medium error correction survives a glossy laptop screen; the default 4-module quiet zone is what
    # phone scanners need to find the code. A viewBox (omitsize) instead of a fixed size lets CSS scale it.
    return segno.make(url, error="m").svg_inline(scale=6, dark="#000", light="#fff", omitsize=True)


def _room_or_404(request: web.Request) -> RoomId:
    try:
        room_id = RoomId.parse(request.match_info["room"])
    except ValueError:
        room_id = None
    if room_id is None or not request.app[HUB_KEY].room_exists(room_id):
        raise web.HTTPNotFound(text=render(request, "error.html", status=404, title="Room not found",
                                           heading="This room does not exist or has ended",
                                           message="Rooms close a few minutes after the last device leaves.").text,
                               content_type="text/html")
    return room_id


def _refusal_status(exc: rooms.RoomError) -> int:
    return 429 if exc.code == protocol.RATE_LIMITED else 503


async def index_page(request: web.Request) -> web.Response:
    return render(request, "index.html", title="tilemesh")


async def new_room(request: web.Request) -> web.Response:
    """The front page's button: make a room and go to its host page (303: the browser follows with a GET). The
    form's `fusion` field ("avg" or "max"; absent or empty: off) makes it a multi-view fusion room."""
    form = await request.post()
    method = form.get("fusion") or None
    try:
        fusion = protocol.fusion_mode({"method": method} if method else None)
    except ValueError as exc:
        return render(request, "error.html", status=400, title="No room made", heading="No room made",
                      message=str(exc))
    try:
        room_id = request.app[HUB_KEY].create_room(request.remote or "", fusion)
    except rooms.RoomError as exc:
        status = _refusal_status(exc)
        return render(request, "error.html", status=status, title="No room available",
                      heading="No room available", message=exc.message)
    raise web.HTTPSeeOther(f"/room/{room_id}")


async def api_new_room(request: web.Request) -> web.Response:
    """For scripts and tests: open a room without following a redirect. An optional JSON body
    `{"fusion": {"method"?: "avg"|"max", "window_s"?: seconds}}` makes it a multi-view fusion room."""
    fusion = None
    if request.can_read_body:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            fusion = protocol.fusion_mode(body.get("fusion"))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            return web.json_response({"error": protocol.INVALID_FIELD, "message": f"fusion: {exc}"}, status=400)
    try:
        room_id = request.app[HUB_KEY].create_room(request.remote or "", fusion)
    except rooms.RoomError as exc:
        return web.json_response({"error": exc.code, "message": exc.message}, status=_refusal_status(exc))
    return web.json_response({"room": room_id, "host_url": f"/room/{room_id}", "join_url": join_url(request, room_id),
                              "fusion": None if fusion is None else fusion.public()}, status=201)


async def host_page(request: web.Request) -> web.Response:
    room_id = _room_or_404(request)
    url = join_url(request, room_id)
    return render(request, "host.html", title="tilemesh room", room_id=room_id, join_url=url,
                  qr=Markup(qr_svg(url)), kind=guess_kind(request.headers.get("User-Agent", "")))


async def qr_image(request: web.Request) -> web.Response:
    room_id = _room_or_404(request)
    return web.Response(text=qr_svg(join_url(request, room_id)), content_type="image/svg+xml",
                        headers={"Cache-Control": "no-store"})


async def join_page(request: web.Request) -> web.Response:
    room_id = _room_or_404(request)
    kind = request.query.get("kind")
    if kind not in ("phone", "laptop"):
        kind = guess_kind(request.headers.get("User-Agent", ""))
    name = f"{kind.capitalize()} {secrets.token_hex(2)}"
    return render(request, "join.html", title="tilemesh: join", room_id=room_id, kind=kind, name=name)


def setup(app: web.Application) -> None:
    app.router.add_get("/", index_page)
    app.router.add_post("/", new_room)
    app.router.add_post("/api/rooms", api_new_room)
    app.router.add_get("/room/{room}", host_page)
    app.router.add_get("/room/{room}/qr.svg", qr_image)
    app.router.add_get("/join/{room}", join_page)
