"""The demo model (torchvision's MobileNetV2), built at setup time without torch.

``build_demo_model(out_dir)`` is the setup step: it finds or downloads the source weights, converts
them to ONNX and writes the ONNX file, its model card (:mod:`tilemesh.models.card`), ``labels.json`` and
``model.json`` (see :mod:`tilemesh.models.demo`). Only setup code lives here: the runtime that runs in Pyodide
does not import this package, and ``onnx`` is imported lazily because Pyodide lacks it.
"""

from tilemesh.models.demo import build_demo_model

__all__ = ["build_demo_model"]
