"""Where Chromium is and how to start it here; imported by conftest and by tests that launch their own browser.

(Test modules import sibling helpers by plain name: pytest puts this folder on sys.path, and the folder has no
__init__.py so that it never shadows the real `playwright` package.)
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("TILEMESH_CHROMIUM", "/usr/bin/chromium")
# Flags from shared/PLATFORM.md: the background-networking ones keep Chromium from reaching for the internet.
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
