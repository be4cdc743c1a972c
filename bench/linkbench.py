"""Data-channel link benchmark: round-trip time and throughput, browser <-> browser and browser <-> aiortc.

    sudo python -m bench.linkbench [--total-mb 8] [--rounds 20]

Makes its own network namespace (Chromium and aiortc never use loopback), re-runs itself
inside it, starts `tilemesh serve --https` there, opens two diagnostics pages (`/diag/mesh`) in headless
Chromium and joins an aiortc `EdgePeer` to the same room. Then, per link and message size (16, 64, 256 KiB,
capped at what the receiver advertises), it measures the median round trip of a message echoed whole and the
bulk throughput, plus the time to move one tensor as the executor would (a 24x56x56 halo-sized and a
64x56x56 full float32 map, chunked by `tilemesh.runtime.wire` at the receiver's maxMessageSize). Prints a table
with ratios. The probe protocol (tag bytes 0xB0..0xB4) is `LinkProbe` in web/mesh.js.

    sudo python -m bench.linkbench --probes [--rounds 20]

compares instead the link figures (Mbit/s, as the planner reads them) that the session's probe
(`tilemesh.runtime.session.LINK_PROBE`) reports with those the edge's former probe gave (256 KiB as 64 KiB
messages), interleaved on the same links in one run, and prints their ratio.

    sudo python -m bench.linkbench --edge-cpu [--total-mb 8] [--rounds 5]

compares the two ways a browser reaches the server's own edge (`tilemesh serve --edge-transport relay|webrtc`):
an aiortc data channel, or binary frames on the signaling WebSocket relayed by the hub. Two edge peers join
the same room in this process, one of each kind; per round and direction each moves `--total-mb` through the
session's own probe, interleaved, and the CPU seconds of the server process plus this process (which holds
both edges: together they are what `serve --edge` runs in one process) are counted per MB moved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tilemesh.edge.peer import EdgePeer
from tilemesh.runtime import wire

REPO = Path(__file__).resolve().parent.parent
SIZES = [16 * 1024, 64 * 1024, 256 * 1024]
TENSORS = {"halo 24x56x56": (24, 56, 56), "map 64x56x56": (64, 56, 56)}


def _load_netns():
    from bench import netns  # noqa: PLC0415

    return netns


def megabytes(t: dict) -> dict:
    """A throughput probe's raw outcome (bytes counted, ms) with this table's rate: megabytes per second.
    (The planner's figures, in megabits per second, are `tilemesh.runtime.session.link_figures`.)"""
    return {**t, "mb_s": t["bytes"] / 1e6 / (t["ms"] / 1e3)}


def http_json(url: str, ctx, body: dict | None = None, timeout: float = 10) -> dict:
    """GET `url` (POST `body` when given) on our own server in the namespace; the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:  # noqa: S310 (our server in the namespace)
        return json.loads(r.read())


def wait_up(url: str, ctx, timeout: float = 30) -> None:
    """Poll `url` until it answers (the server subprocess is starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx):  # noqa: S310
                return
        except Exception:  # noqa: BLE001 (not up yet)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# What the edge peer measured before the device session core: a 256 KiB burst of 64 KiB messages.
OLD_EDGE_PROBE = {"message": 64 * 1024, "total": 256 * 1024}


async def compare_probes(edge, page, browser_id: str, rounds: int) -> list[dict]:
    """Mbit/s of the former edge probe and the session's, alternating, on aiortc -> browser and browser -> aiortc."""
    from tilemesh.runtime import session  # noqa: PLC0415

    new = {"message": session.LINK_PROBE.message, "total": session.LINK_PROBE.total}
    out = []
    for link in ("aiortc -> browser", "browser -> aiortc"):
        got: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(rounds):
            for name, spec in (("old", OLD_EDGE_PROBE), ("new", new)):
                if link == "aiortc -> browser":
                    size = min(edge.max_message_size(browser_id), spec["message"])
                    t = await edge.probe.throughput(browser_id, size, spec["total"], timeout=60)
                else:
                    size = min(await page.evaluate("(id) => window.meshtest.mesh.maxMessageSize(id)", edge.peer_id),
                               spec["message"])
                    t = await page.evaluate("([id, s, n]) => window.meshtest.probe.throughput(id, s, n)",
                                            [edge.peer_id, size, spec["total"]])
                got[name].append(session.link_figures([1.0], t["bytes"], t["ms"] / 1e3)["mbps"])
        old, cur = statistics.median(got["old"]), statistics.median(got["new"])
        out.append({"link": link, "old_mbit_s": old, "new_mbit_s": cur, "ratio": cur / old})
    return out


# What a frame costs the edge's links on the default room's plans: the 224x224x3 float32 input (offload) is
# 602 KB; a partition's feature map to the edge about as much.
FRAME_BYTES = 224 * 224 * 3 * 4
RELAY_KEY = "linkbench-relay-key"


async def compare_edge_transports(addr: str, port: int, room: str, page, browser_id: str, total: int,
                                  rounds: int, server_pid: int) -> list[dict]:
    """CPU (server process + this one) per MB and throughput, aiortc data channel vs signaling relay, both ways."""
    from bench.env import process_cpu_seconds  # noqa: PLC0415

    edges = {}
    for name, key in (("webrtc", None), ("relay", RELAY_KEY)):
        edges[name] = await EdgePeer(f"wss://{addr}:{port}/ws", room, name=f"edge-{name}", kind="edge",
                                     ssl_context=False, probes=True, relay_key=key).start()
    for edge in edges.values():
        await page.evaluate("(id) => window.meshtest.mesh.waitOpen(id)", edge.peer_id)
        await edge.wait_open(browser_id)
    kinds = {n: await page.evaluate("(id) => window.meshtest.mesh.links.get(id).relay === true", e.peer_id)
             for n, e in edges.items()}
    assert kinds == {"webrtc": False, "relay": True}, kinds

    def cpu() -> float:
        return process_cpu_seconds(server_pid) + time.process_time()

    got: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for r in range(rounds):
        order = list(edges.items()) if r % 2 == 0 else list(edges.items())[::-1]
        for name, edge in order:
            for direction in ("browser -> edge", "edge -> browser"):
                c0 = cpu()
                if direction == "browser -> edge":
                    size = await page.evaluate("(id) => window.meshtest.mesh.maxMessageSize(id)", edge.peer_id)
                    t = await page.evaluate("([id, s, n]) => window.meshtest.probe.throughput(id, s, n)",
                                            [edge.peer_id, size, total])
                else:
                    t = await edge.probe.throughput(browser_id, edge.max_message_size(browser_id), total, timeout=120)
                spent = cpu() - c0
                got.setdefault((name, direction), []).append((t["bytes"], t["ms"], spent))
    for edge in edges.values():
        await edge.close()
    rows = []
    for (name, direction), xs in got.items():
        mb = sum(b for b, _, _ in xs) / 1e6
        rows.append({"transport": name, "direction": direction,
                     "mb_s": statistics.median(b / 1e3 / ms for b, ms, _ in xs),
                     "cpu_ms_per_mb": 1e3 * sum(c for _, _, c in xs) / mb})
    return rows


def print_edge_cpu(rows: list[dict]) -> None:
    by = {(r["transport"], r["direction"]): r for r in rows}
    print(f"{'direction':<16} {'transport':<8} {'MB/s':>7} {'CPU ms/MB':>10} {'CPU ms/frame*':>14} {'vs webrtc':>10}")
    for direction in ("browser -> edge", "edge -> browser"):
        for name in ("webrtc", "relay"):
            r = by[(name, direction)]
            base = by[("webrtc", direction)]["cpu_ms_per_mb"]
            print(f"{direction:<16} {name:<8} {r['mb_s']:>7.1f} {r['cpu_ms_per_mb']:>10.1f} "
                  f"{r['cpu_ms_per_mb'] * FRAME_BYTES / 1e6:>14.1f} {r['cpu_ms_per_mb'] / base:>9.2f}x")
    print(f"* CPU of the server process and the edges per {FRAME_BYTES / 1e3:.0f} KB moved (one 224x224x3 float32 "
          "frame); ratio < 1: the relay costs less")


async def bench(addr: str, total: int, rounds: int, probes: bool = False, edge_cpu: bool = False) -> list[dict]:
    from playwright.async_api import async_playwright  # noqa: PLC0415

    from bench.chromium import CHROMIUM, CHROMIUM_ARGS  # noqa: PLC0415

    port = 8443
    base = f"https://{addr}:{port}"
    insecure = ssl._create_unverified_context()  # the server's own self-signed certificate
    with tempfile.TemporaryDirectory() as state, open(os.path.join(state, "server.log"), "w+") as log:
        server = subprocess.Popen([sys.executable, "-m", "tilemesh.cli", "serve", "--host", addr, "--port", str(port),
                                   "--https", "--diagnostics", "--state-dir", state],
                                  cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "TILEMESH_RELAY_KEY": RELAY_KEY})
        try:
            wait_up(base + "/healthz", insecure)
            room = http_json(base + "/api/rooms", insecure, {})["room"]
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                  args=[*CHROMIUM_ARGS, "--ignore-certificate-errors"])
                pages = []
                for name in ("a", "b"):
                    ctx = await browser.new_context(ignore_https_errors=True)
                    pg = await ctx.new_page()
                    await pg.goto(f"{base}/diag/mesh?room={room}&name={name}")
                    await pg.wait_for_function("document.getElementById('info').dataset.state === 'joined'")
                    pages.append(pg)
                if edge_cpu:
                    ida = await pages[0].evaluate("window.meshtest.signaling.peerId")
                    rows = await compare_edge_transports(addr, port, room, pages[0], ida, total, rounds, server.pid)
                    await browser.close()
                    return rows
                edge = EdgePeer(f"wss://{addr}:{port}/ws", room, name="linkbench", kind="edge",
                                ssl_context=False, probes=True)
                probe = edge.probe
                await edge.start()
                a, b = pages
                ida = await a.evaluate("window.meshtest.signaling.peerId")
                idb = await b.evaluate("window.meshtest.signaling.peerId")
                for pg, other in ((a, idb), (a, edge.peer_id), (b, edge.peer_id)):
                    await pg.evaluate("(id) => window.meshtest.mesh.waitOpen(id)", other)
                await edge.wait_open(ida)
                rows = []

                async def js_link(label, src, dst):
                    limit = await src.evaluate("(id) => window.meshtest.mesh.maxMessageSize(id)", dst)
                    for size in [*SIZES, *TENSORS]:
                        if isinstance(size, str):
                            nbytes = len(wire.encode_joined(wire.test_pattern(TENSORS[size], 0), frame=0, tensor=0,
                                                            max_message=limit))
                            t = megabytes(await src.evaluate(
                                "([id, s, n]) => window.meshtest.probe.throughput(id, s, n)", [dst, limit, nbytes]))
                            rows.append({"link": label, "size": size, "limit": limit, "rtt": None, **t})
                            continue
                        if size > limit:
                            rows.append({"link": label, "size": size, "limit": limit, "rtt": None, "mb_s": None})
                            continue
                        r = await src.evaluate("([id, s, n]) => window.meshtest.probe.rtt(id, s, n)",
                                               [dst, size, rounds])
                        t = megabytes(await src.evaluate("([id, s, n]) => window.meshtest.probe.throughput(id, s, n)",
                                                         [dst, size, total]))
                        rows.append({"link": label, "size": size, "limit": limit, "rtt": statistics.median(r), **t})

                async def py_link(label, dst):
                    limit = edge.max_message_size(dst)
                    for size in [*SIZES, *TENSORS]:
                        if isinstance(size, str):
                            nbytes = len(wire.encode_joined(wire.test_pattern(TENSORS[size], 0), frame=0, tensor=0,
                                                            max_message=limit))
                            t = megabytes(await probe.throughput(dst, limit, nbytes, timeout=120))
                            rows.append({"link": label, "size": size, "limit": limit, "rtt": None, **t})
                            continue
                        if size > limit:
                            rows.append({"link": label, "size": size, "limit": limit, "rtt": None, "mb_s": None})
                            continue
                        r = await probe.rtt(dst, size, rounds, timeout=30)
                        t = megabytes(await probe.throughput(dst, size, total, timeout=120))
                        rows.append({"link": label, "size": size, "limit": limit, "rtt": statistics.median(r), **t})

                if probes:
                    await a.evaluate("(id) => window.meshtest.mesh.waitOpen(id)", edge.peer_id)
                    rows = await compare_probes(edge, a, ida, rounds)
                    await edge.close()
                    await browser.close()
                    return rows
                await js_link("browser -> browser", a, idb)
                await js_link("browser -> aiortc", a, edge.peer_id)
                await py_link("aiortc -> browser", ida)
                await edge.close()
                await browser.close()
            return rows
        finally:
            server.terminate()
            server.wait(10)


def _fmt_size(size) -> str:
    return size if isinstance(size, str) else f"{size // 1024} KiB"


def print_table(rows: list[dict]) -> None:
    base = {(r["size"]): r for r in rows if r["link"] == "browser -> browser"}
    print(f"{'link':<20} {'message':>15} {'max msg':>8} {'RTT ms':>8} {'MB/s':>7} {'ms/xfer':>8} "
          f"{'vs 16 KiB':>9} {'vs browser':>10}")
    first: dict[str, float] = {}
    for r in rows:
        mb_s = r.get("mb_s")
        rtt = f"{r['rtt']:.2f}" if r.get("rtt") is not None else "-"
        if mb_s is None:
            print(f"{r['link']:<20} {_fmt_size(r['size']):>15} {r['limit']:>8} {'(above the receiver limit)':>36}")
            continue
        first.setdefault(r["link"], mb_s)
        vs16 = f"{mb_s / first[r['link']]:.2f}x" if not isinstance(r["size"], str) else ""
        ref = base.get(r["size"], {}).get("mb_s")
        vsb = f"{mb_s / ref:.2f}x" if ref and r["link"] != "browser -> browser" else ""
        xfer = f"{r['ms']:.1f}" if isinstance(r["size"], str) else ""
        print(f"{r['link']:<20} {_fmt_size(r['size']):>15} {r['limit']:>8} {rtt:>8} {mb_s:>7.1f} {xfer:>8} "
              f"{vs16:>9} {vsb:>10}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.linkbench", description=__doc__.splitlines()[0])
    parser.add_argument("--total-mb", type=float, default=8.0, help="bytes per throughput run (MB)")
    parser.add_argument("--rounds", type=int, default=20, help="echoes per round-trip measurement")
    parser.add_argument("--probes", action="store_true", help="compare the former edge probe with the session's")
    parser.add_argument("--edge-cpu", action="store_true",
                        help="compare the edge's CPU per MB over aiortc and over the signaling relay")
    parser.add_argument("--inside", metavar="ADDR", help=argparse.SUPPRESS)  # set by the re-run in the namespace
    args = parser.parse_args(argv)
    if args.inside:
        rows = asyncio.run(bench(args.inside, int(args.total_mb * 1e6), args.rounds, args.probes, args.edge_cpu))
        if args.edge_cpu:
            print_edge_cpu(rows)
        elif args.probes:
            print(f"{'link':<20} {'former edge probe':>18} {'session probe':>14} {'ratio':>6}  (Mbit/s, medians)")
            for r in rows:
                print(f"{r['link']:<20} {r['old_mbit_s']:>18.1f} {r['new_mbit_s']:>14.1f} {r['ratio']:>5.2f}x")
        else:
            print_table(rows)
        return 0
    netns = _load_netns()
    reason = netns.unavailable_reason()
    if reason:
        print(f"linkbench: {reason}", file=sys.stderr)
        return 2
    with netns.NetNS() as ns:
        cmd = ns.wrap([sys.executable, "-m", "bench.linkbench", "--inside", ns.inner,
                       "--total-mb", str(args.total_mb), "--rounds", str(args.rounds),
                       *(["--probes"] if args.probes else []), *(["--edge-cpu"] if args.edge_cpu else [])])
        return subprocess.run(cmd, cwd=REPO).returncode


if __name__ == "__main__":
    raise SystemExit(main())
