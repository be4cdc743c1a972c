"""The demo model (torchvision's MobileNetV2), built at setup time without torch.

``build_demo_model(out_dir)`` (in :mod:`peer_runtime.models.demo`) is the setup step: it finds or
downloads the source weights, converts them to ONNX and writes ``mobilenet_v2.onnx``,
``labels.json`` and ``model.json``. Only setup code lives here: nothing in this package is imported
by the runtime that runs in Pyodide, and ``onnx`` is imported lazily because Pyodide lacks it.
"""
