"""The runtime check page boots Pyodide from the local server, loads numpy and imports tilemesh.runtime."""

from __future__ import annotations

from urllib.parse import urlsplit

import tilemesh.runtime


def test_runtime_boots_offline(page, server):
    page.goto(server.url + "/runtime")
    info = page.locator("#info")
    # A cold boot here takes about 3-6 s; 90 s leaves room for a loaded CI machine.
    page.wait_for_function("document.getElementById('info').dataset.state !== 'booting'", timeout=90_000)
    assert info.get_attribute("data-state") == "ready", info.inner_text() + "\n" + "\n".join(page.console_lines)
    assert info.get_attribute("data-runtime") == tilemesh.runtime.__version__
    text = info.inner_text()
    assert "numpy 2.0.2" in text and "Pyodide 0.27.7" in text
    # Cross-origin isolation is what lets onnxruntime-web use threads; it needs our COOP/COEP headers.
    assert "crossOriginIsolated=true" in text
    assert page.locator("#boot").get_attribute("data-stage") == "ready"

    server_origin = urlsplit(server.url).netloc
    foreign = [u for u in page.requests if urlsplit(u).scheme in ("http", "https", "ws", "wss")
               and urlsplit(u).netloc != server_origin]
    assert not foreign, f"requests left the server: {foreign}"
    assert any(u.endswith("pyodide.asm.wasm") for u in page.requests)


def test_python_call_round_trip(page, server):
    """Numbers and bytes cross the Worker boundary both ways through the runtime's call()."""
    page.goto(server.url + "/runtime")
    page.wait_for_function("document.getElementById('info').dataset.state === 'ready'", timeout=90_000)
    got = page.evaluate(
        """async () => {
            const rt = window.tilemeshRuntime;
            const s = await rt.exec("import numpy as np; float(np.arange(10, dtype=np.float32).sum())");
            const b = await rt.exec("bytes(range(5))");
            return [s, Array.from(b)];
        }"""
    )
    assert got == [45.0, [0, 1, 2, 3, 4]]
