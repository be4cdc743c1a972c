"""The camera phone's early exit, as the browser's worker calls it (the rule itself: `early_exit.step`).

The page turns early exit on with `configure(...)` (the model card's `early_exit`: the cheap pass's variant and
its thresholds); then for each camera frame it asks `cheap_pass` first. In the browser's worker, onnxruntime-web
runs the cheap pass on its own session of the variant's graph (`tilemesh/web/ort_engine.js` `cheapPass`) and
hands the scores to `cheap_result`; elsewhere (numpy only) `cheap_pass` runs the variant here. Either way the
decision is `early_exit.step` on the scores, so an exit can only ever show the cheap pass's own top classes.
When the frame went to the room instead, the page reports the room's answer (`room_answered`): it is the label
later exits must name.

Plain functions of module state (one camera per worker), no browser imports: CPython tests drive them as the
worker does.
"""

from __future__ import annotations

import numpy as np

from . import early_exit
from . import session as session_mod
from .classify import top_entries

_state: dict = {"rule": None, "variant": None}


def _classifier():
    rt = session_mod.session().runtime
    if rt is None:
        raise RuntimeError("model not loaded: call tilemesh.runtime.session.load first")
    return rt.classifier


def configure(variant: str, threshold: float, alone_threshold: float = 0.0, max_run: int = 8) -> dict:
    """Early exit with the card's cheap pass `variant` and thresholds (the counts start again); the variant must
    be one of the model's (ValueError naming them otherwise)."""
    _classifier().variant(str(variant))  # loads it, or says which variants there are
    _state["rule"] = early_exit.StreamExit(float(threshold), float(alone_threshold), int(max_run))
    _state["variant"] = str(variant)
    return status()


def status() -> dict:
    rule = _state["rule"]
    if rule is None:
        return {"on": False}
    return {"on": True, "variant": _state["variant"], "threshold": rule.threshold,
            "alone_threshold": rule.alone_threshold, "max_run": rule.max_run, "frames": rule.frames,
            "exits": rule.exits, "exit_rate": rule.exit_rate, "room_label": rule.last_room}


def _rule() -> early_exit.StreamExit:
    if _state["rule"] is None:
        raise RuntimeError("early exit is not configured: call exit_bridge.configure first")
    return _state["rule"]


def preprocessing() -> dict:
    """The cheap pass's preprocessing ({variant, crop, resize_shorter_side, mean, std}) for the worker's engine."""
    _rule()
    pre = _classifier().variant(_state["variant"]).pre
    return {"variant": _state["variant"], "crop": pre.crop, "resize_shorter_side": pre.resize_shorter_side,
            "mean": list(pre.mean), "std": list(pre.std)}


def cheap_result(logits, shape, preprocess_ms: float, compute_ms: float, k: int = 5) -> dict:
    """One frame's cheap-pass scores -> the exit decision and what the page shows: `top` is the cheap pass's own
    top-k (an exit shows nothing else), `exit`, `entropy`, `reason`, and the running counts."""
    from .engine_bridge import _array  # noqa: PLC0415  (a JS typed array in Pyodide, or numpy here)

    z = _array(logits, shape)
    state, d = early_exit.step(_rule(), z)
    _state["rule"] = state
    labels = _classifier().labels
    return {"exit": d.exit, "entropy": d.entropy, "reason": d.reason, "top1": d.top1,
            "top": top_entries(np.asarray(z).reshape(1, -1), labels, int(k)),
            "preprocess_ms": float(preprocess_ms), "compute_ms": float(compute_ms), **status()}


def cheap_pass(data, height: int, width: int, k: int = 5) -> dict:
    """The cheap pass on this device's numpy kernels (no engine): `data` is the frame at the variant's size."""
    import time  # noqa: PLC0415  (a measurement at the worker's edge)

    from .classify import frame_from_bytes  # noqa: PLC0415
    from .executor import run_graph  # noqa: PLC0415

    _rule()
    cheap = _classifier().variant(_state["variant"])
    t0 = time.perf_counter()
    x = cheap.pre.frame_input(frame_from_bytes(data, int(height), int(width)))
    t1 = time.perf_counter()
    z = run_graph(cheap.graph, x, cheap.backend)
    t2 = time.perf_counter()
    return cheap_result(z, z.shape, (t1 - t0) * 1e3, (t2 - t1) * 1e3, k)


def room_answered(top1: int) -> dict:
    """The room's full answer (class index) for a frame that went to the room."""
    _state["rule"] = early_exit.room_answer(_rule(), int(top1))
    return status()


def forget() -> dict:
    """The camera stopped or the scene changed on purpose: later exits wait for a new room answer."""
    if _state["rule"] is not None:
        _state["rule"] = early_exit.reset(_state["rule"])
    return status()


def turn_off() -> dict:
    _state["rule"] = None
    _state["variant"] = None
    return status()


def variant_model() -> dict:
    """The cheap pass's whole graph as an ONNX task model (weights in the model's own blob) for the engine."""
    from .engine_bridge import BLOB_NAME  # noqa: PLC0415
    from .task_model import graph_model  # noqa: PLC0415

    _rule()
    return graph_model(_classifier().variant(_state["variant"]).graph, external=BLOB_NAME).to_dict()
