"""Per-layer and whole-model timing of the numpy kernels against onnxruntime on this machine.

    python -m bench.runtime [--model PATH] [--repeat N] [--pyodide]
    python -m bench.runtime --compare [--baseline REV] [--repeat N] [--pyodide]

Every layer is run alone on its real input (taken from a full run on a fixed random image): the numpy
kernel via `kernels.run_node`, onnxruntime via a single-node model built from the same IR node. The
two are interleaved (numpy, onnxruntime, numpy, ...) so load from other processes hits both alike,
and the median of `--repeat` runs is reported. The whole model is timed the same way (numpy executor
vs onnxruntime on the original ONNX file, which may fuse Conv+Clip). Both sides are single-threaded
unless OPENBLAS_NUM_THREADS / --threads say otherwise.

`--pyodide` also times the numpy kernels inside Pyodide 0.27.7 (numpy 2.0.2 without BLAS, the browser
path) under node, from ``static/vendor/pyodide``: a separate process, so that column is measured
after, not interleaved. A script, not a test; CPython only (needs onnx and onnxruntime).

`--compare` instead times the kernels of git revision `--baseline` (run node by node, as its backend
did) against the current ones (`NumpyBackend`, in-place tails on) on the same model and input, all
paths interleaved in one loop, and prints old/new ratios per layer kind and for the whole model, in
CPython and (with `--pyodide`) in Pyodide, where the new path is timed with einsum and, if scipy is
loadable there, with scipy's sgemm, plus the time to load scipy.
"""

from __future__ import annotations

import os

# Before numpy loads: OpenBLAS reads this once. One thread each keeps the comparison fair.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from tilemesh.runtime import kernels  # noqa: E402
from tilemesh.runtime.backend import NumpyBackend  # noqa: E402
from tilemesh.runtime.executor import run_graph, run_nodes  # noqa: E402
from tilemesh.runtime.graph import Graph, load_onnx, node_flops, save_compact, to_onnx  # noqa: E402

BASELINE_REV = "c042e0d"  # kernels before in-place tails, sgemm and the depthwise rework

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "static" / "model" / "mobilenet_v2.onnx"
PYODIDE_DIR = REPO / "static" / "vendor" / "pyodide"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: list, repeat: int) -> list[float]:
    """Median seconds of each fn, run round-robin `repeat` times after one warm-up round."""
    for f in fns:
        f()
    samples = [[] for _ in fns]
    for _ in range(repeat):
        for s, f in zip(samples, fns, strict=True):
            s.append(_timed(f))
    return [statistics.median(s) for s in samples]


def layer_kind(graph: Graph, node) -> str:
    if node.op != "Conv":
        return node.op
    w = graph.weights[node.params[0]]
    if node.attrs["group"] > 1:
        return "Conv dw" if node.attrs["group"] == w.shape[0] else "Conv grouped"
    return "Conv 1x1" if w.shape[2:] == (1, 1) else f"Conv {w.shape[2]}x{w.shape[3]}"


# --------------------------------------------------------------------------- old vs new kernels


def load_baseline(source: str) -> types.ModuleType:
    """The kernels module text of an older revision as a module of its own (it imports only numpy)."""
    mod = types.ModuleType("tilemesh.runtime._kernels_baseline")
    exec(compile(source, "kernels@baseline", "exec"), mod.__dict__)
    return mod


def baseline_source(rev: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:tilemesh/runtime/kernels.py"],
                          capture_output=True, text=True, check=True).stdout


def _run_old(old, graph: Graph, x: np.ndarray) -> np.ndarray:
    """What the old backend's run_nodes did: one fresh array per node, intermediates freed after use."""
    last = {t: i for i, n in enumerate(graph.nodes) for t in n.inputs}
    env = {graph.input: x}
    for i, n in enumerate(graph.nodes):
        env[n.output] = old.run_node(n, [env[t] for t in n.inputs], graph.weights)
        for t in n.inputs:
            if last[t] == i and t != graph.output:
                env.pop(t, None)
    return env[graph.output]


def compare_paths(graph: Graph, x: np.ndarray, old, repeat: int, dots: list[str]) -> dict:
    """Old kernels vs the current ones with each 2D product in `dots`, interleaved in one loop.

    Layers: every node alone on its real input (the current kernels with `overwrite` where the
    backend would allow it: a Clip/Add input produced by the node before and read by nobody else;
    the input is a private copy, and repeating an in-place op on it changes values, not timing).
    Whole model: `_run_old` vs `NumpyBackend.run_nodes`. Returns seconds (medians) and max |diff|.
    """
    backend = NumpyBackend(graph)
    env = {graph.input: x, **backend.run_nodes(graph.nodes, {graph.input: x})}
    produced_by = {n.output: i for i, n in enumerate(graph.nodes)}
    sole = backend._sole
    saved = kernels.dot_name()
    layers = []
    try:
        for i, n in enumerate(graph.nodes):
            ins = [env[t] for t in n.inputs]
            over = tuple(k for k, t in enumerate(n.inputs) if n.op in kernels.INPLACE_OPS and t in sole
                         and produced_by.get(t) == i - 1)
            mine = [a.copy() if k in over else a for k, a in enumerate(ins)]
            fns = [lambda n=n, ins=ins: old.run_node(n, ins, graph.weights)]
            for d in dots:
                def new(n=n, mine=mine, over=over, d=d):
                    kernels.set_dot(d)
                    return kernels.run_node(n, mine, graph.weights, overwrite=over)
                fns.append(new)
            layers.append({"name": n.name, "kind": layer_kind(graph, n), "inplace": bool(over),
                           "seconds": interleaved(fns, repeat)})
        y_old = _run_old(old, graph, x)
        whole_fns = [lambda: _run_old(old, graph, x)]
        diffs = []
        for d in dots:
            def new(d=d):
                kernels.set_dot(d)
                return backend.run_nodes(graph.nodes, {graph.input: x}, [graph.output])[graph.output]
            whole_fns.append(new)
            y = new()
            diffs.append(float(np.abs(y - y_old).max()))
        whole = interleaved(whole_fns, max(3, repeat // 2))
    finally:
        kernels.set_dot(saved)
    return {"dots": dots, "layers": layers, "whole": whole, "max_diff": diffs}


def print_comparison(title: str, res: dict, flops: int) -> None:
    dots = res["dots"]
    print(title)
    head = f"  {'kind':<17} {'n':>3} {'old ms':>9}" + "".join(f" {d + ' ms':>10} {'old/' + d:>11}" for d in dots)
    print(head)
    print("  " + "-" * (len(head) - 2))
    kinds: dict[str, list] = {}
    for layer in res["layers"]:
        k = layer["kind"] + (" (in place)" if layer["inplace"] else "")
        acc = kinds.setdefault(k, [0, [0.0] * (1 + len(dots))])
        acc[0] += 1
        acc[1] = [a + b for a, b in zip(acc[1], layer["seconds"], strict=True)]
    total = [sum(v[1][j] for v in kinds.values()) for j in range(1 + len(dots))]
    for k, (cnt, secs) in [*sorted(kinds.items(), key=lambda kv: -kv[1][1][0]), ("sum of layers", (0, total))]:
        row = f"  {k:<17} {cnt or len(res['layers']):>3} {secs[0] * 1e3:>9.2f}"
        print(row + "".join(f" {t * 1e3:>10.2f} {secs[0] / t:>10.2f}x" for t in secs[1:]))
    w = res["whole"]
    print(f"  whole model ({flops / 1e9:.3f} GFLOP): old {w[0] * 1e3:.1f} ms, "
          + ", ".join(f"{d} {t * 1e3:.1f} ms (old/new {w[0] / t:.2f}x, max |diff| {e:.1e})"
                      for d, t, e in zip(dots, w[1:], res["max_diff"], strict=True)))


_PYODIDE_COMPARE = r"""
import json, sys, time
sys.path.insert(0, "/repo")
import numpy as np
from bench import runtime as bench
from tilemesh.runtime import kernels
from tilemesh.runtime.graph import load_compact
import pyodide_js
g = load_compact("/data/model")
x = np.load("/data/x.npy")
old = bench.load_baseline(open("/data/kernels_baseline.py").read())
dots, scipy_s = ["einsum"], None
try:
    t = time.perf_counter()
    await pyodide_js.loadPackage("scipy")
    from scipy.linalg.blas import sgemm  # noqa: F401  (the import is part of the boot cost)
    scipy_s = time.perf_counter() - t
    dots.append("sgemm")
except Exception as e:
    print("no scipy:", e)
res = bench.compare_paths(g, x, old, REPEAT, dots)
res.update(scipy_s=scipy_s, numpy=np.__version__, platform=sys.platform)
print("@@RESULT@@" + json.dumps(res))
"""


def compare_in_pyodide(graph: Graph, x: np.ndarray, old_source: str, repeat: int) -> dict:
    return _pyodide_run(graph, x, _PYODIDE_COMPARE.replace("REPEAT", str(int(repeat))), 3600,
                        {"kernels_baseline.py": old_source})


def _ort_session(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


_PYODIDE_SCRIPT = r"""
import json, statistics, sys, time
sys.path.insert(0, "/repo")
import numpy as np
from tilemesh.runtime import kernels
from tilemesh.runtime.executor import run_graph, run_nodes
from tilemesh.runtime.graph import load_compact
g = load_compact("/data/model")
x = np.load("/data/x.npy")
env = {g.input: x, **run_nodes(g, g.nodes, {g.input: x})}
def med(f, n):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
layers = {}
for n in g.nodes:
    ins = [env[t] for t in n.inputs]
    layers[n.name] = med(lambda: kernels.run_node(n, ins, g.weights), REPEAT)
whole = med(lambda: run_graph(g, x), max(3, REPEAT // 4))
print("@@RESULT@@" + json.dumps({"layers": layers, "whole": whole, "dot": kernels.dot_name(),
                                 "numpy": np.__version__, "platform": sys.platform}))
"""

_NODE_RUNNER = r"""
import { pathToFileURL } from "node:url";
const [dir, repo, data, script] = process.argv.slice(2);
const { loadPyodide } = await import(pathToFileURL(dir + "/pyodide.mjs").href);
const py = await loadPyodide({ indexURL: dir + "/", stdout: (s) => console.log(s), stderr: () => {} });
await py.loadPackage("numpy", { messageCallback: () => {} });
py.FS.mkdirTree("/repo"); py.mountNodeFS("/repo", repo);
py.FS.mkdirTree("/data"); py.mountNodeFS("/data", data);
await py.runPythonAsync((await import("node:fs")).readFileSync(script, "utf8"));
"""


def _pyodide_run(graph: Graph, x: np.ndarray, script: str, timeout: int, extra_files: dict | None = None) -> dict:
    """Run `script` inside Pyodide under node with the model, the input and `extra_files` in /data; its result."""
    node = shutil.which("node")
    if node is None or not (PYODIDE_DIR / "pyodide.mjs").exists():
        raise RuntimeError(f"needs `node` and Pyodide in {PYODIDE_DIR} (run `python -m tilemesh.server.assets`)")
    with tempfile.TemporaryDirectory(prefix="tilemesh-bench-") as tmp:
        save_compact(graph, Path(tmp) / "model")
        np.save(Path(tmp) / "x.npy", x)
        for name, text in (extra_files or {}).items():
            (Path(tmp) / name).write_text(text)
        (Path(tmp) / "bench.py").write_text(script)
        (Path(tmp) / "run.mjs").write_text(_NODE_RUNNER)
        r = subprocess.run(
            [node, str(Path(tmp) / "run.mjs"), str(PYODIDE_DIR), str(REPO), tmp, str(Path(tmp) / "bench.py")],
            capture_output=True, text=True, timeout=timeout,
        )
    for line in r.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    raise RuntimeError(f"Pyodide run failed ({r.returncode}): {r.stderr[-2000:] or r.stdout[-2000:]}")


def run_in_pyodide(graph: Graph, x: np.ndarray, repeat: int) -> dict:
    """Time every layer and the whole model inside Pyodide under node; raises RuntimeError if unavailable."""
    return _pyodide_run(graph, x, _PYODIDE_SCRIPT.replace("REPEAT", str(int(repeat))), 1800)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.runtime", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="ONNX model (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=15, help="timed runs per layer and side (median reported)")
    ap.add_argument("--threads", type=int, default=int(os.environ["OPENBLAS_NUM_THREADS"]),
                    help="onnxruntime intra-op threads (numpy's BLAS follows OPENBLAS_NUM_THREADS)")
    ap.add_argument("--dot", default="auto", choices=["auto", "matmul", "einsum", "sgemm"], help="numpy 2D product")
    ap.add_argument("--pyodide", action="store_true", help="also time the numpy kernels inside Pyodide (node)")
    ap.add_argument("--compare", action="store_true", help="old (--baseline) vs current kernels, interleaved")
    ap.add_argument("--baseline", default=BASELINE_REV, help="git revision of the old kernels (default: %(default)s)")
    args = ap.parse_args(argv)

    path = Path(args.model)
    if not path.exists():
        print(f"model {path} not found: run `python -m tilemesh.server.assets` (or pass --model)", file=sys.stderr)
        return 2
    kernels.set_dot(args.dot)
    t0 = time.perf_counter()
    g = load_onnx(path)
    load_s = time.perf_counter() - t0
    x = np.random.default_rng(0).standard_normal(g.shapes[g.input]).astype(np.float32)
    if args.compare:
        return _main_compare(args, g, x)
    env = {g.input: x, **run_nodes(g, g.nodes, {g.input: x})}

    pyo = None
    if args.pyodide:
        try:
            pyo = run_in_pyodide(g, x, args.repeat)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"pyodide column skipped: {e}", file=sys.stderr)

    print(f"model {path} ({len(g.nodes)} nodes, {g.weight_bytes / 1e6:.1f} MB weights, import {load_s * 1e3:.0f} ms)")
    print(f"numpy {np.__version__} dot={kernels.dot_name()} OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}, "
          f"onnxruntime threads={args.threads}, median of {args.repeat} interleaved runs")
    if pyo:
        print(f"pyodide column: numpy {pyo['numpy']} on {pyo['platform']} (node), dot={pyo['dot']}, separate process")
    cols = f"{'#':>3} {'node':<28} {'kind':<17} {'out shape':<17} {'MFLOP':>7}"
    cols += f" {'numpy ms':>9} {'ort ms':>8} {'np/ort':>7}"
    cols += f" {'pyodide ms':>10} {'pyo/ort':>7}" if pyo else ""
    print(cols)
    print("-" * len(cols))

    totals: dict[str, list[float]] = {}
    sum_np = sum_ort = sum_pyo = 0.0
    total_flops = 0
    for i, n in enumerate(g.nodes):
        ins = [env[t] for t in n.inputs]
        sess = _ort_session(to_onnx(g, [n], input_shapes={t: a.shape for t, a in zip(n.inputs, ins, strict=True)})
                            .SerializeToString(), args.threads)
        feeds = dict(zip(n.inputs, ins, strict=True))
        t_np, t_ort = interleaved([lambda n=n, ins=ins: kernels.run_node(n, ins, g.weights),
                                   lambda s=sess, f=feeds: s.run(None, f)], args.repeat)
        fl = node_flops(g, n)
        kind = layer_kind(g, n)
        t_pyo = pyo["layers"][n.name] if pyo else 0.0
        acc = totals.setdefault(kind, [0, 0.0, 0.0, 0.0, 0])
        acc[0] += 1
        acc[1] += t_np
        acc[2] += t_ort
        acc[3] += t_pyo
        acc[4] += fl
        sum_np, sum_ort, sum_pyo, total_flops = sum_np + t_np, sum_ort + t_ort, sum_pyo + t_pyo, total_flops + fl
        row = (f"{i:>3} {n.name[:28]:<28} {kind:<17} {str(g.shapes[n.output]):<17} {fl / 1e6:>7.2f} "
               f"{t_np * 1e3:>9.3f} {t_ort * 1e3:>8.3f} {t_np / t_ort:>7.1f}")
        row += f" {t_pyo * 1e3:>10.3f} {t_pyo / t_ort:>7.1f}" if pyo else ""
        print(row)

    print()
    print("by kind:")
    head = f"  {'kind':<17} {'n':>3} {'MFLOP':>8} {'numpy ms':>9} {'ort ms':>8} {'np/ort':>7}"
    print(head + (f" {'pyodide ms':>10} {'pyo/ort':>7}" if pyo else ""))
    for kind, (cnt, tn, to, tp, fl) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        row = f"  {kind:<17} {cnt:>3} {fl / 1e6:>8.1f} {tn * 1e3:>9.2f} {to * 1e3:>8.2f} {tn / to:>7.1f}"
        print(row + (f" {tp * 1e3:>10.2f} {tp / to:>7.1f}" if pyo else ""))
    row = f"  {'sum of layers':<17} {len(g.nodes):>3} {total_flops / 1e6:>8.1f}"
    row += f" {sum_np * 1e3:>9.2f} {sum_ort * 1e3:>8.2f} {sum_np / sum_ort:>7.1f}"
    print(row + (f" {sum_pyo * 1e3:>10.2f} {sum_pyo / sum_ort:>7.1f}" if pyo else ""))

    full = _ort_session(path.read_bytes(), args.threads)
    in_name = full.get_inputs()[0].name
    t_np, t_ort = interleaved([lambda: run_graph(g, x), lambda: full.run(None, {in_name: x})],
                              max(3, args.repeat // 2))
    y_np, y_ort = run_graph(g, x), full.run(None, {in_name: x})[0]
    print()
    print(f"whole model ({total_flops / 1e9:.3f} GFLOP): numpy {t_np * 1e3:.1f} ms "
          f"({total_flops / t_np / 1e9:.2f} GFLOP/s), onnxruntime {t_ort * 1e3:.1f} ms "
          f"({total_flops / t_ort / 1e9:.2f} GFLOP/s), numpy/ort {t_np / t_ort:.1f}x; "
          f"max |logit diff| {float(np.abs(y_np - y_ort).max()):.2e}")
    if pyo:
        print(f"whole model in Pyodide: {pyo['whole'] * 1e3:.1f} ms ({total_flops / pyo['whole'] / 1e9:.2f} GFLOP/s), "
              f"pyodide/ort {pyo['whole'] / t_ort:.1f}x")
    return 0


def _main_compare(args, g: Graph, x: np.ndarray) -> int:
    src = baseline_source(args.baseline)
    flops = sum(node_flops(g, n) for n in g.nodes)
    print(f"old = kernels at {args.baseline}, node by node; new = current kernels via NumpyBackend "
          f"(in-place tails); median of {args.repeat} interleaved runs, ratios old/new (>1: faster now)")
    if args.pyodide:
        try:
            pyo = compare_in_pyodide(g, x, src, args.repeat)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"pyodide comparison skipped: {e}", file=sys.stderr)
        else:
            print_comparison(f"Pyodide (numpy {pyo['numpy']} on {pyo['platform']}, node):", pyo, flops)
            if pyo["scipy_s"] is not None:
                print(f"  loading scipy + openblas into Pyodide (loadPackage + import scipy.linalg.blas): "
                      f"{pyo['scipy_s'] * 1e3:.0f} ms")
            print()
    dots = [args.dot] if args.dot != "auto" else ["matmul"]
    res = compare_paths(g, x, load_baseline(src), args.repeat, dots)
    print_comparison(f"CPython (numpy {np.__version__}, OPENBLAS_NUM_THREADS="
                     f"{os.environ['OPENBLAS_NUM_THREADS']}):", res, flops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
