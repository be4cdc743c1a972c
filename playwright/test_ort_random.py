"""onnxruntime-web in headless Chromium runs the task models of random CNNs (the hypothesis generator of
tests/test_tiling.py: strided, dilated, grouped and depthwise convs, asymmetric pads, pools of both divisor
conventions, residual adds, concat, gating, heads) for every task of random plans, border and interior tiles
alike, with 1 and 2 threads: each tile equals the numpy reference (`tiling.run_steps`) within 1e-4."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_task_model import compact_blob, tile_input  # noqa: E402
from test_tiling import random_cnn, random_plan_args, to_graph  # noqa: E402

from tilemesh.runtime.backend import NumpyBackend  # noqa: E402
from tilemesh.runtime.task_model import plan_task_models  # noqa: E402
from tilemesh.runtime.tiling import build_plan, run_steps  # noqa: E402

pytestmark = pytest.mark.browser

SETUP = """async (threads) => {
    const ort = await import("/static/vendor/ort/ort.wasm.min.mjs");
    ort.env.wasm.wasmPaths = "/static/vendor/ort/";
    ort.env.wasm.numThreads = threads;
    window.ort = ort;
    return crossOriginIsolated;
}"""

# One task: its model and the graph's weight blob as external data; inputs in, outputs out, all base64.
RUN = """async ([model, blob, feeds, outputs]) => {
    const bytes = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
    const b64 = (u8) => { let s = ""; for (let i = 0; i < u8.length; i += 32768)
        s += String.fromCharCode(...u8.subarray(i, i + 32768)); return btoa(s); };
    const session = await ort.InferenceSession.create(bytes(model), { executionProviders: ["wasm"],
        externalData: [{ path: "model.bin", data: bytes(blob) }] });
    const inputs = {};
    for (const [name, data, dims] of feeds) {
        inputs[name] = new ort.Tensor("float32", new Float32Array(bytes(data).buffer), dims);
    }
    const res = await session.run(inputs, outputs);
    await session.release();
    return outputs.map((k) => [b64(new Uint8Array(res[k].data.buffer, res[k].data.byteOffset, res[k].data.byteLength)),
                               res[k].dims]);
}"""


def b64(a) -> str:
    return base64.b64encode(a if isinstance(a, bytes) else np.ascontiguousarray(a).tobytes()).decode()


@pytest.mark.parametrize("threads", [1, 2])
def test_random_cnn_tiles_on_ort_web_equal_numpy(page, server, threads):
    page.goto(server.url + "/runtime")
    assert page.evaluate(SETUP, threads) is True
    checked = {"tasks": 0, "border": 0, "interior": 0}

    @settings(max_examples=30, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    def check(data):
        graph = to_graph(data.draw(random_cnn()))
        plan = build_plan(graph, *data.draw(random_plan_args(graph)))
        blob = b64(compact_blob(graph))
        numpy = NumpyBackend(graph)
        for dev in plan.devices:
            dplan = plan.device_plan(dev)
            for task, tm in zip(dplan.tasks, plan_task_models(graph, dplan, external="model.bin"), strict=True):
                if tm is None:  # an op the writer does not lower: that task runs on numpy in the browser
                    continue
                feeds = tile_input(graph, task.deps, task.segment)
                ref = run_steps(graph, task.deps, feeds, keep=task.owned, backend=numpy)
                got = page.evaluate(RUN, [b64(tm.model), blob, [[t, b64(a), list(a.shape)] for t, a in feeds.items()],
                                          list(tm.outputs)])
                for t, (data_b64, dims) in zip(tm.outputs, got, strict=True):
                    arr = np.frombuffer(base64.b64decode(data_b64), np.float32).reshape(dims)
                    np.testing.assert_allclose(arr, ref[t], rtol=1e-4, atol=1e-4)
                # Window steps padding like the layer (the image border) or less (an edge that reads halo).
                layer_pads = {n.name: tuple(n.attrs.get("pads", ())) for n in graph.nodes}
                steps = [s for s in task.deps.steps if s.pads is not None and any(layer_pads[s.node])]
                checked["tasks"] += 1
                checked["border"] += sum(tuple(s.pads) == layer_pads[s.node] for s in steps)
                checked["interior"] += sum(tuple(s.pads) != layer_pads[s.node] for s in steps)

    check()
    assert checked["tasks"] > 12 and checked["border"] > 0 and checked["interior"] > 0, checked
