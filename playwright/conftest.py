"""Shared fixtures for real-browser tests: a running tilemesh server and Debian's headless Chromium.

The server runs as a subprocess (`python -m tilemesh.cli serve`) exactly as a user starts it. Every request the
browser makes is recorded so tests can assert that nothing leaves the machine.
"""

from __future__ import annotations

import pytest
from browsers import CHROMIUM, CHROMIUM_ARGS, ServerProcess, free_port, require_browser_assets, wait_http


@pytest.fixture(scope="session")
def server():
    """A plain-http server on loopback (a secure context for the browser, like localhost)."""
    require_browser_assets()
    srv = ServerProcess("127.0.0.1", free_port())
    try:
        wait_http(srv.url + "/healthz")
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def pw():
    """The module's one Playwright driver: a second sync instance cannot start while one runs, so every test
    that needs its own browser (other flags, a namespace, a CPU quota) launches it from this one. Per module,
    not per session: a live sync driver keeps an event loop running, which asyncio tests in a later module
    (aiohttp, aiortc) would trip over."""
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(pw):
    require_browser_assets()
    b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    yield b
    b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page that records every request and console line; fails the test on a foreign host."""
    context = browser.new_context()
    pg = context.new_page()
    pg.requests = []  # type: ignore[attr-defined]
    pg.console_lines = []  # type: ignore[attr-defined]
    pg.on("request", lambda r: pg.requests.append(r.url))
    pg.on("console", lambda m: pg.console_lines.append(f"{m.type}: {m.text}"))
    yield pg
    context.close()
