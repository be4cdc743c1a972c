"""Multi-view fusion (DDNN's sensor fusion, in the browser): several phones look at the same object; the class
scores of their views within a time window are fused into one answer.

Two rules, as DDNN compares them: the average of the views' softmax vectors, and their element-wise maximum
(renormalised). Each view's contribution to the fused label is its own probability of that label, so a page can
show who agreed. A window holds each view's newest scores no older than `window_s`; a view that stops sending drops
out by itself. Everything here is pure: (window, event) -> window, with time passed in, never read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .preprocess import softmax

METHODS = ("avg", "max")


def fuse(probabilities: Mapping[str, np.ndarray], method: str = "avg") -> np.ndarray:
    """Fuse per-view probability vectors (each (C,), summing to 1) into one (C,) vector summing to 1."""
    if method not in METHODS:
        raise ValueError(f"unknown fusion method {method!r}: use one of {METHODS}")
    if not probabilities:
        raise ValueError("nothing to fuse: no views")
    stack = np.stack([np.asarray(p, dtype=np.float64).reshape(-1) for p in probabilities.values()])
    if len({p.shape for p in stack}) != 1 or stack.shape[1] < 2:
        raise ValueError(f"views disagree on the number of classes or have fewer than 2: {stack.shape}")
    fused = stack.mean(axis=0) if method == "avg" else stack.max(axis=0)
    return fused / fused.sum()


@dataclass(frozen=True)
class FusedResult:
    method: str
    top: list[tuple[int, float]]  # (class, fused probability), best first
    views: dict[str, float]  # view -> its own probability of the fused top-1 (its contribution)
    view_top1: dict[str, int]  # view -> its own best class


def fused_result(probabilities: Mapping[str, np.ndarray], method: str = "avg", k: int = 5) -> FusedResult:
    fused = fuse(probabilities, method)
    order = np.argsort(-fused, kind="stable")[:k]
    best = int(order[0])
    probs = {v: np.asarray(p, dtype=np.float64).reshape(-1) for v, p in probabilities.items()}
    return FusedResult(method, [(int(i), float(fused[i])) for i in order],
                       {v: float(p[best]) for v, p in probs.items()},
                       {v: int(np.argmax(p)) for v, p in probs.items()})


@dataclass(frozen=True)
class FusionWindow:
    """Each view's newest class probabilities with their time; views older than `window_s` are left out."""

    window_s: float = 1.0
    views: dict[str, tuple[float, np.ndarray]] = field(default_factory=dict)

    def add(self, view: str, t: float, logits: np.ndarray) -> FusionWindow:
        """A new classification of `view` at time `t` (its logits); an older one than the view's newest is ignored."""
        z = np.asarray(logits, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(z)):
            raise ValueError(f"view {view}: class scores must be finite")
        held = self.views.get(view)
        if held is not None and held[0] > t:
            return self
        return FusionWindow(self.window_s, {**self.views, view: (float(t), softmax(z))})

    def live(self, now: float) -> dict[str, np.ndarray]:
        return {v: p for v, (t, p) in self.views.items() if now - t <= self.window_s}

    def expire(self, now: float) -> FusionWindow:
        return FusionWindow(self.window_s, {v: tp for v, tp in self.views.items() if now - tp[0] <= self.window_s})

    def result(self, now: float, method: str = "avg", k: int = 5) -> FusedResult | None:
        live = self.live(now)
        return fused_result(live, method, k) if live else None
