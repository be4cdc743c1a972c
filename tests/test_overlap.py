"""Overlap cross-checks (tilemesh.runtime.overlap): the halo rows neighbouring tiles both compute, digested and
compared on the camera phone, catch a device that computes wrong before its first wrong answer is shown.

Pure pieces first (which regions overlap, digests, the tolerance against numpy vs onnxruntime, each kind of liar,
the wire flag, the engine's task model), then whole rooms over the fake transport (bench/fakenet.py): a split
plan and a stream, every shown answer compared with onnxruntime's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_faults import DEVICES, frame, plan3, requests
from test_stream_session import Camera, run_cameras, speed, split, stream_msg, whole

from bench.fakenet import FakeRoom
from tilemesh.runtime import overlap, recovery, wire
from tilemesh.runtime import session as S
from tilemesh.runtime.backend import NumpyBackend, OnnxRuntimeBackend
from tilemesh.runtime.classify import frame_from_bytes, top_entries
from tilemesh.runtime.deps import cut_candidates
from tilemesh.runtime.peer import plan_from_spec
from tilemesh.runtime.regions import Region
from tilemesh.runtime.runner import PlanMismatch
from tilemesh.runtime.task_model import task_model, whole_deps
from tilemesh.runtime.tiling import crop, run_steps


@pytest.fixture(scope="module")
def tiny(tiny_served):
    """The small CNN of test_model_param, served as a bundle (test_stream_session's model)."""
    return tiny_served


def full_tensors(graph, x, backend=None) -> dict:
    """Every tensor of the graph on input `x` (a whole run keeping all)."""
    keep = [n.output for n in graph.nodes]
    return run_steps(graph, whole_deps(graph, outputs=keep), {graph.input: x}, keep=keep, backend=backend)


def region_copies(graph, plan, c, full, backend):
    """Check `c`'s region as each of its two devices computes it: the device's own task of the segment, run on
    `backend` from the segment inputs it reads (taken from the whole run `full`)."""
    out = {}
    for task in plan.tasks:
        if task.segment != c.segment or task.device not in c.devices:
            continue
        inputs = {t: crop(full[t] if t != graph.input else full["__x"], full_region(graph, t), r)
                  for t, r in task.deps.inputs.items()}
        vals = run_steps(graph, task.deps, inputs, keep=[c.tensor], backend=backend)
        out[task.device] = crop(vals[c.tensor], task.deps.regions[c.tensor], c.region)
    return out


def full_region(graph, t) -> Region:
    shape = graph.shapes[t]
    return Region(0, shape[2], 0, shape[3])


def ort_top5(classifier, data, n=256) -> list[int]:
    """onnxruntime's answer for a camera frame: the model's preprocessing, then one whole-graph run."""
    g = classifier.graph
    x = classifier.pre.normalize_u8(classifier.pre.centre_crop_u8(frame_from_bytes(data, n, n)))
    logits = OnnxRuntimeBackend(g).run_segment(whole_deps(g), {g.input: x}, [g.output])[g.output]
    return [t["index"] for t in top_entries(logits, classifier.labels, 5)]


def top5(result) -> list[int]:
    return [t["index"] for t in result["top"]]


def corrupt(kind: str, v: np.ndarray, rng) -> np.ndarray:
    if kind == "random":
        return (rng.standard_normal(v.shape) * float(v.std()) + float(v.mean())).astype(np.float32)
    if kind == "zeros":
        return np.zeros_like(v)
    if kind.startswith("scale"):
        return (v * np.float32(float(kind.split()[1]))).astype(np.float32)
    if kind == "one channel":
        w = v.copy()
        w[:, 0] += np.float32(1.0)
        return w
    return (v + np.float32(0.25)).astype(np.float32)


KINDS = ("random", "zeros", "scale 1.01", "scale 1.1", "one channel", "offset")


# --- pure pieces ----------------------------------------------------------------------------------------------


def test_checks_name_regions_both_neighbours_compute_and_nobody_owns(classifier):
    g = classifier.graph
    plan = plan_from_spec(g, plan3(g)["spec"])
    checks = overlap.checks(g, plan)
    pairs = {(c.segment, c.devices) for c in checks}
    # Rows phone | laptop | tablet in segment 0, laptop | tablet in segment 1, the head whole: neighbours only.
    assert pairs == {(0, ("laptop", "phone")), (0, ("laptop", "tablet")), (1, ("laptop", "tablet"))}
    for c in checks:
        tasks = [t for t in plan.tasks if t.segment == c.segment and t.device in c.devices]
        assert len(tasks) == 2
        for t in tasks:
            assert t.deps.regions[c.tensor].contains(c.region) and c.tensor not in t.owned
    assert overlap.checks(g, plan) == checks  # every device derives the same list


def test_honest_numpy_and_onnxruntime_copies_never_disagree(classifier):
    """The tolerance is grounded: every check region of the plan computed by its two devices, one on the numpy
    kernels and one on onnxruntime, over several frames, differs far below it (and never convicts)."""
    g = classifier.graph
    plan = plan_from_spec(g, plan3(g)["spec"])
    ort, npb = OnnxRuntimeBackend(g), NumpyBackend(g)
    worst = 0.0
    for seed in range(3):
        x = classifier.pre.normalize_u8(classifier.pre.centre_crop_u8(frame_from_bytes(frame(seed), 256, 256)))
        full = {**full_tensors(g, x), "__x": x}
        for c in overlap.checks(g, plan):
            a = region_copies(g, plan, c, full, npb)
            b = region_copies(g, plan, c, full, ort)
            for d1 in c.devices:
                for d2 in c.devices:
                    ok, err = overlap.agree_digests(overlap.digest(a[d1]), overlap.digest(b[d2]), overlap.cells(g, c))
                    assert ok, (c, d1, d2, err)
                    worst = max(worst, err)
    assert worst < overlap.DIGEST_RTOL / 10, worst  # an order of magnitude of margin


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_wrong_region_is_seen(classifier, kind):
    g = classifier.graph
    plan = plan_from_spec(g, plan3(g)["spec"])
    x = classifier.pre.normalize_u8(classifier.pre.centre_crop_u8(frame_from_bytes(frame(5), 256, 256)))
    full = full_tensors(g, x)
    rng = np.random.default_rng(0)
    for c in overlap.checks(g, plan):
        honest = crop(full[c.tensor], full_region(g, c.tensor), c.region)
        ok, err = overlap.agree_digests(overlap.digest(honest), overlap.digest(corrupt(kind, honest, rng)),
                                        overlap.cells(g, c))
        assert not ok and err > 10 * overlap.DIGEST_RTOL, (c, err)


def test_digests_are_compact_and_refuse_what_is_not_comparable():
    a = np.random.default_rng(1).standard_normal((1, 96, 3, 28)).astype(np.float32)
    d = overlap.digest(a)
    assert d.shape == (2, overlap.GROUPS) and d.nbytes == 64
    assert overlap.digest(a[:, :3]).shape == (2, 3)  # fewer channels than groups
    assert overlap.agree_digests(d, d, 100) == (True, 0.0)
    assert overlap.digest_error(d, d[:, :4], 100) == float("inf")
    bad = d.copy()
    bad[0, 0] = np.nan
    assert overlap.agree_digests(d, bad, 100)[0] is False
    with pytest.raises(ValueError):
        overlap.digest(a[0])


def test_a_digest_travels_flagged_in_the_tensor_wire_format():
    d = np.arange(16, dtype=np.float32).reshape(2, 8)
    chunks = wire.encode(d, frame=3, tensor=7, plan_id=2, region=[4, 6, 0, 28], flags=wire.FLAG_DIGEST)
    got = wire.decode(chunks)
    assert got.header.flags == wire.FLAG_DIGEST and got.header.region == (4, 6, 0, 28)
    np.testing.assert_array_equal(got.array, d)
    # a piece of the same tensor and region is another message
    assert got.header.key != wire.decode(wire.encode(d, frame=3, tensor=7, plan_id=2, region=[4, 6, 0, 28])).header.key
    with pytest.raises(wire.WireError):
        wire.encode(d, frame=3, tensor=7, flags=2)
    raw = bytearray(chunks[0])
    raw[7] = 2  # an unknown flag (the CRC is checked first: recompute it)
    import zlib

    raw[64:68] = wire._CRC.pack(zlib.crc32(bytes(raw[68:]), zlib.crc32(bytes(raw[:64]))))
    with pytest.raises(wire.WireError, match="flags"):
        wire.parse_chunk(bytes(raw))


def test_the_engine_task_model_hands_out_the_overlap_region_itself(classifier):
    """On an engine with task models (onnxruntime-web in the browser) the task's model outputs each overlap
    region as `overlap.output_name`, cropped inside the model: equal to numpy's."""
    import onnxruntime as ort

    g = classifier.graph
    plan = plan_from_spec(g, plan3(g)["spec"])
    c = next(c for c in overlap.checks(g, plan) if c.segment == 0)
    task = next(t for t in plan.tasks if t.segment == 0 and t.device == c.devices[0])
    x = classifier.pre.normalize_u8(classifier.pre.centre_crop_u8(frame_from_bytes(frame(9), 256, 256)))
    m = task_model(g, task.deps, list(task.owned), slices=[(c.tensor, c.region)])
    name = overlap.output_name(c.tensor, c.region)
    assert m.outputs[name] == (1, g.shapes[c.tensor][1], c.region.rows, c.region.cols)
    sess = ort.InferenceSession(m.model)
    feeds = {t: crop(x, full_region(g, t), r) for t, r in task.deps.inputs.items()}
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))[name]
    want = crop(full_tensors(g, x)[c.tensor], full_region(g, c.tensor), c.region)
    np.testing.assert_allclose(got, want, atol=1e-4)


# --- rooms over the fake transport ----------------------------------------------------------------------------


class Liar:
    """Corrupts every tensor its engine returns (tiles, overlap regions, logits), or with `checked` all but the
    overlap regions it computes (what the checks compare): an adversary that knows the check."""

    def __init__(self, kind: str, checked=()):
        self.kind, self.checked, self.rng = kind, set(checked), np.random.default_rng(3)

    def __call__(self, outputs):
        return {k: corrupt(self.kind, v, self.rng) if v.ndim in (2, 4) and k not in self.checked else v
                for k, v in outputs.items()}


def room(classifier, check_rate=0.0, backends=None, **kw) -> FakeRoom:
    sessions = {d: S.DeviceSession(classifier, deferred=True, check_rate=check_rate, seed=i)
                for i, d in enumerate(DEVICES)}
    r = FakeRoom(sessions, backends=dict(backends or {}), **kw)
    r.open_links()
    return r


def adopt(r, msg):
    for d in list(r.sessions):
        r.fire(d, S.PlanIn(msg, d))


@pytest.mark.parametrize("kind", ["random", "scale 1.01", "one channel"])
def test_a_split_plan_convicts_a_wrong_engine_before_any_wrong_answer(classifier, kind):
    """No spot checks: overlap checks alone. The laptop's engine computes wrong (every tile and every overlap
    region): its first frame's digests disagree with the phone's, the phone's own copy shows it is the laptop,
    whose inputs of that segment are all the phone's: convicted in frame 1, excluded, named. Every answer shown
    is onnxruntime's."""
    r = room(classifier, tick=0.05)
    r.tamper["laptop"] = Liar(kind)
    adopt(r, plan3(classifier.graph, predicted_ms=100))
    for f in range(1, 4):
        data = frame(40 + f)
        r.fire("phone", S.FrameIn(f, data, 256, 256))
        r.run(until=r.now + 2.0)
        assert top5(r.done["phone"][f]) == ort_top5(classifier, data), f
    named = [(d, n.detail["device"], n.detail["frame"]) for d, n in r.notices if n.what == "wrong_result"]
    assert named == [("phone", "laptop", 1)]
    assert requests(r) == [("phone", {"exclude": ["laptop"]})]
    assert r.sessions["phone"].faults["overlap_mismatches"] >= 1 and not r.failed


def test_a_liar_only_on_its_interior_passes_overlap_checks_and_spot_checks_catch_it(classifier):
    """The limit, stated: a device that computes its overlap regions honestly and changes its output tiles is
    invisible to overlap checks (no other device computes those cells); the spot checks still convict it."""
    g = classifier.graph
    msg = plan3(g, predicted_ms=100)
    checked = {c.tensor for c in overlap.checks(g, plan_from_spec(g, msg["spec"]))}
    r = room(classifier, tick=0.05)
    r.tamper["laptop"] = Liar("offset", checked)
    adopt(r, msg)
    r.fire("phone", S.FrameIn(1, frame(50), 256, 256))
    r.run(until=r.now + 2.0)
    assert r.sessions["phone"].faults["overlap_mismatches"] == 0 and not r.sessions["phone"].excluded
    r = room(classifier, check_rate=1.0, tick=0.05)
    r.tamper["laptop"] = Liar("offset", checked)
    adopt(r, msg)
    for f in range(1, 3):
        r.fire("phone", S.FrameIn(f, frame(50 + f), 256, 256))
        r.run(until=r.now + 2.0)
    assert r.sessions["phone"].excluded.get("laptop") == ("wrong results", None)


def test_honest_devices_on_different_engines_are_never_accused(classifier):
    """numpy kernels on the phone and the tablet, onnxruntime on the laptop: every digest pair agrees."""
    r = room(classifier, backends={"laptop": OnnxRuntimeBackend(classifier.graph)}, tick=0.05)
    adopt(r, plan3(classifier.graph, predicted_ms=100))
    for f in range(1, 4):
        data = frame(60 + f)
        r.fire("phone", S.FrameIn(f, data, 256, 256))
        r.run(until=r.now + 2.0)
        assert top5(r.done["phone"][f]) == ort_top5(classifier, data)
        assert r.done["phone"][f].get("recovered") is None
    phone = r.sessions["phone"]
    run = phone.runtime.runners[3]
    assert run.digest_pairs == 3 * 3 and run.digest_max_err < overlap.DIGEST_RTOL / 10
    assert phone.faults["overlap_mismatches"] == 0 and not phone.excluded and not requests(r)
    assert not any(n.what in ("audit", "mismatch") for _, n in r.notices)


def test_an_answer_waits_for_its_digests_and_is_shown_unverified_when_one_never_comes(classifier):
    """The phone shows a frame only when every check of it agreed; a digest lost on the way (or withheld) holds
    the answer for the plan's stall bound at most, then the frame finishes alone on the phone (counted as
    unverified): a missing digest proves nothing, so the answer shown is the phone's own."""
    def lose(src, dst, chunk, n):
        return src == "laptop" and dst == "phone" and chunk[7] == wire.FLAG_DIGEST

    r = room(classifier, tick=0.05, lose=lose)
    adopt(r, plan3(classifier.graph, predicted_ms=100))
    data = frame(70)
    r.fire("phone", S.FrameIn(1, data, 256, 256))
    r.run(until=r.now + 0.25)
    assert 1 not in r.done.get("phone", {})  # computed, held (0.3 s stall bound)
    assert r.sessions["phone"].faults["held_for_digests"] == 1
    r.run(until=r.now + 1.0)
    assert top5(r.done["phone"][1]) == ort_top5(classifier, data)
    assert r.sessions["phone"].faults["unverified"] == 1
    assert r.done["phone"][1].get("recovered") is not None  # finished alone, not shown on trust


def test_a_liar_that_withholds_its_digests_shows_no_wrong_answer_and_is_audited(classifier):
    """A device that computes wrong and never sends its digests, so no check ever disagrees: each frame finishes
    alone once its digests are overdue (every answer onnxruntime's), and after recovery.WITHHELD_AUDIT such
    frames the plan's next frames are audited, which convicts it."""
    def withhold(src, dst, chunk, n):
        return src == "laptop" and dst == "phone" and chunk[7] == wire.FLAG_DIGEST

    r = room(classifier, tick=0.05, lose=withhold)
    r.tamper["laptop"] = Liar("random")
    adopt(r, plan3(classifier.graph, predicted_ms=100))
    f = 0
    while "laptop" not in r.sessions["phone"].excluded and f < recovery.WITHHELD_AUDIT + 4:
        f += 1
        data = frame(90 + f)
        r.fire("phone", S.FrameIn(f, data, 256, 256))
        r.run(until=r.now + 2.0)
        assert top5(r.done["phone"][f]) == ort_top5(classifier, data), f
    phone = r.sessions["phone"]
    assert phone.excluded.get("laptop") == ("wrong results", None), (f, phone.faults)
    assert phone.faults["unverified"] >= recovery.WITHHELD_AUDIT
    assert any(n.what == "audit" and n.detail["suspect"] == "laptop" for _, n in r.notices)


def test_a_digest_from_outside_its_check_is_refused(classifier):
    r = room(classifier)
    adopt(r, plan3(classifier.graph))
    run = r.sessions["phone"].runtime.runners[3]
    c = next(c for c in run.checks.values() if "phone" not in c.devices)
    chunks = wire.encode(np.zeros((2, overlap.GROUPS), np.float32), frame=1, tensor=run.tensor_ids[c.tensor],
                         plan_id=3, region=c.region.to_list(), flags=wire.FLAG_DIGEST)
    with pytest.raises(PlanMismatch):
        run.on_chunk("phone", chunks[0])  # the phone is not of that pair
    r.fire("phone", S.FrameIn(1, frame(9), 256, 256))
    effects = r.fire("phone", S.ChunkIn("tablet", chunks[0]))  # from its device: recorded, no error
    assert not [e for e in effects if isinstance(e, S.Notice) and e.what == "error"]
    assert "tablet" in run.digests[1][c.key]
    # A digest of a frame the phone never started is refused (it would push real frames' digests out).
    future = wire.encode(np.zeros((2, overlap.GROUPS), np.float32), frame=10_000, tensor=run.tensor_ids[c.tensor],
                         plan_id=3, region=c.region.to_list(), flags=wire.FLAG_DIGEST)
    effects = r.fire("phone", S.ChunkIn("tablet", future[0]))
    assert [e for e in effects if isinstance(e, S.Notice) and e.what == "error"] and 10_000 not in run.digests


def test_a_stream_lane_with_a_wrong_helper_is_caught_by_overlap_checks_alone(tiny):
    """A camera's stream: one lane split between the camera and a helper whose engine computes wrong, one lane
    whole on the camera. No spot checks: the overlap check of the split lane convicts the helper, and every
    answer the camera shows is onnxruntime's."""
    devices = ("cam", "helper")
    r = FakeRoom({d: S.DeviceSession(tiny, deferred=True, check_rate=0.0) for d in devices},
                 sec_per_gmac=dict.fromkeys(devices, speed(tiny)))
    r.open_links()
    r.run()
    lane = split(tiny.graph, 1, "cam", "helper")
    assert overlap.checks(tiny.graph, plan_from_spec(tiny.graph, lane["spec"])), "the split lane has an overlap"
    r.tamper["helper"] = Liar("scale 1.1")
    r.fire("cam", S.RequestPlan(objective="throughput"))
    adopt(r, stream_msg("cam", [lane, whole(2, "cam", "cam")]))
    cam = Camera(r, "cam")
    run_cameras(r, [cam], 1.5)
    r.run(until=r.now + 1.0)
    assert r.sessions["cam"].excluded.get("helper") == ("wrong results", None)
    assert len(cam.done()) >= 4
    for f, res in cam.done().items():
        assert top5(res) == ort_top5(tiny, cam.sent[f], cam.n), f


def test_overlap_checks_cost_a_few_small_messages_per_frame(classifier):
    r = room(classifier, tick=0.05)
    adopt(r, plan3(classifier.graph, predicted_ms=100))
    r.fire("phone", S.FrameIn(1, frame(80), 256, 256))
    r.run(until=r.now + 2.0)
    runs = [run for s in r.sessions.values() for run in s.runtime.runners.values()]
    # 3 checks: the phone's own copy stays home, the other 5 copies travel, 132 bytes each (68 header + 64)
    assert sum(x.digests_sent for x in runs) == 5
    assert sum(x.digest_bytes for x in runs) == 5 * (wire.HEADER_SIZE + 64)
    json.dumps(r.sessions["phone"].faults)  # the counters stay plain numbers (the worker's state())


def offload_msg(plan_id=3):
    """The frame whole on the laptop: no two devices compute the same cells, so nothing to cross-check."""
    spec = {"plan_id": plan_id, "source": "phone", "cuts": [],
            "splits": [{"devices": [["laptop"]], "row_shares": None, "col_shares": None}]}
    return {"plan_id": plan_id, "source": "phone", "devices": ["phone", "laptop"], "spec": spec, "timeline": {},
            "predicted_ms": 100}


def test_uncovered_devices_are_those_no_check_covers(classifier):
    g = classifier.graph
    split3 = plan_from_spec(g, plan3(g)["spec"])
    assert overlap.uncovered(["phone", "laptop", "tablet"], overlap.checks(g, split3), "phone") == []
    off = plan_from_spec(g, offload_msg()["spec"])
    assert overlap.checks(g, off) == []
    assert overlap.uncovered(["phone", "laptop"], [], "phone") == ["laptop"]


def test_by_default_only_a_plan_with_an_uncovered_device_has_its_first_frame_audited(classifier):
    """An offloaded frame (nothing to cross-check) whose device computes wrong: the default audits the plan's
    first frame, so the device is convicted there and no wrong answer is shown; a split plan whose every device
    is cross-checked pays no audit."""
    r = room(classifier, tick=0.05)
    r.tamper["laptop"] = Liar("random")
    adopt(r, offload_msg())
    for f in range(1, 3):
        data = frame(90 + f)
        r.fire("phone", S.FrameIn(f, data, 256, 256))
        r.run(until=r.now + 2.0)
        assert top5(r.done["phone"][f]) == ort_top5(classifier, data), f
    assert [(n.detail["device"], n.detail["frame"]) for d, n in r.notices if n.what == "wrong_result"] == [
        ("laptop", 1)]
    r = room(classifier, tick=0.05)
    adopt(r, plan3(classifier.graph, predicted_ms=100))
    r.fire("phone", S.FrameIn(1, frame(95), 256, 256))
    r.run(until=r.now + 2.0)
    assert all(s.faults["checks"] == 0 for s in r.sessions.values()) and not r.reference_runs
    with pytest.raises(ValueError):
        S.DeviceSession(classifier, audit_first="sometimes")


GRID = ("phone", "laptop", "tablet", "tv")


def grid_msg(graph, plan_id=7):
    """A 2x2 grid of the four devices, then the head on the phone: where the four tiles meet, the pairs
    (phone, tv) and (laptop, tablet) overlap in the same corner cells."""
    cut = cut_candidates(graph)[3]
    grid = {"devices": [["phone", "laptop"], ["tablet", "tv"]], "row_shares": [3, 2], "col_shares": [2, 3]}
    spec = {"plan_id": plan_id, "source": "phone", "cuts": [cut],
            "splits": [grid, {"devices": [["phone"]], "row_shares": None, "col_shares": None}]}
    return {"plan_id": plan_id, "source": "phone", "devices": list(GRID), "spec": spec, "timeline": {},
            "predicted_ms": 100}


def test_a_corner_four_tiles_share_is_one_check_of_four_copies(classifier):
    """In a 2x2 grid two neighbour pairs overlap in the same corner: digests name only a tensor and a region, so
    the corner is one check whose every device sends its copy once. (Merged on main without this, the tv's digest
    of the corner was refused: `PlanMismatch: tv has no overlap check`, every frame an error, in the browser's
    room-tiles test.) Honest: every answer onnxruntime's, every copy compared, no error; the tv lying: caught."""
    g = classifier.graph
    msg = grid_msg(g)
    pairs = overlap.checks(g, plan_from_spec(g, msg["spec"]))
    checks = overlap.merged(pairs)
    assert len(checks) < len(pairs)  # two pairs share the corner
    corner = [c for c in checks.values() if len(c.devices) == 4]
    assert len(corner) == 1 and corner[0].devices == tuple(sorted(GRID))
    for liar in (None, "tv"):
        sessions = {d: S.DeviceSession(classifier, deferred=True, check_rate=0.0, seed=i)
                    for i, d in enumerate(GRID)}
        r = FakeRoom(sessions, tick=0.05)
        r.open_links()
        if liar:
            r.tamper[liar] = Liar("random")
        adopt(r, msg)
        for f in range(1, 3):
            data = frame(80 + f)
            r.fire("phone", S.FrameIn(f, data, 256, 256))
            r.run(until=r.now + 2.0)
            assert top5(r.done["phone"][f]) == ort_top5(classifier, data), (liar, f)
        errors = [n.detail for _, n in r.notices if n.what == "error"]
        assert not errors and not r.failed, errors
        phone = r.sessions["phone"]
        if liar is None:
            # every copy after the first of each check is compared with it: (devices - 1) comparisons per check
            assert phone.runtime.runners[7].digest_pairs == 2 * sum(len(c.devices) - 1 for c in checks.values())
            assert phone.faults["overlap_mismatches"] == 0 and not phone.excluded
        else:
            assert phone.excluded.get("tv") == ("wrong results", None)
