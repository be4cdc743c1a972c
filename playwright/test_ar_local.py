"""The AR classifier on one device: a real photo through the (fake) camera is labelled like onnxruntime does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import skimage.data
from browsers import CHROMIUM, CHROMIUM_ARGS, REPO

from bench.media import write_y4m
from tilemesh.runtime.preprocess import preprocess, top_k


def centre_square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    return img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


@pytest.fixture(scope="module")
def coffee_camera(tmp_path_factory) -> tuple[Path, str]:
    """A fake camera showing scikit-image's coffee photo, and onnxruntime's top-1 for what the page will see."""
    img = skimage.data.coffee()  # 400x600: the page takes the centre 400x400 square
    path = write_y4m(tmp_path_factory.mktemp("cam") / "coffee.y4m", img)
    sess = ort.InferenceSession(str(REPO / "static/model/mobilenet_v2.onnx"), providers=["CPUExecutionProvider"])
    labels = __import__("json").loads((REPO / "static/model/labels.json").read_text())
    logits = sess.run(None, {"input": preprocess(centre_square(img))})[0][0]
    return path, top_k(logits, labels, 1)[0][1]


def test_ar_page_labels_camera_frames(coffee_camera, server, pw):
    cam, expected = coffee_camera
    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                 args=[*CHROMIUM_ARGS, f"--use-file-for-fake-video-capture={cam}"])
    try:
        page = browser.new_page()
        page.goto(server.url + "/ar")
        page.wait_for_function(
            "() => { const l = document.getElementById('labels');"
            " return l.dataset.state === 'error' || Number(l.dataset.frames || 0) >= 2; }",
            timeout=120_000,
        )
        labels = page.locator("#labels")
        assert labels.get_attribute("data-state") == "running", page.locator("#error").inner_text()
        assert labels.get_attribute("data-top1") == expected
        assert page.locator("#labels li").count() == 3
        assert "ms" in page.locator("#stats").inner_text()
        assert "ort-wasm" in page.locator("#stats").inner_text()  # the lone device computes on onnxruntime-web
        assert float(page.locator("#stats").get_attribute("data-latency-ms")) > 0
    finally:
        browser.close()
