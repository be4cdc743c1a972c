"""Context-aware model scaling: pick the most accurate model variant the room can run at the user's target.

Variants come from the same weights: the served model at a smaller input resolution (a MobileNet-style network
ends in a global pool, so it runs at any size; the MACs scale with the area). Each variant carries its measured
accuracy cost: top-1 agreement with the full model on real photos (`bench.early_exit` prints it per size).

`choose_variant` is a pure function of the variants, their predicted latency and frame rate in the current room
(`streams.plan_stream` per variant's graph), the target, and the variant in use: the most accurate variant that
meets the target. Moving *up* to a more accurate variant needs the target met with `headroom` (15%) to spare, so
a room hovering at the edge does not flap; moving down happens as soon as the current one misses. When nothing
meets the target, the fastest variant runs (the frame rate drops only after the variant has).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

HEADROOM = 0.15


@dataclass(frozen=True)
class Variant:
    name: str
    input_size: int
    agreement: float  # top-1 agreement with the full model (1.0 for the full model itself)


@dataclass(frozen=True)
class Target:
    kind: str  # "latency" (seconds, at most) or "fps" (frames per second, at least)
    value: float

    def __post_init__(self):
        if self.kind not in ("latency", "fps") or not self.value > 0:
            raise ValueError(f"a target is latency (s) or fps, positive: {self.kind} {self.value}")

    def met(self, latency_s: float, fps: float, slack: float = 0.0) -> bool:
        if self.kind == "latency":
            return latency_s * (1 + slack) <= self.value
        return fps >= self.value * (1 + slack)


def choose_variant(variants: Sequence[Variant], predicted: Mapping[str, tuple[float, float]], target: Target,
                   current: str | None = None, headroom: float = HEADROOM) -> str:
    """The variant to run: `predicted[name]` = (latency_s, fps) of that variant in this room."""
    if not variants:
        raise ValueError("no variants")
    missing = [v.name for v in variants if v.name not in predicted]
    if missing:
        raise ValueError(f"no prediction for variants {missing}")
    ranked = sorted(variants, key=lambda v: (-v.agreement, -v.input_size))
    rank = {v.name: i for i, v in enumerate(ranked)}
    for v in ranked:
        lat, fps = predicted[v.name]
        # A step up from the variant in use (more accurate than it) must clear the target with headroom.
        up = current is not None and current in rank and rank[v.name] < rank[current]
        if target.met(lat, fps, headroom if up else 0.0):
            return v.name
    return min(variants, key=lambda v: (predicted[v.name][0], -v.agreement)).name


def choose_variant_lazily(variants: Sequence[Variant], predict: Callable[[str], tuple[float, float]],
                          target: Target, current: str | None = None,
                          headroom: float = HEADROOM) -> tuple[str, dict[str, tuple[float, float]]]:
    """`choose_variant` with the predictions made on demand, most accurate variant first: a room that meets the
    target with its most accurate variant costs one plan, not one per variant. `predict(name)` = (latency_s,
    fps). Returns the choice and every prediction made (the same choice `choose_variant` makes on them all)."""
    if not variants:
        raise ValueError("no variants")
    ranked = sorted(variants, key=lambda v: (-v.agreement, -v.input_size))
    rank = {v.name: i for i, v in enumerate(ranked)}
    predicted: dict[str, tuple[float, float]] = {}
    for v in ranked:
        predicted[v.name] = predict(v.name)
        up = current is not None and current in rank and rank[v.name] < rank[current]
        if target.met(*predicted[v.name], headroom if up else 0.0):
            return v.name, predicted
    return choose_variant(variants, predicted, target, current, headroom), predicted


def ladder(served_input: int, variants: Mapping[str, tuple[int, float | None]]) -> list[Variant]:
    """The variants automatic scaling chooses among: the model as served (name "", agreement 1) and each card
    variant with a measured agreement (`variants[key]` = (input size, agreement or None))."""
    out = [Variant("", int(served_input), 1.0)]
    out += [Variant(k, int(size), float(a)) for k, (size, a) in variants.items() if a is not None]
    return out
