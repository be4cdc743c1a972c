"""The aiohttp application: pages rendered with jinja2, static assets, and the security headers browsers need.

Feature modules (rooms, signaling, the edge peer) attach themselves through `setup(app)` functions called from
`create_app`, so this module stays the one place that shows what the server serves.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import jinja2
from aiohttp import web

import tilemesh
from tilemesh.edge import manager as edge_manager
from tilemesh.server import inference, model, pages
from tilemesh.server.context import CONFIG_KEY, JINJA_KEY, TEMPLATES, ServerConfig, render
from tilemesh.server.signaling import hub as signaling

# The browser refuses to stream-compile wasm served under another type, and module workers refuse .mjs served
# as application/octet-stream; aiohttp's own table varies by platform, so the types that matter are fixed here.
CONTENT_TYPES = {
    ".wasm": "application/wasm",
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".json": "application/json",
    ".zip": "application/zip",
    ".whl": "application/zip",
    ".npz": "application/octet-stream",
    ".bin": "application/octet-stream",
    ".onnx": "application/octet-stream",
}

@web.middleware
async def security_headers(request: web.Request, handler):
    """Cross-origin isolation lets onnxruntime-web use SharedArrayBuffer threads; nothing is loaded cross-origin."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
        _add_isolation_headers(response)
        raise
    _add_isolation_headers(response)
    if isinstance(response, web.FileResponse):
        content_type = CONTENT_TYPES.get(PurePosixPath(request.path).suffix)
        if content_type:
            response.headers["Content-Type"] = content_type
        # Vendor files sit under versioned paths and model/runtime files are fetched with ?v=<sha256>, so a
        # phone keeps them for good (tens of MB it must not download twice); anything else revalidates.
        immutable = request.path.startswith("/static/vendor/") or "v" in request.query
        response.headers["Cache-Control"] = "public, max-age=31536000, immutable" if immutable else "no-cache"
    return response


def _add_isolation_headers(response: web.StreamResponse) -> None:
    response.headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    response.headers.setdefault("Cross-Origin-Embedder-Policy", "require-corp")
    response.headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "version": tilemesh.__version__})


async def runtime_page(request: web.Request) -> web.Response:
    """A bare page that boots the peer runtime: the smoke test's target and a quick check for a new device."""
    return render(request, "runtime.html", title="tilemesh runtime check")


def create_app(config: ServerConfig | None = None) -> web.Application:
    config = config or ServerConfig()
    app = web.Application(middlewares=[security_headers], client_max_size=1024**2)
    app[CONFIG_KEY] = config
    app[JINJA_KEY] = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=jinja2.select_autoescape(["html"]),
    )
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/runtime", runtime_page)
    _setup_features(app)
    # show_index off: directory listings would leak the layout of the asset folders to anyone on the LAN.
    app.router.add_static("/web/", config.web_dir, append_version=False)
    config.static_dir.mkdir(parents=True, exist_ok=True)
    app.router.add_static("/static/", config.static_dir, append_version=False)
    return app


async def ar_page(request: web.Request) -> web.Response:
    """The AR classifier on this device alone (no room): the camera, the labels, the speed."""
    return render(request, "ar.html", title="tilemesh classifier")


def _setup_features(app: web.Application) -> None:
    """Attach feature modules; each owns its routes and background tasks (added here, one line each)."""
    model.setup(app)
    signaling.setup(app)
    inference.setup(app)
    pages.setup(app)
    edge_manager.setup(app)
    app.router.add_get("/ar", ar_page)


__all__ = ["CONFIG_KEY", "ServerConfig", "create_app"]
