"""The signaling server under abuse: its memory (RSS) with slow readers and under a connection flood.

    python -m bench.serverload [--seconds 15] [--flood 600] [--compare main]

Starts `tilemesh serve --http` on 127.0.0.1 (loopback only; every loop below is bounded in time and count) and
runs two scenarios against it, sampling the server process's RSS from /proc once a second:

- slow readers: one sender in a room broadcasts 60 KB messages at 45 per second (under the per-socket rate limit)
  while four members hold their TCP connection open, keep sending `ping`, and never read. Reports RSS (baseline,
  peak, end), how long until each slow member was dropped (`peer_left`) and how many were still in the room.
- connection flood: `--flood` WebSocket clients from 127.0.0.1 connect, never join, and keep pinging (their
  client answers the server's WebSocket pings too). Reports how many the server accepted, how many are still
  open after the join deadline, and RSS.

With `--compare REF` the same scenarios also run against the code of git ref REF (exported to a temporary
folder, served with this checkout's static assets), and the table shows both with ratios, measured in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
BLOB = 60_000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, source: Path):
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server)
        env = {**os.environ, "PYTHONPATH": str(source)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tilemesh.cli", "serve", "--host", HOST, "--port", str(self.port), "--http",
             "--static-dir", str(REPO / "static")], cwd=source, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), urllib.request.urlopen(self.base + "/healthz", timeout=1):  # noqa: S310
                return
            time.sleep(0.1)
        self.stop()
        self.log.seek(0)
        raise RuntimeError(f"server did not come up: {self.log.read().decode()[-2000:]}")

    def rss(self) -> float:
        return rss_mb(self.proc.pid)

    def new_room(self) -> str:
        req = urllib.request.Request(self.base + "/api/rooms", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310 (loopback)
            return json.loads(r.read())["room"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def ws_frame(obj: dict) -> bytes:
    """One masked client text frame holding `obj` as JSON (payloads under 64 KiB)."""
    payload = json.dumps(obj).encode()
    if len(payload) >= 65536:
        raise ValueError(f"frame of {len(payload)} bytes: only 16-bit lengths are written here")
    mask = os.urandom(4)
    head = struct.pack("!BBH", 0x81, 0x80 | 126, len(payload)) if len(payload) > 125 else \
        struct.pack("!BB", 0x81, 0x80 | len(payload))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def open_raw_ws(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket that reads nothing unless asked: asyncio stops reading once 4 KiB wait unread, and a 4 KiB
    receive buffer makes the kernel stop accepting soon after (a phone behind a dead Wi-Fi link, or a client that
    means harm). Shared with the signaling tests."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        writer.close()
        raise ConnectionError(f"WebSocket upgrade refused: {head[:80]!r}")
    return reader, writer


async def raw_member(port: int, room: str, name: str) -> asyncio.StreamWriter:
    """A room member that never reads."""
    reader, writer = await open_raw_ws(HOST, port)
    writer.write(ws_frame({"v": 1, "type": "join", "room": room, "name": name, "kind": "phone"}))
    writer.reader = reader  # type: ignore[attr-defined]  (kept alive, never read again)
    return writer


async def slow_readers(server: Server, seconds: float, members: int = 4) -> dict:
    room = server.new_room()
    base = server.rss()
    samples = [base]
    left: dict[str, float] = {}
    names: dict[str, str] = {}
    last_roster: list[str] = []
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"ws://{HOST}:{server.port}/ws")
        await ws.send_json({"v": 1, "type": "join", "room": room, "name": "sender", "kind": "laptop"})
        writers = [await raw_member(server.port, room, f"slow{i}") for i in range(members)]
        t0 = time.monotonic()

        async def read() -> None:
            nonlocal last_roster
            async for msg in ws:
                m = json.loads(msg.data)
                if m["type"] in ("roster", "welcome"):
                    for p in m["peers"]:
                        names[p["id"]] = p["name"]
                    last_roster = [p["name"] for p in m["peers"]]
                elif m["type"] == "peer_left":
                    left.setdefault(names.get(m["id"], m["id"]), time.monotonic() - t0)

        reader = asyncio.get_running_loop().create_task(read())
        blob = "x" * BLOB
        i = 0
        next_sample = time.monotonic() + 1
        while time.monotonic() - t0 < seconds:
            await ws.send_json({"v": 1, "type": "broadcast", "data": {"i": i, "blob": blob}})
            i += 1
            if i % 45 == 0:
                for w in writers:  # the slow members look alive: they keep pinging, they just never read
                    if not w.is_closing():
                        w.write(ws_frame({"v": 1, "type": "ping"}))
            if time.monotonic() >= next_sample:
                samples.append(server.rss())
                next_sample += 1
            await asyncio.sleep(1 / 45)
        await asyncio.sleep(2)
        end = server.rss()
        reader.cancel()
        await ws.close()
        for w in writers:
            w.close()
    slow_left = {k: round(v, 2) for k, v in left.items() if k.startswith("slow")}
    return {"sent_mb": round(i * BLOB / 1e6, 1), "rss_base": base, "rss_peak": max(samples), "rss_end": end,
            "dropped": len(slow_left), "drop_s": max(slow_left.values()) if slow_left else None,
            "still_in_room": sum(1 for n in last_roster if n.startswith("slow"))}


async def flood(server: Server, count: int, seconds: float) -> dict:
    base = server.rss()
    samples = [base]
    accepted = refused = 0
    sockets = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.monotonic()
        for _ in range(count):
            try:
                sockets.append(await session.ws_connect(f"ws://{HOST}:{server.port}/ws", autoping=True))
                accepted += 1
            except aiohttp.WSServerHandshakeError:
                refused += 1
        connect_s = time.monotonic() - t0
        samples.append(server.rss())

        async def keep_pinging(ws) -> None:
            with contextlib.suppress(Exception):
                while not ws.closed:
                    await ws.send_json({"v": 1, "type": "ping"})
                    with contextlib.suppress(asyncio.TimeoutError):
                        await ws.receive(timeout=1.5)

        tasks = [asyncio.get_running_loop().create_task(keep_pinging(ws)) for ws in sockets]
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(1)
            samples.append(server.rss())
        open_after = sum(1 for ws in sockets if not ws.closed)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ws in sockets:
            await ws.close()
    await asyncio.sleep(1)
    return {"attempts": count, "accepted": accepted, "refused": refused, "connect_s": round(connect_s, 2),
            "open_after": open_after, "rss_base": base, "rss_peak": max(samples), "rss_end": server.rss()}


def run(source: Path, args) -> dict:
    out = {}
    server = Server(source)
    try:
        out["slow"] = asyncio.run(slow_readers(server, args.seconds))
    finally:
        server.stop()
    server = Server(source)
    try:
        out["flood"] = asyncio.run(flood(server, args.flood, args.seconds))
    finally:
        server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--flood", type=int, default=600)
    parser.add_argument("--compare", help="a git ref whose code runs the same scenarios (e.g. main)")
    args = parser.parse_args(argv)
    results = {"this": run(REPO, args)}
    if args.compare:
        with tempfile.TemporaryDirectory() as tmp:
            archive = subprocess.run(["git", "archive", args.compare, "tilemesh"], cwd=REPO, check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            results[args.compare] = run(Path(tmp), args)
    print(json.dumps(results, indent=1))
    rows = [("slow", k) for k in ("sent_mb", "rss_base", "rss_peak", "rss_end", "dropped", "drop_s", "still_in_room")]
    rows += [("flood", k) for k in ("attempts", "accepted", "refused", "open_after", "rss_base", "rss_peak",
                                      "rss_end")]
    names = list(results)
    print("\n| scenario | measure | " + " | ".join(names) + (f" | {names[1]} / this |" if len(names) == 2 else " |"))
    print("|---|---|" + "---|" * (len(names) + (len(names) == 2)))
    for scenario, key in rows:
        vals = [results[n][scenario][key] for n in names]
        cells = [f"{v:.1f}" if isinstance(v, float) else str(v) for v in vals]
        ratio = ""
        if len(vals) == 2 and all(isinstance(v, int | float) for v in vals) and vals[0]:
            ratio = f" {vals[1] / vals[0]:.1f}x |"
        elif len(vals) == 2:
            ratio = " |"
        print(f"| {scenario} | {key} | " + " | ".join(cells) + " |" + ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
