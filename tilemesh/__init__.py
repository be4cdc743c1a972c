"""tilemesh: one CNN across the phones and laptops in a room, inside their browsers.

Sub-packages are the architecture:
- `runtime`: what every device runs (browsers in Pyodide, the edge in CPython): IR, kernels, backends,
  dependency table, tiling, wire format, the device session. Imports nothing of the server or the browser.
- `models`: ONNX import/export helpers and the demo model's builder (runs at setup, never in a browser).
- `planning`: the planner and cost model, pure functions of (graph, device profiles, links, objective).
- `server`: the aiohttp app (composition root, pages, TLS, assets) and `tilemesh.server.signaling.hub` (protocol, ids,
  rooms, hub).
- `edge`: the aiortc peer, the server's own device in a room.
- `web`: the browser's JavaScript, CSS and page templates (package data).

This file stays import-free: the browser's runtime zip carries it beside `runtime/`.
"""

__version__ = "0.1.0"
