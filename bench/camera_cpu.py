"""The camera phone's CPU per frame with the browser preprocessing frames against Python doing it, in one run.

    sudo .venv/bin/python -m bench.camera_cpu [--cores 0.5] [--seconds 8] [--rounds 2]

A Chromium under a cgroup CPU quota (an emulated phone, as `tilemesh bench` makes them) opens the /ar page
(one device classifying its camera: scikit-image's coffee photo through Chromium's fake camera) either as it is
(the canvas scales and crops each frame, JS normalises it into onnxruntime-web) or with `?preprocess=python`
(the previous path: the page hands over the centre square at 256x256 and Python crops, resamples and normalises
it). The two alternate, `--rounds` times each, fresh browser each time; after a warm-up the cgroup's CPU time
and the frames counted by the page over `--seconds` give CPU seconds per frame, frames per second and the page's
latency. A script, not a test: printed as ratios of this one run (the machine is shared; load printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.chromium import CHROMIUM, CHROMIUM_ARGS, local_server
from bench.env import CpuGroup, unavailable_reason

REPO = Path(__file__).resolve().parents[1]
FRAMES = "() => Number(document.getElementById('labels').dataset.frames || 0)"


def run_one(pw, url: str, tmp: Path, cam: Path, cores: float, mode: str, seconds: float) -> dict:
    group = CpuGroup(f"tmcam{os.getpid()}-{mode}-{int(time.time() * 1000) % 100000}", cores).create()
    script = tmp / f"chromium-{group.name}"
    script.write_text("#!/bin/sh\n" + group.join_lines() + f'exec {CHROMIUM} "$@"\n')
    script.chmod(0o755)
    try:
        browser = pw.chromium.launch(executable_path=str(script), headless=True,
                                     args=[*CHROMIUM_ARGS, f"--use-file-for-fake-video-capture={cam}"])
        try:
            page = browser.new_page()
            page.goto(url + "/ar" + ("?preprocess=python" if mode == "python" else ""))
            page.wait_for_function(f"() => ({FRAMES})() >= 5", timeout=300_000)
            f0, c0, t0 = page.evaluate(FRAMES), group.usage_seconds(), time.monotonic()
            lat = []
            while time.monotonic() - t0 < seconds:
                time.sleep(0.25)
                lat.append(float(page.locator("#stats").get_attribute("data-latency-ms") or 0))
            f1, c1, t1 = page.evaluate(FRAMES), group.usage_seconds(), time.monotonic()
            top1 = page.locator("#labels").get_attribute("data-top1")
            stats = page.locator("#stats").inner_text()
        finally:
            browser.close()
    finally:
        group.remove()
    n = max(1, f1 - f0)
    return {"mode": mode, "frames": f1 - f0, "cpu_s_per_frame": (c1 - c0) / n, "fps": (f1 - f0) / (t1 - t0),
            "latency_ms": statistics.median(lat) if lat else None, "top1": top1, "stats": stats}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.camera_cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cores", type=float, default=0.5)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"bench.camera_cpu: {reason}", file=sys.stderr)
        return 2
    import skimage.data
    from playwright.sync_api import sync_playwright

    from bench.harness import refresh_runtime
    from bench.media import write_y4m

    refresh_runtime()
    load0 = os.getloadavg()[0]
    rows = []
    with local_server() as url, sync_playwright() as pw, tempfile.TemporaryDirectory() as tmp:
        cam = write_y4m(Path(tmp) / "coffee.y4m", skimage.data.coffee())
        for r in range(args.rounds):
            for mode in (("python", "browser") if r % 2 == 0 else ("browser", "python")):
                row = run_one(pw, url, Path(tmp), cam, args.cores, mode, args.seconds)
                rows.append(row)
                print(f"[camera_cpu] {row}", file=sys.stderr, flush=True)
    print(f"\nload average {load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; /ar (one device, "
          f"onnxruntime-web) in a {args.cores:g}-core cgroup, {args.seconds:g} s per window, "
          f"{args.rounds} windows each")
    agg = {}
    for mode in ("python", "browser"):
        rs = [r for r in rows if r["mode"] == mode]
        agg[mode] = {k: statistics.fmean(r[k] for r in rs) for k in ("cpu_s_per_frame", "fps", "latency_ms")}
        print(f"  {mode:>8} preprocessing: {agg[mode]['cpu_s_per_frame'] * 1e3:6.1f} ms CPU per frame, "
              f"{agg[mode]['fps']:5.2f} fps, latency {agg[mode]['latency_ms']:6.1f} ms, top-1 "
              f"{sorted({r['top1'] for r in rs})}")
    b, p = agg["browser"], agg["python"]
    print(f"  browser / python: CPU per frame {b['cpu_s_per_frame'] / p['cpu_s_per_frame']:.2f}x, "
          f"frame rate {b['fps'] / p['fps']:.2f}x, latency {b['latency_ms'] / p['latency_ms']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
