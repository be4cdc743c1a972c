"""Firefox ESR in a Chromium-hosted room: it boots the runtime, joins over WebRTC and computes its share.

Browsers differ most where tilemesh goes (wasm threads, workers, WebRTC data channels), so a room must not be
Chromium-only. Playwright cannot drive a stock Firefox, so Debian's `firefox-esr` is driven headless over
WebDriver BiDi by a small node script (`firefox/device.mjs`, npm `puppeteer-core`, installed by `make test`,
never downloading a browser) inside the test's network namespace, next to Chromium's host and camera phone.
Every device is forced into the plan (equal split): the Firefox device must compute tasks and the phone must
still show onnxruntime's top-1 for the photo its camera sees.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import skimage.data
from browsers import CHROMIUM, CHROMIUM_ARGS, start_room
from roomkit import decode_qr, netns_server
from test_distributed import READY, expected_top1, frames, wait_frames

from bench.media import write_y4m

pytestmark = [pytest.mark.browser, pytest.mark.netns]

FIREFOX = os.environ.get("TILEMESH_FIREFOX", "/usr/bin/firefox-esr")
DEVICE = Path(__file__).parent / "firefox" / "device.mjs"


class FirefoxDevice:
    """The node driver as a subprocess: its JSON state lines are read on a thread; closing stdin ends it."""

    def __init__(self, argv: list[str]):
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in close(); a pipe nobody reads could stall the driver)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True)
        self.lines: queue.Queue = queue.Queue()
        self.state: dict = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))

    def wait(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.state = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    self.stderr.seek(0)
                    raise AssertionError(f"the Firefox driver exited ({self.proc.returncode}): "
                                         f"{self.stderr.read()[-3000:]}") from None
                continue
            if predicate(self.state):
                return self.state
        raise AssertionError(f"Firefox: {what} not reached in {timeout:.0f} s, stuck at "
                             f"{self.state.get('stage')!r} (boot bar {self.state.get('boot')!r}, signaling "
                             f"{self.state.get('socket')!r}); last state {self.state}")

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()


def test_firefox_joins_a_chromium_room_and_computes_its_share(tmp_path: Path, pw):
    if shutil.which(FIREFOX) is None and not Path(FIREFOX).exists():
        pytest.fail(f"{FIREFOX} missing: `apt-get install firefox-esr` (make test does)")
    if not (DEVICE.parent / "node_modules" / "puppeteer-core").exists():
        pytest.fail("puppeteer-core missing: `npm ci --prefix playwright/firefox` (make test does)")
    photo = skimage.data.coffee()
    cam = write_y4m(tmp_path / "coffee.y4m", photo)
    expected = expected_top1(photo)
    with netns_server() as srv:
        in_ns = srv.ns.chromium_wrapper(CHROMIUM)
        chromium = pw.chromium.launch(executable_path=in_ns, args=[*CHROMIUM_ARGS, "--ignore-certificate-errors",
                                                                   f"--use-file-for-fake-video-capture={cam}"])
        firefox = None
        pages = []
        try:
            host = chromium.new_context(ignore_https_errors=True).new_page()
            start_room(host, srv.url)
            join_url = decode_qr(host)
            phone = chromium.new_context(ignore_https_errors=True).new_page()
            phone.goto(join_url + "?kind=phone")
            pages = [host, phone]
            firefox = FirefoxDevice(srv.ns.wrap(["node", str(DEVICE), join_url + "?kind=laptop"]))
            for pg in pages:
                pg.wait_for_function(READY, timeout=180_000)
            ff = firefox.wait(lambda s: s.get("ready"), 180, "ready")
            assert "Firefox" in ff["userAgent"] and ff["crossOriginIsolated"], ff
            # Firefox computes on onnxruntime-web too (wasm SIMD in its Worker, one thread: see ort_engine.js),
            # chosen by its profile.
            assert ff["backend"] == "ort-wasm", ff
            ff_id = ff["peerId"]
            # Chromium sees the Firefox device in its room, measured like any other.
            host.wait_for_function("(id) => window.tilemesh.signaling.peers.some((p) => p.id === id"
                                   " && p.state === 'ready' && p.profile?.compute)", arg=ff_id, timeout=60_000)

            phone.click("#start-ar")
            wait_frames(phone, 2)
            phone.evaluate("() => { window.tilemesh.ar.engine.strategy = 'equal_split';"
                           " window.tilemesh.engine.plan = null; }")
            phone.wait_for_function("() => window.tilemesh.engine.plan?.strategy === 'equal_split'", timeout=60_000)
            plan = phone.evaluate("window.tilemesh.engine.plan")
            assert ff_id in plan["devices"], plan["devices"]
            wait_frames(phone, frames(phone) + 3)
            assert phone.locator("#labels").get_attribute("data-top1") == expected
            key = str(plan["plan_id"])
            done = firefox.wait(lambda s: (s.get("tasksRun") or {}).get(key, 0) > 0, 60,
                                f"tasks computed under plan {key}")
            assert done["errors"] == [], done
            assert phone.evaluate("window.tilemesh.engine.errors") == []
        except Exception:
            print("firefox:", firefox.state if firefox else None)
            for pg in pages:
                print(pg.url, pg.evaluate("({errors: window.tilemesh?.engine?.errors, state: "
                                          "window.tilemesh?.signaling?.lastState})"))
            raise
        finally:
            if firefox:
                firefox.close()
            for pg in pages:
                pg.context.close()
            chromium.close()
