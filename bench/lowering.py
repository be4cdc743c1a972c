"""What lowering the resampling ops to ONNX buys: tasks of models with Resize/ConvTranspose on each engine.

    python -m bench.lowering [--runs N] [--threads 1]

Before, a task holding an op the task-model writer did not lower (Resize, ConvTranspose, Pad, ...) ran on numpy:
Pyodide's in a browser, native numpy on the edge. Now it runs as an ONNX task model. For a U-Net-like CNN (two
MaxPool downs, a stride-2 ConvTranspose up and a bilinear Resize up, skip Concats; 3x128x128 and 3x256x256,
random weights) and, when the zoo can build it offline, DBNet (ppocr_det, 224x224), this prints the median compute
time of the whole model and of the top-left tile of a 2x2 grid (the graph fused up to its first global op, if
any: border padding at the top and left, halo rows at the others) on:

* Chromium: onnxruntime-web (wasm, N threads) running the task model, against Pyodide numpy running the same
  steps (`tiling.run_steps`) in the /runtime page's worker: what a browser paid before;
* native: onnxruntime running the task model (`OnnxRuntimeBackend`'s engine, N threads), against native numpy:
  what the edge paid before;

as ratios measured in one run, and checks that each engine's tile equals numpy (max abs difference printed).
Native numpy's BLAS gets the same thread count (OPENBLAS_NUM_THREADS, unless set). A script, not a test: the
machine is shared, ratios move by +-20%.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before numpy loads its BLAS: the same thread count as the engines
    _t = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv[:-1] else "1"
    os.environ.setdefault("OPENBLAS_NUM_THREADS", _t)

import argparse
import base64
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from bench.chromium import CHROMIUM, CHROMIUM_ARGS, local_server
from bench.chromium import ORT_WASM_SETUP as SETUP
from tilemesh.runtime.backend import NumpyBackend
from tilemesh.runtime.deps import is_global
from tilemesh.runtime.graph import compact_meta, load_onnx
from tilemesh.runtime.task_model import task_model, whole_deps
from tilemesh.runtime.tiling import Split, build_plan, run_steps

REPO = Path(__file__).resolve().parents[1]


# Session made once (plan adoption), one warm-up run, then `runs` timed runs; the median ms and the last output.
TIME_ORT = """async ([model, blob, feeds, output, runs]) => {
    const bytes = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
    const session = await ort.InferenceSession.create(bytes(model), { executionProviders: ["wasm"],
        externalData: [{ path: "model.bin", data: bytes(blob) }] });
    const inputs = {};
    for (const [name, data, dims] of feeds) {
        inputs[name] = new ort.Tensor("float32", new Float32Array(bytes(data).buffer), dims);
    }
    let res = await session.run(inputs, [output]);
    const ms = [];
    for (let i = 0; i < runs; i++) {
        const t0 = performance.now();
        res = await session.run(inputs, [output]);
        ms.push(performance.now() - t0);
    }
    await session.release();
    ms.sort((a, b) => a - b);
    const d = res[output].data;
    let s = ""; const u8 = new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
    for (let i = 0; i < u8.length; i += 32768) s += String.fromCharCode(...u8.subarray(i, i + 32768));
    return [ms[Math.floor(ms.length / 2)], btoa(s)];
}"""

# In the /runtime page's Pyodide worker: the graph from its compact form, the same task, numpy steps timed.
PYODIDE = """
import base64, json, time, statistics
import numpy as np
from tilemesh.runtime.graph import graph_from_compact
from tilemesh.runtime.task_model import whole_deps
from tilemesh.runtime.tiling import Split, build_plan, run_steps
graph = graph_from_compact(json.loads(base64.b64decode({meta!r})), base64.b64decode({blob!r}))
if {tile!r}:
    grid = [Split.grid([["a", "b"], ["c", "d"]])] + [Split.whole("a")] * len({cuts!r})
    deps = build_plan(graph, {cuts!r}, grid, "a").device_plan("a").tasks[0].deps
else:
    deps = whole_deps(graph)
feeds = {{t: np.frombuffer(base64.b64decode(v), np.float32).reshape(s).copy() for t, (v, s) in {feeds!r}.items()}}
keep = [{keep!r}]
run_steps(graph, deps, feeds, keep=keep)
ms = []
for _ in range({runs}):
    t0 = time.perf_counter()
    out = run_steps(graph, deps, feeds, keep=keep)[keep[0]]
    ms.append((time.perf_counter() - t0) * 1e3)
[statistics.median(ms), base64.b64encode(np.ascontiguousarray(out, np.float32).tobytes()).decode()]
"""


def b64(a) -> str:
    return base64.b64encode(a if isinstance(a, bytes) else np.ascontiguousarray(a).tobytes()).decode()


def unet(size: int, seed: int = 0):
    """A U-Net-like CNN as an ONNX model: conv blocks 16/32/64, MaxPool downs, ConvTranspose and Resize ups."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(v) -> str:
        name = f"k{len(inits)}"
        inits.append(numpy_helper.from_array(np.asarray(v, np.float32), name))
        return name

    def node(op, ins, **attrs) -> str:
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node(op, ins, [out], name=f"{op.lower()}{len(nodes)}", **attrs))
        return out

    def block(x, cin, cout):
        for c_in in (cin, cout):
            w = const(rng.standard_normal((cout, c_in, 3, 3)) / np.sqrt(c_in * 9))
            x = node("Relu", [node("Conv", [x, w, const(0.1 * rng.standard_normal(cout))], kernel_shape=[3, 3],
                                   pads=[1, 1, 1, 1])])
        return x

    e1 = block("x", 3, 16)
    e2 = block(node("MaxPool", [e1], kernel_shape=[2, 2], strides=[2, 2]), 16, 32)
    b = block(node("MaxPool", [e2], kernel_shape=[2, 2], strides=[2, 2]), 32, 64)
    u2 = node("ConvTranspose", [b, const(rng.standard_normal((64, 32, 2, 2)) / 16), const(np.zeros(32))],
              strides=[2, 2])
    d2 = block(node("Concat", [u2, e2], axis=1), 64, 32)
    u1 = node("Resize", [d2, "", const([1, 1, 2, 2])], mode="linear")
    d1 = block(node("Concat", [u1, e1], axis=1), 48, 16)
    y = node("Conv", [d1, const(rng.standard_normal((2, 16, 1, 1)) / 4), const(np.zeros(2))], kernel_shape=[1, 1])
    g = helper.make_graph(nodes, "unet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def models() -> list[tuple[str, object]]:
    out = [("U-Net 128", unet(128)), ("U-Net 256", unet(256))]
    try:
        from tilemesh.models import zoo

        d = Path(tempfile.mkdtemp(prefix="tilemesh-lowering-"))
        zoo.build("ppocr_det", d, log=lambda line: None)
        out.append(("DBNet ppocr_det 224", d / "ppocr_det.onnx"))
    except Exception as e:  # noqa: BLE001 - offline without the cached wheel: say so, bench the rest
        print(f"[bench] ppocr_det not built ({e}); U-Nets only", flush=True)
    return out


def blob_of(graph) -> tuple[dict, bytes]:
    meta, chunks = compact_meta(graph)
    blob = bytearray(meta["bin_bytes"])
    for off, w in chunks:
        blob[off: off + w.nbytes] = w.tobytes()
    return meta, bytes(blob)


def _numpy_run(graph, deps, feeds, keep, numpy):
    return run_steps(graph, deps, feeds, keep=[keep], backend=numpy)[keep]


def _ort_run(sess, feeds, keep):
    return sess.run([keep], feeds)[0]


def native_ms(fn, runs: int) -> tuple[float, np.ndarray]:
    out = fn()
    ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ms), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lowering", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import onnxruntime as ort
    from playwright.sync_api import sync_playwright

    rows = []
    with local_server() as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page()
        page.goto(url + "/runtime")
        page.wait_for_function("document.getElementById('info').dataset.state !== 'booting'", timeout=120_000)
        assert page.evaluate(SETUP, args.threads) is True
        for name, src in models():
            graph = load_onnx(src)
            ops = sorted({n.op for n in graph.nodes} & {"Resize", "ConvTranspose", "Pad", "DepthToSpace"})
            meta, blob = blob_of(graph)
            numpy = NumpyBackend(graph)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            opts.add_external_initializers_from_files_in_memory(["model.bin"], [blob], [len(blob)])
            # The tiled part: the graph up to its first global op (DBNet's), 2x2, the rest whole.
            k = next((i for i, n in enumerate(graph.nodes) if is_global(n, graph)), None)
            cuts = [k] if k else []
            for part, tile in (("whole", False), ("2x2 tile", True)):
                if tile:
                    grid = [Split.grid([["a", "b"], ["c", "d"]])] + [Split.whole("a")] * len(cuts)
                    task = build_plan(graph, cuts, grid, "a").device_plan("a").tasks[0]
                    deps, keep = task.deps, sorted(task.owned)[0]
                else:
                    deps, keep = whole_deps(graph), graph.output
                rng = np.random.default_rng(1)
                feeds = {t: rng.standard_normal((1, graph.shapes[t][1], r.rows, r.cols)).astype(np.float32)
                         for t, r in deps.inputs.items()}
                tm = task_model(graph, deps, [keep], external="model.bin")
                sess = ort.InferenceSession(tm.model, opts, providers=["CPUExecutionProvider"])
                np_ms, ref = native_ms(partial(_numpy_run, graph, deps, feeds, keep, numpy), args.runs)
                ort_ms, got = native_ms(partial(_ort_run, sess, feeds, keep), args.runs)
                web_ms, web = page.evaluate(TIME_ORT, [b64(tm.model), b64(blob),
                                                       [[t, b64(a), list(a.shape)] for t, a in feeds.items()],
                                                       keep, args.runs])
                code = PYODIDE.format(meta=b64(json.dumps(meta).encode()), blob=b64(blob), tile=tile, cuts=cuts,
                                      feeds={t: (b64(a), list(a.shape)) for t, a in feeds.items()}, keep=keep,
                                      runs=max(3, args.runs // 2))
                py_ms, py = page.evaluate("(c) => window.tilemeshRuntime.exec(c)", code)
                web = np.frombuffer(base64.b64decode(web), np.float32).reshape(ref.shape)
                py = np.frombuffer(base64.b64decode(py), np.float32).reshape(ref.shape)
                err = max(float(np.abs(a - ref).max()) for a in (got, web, py))
                rows.append((name, part, ops, py_ms, web_ms, np_ms, ort_ms, err, tuple(ref.shape)))
                print(f"[bench] {name} {part}: done", flush=True)
        browser.close()

    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {args.threads} thread(s); median of "
          f"{args.runs} runs (Pyodide {max(3, args.runs // 2)}) after a warm-up")
    print(f"{'model':<22}{'part':<10}{'pyodide numpy':>14}{'ort-web':>10}{'numpy':>10}{'native ort':>11}"
          f"{'browser gain':>14}{'edge gain':>11}{'max |diff|':>12}")
    for name, part, _ops, py_ms, web_ms, np_ms, ort_ms, err, _ in rows:
        print(f"{name:<22}{part:<10}{py_ms:14.1f}{web_ms:10.1f}{np_ms:10.1f}{ort_ms:11.1f}"
              f"{py_ms / web_ms:13.1f}x{np_ms / ort_ms:10.1f}x{err:12.1e}")
    print("\nms per run. browser gain = Pyodide numpy / onnxruntime-web (what lowering saves a browser computing this "
          "task); edge gain = numpy / onnxruntime, native. Ops that used to force numpy: "
          + "; ".join(sorted({f"{r[0]}: {', '.join(r[2])}" for r in rows})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
