"""A device's plan runtime, under its session (`session.DeviceSession`): the model, the current plan, the runner.

Everything here takes and returns plain values (str, int, bytes-like, dicts and lists of them), so the browser
worker can call it through Pyodide without this package importing anything of the browser's.

Plans travel as a small spec, `{"plan_id", "source", "cuts", "splits"}` (what the server's planner chose), with
`"variant"` when the room runs one of the model's variants (the same weights at another input size, e.g. the
demo's heavy mode at 448 px); every device expands it with the same `tiling.build_plan` on the same graph, so
only a few hundred bytes cross the signaling channel instead of every device's full task list.
"""

from __future__ import annotations

import time

from . import wire
from .classify import LocalClassifier, frame_from_bytes, top_entries
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
    """One device's runtime. Chunks may outrun the `plan` message they belong to (the data channel is faster
    than the signaling path through the server), so chunks of a newer plan are held and replayed on adoption."""

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
        self.runner: DeviceRunner | None = None
        self.spec: dict | None = None
        self.plan_id = 0  # the newest plan adopted (or declined): chunks of older plans are stale
        self.started: dict[int, float] = {}
        self.held: list[tuple[int, str, bytes]] = []
        self.held_bytes = 0
        self.dropped_chunks = 0
        self.plan = None  # the whole plan (tiling.Plan) this device runs a part of: who owes whom what
        self.levels: dict[str, int] = {}
        self.rescue_macs: dict[tuple, int] = {}  # (plan id, piece) -> MACs to compute it from the frame
        self.whole_macs: int | None = None
        self.pixels: dict[int, object] = {}  # frames started here -> the uint8 crop (rescues compute from it)
        # Reference runs (tilemesh.runtime.recovery): on a deferred device, rescues and frames finished alone run
        # the whole model once per frame on the engine, keeping every block boundary's tensor.
        self.reference_ok = True  # the engine can run it (engine_bridge turns this off when it cannot)
        self.engines: dict | None = None  # the profile's predicted whole-model ms per engine
        self.references: dict[int, dict] = {}  # frame -> {tensor: whole array} of its reference run
        self.ref_asked: set[int] = set()  # frames whose reference run was asked for
        self.ref_pending: dict[int, list] = {}  # frame -> (plan id, transfers) waiting for its reference run
        self.alone: set[int] = set()  # frames to finish from their reference run's logits
        self._ref_keep: tuple[object, list[str]] | None = None  # (graph, reference_tensors(graph))

    def set_plan(self, spec: dict, device: str, max_message: dict | None = None) -> dict:
        """Adopt a plan; returns what this device will do in it (for the UI and for logs)."""
        t0 = time.perf_counter()
        model = self.classifier.variant(spec.get("variant"))
        plan = plan_from_spec(model.graph, spec)
        plan_id = int(spec["plan_id"])
        if plan_id <= self.plan_id:
            raise ValueError(f"plan {plan_id} is not newer than plan {self.plan_id}")
        self.plan_id = plan_id
        replay = self._take_held(plan_id)
        if device not in plan.devices and device != spec["source"]:
            self.runner = None
            self.plan = None
            self.spec = spec
            return {"plan_id": plan_id, "role": "idle", "build_ms": (time.perf_counter() - t0) * 1e3}
        self.device = device
        self.model = model
        backend = self._backend_for(spec.get("variant"), model.graph)
        self.plan = plan
        self.whole_macs = None  # the plan's model may be another variant
        # How deep each tensor is made: 0 for the frame, k for segment k-1's outputs (rescue waits grow with it).
        self.levels = {t: s.index + 1 for s in plan.segments for t in s.outputs}
        out_owners = plan.owners.get(plan.output_tensor, {})
        self.runner = DeviceRunner(model.graph, plan.device_plan(device), int(spec["plan_id"]), spec["source"],
                                   max_message={k: int(v) for k, v in (max_message or {}).items()},
                                   backend=backend, deferred=self.deferred, normalize=model.pre.normalize_u8,
                                   members=plan.devices,
                                   output_from=next(iter(out_owners)) if len(out_owners) == 1 else None)
        self.spec = spec
        dplan = self.runner.dplan
        # An engine with sessions per task (onnxruntime) makes them now, never per frame.
        sessions_ms = backend.prepare(dplan) if hasattr(backend, "prepare") else None
        out, errors = [], []
        for peer, chunk in replay:
            try:
                out += self.runner.on_chunk(peer, chunk)
            except ValueError as exc:  # one bad held chunk must not lose the others
                errors.append(f"held chunk from {peer}: {exc}")
        return {
            **self._reply(out),
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
        """The graph the current plan runs on (the model's, or its variant's)."""
        return self.runner.graph if self.runner is not None else self.graph

    def _backend_for(self, variant: str | None, graph):
        """`backend` for a variant's graph (its own sessions and shapes, the same weights and settings)."""
        if variant is None or self.backend is None or not hasattr(self.backend, "for_graph"):
            return self.backend
        if variant not in self._backends:
            self._backends[variant] = self.backend.for_graph(graph)
        return self._backends[variant]

    def set_max_message(self, peer: str, size: int) -> None:
        if self.runner is not None:
            self.runner.max_message[peer] = int(size)

    def start_frame(self, frame: int, data, height: int, width: int) -> dict:
        if self.runner is None:
            raise RuntimeError("no plan: the room has not planned this device in")
        pixels = self.model.pre.centre_crop_u8(frame_from_bytes(data, height, width))
        self.started[frame] = time.perf_counter()
        out = self.runner.start_frame(int(frame), pixels)
        self.pixels[int(frame)] = pixels
        for old in [f for f in self.pixels if f <= int(frame) - self.runner.window]:
            del self.pixels[old]
        return self._reply(out)

    # --- rescues: pieces computed from the frame on another device's behalf (tilemesh.runtime.recovery) --------

    def owed(self, src: str, dst: str | None = None) -> list:
        """The transfers `src` owes in the current plan (to `dst` only, if given): what a rescue recomputes."""
        if self.plan is None:
            return []
        out = [t for t in self.plan.transfers if t.src == src and (dst is None or t.dst == dst)]
        piece = self.runner.output_piece if self.runner is not None else None
        if piece is not None and piece.src == src and dst in (None, piece.dst):
            out.append(piece)
        return out

    def rescue(self, frame: int, transfers) -> dict:
        """On the source: compute `transfers` of `frame` from the frame; send them to their receivers (as their
        planned sender would) and take the ones for this device. A piece the engine's reference run gives faster
        (`recovery.use_reference`) waits for that run (asked for once per frame: a compute request in the reply);
        the others are computed here on the numpy kernels. Returns the reply, pieces and numpy MACs spent."""
        from .recovery import rescue_macs, rescue_piece

        frame = int(frame)
        pixels = self.pixels.get(frame)
        if self.runner is None or pixels is None:
            return {**self._reply([]), "rescued": 0, "macs": 0, "reference": 0}
        out, macs, ref = [], 0, []
        # Once this frame has a reference run (asked for, or chosen for one piece), it serves every piece it can.
        by_ref = frame in self.ref_asked or any(self._via_reference(tr) for tr in transfers)
        for tr in transfers:
            if by_ref and self._via_reference(tr, force=True):
                ref.append(tr)
                continue
            arr = rescue_piece(self.model.graph, pixels, self.model.pre.normalize_u8, tr)
            macs += rescue_macs(self.model.graph, tr)
            out += self._take_piece(frame, tr, arr)
        if ref:
            if frame in self.references:
                out += self._serve(frame, ref, self.references[frame])
            else:
                self.ref_pending.setdefault(frame, []).append((self.runner.plan_id, ref))
                out += self._ask_reference(frame)
        return {**self._reply(out), "rescued": len(transfers), "macs": macs, "reference": len(ref)}

    def _take_piece(self, frame: int, tr, arr) -> list:
        if tr.dst == self.device:
            return self.runner.deliver(frame, tr, self.device, arr)
        return [self.runner.encode_piece(frame, tr.dst, tr.tensor, tr.region, arr)]

    # --- reference runs: the whole model once per frame on the engine (tilemesh.runtime.recovery) -------------

    def reference_keep(self) -> list[str]:
        """The tensors the current model's reference run keeps."""
        from .recovery import reference_tensors

        g = self.model.graph
        if self._ref_keep is None or self._ref_keep[0] is not g:
            self._ref_keep = (g, reference_tensors(g))
        return self._ref_keep[1]

    def _via_reference(self, tr, force: bool = False) -> bool:
        """Whether piece `tr` is best taken from a reference run (`force`: whenever it can be, the run being paid
        for anyway)."""
        from .recovery import use_reference

        if not (self.deferred and self.reference_ok):
            return False
        target = tr.of if tr.reduce else tr.tensor
        if target == self.model.graph.input or target not in self.reference_keep():
            return False
        return force or use_reference(self.rescue_cost([tr]), self.model_macs(), self.engines)

    def _ask_reference(self, frame: int) -> list:
        """The reference run of `frame` as a compute request for the engine (once per frame)."""
        from .recovery import REFERENCE_TASK

        if frame in self.ref_asked or frame not in self.pixels:
            return []
        self.ref_asked.add(frame)
        x = self.model.pre.normalize_u8(self.pixels[frame])
        return [ComputeRequest(frame, REFERENCE_TASK, -1, {self.model.graph.input: x}, tuple(self.reference_keep()))]

    def reference_numpy(self, request: ComputeRequest) -> dict:
        """A reference run on the numpy kernels (the engine could not run it; fake rooms)."""
        from .task_model import whole_deps
        from .tiling import run_steps

        g = self.model.graph
        keep = list(request.keep)
        return run_steps(g, whole_deps(g, outputs=keep), dict(request.inputs), keep=keep)

    def alone_request(self, frame: int) -> list | None:
        """Finish `frame` alone on the engine: its reference run's logits are the answer (`computed` returns them
        under "alone"). None when this device cannot (no engine, or the frame's pixels are gone)."""
        frame = int(frame)
        if not (self.deferred and self.reference_ok) or frame not in self.pixels:
            return None
        self.alone.add(frame)
        return self._ask_reference(frame)

    def alone_from_reference(self, frame: int):
        """The logits of `frame` if its reference run already came (a frame finished alone right away)."""
        ref = self.references.get(int(frame))
        return None if ref is None else ref.get(self.model.graph.output)

    def _serve(self, frame: int, transfers, ref: dict) -> list:
        from .recovery import piece_from_reference

        out = []
        for tr in transfers:
            arr = piece_from_reference(self.model.graph, ref, tr)
            if arr is not None:
                out += self._take_piece(frame, tr, arr)
        return out

    def reference_done(self, frame: int, outputs: dict) -> dict:
        """The engine's reference run of `frame`: serve the pieces waiting for it, and its logits if the frame
        finishes alone."""
        frame = int(frame)
        self.references[frame] = outputs
        for old in [f for f in self.references if f <= frame - 2 * (self.runner.window if self.runner else 4)]:
            del self.references[old]
            self.ref_asked.discard(old)
        out = []
        for plan_id, transfers in self.ref_pending.pop(frame, []):
            if self.runner is not None and plan_id == self.runner.plan_id:  # else: that plan's frames went alone
                out += self._serve(frame, transfers, outputs)
        reply = self._reply(out)
        if frame in self.alone:
            self.alone.discard(frame)
            reply["alone"] = [(frame, outputs[self.model.graph.output])]
        return reply

    def rescue_cost(self, transfers) -> int:
        """MACs `rescue` spends on `transfers` (cached per piece for the plan)."""
        from .recovery import rescue_macs

        total = 0
        for t in transfers:
            key = (self.plan_id, t.src, t.dst, t.tensor, t.region)
            if key not in self.rescue_macs:
                self.rescue_macs[key] = rescue_macs(self.model.graph, t)
            total += self.rescue_macs[key]
        return total

    def model_macs(self) -> int:
        """MACs of one whole-model inference."""
        from .recovery import rescue_macs
        from .regions import Region, plane
        from .tiling import Transfer

        if self.whole_macs is None:
            g = self.model.graph
            full = Region.full(*plane(g.shapes[g.output]))
            self.whole_macs = rescue_macs(g, Transfer("", "", g.output, full))
        return self.whole_macs

    def finish_alone(self, frame: int):
        """The logits of a frame started here, computed whole on this device (its plan was replaced)."""
        from .executor import run_graph

        pixels = self.pixels.get(int(frame))
        if pixels is None:
            return None
        return run_graph(self.model.graph, self.model.pre.normalize_u8(pixels))

    def _reply(self, out) -> dict:
        """What the browser's main thread needs after each event: chunks to send, finished frames, reports."""
        if self.runner is None:
            return {"out": [], "results": [], "reports": []}
        finished = self.runner.take_finished()
        results = [self._result(f) for f in finished if f in self.started]
        # Frames started here that can no longer finish (dropped by the runner's window) are forgotten.
        for frame in [f for f in self.started if f < max(self.started, default=0) - self.runner.window]:
            del self.started[frame]
        reports = [self.runner.report(f) for f in finished]
        compute = [o for o in out if isinstance(o, ComputeRequest)]
        return {"out": _outgoing([o for o in out if not isinstance(o, ComputeRequest)]), "compute": compute,
                "results": results, "reports": [r for r in reports if r],
                "tasks_run": self.runner.tasks_run, "plan_id": self.runner.plan_id}

    def computed(self, plan_id: int, frame: int, task: int, outputs: dict) -> dict:
        """The engine's answer to a `ComputeRequest` of the reply's `compute` list (deferred mode)."""
        if int(task) < 0:
            return self.reference_done(frame, outputs)
        if self.runner is None or int(plan_id) != self.runner.plan_id:
            return {"out": [], "results": [], "ignored": True}
        return self._reply(self.runner.on_computed(int(frame), int(task), outputs))

    def on_chunk(self, peer: str, chunk) -> dict:
        chunk = bytes(chunk)
        plan_id = wire.peek_plan_id(chunk)
        if plan_id is not None and (self.runner is None or plan_id != self.runner.plan_id):
            # Held or dropped without reaching a runner: check it here, so a corrupt chunk is a clear error
            # now rather than a silent drop (or a failed replay later).
            wire.parse_chunk(chunk)
        if plan_id is not None and plan_id > self.plan_id:
            self._hold(plan_id, peer, chunk)
            return {"out": [], "results": [], "held": True}
        if self.runner is None or (plan_id is not None and plan_id < self.runner.plan_id):
            self.dropped_chunks += 1
            return {"out": [], "results": [], "ignored": True}
        return self._reply(self.runner.on_chunk(peer, chunk))

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

    def _result(self, frame: int) -> dict:
        """A frame this device (the source) started and got the logits of: top-5 and timings."""
        t0 = self.started.pop(frame)
        return {
            "frame": frame,
            "top": top_entries(self.runner.result(frame), self.classifier.labels, 5),
            "ms": (time.perf_counter() - t0) * 1e3,
            "report": self.runner.report(frame),
        }

    def forget_peer(self, peer: str) -> None:
        """A device left: drop its half-received messages."""
        if self.runner is not None:
            self.runner.forget_peer(peer)


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
