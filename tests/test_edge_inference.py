"""The edge peer as a compute device: it profiles, measures links, adopts plans and computes its part.

The integration test runs the real server with `--edge` in a private network namespace (like
tests/test_edge_peer.py) and a Python aiortc `ComputeDevice` standing in for a phone: it reports a (slower)
compute profile, asks for plans, runs its own part with its own `tilemesh.runtime.session.DeviceSession`, and
must get the same top-5 and logits as one device running the whole model. The in-memory tests drive two ComputeDevices
whose data channels are replaced by direct calls, to pin down ordering and plan races deterministically.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import numpy as np
import pytest
from skimage import data as skdata
from test_edge_peer import Server, run_in_netns

from tilemesh.edge.device import ComputeDevice, ModelRuntime, load_model_runtime
from tilemesh.edge.manager import EDGE_KEY
from tilemesh.runtime import wire
from tilemesh.runtime.classify import frame_from_bytes
from tilemesh.runtime.profile import scaled_profile
from tilemesh.runtime.session import DeviceSession
from tilemesh.server.app import ServerConfig
from tilemesh.server.model import default_model, prepare
from tilemesh.server.signaling.protocol import MAX_PROFILE_BYTES

SIZE = 256


@pytest.fixture(scope="module")
def model() -> ModelRuntime:
    static = ServerConfig().static_dir
    if not default_model(static).exists():
        pytest.skip("static/model is not built (python -m tilemesh.server.assets)")
    return load_model_runtime(prepare(default_model(static), static).dir)


def crop(image: np.ndarray) -> bytes:
    """A 256x256 RGB centre crop, as the browser's camera code hands frames over."""
    h, w = image.shape[:2]
    r, c = (h - SIZE) // 2, (w - SIZE) // 2
    return np.ascontiguousarray(image[r:r + SIZE, c:c + SIZE, :3]).tobytes()


FRAMES = {"chelsea": crop(skdata.chelsea()), "coffee": crop(skdata.coffee())}


def assert_same_as_single_device(model: ModelRuntime, frame: bytes, result: dict, logits: np.ndarray) -> None:
    local = model.classifier.classify(frame, SIZE, SIZE)
    assert [t["index"] for t in result["top"]] == [t["index"] for t in local["top"]]
    ref = model.classifier.logits(frame_from_bytes(frame, SIZE, SIZE))
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


async def until(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout} s")
        await asyncio.sleep(0.05)


def entry(roster: list[dict], peer_id: str) -> dict:
    return next((p for p in roster if p["id"] == peer_id), {})


class LoopLag:
    """Largest gap between 5 ms ticks of the event loop: how long anything blocked it."""

    def __init__(self):
        self.worst = 0.0
        self._task: asyncio.Task | None = None

    async def _tick(self):
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            self.worst = max(self.worst, now - last - 0.005)
            last = now

    def __enter__(self):
        self._task = asyncio.ensure_future(self._tick())
        return self

    def __exit__(self, *exc):
        self._task.cancel()


def test_phone_and_edge_classify_like_one_device(model, caplog):
    caplog.set_level(logging.INFO, logger="tilemesh.edge")
    figures: dict = {}

    async def body(ns):
        async with Server(ns, edge=True) as srv:
            room = srv.new_room()
            manager = srv.app[EDGE_KEY]
            phone = await ComputeDevice(srv.ws_url, room, name="phone", kind="phone").start()
            try:
                # A phone four times slower than this machine: the planner has a reason to use the edge.
                await phone.set_model(ModelRuntime(model.classifier, scaled_profile(model.compute, 0.25, "phone")))
                edge_id = await until(lambda: manager.describe(room).get("peer_id"), what="edge joined")

                # The edge reaches `ready` with its measured compute profile and its link to the phone; the
                # phone has measured its link to the edge through the edge's probe answers.
                def ready():
                    e, p = entry(phone.edge.roster, edge_id), entry(phone.edge.roster, phone.peer_id)
                    prof = e.get("profile") or {}
                    return (e.get("state") == "ready" and prof.get("compute") and phone.peer_id in prof["links"]
                            and edge_id in ((p.get("profile") or {}).get("links") or {}))

                await until(ready, what="edge ready with compute and links")
                edge_entry = entry(phone.edge.roster, edge_id)
                prof = edge_entry["profile"]
                assert edge_entry["kind"] == "edge" and prof["kind"] == "edge"
                assert prof["compute"]["sec_per_mac"] == model.compute["sec_per_mac"]
                assert len(json.dumps(prof)) < MAX_PROFILE_BYTES
                edge_link = prof["links"][phone.peer_id]
                assert edge_link["rtt_ms"] > 0 and edge_link["mbps"] > 0
                figures["edge->phone"] = edge_link
                figures["phone->edge"] = phone.links[edge_id]

                # Offload: the frame goes to the edge, which runs the whole network and returns the logits.
                plan = await phone.request_plan("offload")
                assert set(plan["devices"]) == {phone.peer_id, edge_id} and plan["source"] == phone.peer_id
                assert phone.role["role"] == "source" and phone.role["tasks"] == 0  # the camera only sends
                with LoopLag() as lag:
                    t0 = time.perf_counter()
                    result = await phone.classify(FRAMES["chelsea"], SIZE, SIZE)
                    figures["offload_ms"] = (time.perf_counter() - t0) * 1e3
                figures["loop_lag_ms"] = lag.worst * 1e3
                assert_same_as_single_device(model, FRAMES["chelsea"], result,
                                             phone.runtime.result(result["plan_id"], result["seq"]))
                described = manager.describe(room)["compute"]
                assert described["role"] == "worker" and described["chunks_in"] > 0 and described["errors"] == 0
                assert described["chunks_out"] > 0

                # Malformed chunks cost a logged error each, not the connection.
                await phone.edge.send(edge_id, b"TMWT" + bytes(80))
                await phone.edge.send(edge_id, b"\x00 not a chunk")
                await until(lambda: manager.describe(room)["compute"]["errors"] >= 2, what="errors counted")
                errors = [r for r in caplog.records if r.name == "tilemesh.edge" and r.levelno == logging.ERROR
                          and edge_id in r.getMessage()]
                assert len(errors) >= 2 and "refused" in errors[0].getMessage()
                result = await phone.classify(FRAMES["coffee"], SIZE, SIZE)
                assert_same_as_single_device(model, FRAMES["coffee"], result,
                                             phone.runtime.result(result["plan_id"], result["seq"]))
                assert edge_id in phone.edge.open_peers()

                # The planner's own choice: whatever it splits or offloads must give the same answer.
                plan = await phone.request_plan()
                figures["tilemesh_plan"] = plan["label"]
                figures["predicted_ms"] = round(plan["predicted_ms"], 1)
                for name in ("chelsea", "coffee"):
                    t0 = time.perf_counter()
                    result = await phone.classify(FRAMES[name], SIZE, SIZE)
                    figures[f"tilemesh_ms_{name}"] = round((time.perf_counter() - t0) * 1e3, 1)
                    assert_same_as_single_device(model, FRAMES[name], result,
                                                 phone.runtime.result(result["plan_id"], result["seq"]))
                assert phone.error_count == 0
            finally:
                await phone.close()

    run_in_netns(body, timeout=120)
    print("edge inference figures:", figures)


# --- in memory: two devices whose channels are direct calls ----------------------------------------------------


def connect(devices: dict[str, ComputeDevice]) -> None:
    """Replace each device's channel sends by a later call into the other's receive path, in order."""
    for name, dev in devices.items():
        dev.edge.peer_id = name

        async def send(dst: str, data: bytes, src=name) -> None:
            await asyncio.sleep(0)  # a real channel delivers later, never inside the send
            devices[dst]._on_binary(src, data)

        dev.edge.send = send


def plan_message(devices: list[str], source: str, plan_id: int) -> dict:
    spec = {"plan_id": plan_id, "source": source, "cuts": [],
            "splits": [{"devices": [devices], "row_shares": None, "col_shares": None}]}
    return {"type": "plan", "plan_id": plan_id, "source": source, "devices": devices, "spec": spec}


async def test_chunks_that_outrun_their_plan_are_held_until_it_arrives(model):
    phone = ComputeDevice("ws://unused/ws", "room", kind="phone")
    edge = ComputeDevice("ws://unused/ws", "room")
    connect({"phone": phone, "edge": edge})
    drains = [asyncio.ensure_future(dev._drain()) for dev in (phone, edge)]
    for dev in (phone, edge):
        dev.model, dev.session = model, DeviceSession(model.classifier)
    try:
        # The phone adopts plan 7 and sends its frame before the edge has heard of plan 7.
        phone._on_server(plan_message(["edge"], "phone", 7))
        pending = asyncio.ensure_future(phone.classify(FRAMES["chelsea"], SIZE, SIZE))
        await until(lambda: edge.runtime.held, timeout=10, what="chunks held")
        assert not pending.done()
        edge._on_server(plan_message(["edge"], "phone", 7))
        result = await asyncio.wait_for(pending, 30)
        assert_same_as_single_device(model, FRAMES["chelsea"], result,
                                     phone.runtime.result(result["plan_id"], result["seq"]))
        assert edge.error_count == 0 and not edge.runtime.held and edge.chunks_in > 0

        # Another camera's plan without the edge leaves its runner alone; chunks of an older plan are dropped
        # (counted, not fed to the runner), and the current plan still runs.
        edge._on_server(plan_message(["other"], "other", 8))
        assert edge.plan_id == 7
        pixels = np.zeros(model.classifier.graph.shapes[model.classifier.graph.input], np.uint8)
        stale = wire.encode(pixels, frame=5, tensor=0, plan_id=6, region=[0, 224, 0, 224], max_message=16384)
        for c in stale:
            edge._on_binary("phone", c)
        await until(lambda: edge.runtime.dropped_chunks >= len(stale), timeout=10, what="stale chunks dropped")
        assert edge.error_count == 0
        result = await asyncio.wait_for(phone.classify(FRAMES["coffee"], SIZE, SIZE), 30)
        assert_same_as_single_device(model, FRAMES["coffee"], result,
                                     phone.runtime.result(result["plan_id"], result["seq"]))
    finally:
        for task in drains:
            task.cancel()
        for dev in (phone, edge):
            dev._executor.shutdown(wait=True)
