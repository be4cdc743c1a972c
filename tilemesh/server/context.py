"""What the server's feature modules share: its configuration, the app keys, and page rendering.

A leaf module (it imports no other part of the server), so `app` can import every feature module and each
feature module can import this one without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from aiohttp import web

import tilemesh
from tilemesh.paths import default_static_dir

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
TEMPLATES = WEB_DIR / "templates"


@dataclass
class ServerConfig:
    """Everything the app needs to know about where it runs; the CLI fills it from flags."""

    host: str = "127.0.0.1"
    port: int = 8443
    static_dir: Path = field(default_factory=default_static_dir)
    web_dir: Path = WEB_DIR
    # The URL phones should open (scheme, LAN address, port); the CLI computes it, tests may override it.
    public_url: str | None = None
    ice_servers: list[dict] = field(default_factory=list)
    # Start the aiortc edge peer (the server joins each room as one more device).
    edge_peer: bool = False
    # How browsers reach that edge: "relay" (binary frames on the signaling WebSocket they already hold; the edge
    # is in this process) or "webrtc" (aiortc data channels, as an edge on another machine would use).
    edge_transport: str = "relay"
    # The ONNX model to serve (its model card beside it); None: the demo model `tilemesh setup` built.
    model: Path | None = None
    # Register the `/diag/mesh*` routes (mesh tests, link benchmarks); off in normal serving.
    diagnostics: bool = False


CONFIG_KEY = web.AppKey("config", ServerConfig)
JINJA_KEY = web.AppKey("jinja", jinja2.Environment)
# The served model (`tilemesh.server.model.ModelBundle`), or None when none is set up.
MODEL_KEY = web.AppKey("model", object)


def render(request: web.Request, template: str, status: int = 200, **context) -> web.Response:
    env = request.app[JINJA_KEY]
    bundle = request.app.get(MODEL_KEY)
    model = bundle.page_info() if bundle is not None else None
    html = env.get_template(template).render(version=tilemesh.__version__, model=model, **context)
    return web.Response(text=html, content_type="text/html", status=status)
