"""A short, calibrated compute profile of this device, measured on the model's own layers.

`measure_profile(graph)` times a handful of representative nodes of the real graph through a backend
(numpy by default, the only one in Pyodide): a dense 3x3 conv, 1x1 expand/project convs and 3x3
depthwise convs at two resolutions each, an elementwise op and the Gemm. From the medians it derives
seconds per MAC for each op class plus a fixed per-node overhead (the Python call cost, which is large
in Pyodide), and one `chain_factor`: the measured time of a real block run end to end over the sum of
its per-node predictions. Isolated repetitions run on warm caches and recycled buffers; a real frame
does not, and this factor carries that difference (about 1.5-2x natively, measured).

The result is plain JSON (`version`, `sec_per_mac`, `overhead_s`, `chain_factor`, the samples), so the
browser posts it to the server and the planner (`tilemesh.planning.costmodel`) uses `predict_node_seconds`.
Two optional fixed costs complete it: `task_s`, what one task costs on top of its nodes (an engine outside
Python pays a call, one copy each way and the runner's bookkeeping per task), and `frame_s`, what the device
with the camera pays per frame before and after the network (the frame handed to the runtime, the centre crop,
normalisation, the runner's bookkeeping, top-k, the effects handed to the page), both measured (the latter by
`tilemesh.runtime.session.measure_frame_seconds`) and both absent (0) in older profiles.
Pure Python + numpy: this module runs in Pyodide too, and imports nothing from the server.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from .deps import node_macs
from .regions import Region, plane

PROFILE_VERSION = 1
OP_CLASSES = ("conv_dense", "conv_pointwise", "conv_depthwise", "elementwise", "gemm")
# Ops that only re-view memory: they cost the per-node overhead and nothing per element.
_FREE_OPS = frozenset({"Flatten", "Reshape", "Identity"})
_GEMM_OPS = frozenset({"Gemm", "MatMul"})
_MIN_SAMPLE_S = 0.002  # below this, loop inside one timing (browser timers may be coarse)


def op_class(graph, node) -> str | None:
    """The profile class a node's time scales with, or None for ops that only re-view memory."""
    if node.op == "Conv":
        w = graph.weights[node.params[0]]
        group = int(node.attrs.get("group", 1))
        if group > 1 and group == int(w.shape[0]) and int(w.shape[1]) == 1:
            return "conv_depthwise"
        if tuple(w.shape[2:]) == (1, 1) and group == 1:
            return "conv_pointwise"
        return "conv_dense"
    if node.op == "ConvTranspose":  # per-tap products like a dense conv (node_macs counts them)
        return "conv_dense"
    if node.op in _GEMM_OPS:
        return "gemm"
    if node.op in _FREE_OPS:
        return None
    return "elementwise"  # activations, binary ops, pools, Concat


def predict_node_seconds(profile: dict, graph, node, macs: int, out_region: Region | None = None) -> float:
    """Predicted seconds for `node` to compute `out_region` of its output, which takes `macs` MACs.

    `macs` is what `deps.node_macs` gives for the region (redundant halo compute included by the
    caller's choice of region). An empty region costs nothing: the node is not run at all.
    """
    if out_region is not None and out_region.empty:
        return 0.0
    cls = op_class(graph, node)
    t = float(profile["overhead_s"])
    if cls is not None:
        t += float(macs) * float(profile["sec_per_mac"][cls])
    return t * float(profile.get("chain_factor", 1.0))


def predict_graph_seconds(profile: dict, graph) -> float:
    """Predicted time of single-device inference (`executor.run_graph`) on the whole graph."""
    total = 0.0
    for n in graph.nodes:
        full = Region.full(*plane(graph.shapes[n.output]))
        total += predict_node_seconds(profile, graph, n, node_macs(n, graph, full), full)
    return total


def task_overhead_seconds(profile: dict) -> float:
    """Fixed seconds one task costs on this device on top of its nodes (0 when the profile does not say)."""
    return float(profile.get("task_s", 0.0))


def frame_overhead_seconds(profile: dict) -> float:
    """Fixed seconds the camera device pays per frame outside the network's tasks (0 when not measured)."""
    return float(profile.get("frame_s", 0.0))


def scaled_profile(profile: dict, speed: float, name: str | None = None) -> dict:
    """A copy of `profile` for a device `speed` times as fast (0.5 = half the speed), for tests and what-ifs."""
    if speed <= 0:
        raise ValueError(f"speed must be positive, got {speed}")
    out = dict(profile)
    out["sec_per_mac"] = {k: v / speed for k, v in profile["sec_per_mac"].items()}
    out["overhead_s"] = profile["overhead_s"] / speed
    for key in ("task_s", "frame_s"):
        if key in profile:
            out[key] = float(profile[key]) / speed
    out["samples"] = []
    if name is not None:
        out["name"] = name
    return out


def validate_profile(profile: dict) -> dict:
    """Raise ValueError unless `profile` is a usable profile of this version; return it."""
    if not isinstance(profile, dict) or profile.get("version") != PROFILE_VERSION:
        raise ValueError(f"not a v{PROFILE_VERSION} profile: {profile!r:.80}")
    spm = profile.get("sec_per_mac")
    if not isinstance(spm, dict) or set(spm) != set(OP_CLASSES):
        raise ValueError(f"profile needs sec_per_mac for {OP_CLASSES}")
    values = [*spm.values(), profile.get("overhead_s"), profile.get("chain_factor", 1.0),
              profile.get("task_s", 0.0), profile.get("frame_s", 0.0)]
    if not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in values):
        raise ValueError("profile values must be finite and non-negative")
    if not any(v > 0 for v in spm.values()):
        raise ValueError("profile predicts zero time for everything")
    return profile


# --------------------------------------------------------------------------- measuring


def _time_call(fn, budget_s: float) -> float:
    """Seconds of one call of `fn`: the lower-quartile repetition, repetitions adapted to the budget.

    Not the plain median: on a shared or throttled machine other processes only ever add time, and a
    burst during half of the repetitions moved medians 2-5x here while the lower quartile held.
    """
    t0 = time.perf_counter()
    fn()  # warm-up: first calls allocate and fault pages in
    first = time.perf_counter() - t0
    inner = 1 if first >= _MIN_SAMPLE_S else min(1000, int(_MIN_SAMPLE_S / max(first, 1e-7)) + 1)
    one = max(first * inner, 1e-9)
    # Slow devices (a phone's Pyodide runs the stem conv for tens of ms) get 3 repetitions, not 5.
    reps = int(max(3 if 5 * one > budget_s else 5, min(21, budget_s / one)))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    samples.sort()
    return samples[len(samples) // 4]


def _representatives(graph) -> list:
    """A few real nodes per class: for convs the 2nd-largest and 2nd-smallest resolutions present
    (MobileNetV2: 56x56 and 14x14), the median-MAC node at each; one elementwise op; the Gemm."""
    by_class: dict[str, list] = {}
    for n in graph.nodes:
        cls = op_class(graph, n)
        if cls is not None:
            by_class.setdefault(cls, []).append(n)
    chosen = []
    for cls in OP_CLASSES:
        nodes = by_class.get(cls, [])
        if not nodes:
            continue
        areas = sorted({math.prod(plane(graph.shapes[n.output])) for n in nodes}, reverse=True)
        if cls in ("gemm", "elementwise"):
            picks = [areas[min(1, len(areas) - 1)]]
        else:
            picks = sorted({areas[min(1, len(areas) - 1)], areas[max(0, len(areas) - 2)]}, reverse=True)
        for area in picks:
            at = [n for n in nodes if math.prod(plane(graph.shapes[n.output])) == area]
            at.sort(key=lambda n: _full_macs(graph, n))
            chosen.append((cls, at[len(at) // 2]))
    return chosen


def _full_macs(graph, node) -> int:
    return node_macs(node, graph, Region.full(*plane(graph.shapes[node.output])))


def _chain_block(graph) -> list:
    """A real residual-free-or-not block of consecutive nodes to time end to end: the spatial run
    between two single-tensor cuts with the most MACs at the second-largest resolution."""
    from .deps import cut_candidates, make_segments, segment_is_spatial

    cuts = cut_candidates(graph)
    if not cuts:
        return list(graph.nodes)
    segs = [s for s in make_segments(graph, cuts) if segment_is_spatial(graph, s)]
    if not segs:
        return list(graph.nodes)
    by_name = {n.name: n for n in graph.nodes}

    def area(s):
        return math.prod(plane(graph.shapes[s.outputs[0]]))

    areas = sorted({area(s) for s in segs}, reverse=True)
    want = areas[min(1, len(areas) - 1)]
    best = max((s for s in segs if area(s) == want),
               key=lambda s: sum(_full_macs(graph, by_name[n]) for n in s.nodes))
    return [by_name[n] for n in best.nodes]


def _overhead_node():
    from .graph import Node

    return Node("_probe", "Clip", ("_x",), "_y", {"min": 0.0, "max": 6.0})


def profile_probes(graph, seed: int = 0) -> list[dict]:
    """What a profile times, for any engine: the dispatch overhead (a 1x1 Clip), a few representative nodes
    run whole, and one real block chained. Each probe: `key`, `kind` (overhead/node/chain), `nodes` (IR nodes
    run together), `feeds` (random inputs), `outputs`, and for node probes `class` and `macs`."""
    rng = np.random.default_rng(seed)
    tiny = _overhead_node()
    probes = [{"key": "overhead", "kind": "overhead", "nodes": [tiny], "outputs": [tiny.output],
               "feeds": {"_x": rng.standard_normal((1, 1, 1, 1)).astype(np.float32)}}]
    for cls, node in _representatives(graph):
        feeds = {t: rng.standard_normal(graph.shapes[t]).astype(np.float32) for t in node.inputs}
        probes.append({"key": f"node:{node.name}", "kind": "node", "class": cls, "nodes": [node],
                       "outputs": [node.output], "feeds": feeds, "macs": _full_macs(graph, node)})
    block = _chain_block(graph)
    produced = {n.output for n in block}
    feeds = {t: rng.standard_normal(graph.shapes[t]).astype(np.float32)
             for n in block for t in n.inputs if t not in produced}
    probes.append({"key": "chain", "kind": "chain", "nodes": block, "outputs": [block[-1].output], "feeds": feeds})
    return probes


def profile_from_timings(graph, probes: list[dict], seconds: dict[str, float], backend: str,
                         name: str | None = None, **extra) -> dict:
    """The profile (sec_per_mac per class, overhead, chain_factor) from each probe's measured `seconds`."""
    overhead = float(seconds["overhead"])
    samples = [{"node": p["nodes"][0].name, "class": p["class"], "macs": p["macs"], "seconds": float(seconds[p["key"]])}
               for p in probes if p["kind"] == "node"]
    spm = {}
    for cls in OP_CLASSES:
        ss = [s for s in samples if s["class"] == cls]
        macs = sum(s["macs"] for s in ss)
        work = sum(max(s["seconds"] - overhead, 0.0) for s in ss)
        spm[cls] = work / macs if macs and work > 0 else None
    # A class the graph lacks borrows the nearest kind we did measure, so the profile stays complete.
    fallback = {"conv_dense": "conv_pointwise", "conv_pointwise": "gemm", "gemm": "conv_pointwise",
                "conv_depthwise": "elementwise", "elementwise": "conv_depthwise"}
    known = [v for v in spm.values() if v]
    for cls in OP_CLASSES:
        if spm[cls] is None:
            spm[cls] = spm.get(fallback[cls]) or (min(known) if known else 1e-9)

    profile = {"version": PROFILE_VERSION, "sec_per_mac": spm, "overhead_s": overhead, "chain_factor": 1.0}
    (chain,) = [p for p in probes if p["kind"] == "chain"]
    block = chain["nodes"]
    measured = float(seconds["chain"])
    predicted = sum(predict_node_seconds(profile, graph, n, _full_macs(graph, n)) for n in block)
    # Clamped: a chained run is never much faster than its parts, and a wild ratio means a hiccup.
    profile["chain_factor"] = float(min(3.0, max(0.8, measured / predicted))) if predicted > 0 else 1.0
    profile.update({
        "backend": backend,
        "platform": sys.platform,
        "samples": samples,
        "chain": {"nodes": [block[0].name, block[-1].name], "seconds": measured, "predicted": predicted},
        **extra,
    })
    if name is not None:
        profile["name"] = name
    return profile


def median_seconds(samples) -> float:
    """The median of timings taken back to back (`sustained` runs): what a frame typically pays on this device.

    Isolated probes keep the lower quartile (`_time_call`): relative speeds of op classes need clean samples.
    The figures the planner's totals rest on (the whole model, the per-frame work) take the median of runs
    back to back instead: a CPU quota (phones emulated by cgroups, a throttled phone) and other processes
    slow every frame, and the lower quartile picked the lucky runs, 1.3-2x faster than frames (measured)."""
    xs = sorted(float(s) for s in samples)
    if not xs:
        raise ValueError("no samples")
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def sustained_samples(fn, budget_s: float, min_runs: int = 5, max_runs: int = 50) -> list[float]:
    """Seconds of each of `fn`'s runs back to back (after one warm-up) for about `budget_s`."""
    fn()
    out: list[float] = []
    start = time.perf_counter()
    while len(out) < max_runs and (len(out) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure_profile(graph, backend=None, budget_s: float = 0.3, seed: int = 0, name: str | None = None) -> dict:
    """Time representative nodes of `graph` on this device through `backend` (numpy by default); return a
    JSON-able profile.

    `budget_s` is spread over the samples (each gets at least 3 timed repetitions, so a very slow
    device overruns it rather than returning noise). An engine outside Python times the same
    `profile_probes` itself and calls `profile_from_timings` (the browser's onnxruntime-web).
    """
    if backend is None:
        from .backend import NumpyBackend

        backend = NumpyBackend(graph)
    probes = profile_probes(graph, seed)
    per = budget_s / (len(probes) + 2)
    seconds = {}
    for p in probes:
        if p["kind"] == "chain":
            seconds[p["key"]] = _time_call(lambda p=p: backend.run_nodes(p["nodes"], p["feeds"], p["outputs"]), 2 * per)
        else:
            node = p["nodes"][0]
            ins = [p["feeds"][t] for t in node.inputs]
            seconds[p["key"]] = _time_call(lambda node=node, ins=ins: backend.run_node(node, ins), per)

    from .kernels import dot_name

    extra = {"dot": dot_name()} if getattr(backend, "name", "") == "numpy" else {}
    return profile_from_timings(graph, probes, seconds, getattr(backend, "name", type(backend).__name__), name,
                                **extra)


def profile_backends(graph, backends: list, budget_s: float = 0.3, name: str | None = None) -> tuple[object, dict]:
    """Profile each backend on the model's own layers; return the one predicting the whole model fastest and
    its profile, which records every backend's prediction (`engines`, ms) and why this one (`engine_reason`)."""
    if not backends:
        raise ValueError("no backend to profile")
    profiles = [measure_profile(graph, b, budget_s=budget_s, name=name) for b in backends]
    preds = {p["backend"]: predict_graph_seconds(p, graph) * 1e3 for p in profiles}
    best = min(range(len(backends)), key=lambda i: predict_graph_seconds(profiles[i], graph))
    prof = profiles[best]
    others = ", ".join(f"{k} {v:.1f} ms" for k, v in preds.items() if k != prof["backend"])
    prof["engines"] = {k: round(v, 2) for k, v in preds.items()}
    prof["engine_reason"] = f"{prof['backend']} predicts {preds[prof['backend']]:.1f} ms" + (
        f" (vs {others})" if others else "")
    return backends[best], prof
