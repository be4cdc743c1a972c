"""onnxruntime-web's WebGPU execution provider in the peer runtime's Worker, for correctness only.

Headless Chromium with `--enable-unsafe-webgpu` gets SwiftShader's software adapter even with `--disable-gpu`
(shared/PLATFORM.md): about 0.3 GFLOP/s, useless for speed, enough to check results. `?ort_ep=webgpu` makes the
device take WebGPU whenever it has an adapter (by default it is taken only when it measures faster than wasm,
which SwiftShader never does). Against the references: the whole demo model on a real photo (onnxruntime's
top-5), and a room's tiles with border and interior pads (a fused 2x2 grid, then the rest) equal to
single-device numpy.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import onnxruntime as ort
import pytest
import skimage.data
from browsers import CHROMIUM, CHROMIUM_ARGS, REPO, require_browser_assets
from test_ort_engine import CLASSIFY, boot, room_tiles_equal_numpy

from tilemesh.runtime.preprocess import preprocess, top_k

pytestmark = pytest.mark.browser

# GPU arithmetic (other summation orders, fused multiply-adds) moves softmax probabilities by up to about 1e-5
# here; 1e-4 as for every engine.
ATOL = 1e-4


@pytest.fixture(scope="module")
def gpu_browser(pw):
    require_browser_assets()
    b = pw.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, "--enable-unsafe-webgpu"], headless=True)
    yield b
    b.close()


@pytest.fixture
def gpu_page(gpu_browser, server):
    page = gpu_browser.new_page()
    page.requests = []  # type: ignore[attr-defined]
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(server.url + "/healthz")
    if not page.evaluate("async () => Boolean(navigator.gpu && await navigator.gpu.requestAdapter())"):
        pytest.skip("this Chromium offers no WebGPU adapter (needs --enable-unsafe-webgpu and SwiftShader)")
    yield page
    page.close()


def test_webgpu_tiles_and_whole_model_match_the_references(gpu_page, server):
    """One boot (SwiftShader is slow): a room's border and interior tiles equal single-device numpy, then the
    whole model on the same page gives onnxruntime's top-5."""
    room_tiles_equal_numpy(gpu_page, server, 1, "&ort_ep=webgpu", "ort-webgpu", atol=ATOL)
    sess = ort.InferenceSession(str(REPO / "static/model/mobilenet_v2.onnx"), providers=["CPUExecutionProvider"])
    labels = json.loads((REPO / "static/model/labels.json").read_text())
    img = np.ascontiguousarray(skimage.data.chelsea())
    got = gpu_page.evaluate(CLASSIFY, [base64.b64encode(img.tobytes()).decode(), *img.shape[:2]])
    assert got["engine"] == "ort-webgpu"
    want = top_k(sess.run(None, {"input": preprocess(img)})[0][0], labels, 5)
    assert [t["index"] for t in got["top"]] == [i for i, _, _ in want]
    np.testing.assert_allclose([t["p"] for t in got["top"]], [p for _, _, p in want], atol=ATOL)
    # The WebGPU build was fetched (its wasm once); nothing left the machine.
    assert len([r for r in gpu_page.requests if "asyncify.wasm" in r]) == 1, gpu_page.requests
    assert not [r for r in gpu_page.requests if not r.startswith(server.url)]


def test_wasm_devices_never_fetch_the_webgpu_build(page, server):
    """Without an adapter (the default headless Chromium) the device stays on wasm and loads no WebGPU file."""
    info = boot(page, server, 1)
    assert info["engine"]["engine"] == "ort-wasm"
    assert not [r for r in page.requests if "webgpu" in r or "asyncify" in r], page.requests
