"""The whole demo model inside Pyodide in headless Chromium: the same top-5 as onnxruntime on real photos."""

from __future__ import annotations

import base64
import json

import numpy as np
import onnxruntime as ort
import pytest
import skimage.data
from browsers import REPO

from tilemesh.runtime.preprocess import preprocess, top_k

pytestmark = pytest.mark.browser

LOAD_MODEL = """
from pyodide.http import pyfetch
import os
os.makedirs('/model', exist_ok=True)
for name in ('graph.json', 'graph.bin', 'labels.json'):
    resp = await pyfetch('/model/' + name)
    open('/model/' + name, 'wb').write(await resp.bytes())
"""

CLASSIFY = """async ([b64, h, w]) => {
    const rt = window.tilemeshRuntime;
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    return await rt.call("tilemesh.runtime.session", "classify_local", [bytes, h, w, 5], [bytes.buffer]);
}"""


def test_full_model_in_pyodide_matches_onnxruntime_top5(page, server):
    page.goto(server.url + "/runtime")
    page.wait_for_function("document.getElementById('info').dataset.state !== 'booting'", timeout=90_000)
    assert page.locator("#info").get_attribute("data-state") == "ready"
    page.evaluate("(code) => window.tilemeshRuntime.exec(code)", LOAD_MODEL)
    page.evaluate("() => window.tilemeshRuntime.call('tilemesh.runtime.session', 'load', "
                  "['/model/graph.json', '/model/labels.json'])")
    sess = ort.InferenceSession(str(REPO / "static/model/mobilenet_v2.onnx"), providers=["CPUExecutionProvider"])
    labels = json.loads((REPO / "static/model/labels.json").read_text())
    for photo in (skimage.data.chelsea(), skimage.data.coffee()):
        img = np.ascontiguousarray(photo)
        got = page.evaluate(CLASSIFY, [base64.b64encode(img.tobytes()).decode(), *img.shape[:2]])
        want = top_k(sess.run(None, {"input": preprocess(img)})[0][0], labels, 5)
        assert [t["index"] for t in got["top"]] == [i for i, _, _ in want]
        np.testing.assert_allclose([t["p"] for t in got["top"]], [p for _, _, p in want], atol=1e-4)
