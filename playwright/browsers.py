"""Where Chromium is, how to start it here, and the tilemesh server as a subprocess: shared by conftest, the
test modules and the room helpers (imported by plain name, never through `conftest`, whose module name is
ambiguous with tests/conftest.py).

(Test modules import sibling helpers by plain name: pytest puts this folder on sys.path, and the folder has no
__init__.py so that it never shadows the real `playwright` package.)
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

from bench.chromium import CHROMIUM, CHROMIUM_ARGS

REPO = Path(__file__).resolve().parent.parent
__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "REPO"]


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
    def __init__(self, host: str, port: int, extra: list[str] | None = None, prefix: list[str] | None = None,
                 cwd: Path | None = None, launcher: list[str] | None = None):
        self.host, self.port = host, port
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"tilemesh-server-{port}.log", "w+")  # noqa: SIM115
        cmd = [*(prefix or []), *(launcher or [sys.executable, "-m", "tilemesh.cli"]), "serve", "--host", host,
               "--port", str(port), *(extra or [])]
        # `cwd`, `launcher`: another checkout's code and how to run it (benchmarks comparing two versions)
        self.proc = subprocess.Popen(cmd, cwd=cwd or REPO, stdout=self.log, stderr=subprocess.STDOUT)
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
        pytest.fail("browser assets missing: run `python -m tilemesh.server.assets` (make test does)")
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: `apt-get install chromium` (make test does)")


def start_room(page, base_url: str) -> str:
    """Do what a host does: open the front page and press "Start a room" (only a POST makes a room); the room id
    of the host page it lands on."""
    page.goto(base_url + "/")
    page.locator("#new-room").click()
    page.wait_for_url("**/room/*")
    return page.url.rsplit("/", 1)[-1]
