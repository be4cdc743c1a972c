"""Shared fixtures for real-browser tests: a running tilemesh server and Debian's headless Chromium.

The server runs as a subprocess (`python -m server.cli serve`) exactly as a user starts it. Every request the
browser makes is recorded so tests can assert that nothing leaves the machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from browsers import CHROMIUM, CHROMIUM_ARGS, REPO  # noqa: E402,F401  (re-exported for tests)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0, context=None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as r:  # noqa: S310 (local test server)
                if r.status == 200:
                    return
        except Exception as exc:  # noqa: BLE001 (any failure means: not up yet)
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not come up: {last}")


class ServerProcess:
    def __init__(self, host: str, port: int, extra: list[str] | None = None, prefix: list[str] | None = None):
        self.host, self.port = host, port
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"tilemesh-server-{port}.log", "w+")  # noqa: SIM115
        cmd = [*(prefix or []), sys.executable, "-m", "server.cli", "serve", "--host", host, "--port", str(port),
               *(extra or [])]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://{host}:{port}"

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.seek(0)
        out = self.log.read()
        self.log.close()
        return out


def require_browser_assets() -> None:
    if not (REPO / "static" / "vendor" / "pyodide" / "pyodide.mjs").exists():
        pytest.fail("browser assets missing: run `python -m server.assets` (make test does)")
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: `apt-get install chromium` (make test does)")


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


@pytest.fixture(scope="session")
def pw():
    """The test session's one Playwright driver: a second sync instance cannot start while one runs, so every
    test that needs its own browser (other flags, a namespace, a CPU quota) launches it from this one."""
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="session")
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
