"""Numbers and text of `tilemesh bench`: statistics per strategy, ratios, the Markdown table, plots.

Pure functions of the raw measurement windows that bench/harness.py records (no browsers, no clocks), so the
arithmetic is unit-tested on synthetic numbers. A window is one strategy's run of consecutive frames:

    {"strategy", "repeat", "ok", "error", "latencies_ms": [...], "wall_ms", "fallback_frames", "top1": [...],
     "bytes_per_frame", "predicted_bytes_per_frame", "source_cpu_s", "edge_cpu_s", "edge_mac_share",
     "predicted_ms", "label", "devices"}
"""

from __future__ import annotations

import math
import statistics

BASELINES = ("single", "partition_offload")


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence; numpy's default method."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in 0..100, got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def summarize(windows: list[dict], expected_top1: str | None = None) -> dict[str, dict]:
    """Per strategy (in first-seen order): pooled frame statistics over its successful windows."""
    out: dict[str, dict] = {}
    for w in windows:
        out.setdefault(w["strategy"], {"windows": []})["windows"].append(w)
    for strategy, s in out.items():
        ok = [w for w in s.pop("windows") if w.get("ok")]
        failed = [w for w in out_windows(windows, strategy) if not w.get("ok")]
        lat = [x for w in ok for x in w["latencies_ms"]]
        frames = len(lat)
        s.update(strategy=strategy, windows_ok=len(ok), windows_failed=len(failed),
                 errors=sorted({w.get("error") or "" for w in failed} - {""}), frames=frames,
                 labels=sorted({w.get("label") or "" for w in ok} - {""}))
        if not frames:
            continue
        wall = sum(w["wall_ms"] for w in ok)
        top1 = [t for w in ok for t in w.get("top1", [])]
        s.update(
            median_ms=statistics.median(lat),
            p90_ms=percentile(lat, 90),
            fps=frames / (wall / 1e3) if wall > 0 else None,
            predicted_ms=_mean(w.get("predicted_ms") for w in ok),
            bytes_per_frame=_mean(w.get("bytes_per_frame") for w in ok),
            predicted_bytes_per_frame=_mean(w.get("predicted_bytes_per_frame") for w in ok),
            source_cpu_s_per_frame=_per_frame(ok, "source_cpu_s"),
            edge_cpu_s_per_frame=_per_frame(ok, "edge_cpu_s"),
            edge_mac_share=_mean(w.get("edge_mac_share") for w in ok),
            fallback_frames=sum(w.get("fallback_frames", 0) for w in ok),
            top1_agreement=(sum(t == expected_top1 for t in top1) / len(top1)) if expected_top1 and top1 else None,
        )
    return out


def out_windows(windows: list[dict], strategy: str) -> list[dict]:
    return [w for w in windows if w["strategy"] == strategy]


def _per_frame(windows: list[dict], key: str) -> float | None:
    pairs = [(w[key], len(w["latencies_ms"])) for w in windows if w.get(key) is not None]
    frames = sum(n for _, n in pairs)
    return sum(v for v, _ in pairs) / frames if frames else None


def ratio(baseline: float | None, value: float | None) -> float | None:
    """baseline / value: how many times lower `value` is (latency, CPU); None when either is missing or 0."""
    if baseline is None or value is None or value <= 0 or baseline <= 0:
        return None
    return baseline / value


def ratios(summary: dict[str, dict]) -> dict[str, dict]:
    """For every strategy, how many times better than each baseline it is, measured in this run.

    latency: baseline median / strategy median; phone_cpu and edge_cpu: baseline CPU seconds per frame /
    strategy's (eDDNN's energy and edge-load comparisons); fps: strategy fps / baseline fps.
    """
    out: dict[str, dict] = {}
    for strategy, s in summary.items():
        row = {}
        for base in BASELINES:
            b = summary.get(base)
            if not b or strategy == base or "median_ms" not in b or "median_ms" not in s:
                continue
            # A baseline that computes nothing on the edge (single) has only the server's idle CPU there: a
            # ratio against that would be noise, not edge load.
            uses_edge = bool(b.get("edge_mac_share"))
            row[base] = {
                "latency": ratio(b["median_ms"], s["median_ms"]),
                "p90": ratio(b["p90_ms"], s["p90_ms"]),
                "fps": ratio(s.get("fps"), b.get("fps")),
                "phone_cpu": ratio(b.get("source_cpu_s_per_frame"), s.get("source_cpu_s_per_frame")),
                "edge_cpu": ratio(b.get("edge_cpu_s_per_frame"), s.get("edge_cpu_s_per_frame")) if uses_edge else None,
            }
        out[strategy] = row
    return out


def _f(value, fmt: str, none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def ratio_lines(summary: dict[str, dict], focus: str = "tilemesh") -> list[str]:
    """The headline: `focus` against single-device and partition-offloading, plus every strategy's speedup."""
    r = ratios(summary)
    lines = []
    for base, title in (("single", "single device"), ("partition_offload", "partition-offloading")):
        got = r.get(focus, {}).get(base)
        if got is None:
            reason = summary.get(base, {}).get("errors") or ["not measured in this run"]
            lines.append(f"{focus} vs {title}: no comparison ({'; '.join(reason)})")
            continue
        lines.append(f"{focus} vs {title}: median latency {_x(got['latency'])}, p90 {_x(got['p90'])}, "
                     f"frame rate {_x(got['fps'])}, phone CPU per frame {_x(got['phone_cpu'])}, "
                     f"edge CPU per frame {_x(got['edge_cpu'])} (above 1x = {focus} better)")
    for strategy in summary:
        if strategy == "single" or "single" not in r.get(strategy, {}):
            continue
        lines.append(f"  {strategy:<18} median latency {_x(r[strategy]['single']['latency'])} better than single")
    return lines


def prediction_line(summary: dict[str, dict]) -> str | None:
    """How far the planner's cost model was from the measured medians (measured / predicted per strategy)."""
    ratios_ = {k: s["median_ms"] / s["predicted_ms"] for k, s in summary.items()
               if s.get("median_ms") and s.get("predicted_ms")}
    if not ratios_:
        return None
    parts = ", ".join(f"{k} {v:.2f}x" for k, v in ratios_.items())
    return (f"measured median / predicted latency: {parts} (median {statistics.median(ratios_.values()):.2f}x; "
            "above 1x = slower than the cost model said)")


COLUMNS = ("strategy", "plan", "frames", "median ms", "p90 ms", "fps", "predicted ms", "KB sent/frame",
           "phone CPU s/frame", "edge CPU s/frame", "edge MAC share", "vs single", "vs partition-offload")


def markdown_table(summary: dict[str, dict]) -> str:
    r = ratios(summary)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for strategy, s in summary.items():
        if "median_ms" not in s:
            why = "; ".join(s.get("errors") or ["no frames"])
            lines.append(f"| {strategy} | not measured: {why} |" + " |" * (len(COLUMNS) - 2))
            continue
        frames = f"{s['frames']}" + (f" ({s['fallback_frames']} local)" if s.get("fallback_frames") else "")
        kb = _f(s.get("bytes_per_frame") and s["bytes_per_frame"] / 1e3, ".0f")
        if s.get("predicted_bytes_per_frame") is not None:
            kb += f" (pred. {s['predicted_bytes_per_frame'] / 1e3:.0f})"
        cells = [
            strategy, " / ".join(s.get("labels") or []) or "-", frames,
            _f(s["median_ms"], ".0f"), _f(s["p90_ms"], ".0f"), _f(s.get("fps"), ".2f"),
            _f(s.get("predicted_ms"), ".0f"), kb,
            _f(s.get("source_cpu_s_per_frame"), ".3f"), _f(s.get("edge_cpu_s_per_frame"), ".3f"),
            _f(s.get("edge_mac_share") and s["edge_mac_share"] * 100, ".0f", "-") + ("%" if s.get("edge_mac_share")
                                                                                   else ""),
            _x(r.get(strategy, {}).get("single", {}).get("latency")),
            _x(r.get(strategy, {}).get("partition_offload", {}).get("latency")),
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def render_markdown(result: dict) -> str:
    """The whole results.md: ratios first, the table, then how it was measured."""
    summary = result["summary"]
    sc = result["scenario"]
    lines = [f"# tilemesh bench: {sc['name']}", ""]
    if sc.get("description"):
        lines += [sc["description"], ""]
    pred = prediction_line(summary)
    lines += ["## Ratios (measured in this run)", "", *[f"- {x.strip()}" for x in ratio_lines(summary)],
              *([f"- {pred}"] if pred else []), "",
              "## Per strategy", "", markdown_table(summary), ""]
    lines += ["Latency: from the frame leaving the camera loop to its top-5 on the phone, per frame; fps: frames over "
              "the wall time of a continuous stream; KB sent/frame: sum over devices of their reported bytes sent "
              "(predicted by the cost model in brackets); phone CPU: the source browser's cgroup CPU time per frame "
              "(energy stand-in); edge CPU: the server process's CPU time per frame; edge MAC share: the plan's "
              "multiply-accumulates on the edge peer; predicted ms: the planner's cost model for the plan.", ""]
    lines += ["## Emulation", "", *[f"- {x}" for x in result.get("emulation_notes", [])], ""]
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


def performance_section(result: dict) -> str:
    """A README "Performance" section generated from one run."""
    summary = result["summary"]
    m = result.get("machine", {})
    sc = result["scenario"]
    devices = ", ".join(f"{d['name']} ({d['kind']}, {d['cores']:g} core, {d['mbps']:g} Mbit/s"
                        + (f", {d['delay_ms']:g} ms" if result.get("shaping") == "netem" else "") + ")"
                        for d in sc["devices"])
    src = result.get("source") or {}
    at = f" at commit {src['commit']}" if src.get("commit") else ""
    if src.get("modified"):
        at += f" (with uncommitted changes to {', '.join(src['modified'])})"
    engines = sorted({f"{(p.get('profile') or {}).get('compute', {}).get('backend') or '?'} on the {p.get('kind')}"
                      for p in result.get("roster", [])})
    engine_text = ", ".join(engines) if engines else "engines not recorded"
    pred = prediction_line(summary)
    lines = [
        "## Performance", "",
        f"Measured{at} with `sudo tilemesh bench {sc['name']}` on {m.get('cpu', 'this machine')} "
        f"({m.get('cores', '?')} cores shared with other work, Linux {m.get('kernel', '?')}, "
        f"Chromium {m.get('chromium', '?')}; compute engines as each device profiled fastest: {engine_text}). "
        f"Every device is its own process tree under a cgroup CPU quota, in its own network "
        f"namespace behind a bridge: {devices}. The phone \"{sc['source']}\" holds the camera (a still photo).",
        "",
        *[f"- {x.strip()}" for x in ratio_lines(summary)], *([f"- {pred}"] if pred else []), "",
        markdown_table(summary), "",
        *[f"- {x}" for x in result.get("emulation_notes", [])],
    ]
    return "\n".join(lines).rstrip() + "\n"


def plot_predictions(sweeps: dict, measured: dict[str, dict], out_dir) -> list[str]:
    """latency_vs_devices.png and latency_vs_bandwidth.png from the cost model's sweeps (labelled as such),
    with this run's measured medians as markers where they apply. Returns the file names written."""
    import matplotlib  # noqa: PLC0415  (optional: only plots need it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    written = []
    for key, xlabel, fname, logx in (("devices", "devices in the room (source first, scenario order)",
                                      "latency_vs_devices.png", False),
                                     ("bandwidth", "every link's rate, Mbit/s (measured round trips kept)",
                                      "latency_vs_bandwidth.png", True)):
        sweep = sweeps.get(key)
        if not sweep:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, (strategy, points) in enumerate(sweep["predicted_ms"].items()):
            colour = f"C{i}"
            ax.plot(sweep["x"], points, marker=".", color=colour, label=f"{strategy} (predicted)")
            if key == "devices" and strategy in measured and "median_ms" in measured[strategy]:
                ax.scatter([sweep["x"][-1]], [measured[strategy]["median_ms"]], marker="x", s=60, color=colour)
        if logx:
            ax.set_xscale("log")
        if sweep.get("names"):
            ax.set_xticks(sweep["x"], labels=[n if i == 0 else f"+{n}" for i, n in enumerate(sweep["names"])])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("frame latency, ms")
        marks = " (x = measured median)" if key == "devices" else ""
        ax.set_title(f"Cost-model predictions from this run's measured profiles{marks}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written
