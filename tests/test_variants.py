"""Context-aware scaling: the variant choice across rooms, with hysteresis (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemesh.planning.variants import Target, Variant, choose_variant, choose_variant_lazily, ladder

V = [Variant("224", 224, 1.0), Variant("192", 192, 0.8), Variant("160", 160, 0.6), Variant("128", 128, 0.45)]


def room(scale: float) -> dict[str, tuple[float, float]]:
    """Latency and rate of each variant in a room `scale` times as fast as a reference phone (MACs ~ area)."""
    return {v.name: (0.4 * (v.input_size / 224) ** 2 / scale, 2.5 * scale * (224 / v.input_size) ** 2) for v in V}


def test_most_accurate_variant_that_meets_the_target():
    target = Target("latency", 0.25)
    assert choose_variant(V, room(2.0), target) == "224"  # 200 ms
    assert choose_variant(V, room(1.0), target) == "160"  # 400/294/204 ms
    assert choose_variant(V, room(0.5), target) == "128"  # nothing meets it: the fastest runs
    assert choose_variant(V, room(1.0), Target("fps", 4.0)) == "160"


def test_variant_drops_before_the_rate_and_rises_back_with_headroom():
    target = Target("fps", 4.0)
    full = choose_variant(V, room(2.0), target)
    assert full == "224"
    # A device leaves: the room is half as fast; the variant drops at once.
    after_leave = choose_variant(V, room(1.0), target, current=full)
    assert after_leave == "160"
    # The room recovers only a little: 192 would just meet the target, but not with headroom: stay.
    almost = room(1.2)
    assert almost["192"][1] >= 4.0 and almost["192"][1] < 4.0 * 1.15
    assert choose_variant(V, almost, target, current=after_leave) == "160"
    # Without a variant in use the same room takes 192 (no hysteresis needed on a first pick).
    assert choose_variant(V, almost, target) == "192"
    # Fully recovered: back to the full model.
    assert choose_variant(V, room(2.0), target, current=after_leave) == "224"


def test_bad_inputs():
    with pytest.raises(ValueError):
        Target("speed", 1.0)
    with pytest.raises(ValueError):
        Target("fps", 0)
    with pytest.raises(ValueError):
        choose_variant([], {}, Target("fps", 1))
    with pytest.raises(ValueError):
        choose_variant(V, {"224": (0.1, 10)}, Target("fps", 1))


@settings(max_examples=200, deadline=None)
@given(st.floats(0.2, 5.0), st.sampled_from(["latency", "fps"]), st.floats(0.05, 20.0),
       st.sampled_from([None, "224", "192", "160", "128"]))
def test_lazy_choice_equals_the_full_choice_and_plans_only_what_it_needs(scale, kind, value, current):
    preds = room(scale)
    asked = []

    def predict(name):
        asked.append(name)
        return preds[name]

    target = Target(kind, value)
    chosen, made = choose_variant_lazily(V, predict, target, current)
    assert chosen == choose_variant(V, preds, target, current)
    assert made == {n: preds[n] for n in asked} and len(asked) == len(set(asked))
    # Variants less accurate than the chosen one were never planned unless nothing met the target.
    order = [v.name for v in V]
    if target.met(*preds[chosen]):
        assert asked == order[:order.index(chosen) + 1]


def test_ladder_keeps_the_served_model_and_measured_variants():
    got = ladder(224, {"heavy": (448, None), "fast160": (160, 0.6)})
    assert got == [Variant("", 224, 1.0), Variant("fast160", 160, 0.6)]
