"""Early exit and context-aware scaling in the product, without a browser.

* The worker's early-exit entry (`exit_bridge`, as `ort_engine.js` and the AR page drive it) on the demo model's
  160 px variant from its served bundle: the cheap pass's answer is onnxruntime's at 160 px, and the exit rule
  lets a confident frame that names the room's answer exit, and sends unsure or different frames to the room.
* The server's variant choice (`plan_request {target}`) across rooms on the demo model's variants: the most
  accurate variant whose predicted rate meets the target; a device leaving drops it, the room recovering raises
  it again with headroom; the device session carries the target into its background replans.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
from test_model_param import _room
from test_variants_served import PROFILE, onnx_at

from tilemesh.planning import variants
from tilemesh.runtime import exit_bridge
from tilemesh.runtime import session as S
from tilemesh.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD
from tilemesh.runtime.profile import scaled_profile
from tilemesh.server import model as model_mod
from tilemesh.server.inference import Inference
from tilemesh.server.signaling import protocol


@pytest.fixture(scope="module")
def bundle(demo_model_dir, tmp_path_factory):
    return model_mod.prepare(demo_model_dir / "mobilenet_v2.onnx", tmp_path_factory.mktemp("static"))


@pytest.fixture
def loaded(bundle):
    old = S._session
    S._session = None
    S.load(str(bundle.dir / "graph.json"), str(bundle.dir / "labels.json"), str(bundle.dir / "card.json"))
    yield bundle
    exit_bridge.turn_off()
    S._session = old


def square(img: np.ndarray, side: int) -> np.ndarray:
    """The centre square of a photo scaled to side x side RGBA (what the page's canvas hands over)."""
    from skimage.transform import resize

    h, w = img.shape[:2]
    s = min(h, w)
    sq = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    rgb = np.clip(np.rint(resize(sq, (side, side), anti_aliasing=True) * 255), 0, 255).astype(np.uint8)
    return np.concatenate([rgb, np.full((side, side, 1), 255, np.uint8)], axis=2)


def ort_at_160(bundle, frame: np.ndarray) -> np.ndarray:
    """onnxruntime on the ONNX file at 160x160, on the card's 160 px preprocessing done here by hand."""
    v = bundle.card.variant("fast160").preprocess
    off = int(round((v.resize_shorter_side - v.crop) / 2.0))
    crop = frame[off:off + v.crop, off:off + v.crop, :3].astype(np.float32) / 255.0
    x = (crop - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    return onnx_at(bundle.dir / "model.onnx", v.crop).run(None, {"input": np.ascontiguousarray(
        x.transpose(2, 0, 1)[None])})[0][0]


def test_the_demo_card_offers_the_cheap_pass_and_scaling_variants(bundle):
    card = bundle.card
    assert card.early_exit.variant == "fast160" and 0 < card.early_exit.threshold <= 0.2
    sizes = {v.key: (v.preprocess.crop, v.agreement) for v in card.variants}
    assert sizes["fast160"][0] == 160 and sizes["fast192"][0] == 192 and sizes["heavy"] == (448, None)
    # Heavy mode is a user's pick, not a scaling step: only variants with a measured agreement are.
    assert [v.name for v in variants.ladder(224, sizes)] == ["", "fast192", "fast160"]
    info = bundle.page_info()
    assert info["early_exit"]["variant"] == "fast160" and info["variants"]["fast160"]["agreement"] == 0.615


def test_cheap_pass_is_onnxruntimes_and_exits_only_with_the_rooms_answer(loaded):
    bundle = loaded
    v = bundle.card.variant("fast160").preprocess
    exit_bridge.configure("fast160", 0.1, 0.0, 3)
    frame = square(skimage.data.coffee(), v.resize_shorter_side)
    want = ort_at_160(bundle, frame)
    args = (frame.tobytes(), frame.shape[0], frame.shape[1])
    first = exit_bridge.cheap_pass(*args)
    # The cheap pass's top-5 is onnxruntime's at 160 px (same classes, same order, same probabilities).
    order = list(np.argsort(-want)[:5])
    assert [t["index"] for t in first["top"]] == order
    p = np.exp(want - want.max())
    np.testing.assert_allclose([t["p"] for t in first["top"]], (p / p.sum())[order], atol=1e-4)
    assert first["entropy"] < 0.1 and first["top"][0]["label"].startswith("espresso")
    # No room answer yet (alone_threshold 0): the room is asked even though the cheap pass is sure.
    assert not first["exit"] and first["frames"] == 1
    # The room said something else: a confident cheap pass that disagrees still goes to the room.
    exit_bridge.room_answered((order[0] + 1) % 1000)
    assert not exit_bridge.cheap_pass(*args)["exit"]
    # The room said espresso: the same confident frame now exits, showing only the cheap pass's own labels.
    exit_bridge.room_answered(order[0])
    r = exit_bridge.cheap_pass(*args)
    assert r["exit"] and r["top1"] == order[0] and r["top"][0]["index"] == order[0]
    assert r["reason"] == "confident and names the room's answer"
    # A hard frame (noise): unsure, so it goes to the room.
    noise = np.random.default_rng(0).integers(0, 256, frame.shape, dtype=np.uint8)
    hard = exit_bridge.cheap_pass(noise.tobytes(), *frame.shape[:2])
    assert not hard["exit"] and hard["reason"] == "not confident" and hard["entropy"] > 0.1
    status = exit_bridge.status()
    assert (status["frames"], status["exits"]) == (4, 1)
    with pytest.raises(ValueError, match="no variant 'nope'"):
        exit_bridge.configure("nope", 0.1)


def test_cheap_pass_before_configure_is_a_clear_error(loaded):
    exit_bridge.turn_off()
    with pytest.raises(RuntimeError, match="not configured"):
        exit_bridge.cheap_pass(b"\0" * 160 * 160 * 4, 160, 160)


def _scaled(inference, room, source, target, current=None):
    msg = inference.choose(room, source, protocol.PlanRequest(target=target, variant=current))
    return json.loads(json.dumps(protocol.plan(msg)))


def test_variant_choice_across_rooms_drops_before_the_rate_and_rises_again(bundle):
    inference = Inference(bundle)
    phone = scaled_profile(PROFILE, 1.0)
    edge = scaled_profile(PROFILE, 6.0)
    full, alone = _room({"phone": phone, "edge": edge}), _room({"phone": phone})
    # Each variant's predicted latency in both rooms (the planner's own figures, no target).
    lat = {(name, k): inference.choose(room, src, protocol.PlanRequest(variant=k or None))["predicted_ms"] / 1e3
           for name, (room, src) in (("full", full), ("alone", alone)) for k in ("", "fast192", "fast160")}
    assert lat[("alone", "fast160")] < lat[("alone", "fast192")] < lat[("alone", "")]
    assert lat[("full", "")] * 1.15 < lat[("alone", "fast160")]  # the edge makes the full model fast enough
    target = ("fps", 1.0 / (lat[("alone", "fast160")] * 1.05))  # the phone alone meets it only at 160 px

    msg = _scaled(inference, *full, target)
    assert "variant" not in msg["spec"] and msg["scaling"]["chosen"] is None and msg["scaling"]["met"]
    assert list(msg["scaling"]["predicted"]) == [""]  # met by the most accurate: one plan, not three
    # The edge leaves: the phone alone; the variant drops (to the most accurate that still meets the target).
    msg = _scaled(inference, *alone, target, current=None)
    assert msg["spec"]["variant"] == msg["variant"] == msg["scaling"]["chosen"] == "fast160"
    assert msg["scaling"]["met"] and msg["devices"] == [str(alone[1])]
    assert set(msg["scaling"]["predicted"]) == {"", "fast192", "fast160"}
    # The edge is back: the full model again (it meets the target with headroom).
    msg = _scaled(inference, *full, target, current="fast160")
    assert msg["scaling"]["chosen"] is None and "variant" not in msg["spec"]
    # A target nothing meets: the fastest variant runs, and the plan says the target is missed.
    msg = _scaled(inference, *alone, ("fps", 1e3))
    assert msg["scaling"]["chosen"] == "fast160" and not msg["scaling"]["met"]
    # Hysteresis: a room where the full model meets a latency target without 15% to spare keeps a lower variant
    # in use, while a first pick takes the full model.
    tight = ("latency", lat[("full", "")] * 1.05)
    assert _scaled(inference, *full, tight)["scaling"]["chosen"] is None
    assert _scaled(inference, *full, tight, current="fast192")["scaling"]["chosen"] == "fast192"


def test_target_on_the_wire_and_in_background_replans(loaded):
    req = protocol.parse(json.dumps({"v": protocol.VERSION, "type": "plan_request",
                                     "target": {"kind": "fps", "value": 5}, "variant": "fast160"}))
    assert req.target == ("fps", 5.0) and req.variant == "fast160"
    for bad in ({"kind": "speed", "value": 5}, {"kind": "fps", "value": 0}, {"kind": "fps"}, [5],
                {"kind": "fps", "value": True}):
        with pytest.raises(protocol.ProtocolError):
            protocol.parse(json.dumps({"v": protocol.VERSION, "type": "plan_request", "target": bad}))
    s = S.session()
    (sig,) = s.handle(S.event_from_dict({"on": "request_plan", "strategy": "tilemesh",
                                         "target": {"kind": "fps", "value": 5}}), 0.0)
    assert sig.fields == {"strategy": "tilemesh", "target": {"kind": "fps", "value": 5}}
    # The planner chose the 160 px variant: the device adopts it and its background replans (a device leaving,
    # drift) ask again with the target, naming the variant in use.
    spec = {"plan_id": 1, "source": "me", "cuts": [], "splits": [{"devices": [["me"]]}], "variant": "fast160"}
    s.handle(S.PlanIn({"plan_id": 1, "source": "me", "devices": ["me"], "spec": spec, "variant": "fast160"}, "me"),
             0.0)
    assert s.variant == "fast160"
    assert s._plan_request().fields == {"variant": "fast160", "target": {"kind": "fps", "value": 5}}
    # A device becoming ready (the session's newcomer rule): asked again with the target, so the variant can rise.
    out = s.handle(S.Roster(ready=("me", "pnew")), 1.0)
    (sig,) = [e for e in out if isinstance(e, S.Signal)]
    assert sig.type == "plan_request" and sig.fields == {"variant": "fast160", "target": {"kind": "fps", "value": 5}}
