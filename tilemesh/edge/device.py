"""A computing room member in CPython: the executor of a `tilemesh.runtime.session.DeviceSession` over an EdgePeer.

The session decides (plan adoption, chunk sizes per link, probes, frames, reports, drift); this module carries
out its effects with aiortc and signaling and feeds it what happens, as web/room_engine.js does in a browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tilemesh.runtime import session as S
from tilemesh.runtime import wire
from tilemesh.runtime.backend import NumpyBackend, OnnxRuntimeBackend
from tilemesh.runtime.classify import LocalClassifier
from tilemesh.runtime.profile import measure_profile, profile_backends
from tilemesh.runtime.tiling import run_steps

from .link import PeerGone
from .peer import EdgePeer, TensorHandler

log = logging.getLogger("tilemesh.edge")

TICK_S = 0.5


@dataclass
class ModelRuntime:
    """What a computing device needs: the model (shared, read-only) and its measured compute profile."""

    classifier: LocalClassifier
    compute: dict
    backend: object | None = None  # what computes its tasks (tilemesh.runtime.backend); None: numpy


_profile_lock = threading.Lock()
_profiles: dict[tuple[str, int], tuple[object, dict]] = {}
# Threads of the edge's onnxruntime: half the server's cores (the other half runs WebRTC and signaling), 1-4.
EDGE_THREADS = int(os.environ.get("TILEMESH_EDGE_THREADS", 0)) or max(1, min(4, (os.cpu_count() or 2) // 2))


def edge_backends(graph) -> list:
    """Native onnxruntime when installed (task-model sessions, idle threads not spinning), and numpy."""
    out: list = []
    try:
        out.append(OnnxRuntimeBackend(graph, threads=EDGE_THREADS, spinning=False))
    except ImportError as exc:  # the reason shows in the profile: only numpy was measured
        log.warning("onnxruntime unavailable on the edge: %s", exc)
    return [*out, NumpyBackend(graph)]


def measured_profile(model_json: Path, classifier: LocalClassifier) -> tuple[object, dict]:
    """The fastest of `edge_backends` on this model and its profile, once per process (blocking, ~1-2 s)."""
    key = (str(model_json.resolve()), model_json.stat().st_mtime_ns)
    with _profile_lock:
        if key not in _profiles:
            _profiles[key] = profile_backends(classifier.graph, edge_backends(classifier.graph), name="edge")
        return _profiles[key]


def load_model_runtime(model_dir: Path) -> ModelRuntime:
    """The served model (its bundle, `tilemesh.server.model`), the engine this device computes it with and that
    engine's profile on it (blocking: call it in a thread)."""
    model_json = model_dir / "graph.json"
    classifier = LocalClassifier.from_files(model_json, model_dir / "labels.json", model_dir / "card.json")
    backend, compute = measured_profile(model_json, classifier)
    return ModelRuntime(classifier, compute, backend)


class ComputeDevice:
    """A room member that computes its part of the room's plans, over an `EdgePeer`.

    Every event (a plan message, a chunk, a link opening or closing, a probe's outcome, a frame, a tick) goes to
    the session on one dedicated thread, in arrival order, so signaling and the data channels stay responsive
    (a chunk can cost tens of ms of numpy) and chunk order is the channels' order; `_drain` carries out the
    effects in the same order: chunks go out through one sender per destination, in order.

    Messages whose wire header says plan 0 are not plan traffic (plan ids start at 1) but the diagnostics
    page's test tensors: they are reassembled and handed to `on_tensor`.

    `classify` makes this device the camera (the tests' stand-in for a phone); the edge never calls it.
    """

    def __init__(self, ws_url: str, room: str, *, name: str = "edge", kind: str = "edge",
                 ssl_context: ssl.SSLContext | bool | None = None, on_tensor: TensorHandler | None = None,
                 relay_key: str | None = None):
        self.kind = kind
        self.edge = EdgePeer(ws_url, room, name=name, kind=kind, ssl_context=ssl_context, probes=True,
                             relay_key=relay_key,
                             on_message=self._on_binary, on_peer=self._on_peer, on_server=self._on_server)
        self.on_tensor = on_tensor
        self.diag_inbox = wire.Inbox()
        self.session = S.DeviceSession()
        self.model: ModelRuntime | None = None
        self.model_error: str | None = None
        self.links: dict[str, dict] = {}  # as last reported by the session (megabits/s)
        self.compute: dict | None = None
        self.plan: dict | None = None  # the last `plan` message this device adopted
        self.role: dict | None = None
        self.plan_error: str | None = None
        self.plan_id = 0
        self.errors: deque[str] = deque(maxlen=32)
        self.error_count = 0
        self.chunks_in = self.chunks_out = 0
        self.plans = 0
        self._plan_seen = asyncio.Condition()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tilemesh-compute-{room[:6]}")
        self._pipeline: asyncio.Queue = asyncio.Queue()
        self._outboxes: dict[str, asyncio.Queue] = {}
        self._senders: dict[str, asyncio.Task] = {}
        self._waiting: dict[int, asyncio.Future] = {}
        self._frame = 0
        self._probes: dict[str, asyncio.Task] = {}
        self._booting: int | None = None  # other devices still booting, as last told to the session

    @property
    def peer_id(self) -> str | None:
        return self.edge.peer_id

    @property
    def runtime(self):
        """The session's plan runtime (None before the model is loaded)."""
        return self.session.runtime

    @property
    def tasks_run(self) -> dict[int, int]:
        return dict(self.session.tasks_run)

    async def start(self) -> ComputeDevice:
        await self.edge.start()
        self.edge._spawn(self._drain())
        self.edge._spawn(self._ticks())
        await self._report()
        return self

    async def close(self) -> None:
        await self.edge.close()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("device closed"))
        self._executor.shutdown(wait=False, cancel_futures=True)
        # Join the compute thread off the loop: a frame in progress finishes in tens of ms.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown), 10)

    async def set_model(self, model: ModelRuntime | None, error: str | None = None) -> None:
        """Attach the model (or say why there is none); the device reports `ready` with its profile."""
        self.model, self.model_error = model, error
        if model is not None:
            self.session.backend = model.backend  # the engine the profile chose (native onnxruntime here)
            self._fire(S.ModelLoaded(model.classifier))
            self._fire(S.Profiled(model.compute))  # the session answers with a profile report
        else:
            await self._report()

    # --- events in ---------------------------------------------------------------------------------------

    def _fire(self, event: S.Event, at: float | None = None) -> None:
        """Hand `event` to the session on the compute thread after everything queued before it; `at`: when it
        happened, if that matters more than when the session gets it (a chunk's arrival times its link)."""
        if self.edge.closed.is_set():
            return
        fut = asyncio.get_running_loop().run_in_executor(self._executor, self._handle, event, at)
        self._pipeline.put_nowait((event, fut))

    def _handle(self, event: S.Event, at: float | None = None) -> list[S.Effect]:
        now = time.monotonic() if at is None else at
        return self.session.handle(event, now)

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            # Frames of its own (timeouts) or a plan it computes in (the stall rule: ask the camera for a silent
            # device's pieces, which also clears this device of the blame).
            if self._waiting or self.session.runtime is not None and self.session.runtime.runner is not None:
                self._fire(S.Tick())

    def _on_peer(self, remote: str, state: str) -> None:
        if state == "open":
            link = self.edge.links.get(remote)
            self._fire(S.LinkOpened(remote, link.max_message if link is not None else 0))
        elif state == "gone":
            task = self._probes.pop(remote, None)
            if task is not None:
                task.cancel()
            self.diag_inbox.forget(remote)
            sender = self._senders.pop(remote, None)
            self._outboxes.pop(remote, None)
            if sender is not None:
                sender.cancel()
            self._fire(S.PeerLeft(remote))

    def _on_server(self, msg: dict) -> None:
        t = msg.get("type")
        if t == "roster":  # links measured while browsers boot are measured again once none does (session rule)
            peers = msg.get("peers") if isinstance(msg.get("peers"), list) else []
            n = sum(1 for p in peers if isinstance(p, dict) and p.get("id") != self.peer_id
                    and p.get("state") == "booting")
            if n != self._booting:
                self._booting = n
                self._fire(S.RoomChanged(n))
        elif t == "plan":
            self._fire(S.PlanIn(msg, self.peer_id or ""))
        elif t == "broadcast" and isinstance(msg.get("data"), dict):
            self._fire(S.BroadcastIn(str(msg.get("from")), msg["data"]))
        elif t == "error" and msg.get("code") == "plan_failed":
            self.plan_error = str(msg.get("message"))
            self.edge._spawn(self._notify_plan())

    def _on_binary(self, remote: str, data: bytes) -> None:
        data = bytes(data)
        if wire.peek_plan_id(data) == 0 and self._is_chunk(data):
            self._diag_tensor(remote, data)
        else:
            self.chunks_in += 1
            self._fire(S.ChunkIn(remote, data), at=time.monotonic())

    @staticmethod
    def _is_chunk(data: bytes) -> bool:
        try:
            wire.parse_chunk(data)
        except wire.WireError:
            return False  # the session refuses it too, and its error is logged in one place
        return True

    def _diag_tensor(self, remote: str, data: bytes) -> None:
        try:
            got = self.diag_inbox.feed(remote, data)
        except wire.WireError as exc:
            self._error(f"bad test tensor chunk from {remote}: {exc}")
            return
        if got is not None and self.on_tensor is not None:
            self.edge._dispatch(self.on_tensor(remote, got))

    # --- effects out -------------------------------------------------------------------------------------

    async def _drain(self) -> None:
        while True:
            event, fut = await self._pipeline.get()
            try:
                effects = await fut
            except Exception as exc:  # noqa: BLE001 (the session refuses bad input itself; this is a bug)
                self._error(f"{event.kind} failed: {type(exc).__name__}: {exc}")
                if isinstance(event, S.FrameIn):
                    self._settle(event.frame, error=exc)
                continue
            for effect in effects:
                self._execute(effect)

    def _execute(self, e: S.Effect) -> None:
        if isinstance(e, S.Send):
            self._send(e.dst, e.chunks)
        elif isinstance(e, S.Signal):
            self.edge._spawn(self.edge.send_signaling(e.type, **e.fields))
        elif isinstance(e, S.ReportProfile):
            self.links, self.compute = dict(e.links), e.compute
            self.edge._spawn(self._report())
        elif isinstance(e, S.FrameDone):
            self._settle(e.frame, result=e.result)
        elif isinstance(e, S.FrameFailed):
            self._settle(e.frame, error=RuntimeError(e.reason))
        elif isinstance(e, S.Probe):
            if e.peer not in self._probes:
                self._probes[e.peer] = self.edge._spawn(self._probe(e))
        elif isinstance(e, S.Profile):
            self.edge._spawn(self._profile())
        elif isinstance(e, S.Compute):
            self.edge._spawn(self._compute(e))
        elif isinstance(e, S.Notice):
            self._notice(e)

    def _notice(self, e: S.Notice) -> None:
        if e.what == "plan" and e.detail["role"].get("role") != "idle":
            self.plan, self.role = e.detail["plan"], e.detail["role"]
            self.plan_id = int(self.plan["plan_id"])
            self.plans += 1
            log.info("device %s adopts plan %s as %s (%d tasks)", self.peer_id, self.plan_id,
                     self.role.get("role"), self.role.get("tasks", 0))
            self.edge._spawn(self._notify_plan())
        elif e.what == "error":
            self._error(e.detail["message"])
        elif e.what in ("replanning", "recovering", "straggler", "mismatch", "wrong_result", "drift"):
            log.info("device %s: %s %s", self.peer_id, e.what, e.detail)

    def _settle(self, frame: int, *, result: dict | None = None, error: BaseException | None = None) -> None:
        fut = self._waiting.pop(frame, None)
        if fut is None or fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    async def _probe(self, probe: S.Probe) -> None:
        try:
            rtts, nbytes, seconds = await self.edge.probe.measure(probe)
            self._fire(S.LinkMeasured(probe.peer, tuple(rtts), nbytes, seconds))
        except (PeerGone, TimeoutError, KeyError) as exc:
            log.info("link probe to %s abandoned: %r", probe.peer, exc)
            self._fire(S.ProbeFailed(probe.peer, repr(exc)))
        finally:
            if self._probes.get(probe.peer) is asyncio.current_task():
                del self._probes[probe.peer]

    async def _profile(self) -> None:
        """Measure this device again (drift), on the compute thread so nothing competes with it."""
        runtime = self.session.runtime
        if runtime is None:
            return
        loop = asyncio.get_running_loop()
        backend = self.model.backend if self.model is not None else None
        compute = await loop.run_in_executor(self._executor,
                                             lambda: measure_profile(runtime.graph, backend, name="edge"))
        self._fire(S.Profiled(compute))

    async def _compute(self, e: S.Compute) -> None:
        """A deferred task (sessions built `deferred=True`): run it with the runtime's kernels, off the loop."""
        runtime = self.session.runtime
        runner = runtime.runners.get(e.plan_id)
        if runner is None:
            return  # the plan was retired meanwhile: its frames are given up
        task = runner.dplan.tasks[e.request.task]
        outputs = await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: run_steps(runner.graph, task.deps, e.request.inputs, keep=e.request.keep))
        self._fire(S.Computed(e.plan_id, e.request.frame, e.request.task, outputs))

    def _send(self, dst: str, chunks: list[bytes]) -> None:
        box = self._outboxes.get(dst)
        if box is None:
            box = self._outboxes[dst] = asyncio.Queue()
            self._senders[dst] = self.edge._spawn(self._sender(dst, box))
        self.chunks_out += len(chunks)
        for c in chunks:
            box.put_nowait(c)

    async def _sender(self, dst: str, box: asyncio.Queue) -> None:
        while True:
            chunk = await box.get()
            try:
                await self.edge.send(dst, chunk)
            except PeerGone:
                self._error(f"{dst} left with {box.qsize() + 1} chunks unsent")
                while not box.empty():
                    box.get_nowait()
            except ValueError as exc:  # larger than the channel accepts: a plan built before the link was known
                self._error(str(exc))

    def _error(self, text: str) -> None:
        self.error_count += 1
        self.errors.append(text)
        log.error("device %s in room %s: %s", self.peer_id, self.edge.room, text)

    # --- state -------------------------------------------------------------------------------------------

    def profile(self) -> dict:
        prof: dict = {"kind": self.kind, "links": dict(self.links)}
        if self.compute is not None:
            prof["compute"] = self.compute
        return prof

    async def _report(self) -> None:
        if self.model is None and self.model_error is None:
            await self.edge.set_state("booting", progress=0.5, detail="measuring compute", profile=self.profile())
        else:
            detail = f"no model: {self.model_error}"[:200] if self.model is None else None
            fields = {"detail": detail} if detail else {}
            await self.edge.set_state("ready", profile=self.profile(), **fields)

    # --- plans -------------------------------------------------------------------------------------------

    async def _notify_plan(self) -> None:
        async with self._plan_seen:
            self._plan_seen.notify_all()

    async def request_plan(self, strategy: str | None = None, timeout: float = 20.0) -> dict:
        """Ask the server's planner for a plan with this device as the source; the plan, once adopted."""
        before, self.plan_error = self.plan_id, None
        self._fire(S.RequestPlan(strategy))
        return await self.wait_plan(lambda p: p["source"] == self.peer_id and p["plan_id"] > before, timeout)

    async def wait_plan(self, predicate: Callable[[dict], bool], timeout: float = 15.0) -> dict:
        """The first adopted plan message satisfying `predicate`; raises the server's `plan_failed`."""
        async with self._plan_seen:
            await asyncio.wait_for(self._plan_seen.wait_for(
                lambda: self.plan_error is not None or (self.plan is not None and predicate(self.plan))), timeout)
            if self.plan_error is not None:
                raise RuntimeError(f"plan_failed: {self.plan_error}")
            return self.plan

    # --- the camera's side (tests' phone stand-in) -------------------------------------------------------

    async def classify(self, data: bytes, height: int, width: int, timeout: float = 30.0) -> dict:
        """Run one RGB(A) frame through the adopted plan as its source; the session's result (top-5, report)."""
        self._frame += 1
        frame = self._frame
        fut = self._waiting[frame] = asyncio.get_running_loop().create_future()
        self._fire(S.FrameIn(frame, bytes(data), height, width))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(frame, None)

    def describe(self) -> dict:
        return {
            "ready": self.model is not None, "model_error": self.model_error,
            "plan_id": self.plan_id or None, "role": (self.role or {}).get("role"), "plans": self.plans,
            "tasks_run": self.tasks_run,
            "links": dict(self.links), "chunks_in": self.chunks_in, "chunks_out": self.chunks_out,
            "errors": self.error_count, "last_errors": list(self.errors)[-5:],
        }
