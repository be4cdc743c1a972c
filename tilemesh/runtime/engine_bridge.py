"""The Python side of a compute engine that lives outside Python (onnxruntime-web in the browser's worker).

The worker's JavaScript (`tilemesh/web/ort_engine.js`) calls these plain functions; they hold no browser imports,
so CPython tests drive them exactly as the worker does:

* `use_engine(name, on)`: the peer hands its tasks out (`Peer(deferred=True)`) instead of computing with numpy;
* `whole_model()` / `plan_models()`: the ONNX bytes (`task_model`, weights as external data into the compact
  blob) of the whole graph, and of each task of the plan just adopted: the worker makes its sessions then;
* `take_compute(reply)` / `computed(reply, ...)`: the loop that runs every `ComputeRequest` of a peer reply
  and folds the effects of each answer back into that reply, until nothing is left to compute;
* `local_input` / `local_result`: the single-device classifier around one whole-model run.

Arrays cross once each way: the worker reads request inputs through `PyProxy.getBuffer()` (a view into
Pyodide's heap that onnxruntime-web copies into its own), and results are assigned straight into fresh numpy
arrays (`JsBuffer.assign_to`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import session as session_mod
from .classify import answer, frame_from_bytes
from .graph import Node
from .profile import predict_graph_seconds, profile_from_timings, profile_probes
from .task_model import graph_model, nodes_model, plan_task_models, task_model, whole_deps

BLOB_NAME = "model.bin"  # the external-data location every task model names; the worker maps it to the blob

_engine = {"name": "numpy", "reason": "numpy is the default"}


def _rt():
    """The device session's plan runtime (`peer.PlanRuntime`): model, current runner."""
    rt = session_mod.session().runtime
    if rt is None:
        raise RuntimeError("model not loaded: call tilemesh.runtime.session.load first")
    return rt


def use_engine(name: str, on: bool, reason: str = "") -> dict:
    """Compute this peer's tasks with engine `name` outside Python (`on`), or with numpy; returns the choice."""
    s = session_mod.session()
    s.deferred = bool(on)
    _rt().set_deferred(bool(on))
    _engine.update(name=name if on else "numpy", reason=reason)
    return dict(_engine)


def engine() -> dict:
    return dict(_engine)


def blob_path(model_json: str) -> str:
    """The weight blob of a compact model (what the task models' external data points into)."""
    path = Path(model_json)
    meta = json.loads(path.read_text())
    return str(path.with_name(meta.get("bin", path.stem + ".bin")))


def whole_model() -> dict:
    return graph_model(_rt().graph, external=BLOB_NAME).to_dict()


def plan_models(plan_id: int | None = None) -> dict | None:
    """Plan `plan_id`'s task models (default: the newest plan's), in task order (None when this device does not
    run it)."""
    p = _rt()
    runner = p.runner if plan_id is None else p.runners.get(int(plan_id))
    if runner is None:
        return None
    t0 = time.perf_counter()
    models = [m.to_dict() if m is not None else None
              for m in plan_task_models(runner.graph, runner.dplan, external=BLOB_NAME,
                                        slices=[runner.check_slices(i) for i in range(len(runner.dplan.tasks))])]
    return {"plan_id": runner.plan_id, "tasks": models, "build_ms": (time.perf_counter() - t0) * 1e3,
            "source": runner.device == runner.source}


def reference_model(plan_id: int | None = None) -> dict:
    """The reference run's model for plan `plan_id`'s graph (default: the newest plan's; the model's, or its
    variant's): the whole graph on the whole frame, keeping every block boundary's tensor and the logits
    (`recovery.reference_tensors`). `key` names the graph, so the worker makes its session once per graph."""
    p = _rt()
    pid = int(plan_id) if plan_id is not None else max(p.runners, default=None)
    g = p.models.get(pid, p.classifier).graph
    keep = p.reference_keep(pid)
    model = task_model(g, whole_deps(g, outputs=keep), keep, external=BLOB_NAME, whole_inputs=True)
    return {"key": (p.specs.get(pid) or {}).get("variant") or "", **model.to_dict()}


def reference_off(reason: str) -> None:
    """The engine cannot run reference runs: rescues stay on the numpy kernels."""
    _rt().reference_ok = False
    _engine["reference"] = f"off: {reason}"


def _split(effects, reply: dict) -> dict:
    """Effects for the main thread (as `session.effect_to_dict`) apart from compute requests (raw arrays)."""
    for e in effects:
        if isinstance(e, session_mod.Compute):
            r = e.request
            reply["compute"].append({"plan_id": e.plan_id, "frame": r.frame, "task": r.task, "segment": r.segment,
                                     "keep": list(r.keep), "request": r,
                                     "inputs": [[t, np.ascontiguousarray(a, np.float32)] for t, a in r.inputs.items()]})
        else:
            reply["effects"].append(session_mod.effect_to_dict(e))
    return reply


def handle(event: dict, now: float) -> dict:
    """`session.handle` for a worker with an engine: `{effects, compute, adopted, live}`; `adopted` lists the plan
    ids this event made the device adopt (the worker makes their sessions before running anything), `live` the
    plans it still runs (the worker releases the sessions of the others)."""
    s = session_mod.session()
    before = set(s.runtime.runners) if s.runtime is not None else set()
    effects = s.handle(session_mod.event_from_dict(event), float(now))
    after = set(s.runtime.runners) if s.runtime is not None else set()
    reply = _split(effects, {"effects": [], "compute": []})
    reply["adopted"] = sorted(after - before)
    reply["live"] = sorted(after)
    return reply


def take_compute(reply: dict) -> list[dict]:
    """Remove and return the reply's compute requests, each with its inputs as contiguous float32 arrays."""
    reqs, reply["compute"] = reply.get("compute") or [], []
    return reqs


def computed_numpy(reply: dict, plan_id: int, req: dict, now: float = 0.0) -> dict:
    """Compute one request with the numpy kernels instead (the engine failed on it): the frame still finishes."""
    from .backend import NumpyBackend
    from .tiling import run_steps

    p = _rt()
    if int(req["task"]) < 0:  # a reference run (rescues, a frame alone): the whole model on numpy
        vals = p.reference_numpy(int(plan_id), req["request"])
        names = list(vals)
        return computed(reply, plan_id, req["frame"], req["task"], names, [vals[n] for n in names],
                        [vals[n].shape for n in names], now)
    runner = p.runners.get(int(plan_id))
    if runner is None:
        return reply
    task = runner.dplan.tasks[int(req["task"])]
    # What the request keeps: the owned tensors and the overlap checks' (`runner.compute_keep`), so a task that
    # falls back to numpy still sends its digests.
    keep = tuple(req.get("keep") or runner.compute_keep(int(req["task"])))
    vals = run_steps(runner.graph, task.deps, dict(req["inputs"]), keep=keep,
                     backend=NumpyBackend(runner.graph))
    names = list(vals)
    return computed(reply, plan_id, req["frame"], req["task"], names, [vals[n] for n in names],
                    [vals[n].shape for n in names], now)


def _array(data, shape) -> np.ndarray:
    shape = tuple(int(d) for d in shape)
    if hasattr(data, "assign_to"):  # a JS typed array in Pyodide: one copy, straight into the numpy array
        out = np.empty(shape, np.float32)
        data.assign_to(out)
        return out
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data, np.float32).reshape(shape)
    return np.frombuffer(memoryview(data).cast("B"), np.float32).reshape(shape).copy()


def computed(reply: dict, plan_id: int, frame: int, task: int, names, datas, shapes, now: float = 0.0) -> dict:
    """Hand the engine's outputs of one request to the session (`Computed`); its effects join `reply`."""
    outputs = {str(n): _array(d, s) for n, d, s in zip(names, datas, shapes, strict=True)}
    effects = session_mod.session().handle(session_mod.Computed(int(plan_id), int(frame), int(task), outputs),
                                           float(now))
    return _split(effects, reply)


# --------------------------------------------------------------------------- choosing the engine by profile

_OVERHEAD_CHAIN = 20
_probes: list[dict] = []


def engine_probes() -> list[dict]:
    """The profile's probes as models for the engine: `{key, model, inputs: [[name, array]], outputs}`.

    Inside one session a node costs far less than a call from JavaScript, so the engine's per-node overhead is
    measured as the slope of a chain of tiny nodes (`call` is one node, `overhead` 20), and the call cost is taken
    off every other probe (`engine_profile`); a whole task pays it once."""
    global _probes
    graph = _rt().graph
    _probes = profile_probes(graph)
    rng = np.random.default_rng(1)
    tiny = [Node(f"_probe{i}", "Clip", (f"_y{i - 1}" if i else "_x",), f"_y{i}", {"min": 0.0, "max": 6.0})
            for i in range(_OVERHEAD_CHAIN)]
    x = {"_x": rng.standard_normal((1, 1, 1, 1)).astype(np.float32)}
    timed = [("call", tiny[:1], x, [tiny[0].output]), ("overhead", tiny, x, [tiny[-1].output])]
    timed += [(p["key"], p["nodes"], p["feeds"], p["outputs"]) for p in _probes if p["kind"] != "overhead"]
    out = []
    for key, nodes, feeds, outputs in timed:
        shapes = {t: a.shape for t, a in feeds.items()}
        model = nodes_model(graph, nodes, shapes, outputs, external=BLOB_NAME)
        out.append({"key": key, "model": model, "outputs": dict.fromkeys(outputs),
                    "inputs": [[t, np.ascontiguousarray(a)] for t, a in feeds.items()]})
    return out


def engine_profile(name: str, seconds, reason: str = "", model_ms: float = 0.0, numpy_profile=None,
                   extra=None) -> dict:
    """The engine's profile from its probe timings; the peer then uses whichever of numpy (`numpy_profile`, when
    given) and the engine predicts the whole model faster. Returns the chosen profile (what the planner gets),
    with `engines`: each one's predicted whole-model ms, and `engine_reason`.

    `model_ms` is the whole model's median time run back to back through the engine (what a frame pays, quota
    and contention included): the profile is scaled to predict exactly that (`chain_factor`), and the engine's
    per-task cost (`task_s`) is the measured call of a one-node model. `extra` (JSON-able) joins the profile:
    the worker's thread count and the times that chose it. The numpy profile's `frame_s` (the camera device's
    per-frame Python work) carries over: it does not depend on the engine."""
    graph = _rt().graph
    sec = {str(k): float(v) for k, v in dict(seconds).items()}
    call = sec["call"]
    per_node = max((sec["overhead"] - call) / (_OVERHEAD_CHAIN - 1), 0.0)
    adjusted = {k: max(v - call, 0.0) + per_node for k, v in sec.items() if k not in ("call", "overhead")}
    adjusted["overhead"] = per_node
    extra = {str(k): v for k, v in dict(extra or {}).items()}
    numpy_profile = dict(numpy_profile) if numpy_profile is not None else None
    frame_s = float((numpy_profile or {}).get("frame_s", 0.0))
    if numpy_profile is not None and "sec_per_mac" not in numpy_profile:
        numpy_profile = None  # only Python's per-frame work was measured: numpy is not a candidate
    prof = profile_from_timings(graph, _probes, adjusted, name, call_s=call, task_s=call, frame_s=frame_s,
                                model_ms=round(float(model_ms), 3) if model_ms else None, **extra)
    if model_ms:
        # A lone node's session also copies its input in and its output out, which a fused task does not: the
        # probes alone misjudge the engine 0.5-5x (more under a CPU quota, where tiny probes fall between the
        # throttled periods). The whole model's measured time sets the scale, so a one-task frame on this
        # device is predicted at exactly what it measured; the probes only give the op classes' proportions.
        unchained = predict_graph_seconds({**prof, "chain_factor": 1.0}, graph)
        target = max(float(model_ms) / 1e3 - call, 1e-6)
        prof["chain_factor"] = float(min(50.0, max(0.02, target / unchained))) if unchained > 0 else 1.0
        prof["chain"]["calibrated"] = "whole model"
    preds = {name: predict_graph_seconds(prof, graph) * 1e3}
    if numpy_profile is not None:
        preds["numpy"] = predict_graph_seconds(numpy_profile, graph) * 1e3
    # The choice compares like with like: numpy's profile rests on lower quartiles of its probes, so the engine
    # is judged by the lower quartile of its whole-model runs (`model_best_ms`) when the worker measured one; the
    # planner still gets the median's scale. (Median against lower quartile put a loaded laptop on numpy.)
    best = float(extra.get("model_best_ms") or 0.0) or preds[name]
    use = name if best <= preds.get("numpy", float("inf")) else "numpy"
    why = reason if use == name else f"numpy predicted faster than {name} ({reason})"
    use_engine(name, use == name, why)
    chosen = prof if use == name else numpy_profile
    return {**chosen, "backend": use, "engines": {k: round(v, 2) for k, v in preds.items()}, "engine_reason": why}


def preprocessing() -> dict:
    """The model card's preprocessing, for an engine that normalises frames itself (the browser's worker)."""
    pre = _rt().classifier.pre
    return {"crop": pre.crop, "resize_shorter_side": pre.resize_shorter_side, "mean": list(pre.mean),
            "std": list(pre.std)}


def local_input(data, height: int, width: int) -> list:
    """The single-device classifier's model input for one frame, and the preprocessing time."""
    t0 = time.perf_counter()
    pre = _rt().classifier.pre  # the model card's preprocessing
    x = np.ascontiguousarray(pre.frame_input(frame_from_bytes(data, int(height), int(width))), np.float32)
    return [x, (time.perf_counter() - t0) * 1e3]


def local_result(logits, shape, preprocess_ms: float, compute_ms: float, k: int = 5) -> dict:
    """What `classify_local` returns, from the engine's logits."""
    labels = _rt().classifier.labels
    return {**answer(_array(logits, shape), labels, int(k)), "preprocess_ms": float(preprocess_ms),
            "compute_ms": float(compute_ms), "engine": _engine["name"]}
