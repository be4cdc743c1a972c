"""Distributed inference on the server side: turn a room's roster into a planner call and a `plan` message.

Each peer reports, in its `state.profile`, `{"compute": <tilemesh.runtime.profile dict>, "links": {peer_id:
{"rtt_ms", "mbps"}}}`: its own speed on the model's layer kinds and what it measured to the others over the
data channels. A `plan_request` from the device with the camera makes the planner (a pure function, run in a
thread so the event loop keeps relaying signals) choose a plan over the ready peers; the answer is a small
spec that every device expands locally (`tilemesh.runtime.peer.plan_from_spec`).

Learned allocation: the `frame_report`s devices broadcast pass through the server, which learns from them
(`tilemesh.planning.refine`: each device's measured compute against its plan's prediction, each link's measured
throughput) and plans with the corrected picture; when the picture moves beyond its margins, the server plans
the source's last request again and sends the new plan, if it differs from the running one.
Streams: a `plan_request` with an `objective` makes the requester's camera one of the room's streams (kept
here, per room, until it stops or leaves). The room's devices are then divided among its streams
(`streams.divide_devices`) and each stream is planned on its share (`streams.plan_stream`, with its own
objective and privacy), so one request answers with every stream's new plan: a second camera starting or
stopping re-divides the room, and the cameras' sessions finish their frames in flight on the old lanes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading

from aiohttp import web

from tilemesh.planning import planner, refine, variants
from tilemesh.planning import streams as streams_mod
from tilemesh.runtime.graph import Graph
from tilemesh.runtime.profile import predict_graph_seconds, validate_profile
from tilemesh.server.context import MODEL_KEY
from tilemesh.server.signaling import protocol, rooms
from tilemesh.server.signaling.ids import PeerId

log = logging.getLogger("tilemesh.inference")

READY_STATES = ("ready", "busy")
MAX_CANDIDATES = 12


def planner_inputs(room: rooms.Room, requester: PeerId, devices=None, exclude=()) -> tuple[dict, dict, str | None]:
    """(profiles, links, edge id) from the roster: ready, connected peers with a compute profile, but for
    `exclude` (never the requester)."""
    wanted = None if devices is None else {*devices, requester}
    excluded = set(exclude) - {requester}
    profiles: dict[str, dict] = {}
    links: dict[tuple[str, str], dict] = {}
    edge = None
    for peer in room.peers:
        prof = peer.profile if isinstance(peer.profile, dict) else None
        if (wanted is not None and peer.id not in wanted) or peer.id in excluded:
            continue
        usable = peer.connected and peer.state in READY_STATES and prof and isinstance(prof.get("compute"), dict)
        if not usable:
            continue
        profiles[peer.id] = prof["compute"]
        if peer.kind == "edge":
            edge = peer.id
    for peer in room.peers:
        prof = peer.profile if isinstance(peer.profile, dict) else {}
        for other, link in (prof.get("links") or {}).items():
            if peer.id in profiles and other in profiles and _valid_link(link):
                links[(peer.id, other)] = {"rtt_ms": float(link["rtt_ms"]), "mbps": float(link["mbps"])}
    if requester not in profiles:
        raise ValueError("this device has not finished measuring its speed yet; try again in a moment")
    return profiles, links, edge


def _valid_link(link) -> bool:
    try:
        return float(link["rtt_ms"]) >= 0 and float(link["mbps"]) > 0
    except (KeyError, TypeError, ValueError):
        return False


def model_seconds(profiles: dict[str, dict], graph) -> dict[str, float]:
    """Each usable profile's whole-model prediction (what carries a learned correction over a new profile)."""
    out = {}
    for d, prof in profiles.items():
        try:
            out[d] = predict_graph_seconds(validate_profile(prof), graph)
        except (ValueError, KeyError, TypeError):
            continue
    return out


def shortlist(candidates: list[dict], top: int = MAX_CANDIDATES) -> list[dict]:
    """The best few candidates plus the best of every other strategy (best first), so the host page can show
    what the chosen plan beat: single device, offloading, the baselines, not only variants of the winner."""
    best_of = {}
    for c in candidates:
        best_of.setdefault(c["strategy"], c)
    chosen = candidates[:top]
    chosen += [c for c in best_of.values() if c not in chosen]
    return sorted(chosen, key=lambda c: c["predicted_s"])


class Inference:
    """Holds the served model's graph (loaded once, lazily, from its bundle) and numbers plans."""

    def __init__(self, bundle):
        self.bundle = bundle  # tilemesh.server.model.ModelBundle, or None when no model is set up
        self._graphs: dict[str | None, Graph] = {}
        self._ids = itertools.count(1)
        # What frames taught the server (tilemesh.planning.refine), per room; the last request and plan of each
        # source (a replan the picture asks for repeats that request). Planning runs in threads: one lock.
        self._lock = threading.Lock()
        self.pictures: dict = {}
        self.requests: dict = {}
        self.running: dict = {}
        self.streams: dict[str, dict[str, dict]] = {}  # room id -> camera -> {"objective", "private", ...}

    @property
    def graph(self) -> Graph:
        return self.variant_graph(None)

    def variant_graph(self, variant: str | None) -> Graph:
        """The served model's graph, or its variant's (a ValueError naming the variants for an unknown one)."""
        if variant not in self._graphs:
            if self.bundle is None:
                raise ValueError("the server has no model: run `tilemesh setup` (or serve with --model FILE.onnx)")
            if variant is not None and variant not in {v.key for v in self.bundle.card.variants}:
                raise ValueError(f"the model has no variant {variant!r} "
                                 f"(its variants: {[v.key for v in self.bundle.card.variants]})")
            self._graphs[variant] = self.bundle.graph(variant)
        return self._graphs[variant]

    def choose(self, room: rooms.Room, requester: PeerId, request: protocol.PlanRequest,
               only_if_new: bool = False, based_on: int | None = None) -> dict | list[dict] | None:
        """The plan for `requester`'s request, made with the room's learned picture (`refine.corrected`).
        `only_if_new` (a replan the picture asked for, while plan `based_on` ran): None when it would be the plan
        already running, or when another plan has replaced `based_on` meanwhile.
        A request with an `objective` is a stream (`choose_streams`, every stream's plan); learned allocation
        leaves streams alone: their lanes are not registered with the picture, and a stream request forgets
        the source's single plan, so no learned replan can answer a streaming camera with a single plan."""
        key = (room.id, requester)
        if request.objective is not None:
            if only_if_new:
                return None
            with self._lock:
                self.requests.pop(key, None)
                self.running.pop(key, None)
            return self.choose_streams(room, requester, request)
        if not only_if_new:
            self.streams.get(room.id, {}).pop(requester, None)  # a benchmark baseline: this camera streams no more
        profiles, links, edge = planner_inputs(room, requester, request.devices, request.exclude)
        with self._lock:
            picture = self.pictures.get(room.id, refine.Picture())
        model_s = model_seconds(profiles, self.variant_graph(request.variant))
        fixed_profiles, fixed_links = refine.corrected(profiles, links, picture, model_s)
        if request.target is not None:
            msg = self._choose_scaled(fixed_profiles, fixed_links, edge, requester, request)
        else:
            graph = self.variant_graph(request.variant)
            choice = planner.make_plan(request.strategy, graph, fixed_profiles, fixed_links, requester, edge=edge)
            msg = self._message(choice, requester, request.strategy, request.variant)
        shape = (msg["spec"]["cuts"], msg["spec"]["splits"], msg["devices"], msg.get("variant"))
        running = self.running.get(key, (None, None))
        if only_if_new and (running[1] == shape or (based_on is not None and running[0] != based_on)):
            return None
        predicted = {d: v["compute_s"] for d, v in msg["timeline"]["devices"].items() if v.get("compute_s")}
        with self._lock:
            if only_if_new and based_on is not None and self.running.get(key, (None, None))[0] != based_on:
                return None  # the source asked for a plan of its own meanwhile
            picture = self.pictures.get(room.id, refine.Picture())
            self.pictures[room.id] = refine.planned(picture, msg["plan_id"], requester, profiles, fixed_links,
                                                    predicted, model_s=model_s)
            self.requests[key] = request
            self.running[key] = (msg["plan_id"], shape)
        return msg

    def _choose_scaled(self, profiles, links, edge, requester: PeerId, request: protocol.PlanRequest) -> dict:
        """Context-aware scaling: the most accurate variant (the model as served, or a card variant with a
        measured agreement) whose plan in this room is predicted to meet the target (`variants`)."""
        if self.bundle is None:
            raise ValueError("the server has no model: run `tilemesh setup` (or serve with --model FILE.onnx)")
        card = self.bundle.card
        served = card.preprocess.crop
        options = variants.ladder(served, {v.key: (v.preprocess.crop, v.agreement) for v in card.variants})
        target = variants.Target(*request.target)
        current = request.variant or ""
        choices: dict[str, planner.PlanChoice] = {}

        def predict(name: str) -> tuple[float, float]:
            choices[name] = planner.make_plan(request.strategy, self.variant_graph(name or None), profiles, links,
                                              requester, edge=edge)
            latency = choices[name].predicted_s
            return latency, 1.0 / latency  # one frame at a time: the rate is the latency's inverse

        chosen, predicted = variants.choose_variant_lazily(options, predict, target, current)
        scaling = {"target": {"kind": target.kind, "value": target.value}, "chosen": chosen or None,
                   "predicted": {k or "": {"latency_ms": lat * 1e3, "fps": fps} for k, (lat, fps) in predicted.items()},
                   "met": target.met(*predicted[chosen])}
        log.info("scaling for %s: target %s %.3g -> variant %s (%s)", requester, target.kind, target.value,
                 chosen or "as served", ", ".join(f"{k or 'served'} {v[0] * 1e3:.0f} ms" for k, v in predicted.items()))
        return self._message(choices[chosen], requester, request.strategy, chosen or None, scaling=scaling)

    def _message(self, choice, requester: PeerId, strategy: str, variant: str | None, **extra) -> dict:
        plan_id = next(self._ids)
        spec = {"plan_id": plan_id, "source": requester, "cuts": list(choice.cuts),
                "splits": [s.to_dict() for s in choice.splits],
                **({"variant": variant} if variant else {})}
        log.info("plan %d for %s: %s (%s), predicted %.0f ms", plan_id, requester, choice.strategy, choice.label,
                 choice.predicted_s * 1e3)
        return {
            "plan_id": plan_id,
            "source": requester,
            "strategy": strategy,
            "label": choice.label,
            "spec": spec,
            "devices": list(choice.plan.devices),
            "predicted_ms": choice.predicted_s * 1e3,
            "timeline": choice.prediction.to_dict(),
            "candidates": shortlist(choice.candidates),
            **({"variant": variant} if variant else {}),
            **extra,
        }

    def choose_streams(self, room: rooms.Room, requester: PeerId, request: protocol.PlanRequest) -> list[dict]:
        """Every stream of the room planned again (see the module doc); the requester's joins or leaves first."""
        streams = self.streams.setdefault(room.id, {})
        if request.objective == "stop":
            streams.pop(requester, None)
        else:
            self.variant_graph(request.variant)  # an unknown variant is refused before the room changes
            streams[requester] = {"objective": request.objective, "private": bool(request.private),
                                  "variant": request.variant, "exclude": set(request.exclude),
                                  "devices": None if request.devices is None else {*request.devices, requester},
                                  **({"latency_factor": request.latency_factor} if request.latency_factor else {})}
        if not streams:
            self.streams.pop(room.id, None)
            return []
        # A device a camera caught returning wrong results (or stalling) computes for no stream of the room.
        exclude = set().union(*(st["exclude"] for st in streams.values())) - set(streams)
        try:
            profiles, links, _ = planner_inputs(room, next(iter(streams)), exclude=exclude)
        except ValueError:
            profiles, links = {}, {}
        if request.objective != "stop" and requester not in profiles:
            raise ValueError("this device has not finished measuring its speed yet; try again in a moment")
        for camera in [c for c in streams if c not in profiles]:  # left, or not ready any more
            del streams[camera]
        if not streams:
            return []
        cameras = list(streams)
        graphs = {c: self.variant_graph(streams[c]["variant"]) for c in cameras}
        shares = streams_mod.divide_devices(self.graph, profiles, links, cameras, graphs=graphs)
        out = []
        for camera in cameras:
            settings = streams[camera]
            # A camera that named devices (benchmarks: rooms of 1..N phones in one run) uses those of its share.
            share = {d: profiles[d] for d in shares[camera]
                     if settings["devices"] is None or d in settings["devices"]}
            options = {"private": settings["private"]}
            if settings.get("latency_factor"):
                options["latency_factor"] = settings["latency_factor"]
            sp = streams_mod.plan_stream(graphs[camera], share, links, camera, settings["objective"],
                                         options=options)
            out.append(self._stream_message(camera, sp, settings["variant"]))
            log.info("stream of %s (%s%s): %d lane(s) on %s, predicted %.1f fps, %.0f ms", camera,
                     settings["objective"], ", private" if settings["private"] else "", len(sp.lanes),
                     sorted(sp.devices), sp.fps, sp.latency_s * 1e3)
        return out

    def _stream_message(self, camera: str, sp: streams_mod.StreamPlan, variant: str | None = None) -> dict:
        lanes = []
        for lane, weight in zip(sp.lanes, sp.weights, strict=True):
            choice, plan_id = lane.choice, next(self._ids)
            spec = {"plan_id": plan_id, "source": camera, "cuts": list(choice.cuts),
                    "splits": [s.to_dict() for s in choice.splits], **({"variant": variant} if variant else {})}
            lanes.append({"plan_id": plan_id, "spec": spec, "devices": list(choice.plan.devices),
                          "label": choice.label, "strategy": choice.strategy, "weight": weight, "depth": lane.depth,
                          "predicted_ms": lane.latency_s * 1e3, "fps": lane.fps,
                          "timeline": choice.prediction.to_dict()})
        summary = {k: v for k, v in sp.to_dict().items() if k != "lanes"}
        first = lanes[0]
        label = " + ".join(lane["label"] for lane in lanes)
        return {
            "plan_id": first["plan_id"], "source": camera, "strategy": "tilemesh", "label": label,
            "spec": first["spec"], "devices": sorted({d for lane in lanes for d in lane["devices"]} | {camera}),
            "predicted_ms": sp.latency_s * 1e3, "timeline": first["timeline"], "candidates": [],
            "lanes": lanes, **({"variant": variant} if variant else {}),
            "stream": {**summary, "predicted_fps": sp.fps, "predicted_ms": sp.latency_s * 1e3,
                       "bound_ms": sp.bound_s * 1e3, "single_ms": sp.single_s * 1e3},
        }

    async def __call__(self, room: rooms.Room, requester: PeerId, request: protocol.PlanRequest,
                       only_if_new: bool = False, based_on: int | None = None) -> dict | list[dict] | None:
        return await asyncio.get_running_loop().run_in_executor(None, self.choose, room, requester, request,
                                                                 only_if_new, based_on)

    def observe(self, room: rooms.Room, sender: PeerId, data: dict, now: float):
        """A `frame_report` broadcast on its way through the server: learn from it (`refine.observe`, the sender
        as the socket says, its profile as the roster has it). Returns (source, request) when the running plan of
        that report's source should be made again with what was learned, else None."""
        try:
            plan_id = int(data["plan_id"])
            report = data["report"]
            compute_s = float(report.get("compute_ms") or 0.0) / 1e3
            links = report.get("links") if isinstance(report.get("links"), dict) else None
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        member = room.peer(sender)
        prof = member.profile.get("compute") if member is not None and isinstance(member.profile, dict) else None
        profiles = {p.id: p.profile.get("compute") for p in room.peers
                    if isinstance(p.profile, dict) and isinstance(p.profile.get("compute"), dict)}
        model_s = model_seconds(profiles, self.graph)
        with self._lock:
            picture = self.pictures.get(room.id)
            if picture is None or plan_id not in picture.plans:
                return None
            picture = refine.observe(picture, plan_id, sender, compute_s, prof, links, model_s.get(sender, 0.0))
            source = picture.plans[plan_id].source
            key = (room.id, source)
            running = self.running.get(key)
            why = None
            if running is not None and running[0] == plan_id and key in self.requests:
                picture, why = refine.replan_due(picture, plan_id, profiles, now, model_s)
            self.pictures[room.id] = picture
            if why is None:
                return None
            log.info("room %s…: replanning for %s: %s", room.id[:6], source, why)
            return source, self.requests[key], plan_id

    def forget(self, room_id) -> None:
        """A closed room's learned picture goes with it."""
        with self._lock:
            self.pictures.pop(room_id, None)
            for key in [k for k in self.requests if k[0] == room_id]:
                self.requests.pop(key, None)
                self.running.pop(key, None)
            self.streams.pop(room_id, None)


INFERENCE_KEY = web.AppKey("inference", Inference)


def setup(app: web.Application) -> Inference:
    from tilemesh.server.signaling import hub as signaling  # noqa: PLC0415  (signaling imports app; keep the import graph acyclic)

    inference = Inference(app[MODEL_KEY])
    app[INFERENCE_KEY] = inference
    app[signaling.HUB_KEY].planner = inference
    app[signaling.HUB_KEY].observer = inference.observe
    app[signaling.HUB_KEY].room_closed = inference.forget
    if app[MODEL_KEY] is not None:  # fusion rooms name the model's classes and check views against them
        app[signaling.HUB_KEY].set_labels(app[MODEL_KEY].card.labels)
    return inference
