"""`tilemesh serve --model FILE.onnx` in a real browser: a small CNN that is not the demo model, with a card of
its own (32-px input, frames scaled to 36, its own mean/std and labels), reaches Pyodide through the fixed
`/model/*` files the page scripts name, and classifies a frame there as onnxruntime does on the ONNX file."""

from __future__ import annotations

import base64
import json

import numpy as np
import onnxruntime as ort
import pytest
from browsers import ServerProcess, free_port, wait_http
from onnx import TensorProto, helper, numpy_helper

pytestmark = pytest.mark.browser

SIZE, FRAME, CLASSES = 32, 36, 5
LABELS = [f"shape {i}" for i in range(CLASSES)]
CARD = {"name": "Tiny browser CNN", "labels": LABELS,
        "preprocess": {"resize_shorter_side": FRAME, "crop": SIZE, "mean": [0.5, 0.45, 0.4], "std": [0.3, 0.2, 0.25]}}


def tiny_onnx(rng: np.random.Generator):
    """conv 3x3 s2 + relu, depthwise 3x3 + relu, conv 1x1, global pool, flatten, gemm; arbitrary node names."""
    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"a_w": normal(8, 3, 3, 3, scale=0.2), "a_b": np.zeros(8, np.float32),
         "b_w": normal(8, 1, 3, 3, scale=0.3), "b_b": normal(8),
         "c_w": normal(12, 8, 1, 1, scale=0.3), "c_b": np.zeros(12, np.float32),
         "fc_w": normal(CLASSES, 12), "fc_b": normal(CLASSES)}
    nodes = [
        helper.make_node("Conv", ["image", "a_w", "a_b"], ["t1"], name="q", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["t1"], ["t2"], name="zz"),
        helper.make_node("Conv", ["t2", "b_w", "b_b"], ["t3"], name="k9", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         group=8),
        helper.make_node("Relu", ["t3"], ["t4"], name="m"),
        helper.make_node("Conv", ["t4", "c_w", "c_b"], ["t5"], name="x1", kernel_shape=[1, 1]),
        helper.make_node("GlobalAveragePool", ["t5"], ["t6"], name="p"),
        helper.make_node("Flatten", ["t6"], ["t7"], name="f", axis=1),
        helper.make_node("Gemm", ["t7", "fc_w", "fc_b"], ["scores"], name="g", transB=1),
    ]
    graph = helper.make_graph(nodes, "tiny",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, CLASSES])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    import onnx

    d = tmp_path_factory.mktemp("second_model")
    onnx.save(tiny_onnx(np.random.default_rng(4)), d / "tiny.onnx")
    (d / "tiny.json").write_text(json.dumps(CARD))
    srv = ServerProcess("127.0.0.1", free_port(), extra=["--model", str(d / "tiny.onnx")])
    try:
        wait_http(srv.url + "/healthz", timeout=60)
        yield srv, d / "tiny.onnx"
    finally:
        srv.stop()


LOAD = """async (files) => {
    const code = "from pyodide.http import pyfetch\\nimport os\\n" + files.map((f) =>
        `os.makedirs('${f.path.slice(0, f.path.lastIndexOf("/"))}', exist_ok=True)\\n` +
        `open('${f.path}', 'wb').write(await (await pyfetch('${f.url}')).bytes())\\n`).join("");
    await window.tilemeshRuntime.exec(code);
    return await window.tilemeshRuntime.call("tilemesh.runtime.session", "load",
        ["/model/graph.json", "/model/labels.json", "/model/card.json"]);
}"""

CLASSIFY = """async ([b64, h, w]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    return await window.tilemeshRuntime.call("tilemesh.runtime.session", "classify_local", [bytes, h, w, 5],
                                             [bytes.buffer]);
}"""


def test_a_second_model_classifies_in_pyodide_like_onnxruntime(browser, tiny_server):
    srv, onnx_path = tiny_server
    page = browser.new_page()
    try:
        page.goto(srv.url + "/runtime")
        page.wait_for_function("document.getElementById('info').dataset.state !== 'booting'", timeout=90_000)
        assert page.locator("#info").get_attribute("data-state") == "ready"
        # What the page's scripts know of the model comes from the server: its name and the card's frame size.
        assert page.evaluate("async () => (await import('/web/model.js')).pageModel().name") == "Tiny browser CNN"
        assert page.evaluate("async () => (await import('/web/camera.js')).FRAME_SIZE") == FRAME
        files = page.evaluate("async () => (await import('/web/runtime.js')).MODEL_FILES")
        info = page.evaluate(LOAD, files)
        assert info["classes"] == CLASSES
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(9)
        for _ in range(3):
            frame = rng.integers(0, 256, (FRAME, FRAME, 4), dtype=np.uint8)
            got = page.evaluate(CLASSIFY, [base64.b64encode(frame.tobytes()).decode(), FRAME, FRAME])
            off = (FRAME - SIZE) // 2
            crop = frame[off:off + SIZE, off:off + SIZE, :3].astype(np.float32) / 255.0
            x = ((crop - np.float32(CARD["preprocess"]["mean"])) / np.float32(CARD["preprocess"]["std"]))
            logits = sess.run(None, {"image": np.ascontiguousarray(x.transpose(2, 0, 1)[None])})[0][0]
            want = np.argsort(-logits, kind="stable")[:5]
            assert [t["index"] for t in got["top"]] == list(want)
            assert [t["label"] for t in got["top"]] == [LABELS[i] for i in want]
            p = np.exp(logits - logits.max())
            np.testing.assert_allclose([t["p"] for t in got["top"]], (p / p.sum())[want], atol=1e-4)
    finally:
        page.close()


@pytest.fixture(scope="module")
def zoo_server(tmp_path_factory):
    """`tilemesh serve --model` on a pretrained zoo model (EfficientNet-Lite0), built from the download cache."""
    from tilemesh.models import zoo

    onnx_path = zoo.build("efficientnet_lite0", tmp_path_factory.mktemp("zoo"), log=lambda line: None)
    srv = ServerProcess("127.0.0.1", free_port(), extra=["--model", str(onnx_path)])
    try:
        wait_http(srv.url + "/healthz", timeout=60)
        yield srv, onnx_path
    finally:
        srv.stop()


def test_a_pretrained_zoo_model_classifies_a_photo_like_onnxruntime(browser, zoo_server):
    """A real photo (scikit-image's cat) as a camera frame: Pyodide's answer is onnxruntime's, top-1 and top-5."""
    from skimage import data, transform

    srv, onnx_path = zoo_server
    card = json.loads(onnx_path.with_suffix(".json").read_text())
    pre = card["preprocess"]
    frame_size, crop = pre["resize_shorter_side"], pre["crop"]
    img = data.chelsea()
    s = frame_size / min(img.shape[:2])
    big = transform.resize(img, (round(img.shape[0] * s), round(img.shape[1] * s)), order=1, anti_aliasing=True)
    t, left = (big.shape[0] - frame_size) // 2, (big.shape[1] - frame_size) // 2
    rgb = np.round(big[t:t + frame_size, left:left + frame_size] * 255).astype(np.uint8)
    frame = np.concatenate([rgb, np.full((frame_size, frame_size, 1), 255, np.uint8)], axis=2)
    page = browser.new_page()
    try:
        page.goto(srv.url + "/runtime")
        page.wait_for_function("document.getElementById('info').dataset.state !== 'booting'", timeout=90_000)
        assert page.evaluate("async () => (await import('/web/model.js')).pageModel().name") == card["name"]
        files = page.evaluate("async () => (await import('/web/runtime.js')).MODEL_FILES")
        assert page.evaluate(LOAD, files)["classes"] == 1000
        got = page.evaluate(CLASSIFY, [base64.b64encode(frame.tobytes()).decode(), frame_size, frame_size])
        off = (frame_size - crop) // 2
        x = (rgb[off:off + crop, off:off + crop].astype(np.float32) / 255.0 - np.float32(pre["mean"])) / np.float32(
            pre["std"])
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        logits = sess.run(None, {"input": np.ascontiguousarray(x.transpose(2, 0, 1)[None])})[0][0]
        want = list(np.argsort(-logits, kind="stable")[:5])
        assert [t["index"] for t in got["top"]] == want
        assert 281 <= want[0] <= 285  # a domestic cat: the weights are the real ones
        assert got["top"][0]["label"] == card["labels"][want[0]]
    finally:
        page.close()
