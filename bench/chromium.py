"""Where Chromium is and the flags it needs here: shared by the benchmarks and the browser tests."""

from __future__ import annotations

import os

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
