"""The aiohttp app serves pages and assets with the headers and MIME types browsers insist on."""

from __future__ import annotations

import pytest

from tilemesh.server.app import ServerConfig, create_app


@pytest.fixture
async def client(aiohttp_client, tmp_path):
    static = tmp_path / "static"
    (static / "vendor").mkdir(parents=True)
    (static / "vendor" / "x.wasm").write_bytes(b"\0asm\1\0\0\0")
    (static / "vendor" / "x.mjs").write_text("export const a = 1;\n")
    return await aiohttp_client(create_app(ServerConfig(static_dir=static)))


async def test_healthz_and_isolation_headers(client):
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert (await resp.json())["ok"] is True
    # Without both headers the page is not crossOriginIsolated and onnxruntime-web gets no threads.
    assert resp.headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert resp.headers["Cross-Origin-Embedder-Policy"] == "require-corp"


async def test_wasm_and_mjs_mime_types(client):
    wasm = await client.get("/static/vendor/x.wasm")
    assert wasm.status == 200 and wasm.headers["Content-Type"] == "application/wasm"
    mjs = await client.get("/static/vendor/x.mjs")
    assert mjs.status == 200 and mjs.headers["Content-Type"].startswith("text/javascript")
    assert mjs.headers["Cross-Origin-Embedder-Policy"] == "require-corp"


async def test_web_scripts_served_as_javascript(client):
    resp = await client.get("/web/runtime.js")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/javascript")


async def test_missing_file_is_404_with_headers(client):
    resp = await client.get("/static/vendor/nope.wasm")
    assert resp.status == 404
    assert resp.headers["Cross-Origin-Opener-Policy"] == "same-origin"


async def test_no_directory_listing(client):
    resp = await client.get("/static/vendor/")
    assert resp.status in (403, 404)


async def test_runtime_page_renders(client):
    resp = await client.get("/runtime")
    assert resp.status == 200
    html = await resp.text()
    assert "/web/runtime.js" in html and "<progress" in html


async def test_cache_policy(client):
    vendor = await client.get("/static/vendor/x.wasm")
    assert "immutable" in vendor.headers["Cache-Control"]
    web_js = await client.get("/web/runtime.js")
    assert web_js.headers["Cache-Control"] == "no-cache"
    versioned = await client.get("/web/runtime.js?v=abc")
    assert "max-age=31536000" in versioned.headers["Cache-Control"]
