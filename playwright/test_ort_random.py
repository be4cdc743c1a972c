"""onnxruntime-web in headless Chromium runs the task models of random CNNs (the hypothesis generator of
tests/test_tiling.py: strided, dilated, grouped and depthwise convs, asymmetric pads, pools of both divisor
conventions, residual adds, concat, gating, heads) for every task of random plans, border and interior tiles
alike, with 1 and 2 threads: each tile equals the numpy reference (`tiling.run_steps`) within 1e-4, and no task
falls back to numpy (every op the importer emits lowers, the resampling ops and their per-tile adjustments
included). A U-Net's ConvTranspose/Resize tiles are checked within 1e-5."""

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

from bench.chromium import ORT_WASM_SETUP as SETUP  # noqa: E402
from tilemesh.runtime.backend import NumpyBackend  # noqa: E402
from tilemesh.runtime.task_model import plan_task_models, task_model  # noqa: E402
from tilemesh.runtime.tiling import build_plan, run_steps  # noqa: E402

pytestmark = pytest.mark.browser


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


def run_on_page(page, tm, blob_b64: str, feeds) -> dict[str, np.ndarray]:
    """One task model on onnxruntime-web in `page` (SETUP done): kept tensor -> tile."""
    got = page.evaluate(RUN, [b64(tm.model), blob_b64, [[t, b64(a), list(a.shape)] for t, a in feeds.items()],
                              list(tm.outputs)])
    return {t: np.frombuffer(base64.b64decode(d), np.float32).reshape(dims)
            for t, (d, dims) in zip(tm.outputs, got, strict=True)}


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
                if not task.deps.steps:  # a distributed pool's result passing through: nothing to compute
                    continue
                assert tm is not None, "every op lowers: no task falls back to numpy"
                feeds = tile_input(graph, task.deps, task.segment)
                ref = run_steps(graph, task.deps, feeds, keep=task.owned, backend=numpy)
                for t, arr in run_on_page(page, tm, blob, feeds).items():
                    np.testing.assert_allclose(arr, ref[t], rtol=1e-4, atol=1e-4)
                # Window steps padding like the layer (the image border) or less (an edge that reads halo).
                layer_pads = {n.name: tuple(n.attrs.get("pads", ())) for n in graph.nodes}
                steps = [s for s in task.deps.steps if s.pads is not None and any(layer_pads[s.node])]
                checked["tasks"] += 1
                checked["border"] += sum(tuple(s.pads) == layer_pads[s.node] for s in steps)
                checked["interior"] += sum(tuple(s.pads) != layer_pads[s.node] for s in steps)

    check()
    assert checked["tasks"] > 12 and checked["border"] > 0 and checked["interior"] > 0, checked


def test_unet_tiles_on_ort_web_equal_numpy(page, server):
    """A U-Net's ConvTranspose and Resize (linear) tiles, border and interior of a 2x2 grid and uneven bands, run
    on onnxruntime-web (2 threads) exactly as the numpy kernels compute them (1e-5), and the stitched output
    equals single-device inference."""
    from test_task_model import _unet

    from tilemesh.runtime.executor import run_graph
    from tilemesh.runtime.graph import load_onnx
    from tilemesh.runtime.tiling import Split, simulate

    page.goto(server.url + "/runtime")
    assert page.evaluate(SETUP, 2) is True
    graph = load_onnx(_unet("linear"))
    blob = b64(compact_blob(graph))
    numpy = NumpyBackend(graph)
    n = len(graph.nodes)
    x = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ops = set()
    for plan in (build_plan(graph, [], [Split.grid([["a", "b"], ["c", "d"]])], "a"),
                 build_plan(graph, [n // 2], [Split.rows({"a": 3, "b": 1, "c": 2}), Split.whole("b")], "a")):

        class OrtWeb:  # the tiling executor's engine hook, computing each tile in the browser
            name = "ort-web"

            def run_segment(self, deps, inputs, keep):
                got = run_on_page(page, task_model(graph, deps, keep, external="model.bin"), blob, inputs)
                ref = run_steps(graph, deps, inputs, keep=keep, backend=numpy)
                for t in keep:
                    np.testing.assert_allclose(got[t], ref[t], rtol=1e-5, atol=1e-5, err_msg=t)
                ops.update(graph.node(s.node).op for s in deps.steps)
                return {t: got[t] for t in keep}

        out = simulate(graph, plan, x, backend=OrtWeb())
        np.testing.assert_allclose(out, run_graph(graph, x), rtol=1e-5, atol=1e-5)
    assert {"ConvTranspose", "Resize"} <= ops
