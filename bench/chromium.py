"""Where Chromium is and the flags it needs here: shared by the benchmarks and the browser tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = os.environ.get("TILEMESH_CHROMIUM", "/usr/bin/chromium")
# Headless flags that work on Debian's Chromium: the background-networking ones keep it from reaching for the
# internet.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]


@contextlib.contextmanager
def local_server(port: int | None = None):
    """`tilemesh serve` on loopback over plain http, for a benchmark's browser pages: yields its URL once
    /healthz answers, and stops it afterwards."""
    port = port or 8500 + int(time.time()) % 400
    srv = subprocess.Popen([sys.executable, "-m", "tilemesh.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                           cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/healthz", timeout=1).close()  # noqa: S310 (our local server)
                break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        srv.terminate()
        srv.wait(10)


# A page's onnxruntime-web (wasm build, served from static/vendor/ort) with `threads` threads, as window.ort;
# returns whether the page is cross-origin isolated (threads need it).
ORT_WASM_SETUP = """async (threads) => {
    const ort = await import("/static/vendor/ort/ort.wasm.min.mjs");
    ort.env.wasm.wasmPaths = "/static/vendor/ort/";
    ort.env.wasm.numThreads = threads;
    window.ort = ort;
    return crossOriginIsolated;
}"""
