"""A device's plan runtime, under its session (`session.DeviceSession`): the model and a runner per plan it runs.

Everything here takes and returns plain values (str, int, bytes-like, dicts and lists of them), so the browser
worker can call it through Pyodide without this package importing anything of the browser's.

Plans travel as a small spec, `{"plan_id", "source", "cuts", "splits"}` (what the server's planner chose), with
`"variant"` when the room runs one of the model's variants (the same weights at another input size, e.g. the
demo's heavy mode at 448 px); every device expands it with the same `tiling.build_plan` on the same graph, so
only a few hundred bytes cross the signaling channel instead of every device's full task list.
"""

from __future__ import annotations

import time

from . import overlap, wire
from .classify import LocalClassifier, answer, frame_from_bytes
from .runner import ComputeRequest, DeviceRunner
from .tiling import Split, build_plan


def split_from_json(spec):
    """A segment's split as the planner sends it: a Split dict, or {tensor: {device: [r0, r1, c0, c1]}}."""
    from .regions import Region

    if "devices" in spec:
        return Split.from_dict(spec)
    return {t: {d: Region.from_list(r) for d, r in part.items()} for t, part in spec.items()}


def plan_from_spec(graph, spec: dict):
    source = spec["source"]
    splits = [split_from_json(s) for s in spec["splits"]]
    return build_plan(graph, [int(c) for c in spec["cuts"]], splits, source)


# Chunks of a plan this device has not adopted yet wait at most this much memory (then the oldest go).
MAX_HELD_BYTES = 64 * 1024 * 1024


class PlanRuntime:
    """One device's runtime: the model and a runner per plan it takes part in, several at once (lanes of a stream,
    streams of several cameras). Plans are keyed by plan id, as chunks are on the wire. Chunks may outrun the
    `plan` message they belong to (the data channel is faster than the signaling path through the server), so
    chunks of a plan newer than any seen are held and replayed on adoption; chunks of a plan this device does
    not run (retired, or never its) are dropped and counted."""

    def __init__(self, classifier: LocalClassifier, device: str = "local", backend=None, deferred: bool = False):
        """`backend` computes tasks in Python; `deferred` hands them out instead (`compute` in every reply, answered
        through `computed`), for an engine outside Python such as onnxruntime-web."""
        self.classifier = classifier  # the model as served: the single-device classifier and the profile use it
        self.backend = backend
        self.deferred = deferred
        self.graph = classifier.graph
        self.model = classifier  # the current plan's model: `classifier` or one of its variants
        self._backends: dict[str, object] = {}  # variant -> `backend` on that variant's graph
        self.device = device
        self.runners: dict[int, DeviceRunner] = {}  # plan id -> this device's runner in it
        self.models: dict[int, object] = {}  # plan id -> the model or variant it runs
        self.specs: dict[int, dict] = {}
        self.plan_id = 0  # the newest plan adopted: chunks of newer ones are held, of unknown older ones dropped
        self.started: dict[int, dict[int, float]] = {}  # plan id -> frames started here -> perf_counter
        self.held: list[tuple[int, str, bytes]] = []
        self.held_bytes = 0
        self.dropped_chunks = 0
        self.plans: dict[int, object] = {}  # plan id -> the whole plan (tiling.Plan): who owes whom what
        self.levels: dict[int, dict[str, int]] = {}  # plan id -> tensor -> its depth (see `set_plan`)
        self.rescue_macs: dict[tuple, int] = {}  # (plan id, piece) -> MACs to compute it from the frame
        self.whole_macs: dict[str | None, int] = {}  # variant -> MACs of one whole-model inference
        self.pixels: dict[int, dict[int, object]] = {}  # plan id -> frames started here -> the uint8 crop
        # Reference runs (tilemesh.runtime.recovery): on a deferred device, rescues and frames finished alone run
        # the whole model once per frame on the engine, keeping every block boundary's tensor. Frames are keyed
        # (plan id, the plan's frame id).
        self.reference_ok = True  # the engine can run it (engine_bridge turns this off when it cannot)
        self.engines: dict | None = None  # the profile's predicted whole-model ms per engine
        self.references: dict[tuple[int, int], dict] = {}  # frame -> {tensor: whole array} of its reference run
        self.ref_asked: set[tuple[int, int]] = set()  # frames whose reference run was asked for
        self.ref_pending: dict[tuple[int, int], list] = {}  # frame -> transfers waiting for its reference run
        self.alone: dict[tuple[int, int], str] = {}  # frames to finish from their reference run's logits -> the
        # graph's output (kept when their plan is retired: a frame finished alone outlives its plan)
        self._ref_keep: dict[int, list[str]] = {}  # id(graph) -> reference_tensors(graph)
        self.overlap_checks = True  # digests of the halo rows neighbours both compute (tilemesh.runtime.overlap)

    @property
    def runner(self) -> DeviceRunner | None:
        """The newest plan's runner (what a device running one plan at a time has)."""
        return self.runners[max(self.runners)] if self.runners else None

    @property
    def spec(self) -> dict | None:
        return self.specs[max(self.specs)] if self.specs else None

    def set_plan(self, spec: dict, device: str, max_message: dict | None = None) -> dict:
        """Adopt a plan beside the ones already running; returns what this device will do in it (UI, logs)."""
        t0 = time.perf_counter()
        model = self.classifier.variant(spec.get("variant"))
        plan = plan_from_spec(model.graph, spec)
        plan_id = int(spec["plan_id"])
        if plan_id <= self.plan_id:
            raise ValueError(f"plan {plan_id} is not newer than plan {self.plan_id}")
        self.plan_id = plan_id
        replay = self._take_held(plan_id)
        if device not in plan.devices and device != spec["source"]:
            return {"plan_id": plan_id, "role": "idle", "build_ms": (time.perf_counter() - t0) * 1e3}
        self.device = device
        self.model = model
        backend = self._backend_for(spec.get("variant"), model.graph)
        # How deep each tensor is made: 0 for the frame, k for segment k-1's outputs (rescue waits grow with it).
        self.levels[plan_id] = {t: s.index + 1 for s in plan.segments for t in s.outputs}
        out_owners = plan.owners.get(plan.output_tensor, {})
        runner = DeviceRunner(model.graph, plan.device_plan(device), plan_id, spec["source"],
                              max_message={k: int(v) for k, v in (max_message or {}).items()},
                              backend=backend, deferred=self.deferred, normalize=model.pre.normalize_u8,
                              members=plan.devices,
                              output_from=next(iter(out_owners)) if len(out_owners) == 1 else None,
                              checks=overlap.checks(model.graph, plan) if self.overlap_checks else ())
        self.runners[plan_id], self.specs[plan_id], self.started[plan_id] = runner, spec, {}
        self.models[plan_id], self.plans[plan_id], self.pixels[plan_id] = model, plan, {}
        dplan = runner.dplan
        # An engine with sessions per task (onnxruntime) makes them now, never per frame.
        sessions_ms = backend.prepare(dplan, [runner.compute_keep(i) for i in range(len(dplan.tasks))]) \
            if hasattr(backend, "prepare") else None
        out, errors = [], []
        for peer, chunk in replay:
            try:
                out += runner.on_chunk(peer, chunk)
            except ValueError as exc:  # one bad held chunk must not lose the others
                errors.append(f"held chunk from {peer}: {exc}")
        return {
            **self._reply(runner, out),
            "errors": errors,
            "plan_id": plan_id,
            "role": "source" if device == spec["source"] else "worker",
            "tasks": len(dplan.tasks),
            "macs": int(sum(t.macs for t in dplan.tasks)),
            "build_ms": (time.perf_counter() - t0) * 1e3,
            **({"sessions_ms": sessions_ms} if sessions_ms is not None else {}),
            "parts": parts_of(plan),
            **({"variant": spec["variant"]} if spec.get("variant") else {}),
        }

    @property
    def plan_graph(self):
        """The graph the newest plan runs on (the model's, or its variant's)."""
        return self.runner.graph if self.runner is not None else self.graph

    def _backend_for(self, variant: str | None, graph):
        """`backend` for a variant's graph (its own sessions and shapes, the same weights and settings)."""
        if variant is None or self.backend is None or not hasattr(self.backend, "for_graph"):
            return self.backend
        if variant not in self._backends:
            self._backends[variant] = self.backend.for_graph(graph)
        return self._backends[variant]

    def retire(self, plan_id: int) -> None:
        """Stop running `plan_id` here: its frames in flight are given up, its late chunks dropped."""
        for held in (self.runners, self.specs, self.started, self.models, self.plans, self.levels, self.pixels):
            held.pop(int(plan_id), None)
        for key in [k for k in self.rescue_macs if k[0] == int(plan_id)]:
            del self.rescue_macs[key]
        for held in (self.references, self.ref_pending):
            for key in [k for k in held if k[0] == int(plan_id)]:
                del held[key]
        self.ref_asked = {k for k in self.ref_asked if k[0] != int(plan_id) or k in self.alone}

    def set_deferred(self, on: bool) -> None:
        self.deferred = bool(on)
        for runner in self.runners.values():
            runner.deferred = bool(on)

    def set_max_message(self, peer: str, size: int) -> None:
        for runner in self.runners.values():
            runner.max_message[peer] = int(size)

    def start_frame(self, frame: int, data, height: int, width: int, plan_id: int | None = None) -> dict:
        """Start `frame` on `plan_id` (default: the newest plan)."""
        runner = self.runner if plan_id is None else self.runners.get(int(plan_id))
        if runner is None:
            raise RuntimeError("no plan: the room has not planned this device in")
        model = self.models.get(runner.plan_id, self.classifier)  # the plan's model or variant
        pixels = model.pre.centre_crop_u8(frame_from_bytes(data, height, width))
        self.started[runner.plan_id][frame] = time.perf_counter()
        out = runner.start_frame(int(frame), pixels)
        held = self.pixels.setdefault(runner.plan_id, {})
        held[int(frame)] = pixels
        for old in [f for f in held if f <= int(frame) - runner.window]:
            del held[old]
        return self._reply(runner, out)

    # --- rescues: pieces computed from the frame on another device's behalf (tilemesh.runtime.recovery) --------

    def owed(self, plan_id: int, src: str, dst: str | None = None) -> list:
        """The transfers `src` owes in plan `plan_id` (to `dst` only, if given): what a rescue recomputes."""
        plan, runner = self.plans.get(int(plan_id)), self.runners.get(int(plan_id))
        if plan is None or runner is None:
            return []
        out = [t for t in plan.transfers if t.src == src and (dst is None or t.dst == dst)]
        piece = runner.output_piece
        if piece is not None and piece.src == src and dst in (None, piece.dst):
            out.append(piece)
        return out

    def rescue(self, plan_id: int, frame: int, transfers) -> dict:
        """On the source: compute `transfers` of `frame` (plan `plan_id`'s frame id) from the frame; send them to
        their receivers (as their planned sender would) and take the ones for this device. A piece the engine's
        reference run gives faster (`recovery.use_reference`) waits for that run (asked for once per frame: a
        compute request in the reply); the others are computed here on the numpy kernels. Returns the reply,
        pieces and numpy MACs spent."""
        from .recovery import rescue_macs, rescue_piece

        plan_id, frame = int(plan_id), int(frame)
        runner = self.runners.get(plan_id)
        pixels = self.pixels.get(plan_id, {}).get(frame)
        if runner is None or pixels is None:
            return {"out": [], "results": [], "reports": [], "rescued": 0, "macs": 0, "reference": 0}
        model = self.models[plan_id]
        out, macs, ref = [], 0, []
        # Once this frame has a reference run (asked for, or chosen for one piece), it serves every piece it can.
        by_ref = (plan_id, frame) in self.ref_asked or any(self._via_reference(plan_id, tr) for tr in transfers)
        for tr in transfers:
            if by_ref and self._via_reference(plan_id, tr, force=True):
                ref.append(tr)
                continue
            arr = rescue_piece(model.graph, pixels, model.pre.normalize_u8, tr)
            macs += rescue_macs(model.graph, tr)
            out += self._take_piece(runner, frame, tr, arr)
        if ref:
            if (plan_id, frame) in self.references:
                out += self._serve(runner, frame, ref, self.references[(plan_id, frame)])
            else:
                self.ref_pending.setdefault((plan_id, frame), []).extend(ref)
                out += self._ask_reference(plan_id, frame)
        return {**self._reply(runner, out), "rescued": len(transfers), "macs": macs, "reference": len(ref)}

    def release_held(self, plan_id: int, device: str) -> dict:
        """Plan `plan_id`'s pieces held for `device`'s copy are used without it (`DeviceRunner.release_held`)."""
        runner = self.runners.get(int(plan_id))
        if runner is None:
            return {"out": [], "results": []}
        return self._reply(runner, runner.release_held(device))

    def overlap_truth(self, plan_id: int, frame: int, check) -> tuple[object, int] | None:
        """On the source: the digest of overlap check `check` of `frame` computed here from the frame (the third
        computation that settles a disagreeing pair), and the numpy MACs it took; None when the pixels are gone."""
        from .recovery import rescue_macs, rescue_piece
        from .tiling import Transfer

        pixels = self.pixels.get(int(plan_id), {}).get(int(frame))
        model = self.models.get(int(plan_id))
        if pixels is None or model is None:
            return None
        tr = Transfer(check.devices[0], self.device, check.tensor, check.region)
        arr = rescue_piece(model.graph, pixels, model.pre.normalize_u8, tr)
        return overlap.digest(arr), rescue_macs(model.graph, tr)

    def _take_piece(self, runner: DeviceRunner, frame: int, tr, arr) -> list:
        if tr.dst == self.device:
            return runner.deliver(frame, tr, self.device, arr)
        return [runner.encode_piece(frame, tr.dst, tr.tensor, tr.region, arr)]

    # --- reference runs: the whole model once per frame on the engine (tilemesh.runtime.recovery) -------------

    def reference_keep(self, plan_id: int | None = None) -> list[str]:
        """The tensors the reference run of plan `plan_id`'s model keeps."""
        from .recovery import reference_tensors

        g = self.models.get(plan_id, self.classifier).graph
        if id(g) not in self._ref_keep:
            self._ref_keep[id(g)] = reference_tensors(g)
        return self._ref_keep[id(g)]

    def _via_reference(self, plan_id: int, tr, force: bool = False) -> bool:
        """Whether piece `tr` is best taken from a reference run (`force`: whenever it can be, the run being paid
        for anyway)."""
        from .recovery import use_reference

        if not (self.deferred and self.reference_ok):
            return False
        target = tr.of if tr.reduce else tr.tensor
        if target == self.models[plan_id].graph.input or target not in self.reference_keep(plan_id):
            return False
        return force or use_reference(self.rescue_cost(plan_id, [tr]), self.model_macs(plan_id), self.engines)

    def _ask_reference(self, plan_id: int, frame: int) -> list:
        """The reference run of `frame` as a compute request for the engine (once per frame)."""
        from .recovery import REFERENCE_TASK

        pixels = self.pixels.get(plan_id, {}).get(frame)
        if (plan_id, frame) in self.ref_asked or pixels is None:
            return []
        self.ref_asked.add((plan_id, frame))
        model = self.models[plan_id]
        x = model.pre.normalize_u8(pixels)
        return [ComputeRequest(frame, REFERENCE_TASK, -1, {model.graph.input: x},
                               tuple(self.reference_keep(plan_id)))]

    def reference_numpy(self, plan_id: int, request: ComputeRequest) -> dict:
        """A reference run on the numpy kernels (the engine could not run it; fake rooms)."""
        from .task_model import whole_deps
        from .tiling import run_steps

        g = self.models.get(int(plan_id), self.classifier).graph
        keep = list(request.keep)
        return run_steps(g, whole_deps(g, outputs=keep), dict(request.inputs), keep=keep)

    def alone_request(self, plan_id: int, frame: int) -> list | None:
        """Finish `frame` alone on the engine: its reference run's logits are the answer (`computed` returns them
        under "alone"). None when this device cannot (no engine, or the frame's pixels are gone)."""
        plan_id, frame = int(plan_id), int(frame)
        if not (self.deferred and self.reference_ok) or frame not in self.pixels.get(plan_id, {}):
            return None
        self.alone[(plan_id, frame)] = self.models[plan_id].graph.output
        return self._ask_reference(plan_id, frame)

    def alone_from_reference(self, plan_id: int, frame: int):
        """The logits of `frame` if its reference run already came (a frame finished alone right away)."""
        ref = self.references.get((int(plan_id), int(frame)))
        model = self.models.get(int(plan_id))
        return None if ref is None or model is None else ref.get(model.graph.output)

    def _serve(self, runner: DeviceRunner, frame: int, transfers, ref: dict) -> list:
        from .recovery import piece_from_reference

        out = []
        for tr in transfers:
            arr = piece_from_reference(runner.graph, ref, tr)
            if arr is not None:
                out += self._take_piece(runner, frame, tr, arr)
        return out

    def reference_done(self, plan_id: int, frame: int, outputs: dict) -> dict:
        """The engine's reference run of `frame`: serve the pieces waiting for it, and its logits if the frame
        finishes alone."""
        plan_id, frame = int(plan_id), int(frame)
        runner = self.runners.get(plan_id)
        if runner is None:  # the plan was retired meanwhile: only a frame finishing alone still wants it
            output = self.alone.pop((plan_id, frame), None)
            if output is None:
                return {"out": [], "results": [], "ignored": True}
            return {"out": [], "results": [], "plan_id": plan_id, "alone": [(frame, outputs[output])]}
        self.references[(plan_id, frame)] = outputs
        for old in [k for k in self.references if k[0] == plan_id and k[1] <= frame - 2 * runner.window]:
            del self.references[old]
            self.ref_asked.discard(old)
        out = self._serve(runner, frame, self.ref_pending.pop((plan_id, frame), []), outputs)
        reply = self._reply(runner, out)
        if (plan_id, frame) in self.alone:
            reply["alone"] = [(frame, outputs[self.alone.pop((plan_id, frame))])]
        return reply

    def rescue_cost(self, plan_id: int, transfers) -> int:
        """MACs `rescue` spends on `transfers` of plan `plan_id` (cached per piece for the plan)."""
        from .recovery import rescue_macs

        model = self.models.get(int(plan_id), self.classifier)
        total = 0
        for t in transfers:
            key = (int(plan_id), t.src, t.dst, t.tensor, t.region)
            if key not in self.rescue_macs:
                self.rescue_macs[key] = rescue_macs(model.graph, t)
            total += self.rescue_macs[key]
        return total

    def model_macs(self, plan_id: int) -> int:
        """MACs of one whole-model inference of the model (or variant) plan `plan_id` runs."""
        from .recovery import rescue_macs
        from .regions import Region, plane
        from .tiling import Transfer

        variant = (self.specs.get(int(plan_id)) or {}).get("variant")
        if variant not in self.whole_macs:
            g = self.models.get(int(plan_id), self.classifier).graph
            full = Region.full(*plane(g.shapes[g.output]))
            self.whole_macs[variant] = rescue_macs(g, Transfer("", "", g.output, full))
        return self.whole_macs[variant]

    def finish_alone(self, plan_id: int, frame: int):
        """The logits of a frame started here under plan `plan_id`, computed whole on this device (its plan was
        replaced, or a device of it lied); None when its pixels are gone."""
        from .executor import run_graph

        pixels = self.pixels.get(int(plan_id), {}).get(int(frame))
        model = self.models.get(int(plan_id))
        if pixels is None or model is None:
            return None
        return run_graph(model.graph, model.pre.normalize_u8(pixels))

    def _reply(self, runner: DeviceRunner, out) -> dict:
        """What the browser's main thread needs after each event: chunks to send, finished frames, reports."""
        started = self.started.setdefault(runner.plan_id, {})
        finished = runner.take_finished()
        results = [self._result(runner, f) for f in finished if f in started]
        # Frames started here that can no longer finish (dropped by the runner's window) are forgotten.
        for frame in [f for f in started if f < max(started, default=0) - runner.window]:
            del started[frame]
        reports = [runner.report(f) for f in finished]
        compute = [o for o in out if isinstance(o, ComputeRequest)]
        return {"out": _outgoing([o for o in out if not isinstance(o, ComputeRequest)]), "compute": compute,
                "results": results, "reports": [r for r in reports if r],
                "tasks_run": runner.tasks_run, "plan_id": runner.plan_id}

    def computed(self, plan_id: int, frame: int, task: int, outputs: dict) -> dict:
        """The engine's answer to a `ComputeRequest` of the reply's `compute` list (deferred mode)."""
        if int(task) < 0:
            return self.reference_done(plan_id, frame, outputs)
        runner = self.runners.get(int(plan_id))
        if runner is None:
            return {"out": [], "results": [], "ignored": True}
        return self._reply(runner, runner.on_computed(int(frame), int(task), outputs))

    def on_chunk(self, peer: str, chunk) -> dict:
        chunk = bytes(chunk)
        plan_id = wire.peek_plan_id(chunk)
        runner = self.runners.get(plan_id) if plan_id is not None else self.runner
        if runner is None and plan_id is not None:
            # Held or dropped without reaching a runner: check it here, so a corrupt chunk is a clear error
            # now rather than a silent drop (or a failed replay later).
            wire.parse_chunk(chunk)
        if plan_id is not None and plan_id > self.plan_id:
            self._hold(plan_id, peer, chunk)
            return {"out": [], "results": [], "held": True}
        if runner is None:
            self.dropped_chunks += 1
            return {"out": [], "results": [], "ignored": True}
        return self._reply(runner, runner.on_chunk(peer, chunk))

    def _hold(self, plan_id: int, peer: str, chunk: bytes) -> None:
        self.held.append((plan_id, peer, chunk))
        self.held_bytes += len(chunk)
        while self.held_bytes > MAX_HELD_BYTES:
            self.held_bytes -= len(self.held.pop(0)[2])
            self.dropped_chunks += 1

    def _take_held(self, plan_id: int) -> list[tuple[str, bytes]]:
        """The held chunks of `plan_id` in arrival order; older plans' are dropped, newer ones stay held."""
        held, self.held, self.held_bytes = self.held, [], 0
        out = []
        for pid, peer, chunk in held:
            if pid == plan_id:
                out.append((peer, chunk))
            elif pid > plan_id:
                self._hold(pid, peer, chunk)
            else:
                self.dropped_chunks += 1
        return out

    def result(self, plan_id: int, frame: int):
        """The logits of a frame this device finished under `plan_id` (None when unknown or gone)."""
        runner = self.runners.get(int(plan_id))
        return None if runner is None else runner.result(int(frame))

    def _result(self, runner: DeviceRunner, frame: int) -> dict:
        """A frame this device (the source) started and got the logits of: top-5 and timings."""
        t0 = self.started[runner.plan_id].pop(frame)
        return {
            "frame": frame,
            **answer(runner.result(frame), self.classifier.labels, 5),
            "ms": (time.perf_counter() - t0) * 1e3,
            "report": runner.report(frame),
        }

    def forget_peer(self, peer: str) -> None:
        """A device left: drop its half-received messages."""
        for runner in self.runners.values():
            runner.forget_peer(peer)


def parts_of(plan) -> list[dict]:
    """Which device owns which part of the first segment's output, as fractions of the frame: the AR map."""
    if not plan.segments:
        return []
    owners = plan.owners[plan.segments[0].outputs[0]]
    h = max(r.r1 for r in owners.values())
    w = max(r.c1 for r in owners.values())
    return [{"device": d, "r0": r.r0 / h, "r1": r.r1 / h, "c0": r.c0 / w, "c1": r.c1 / w} for d, r in owners.items()]


def _outgoing(out) -> list[dict]:
    return [{"dst": o.dst, "chunks": o.chunks, "tensor": o.tensor, "nbytes": o.nbytes} for o in out]
