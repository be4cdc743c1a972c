"""Multi-view fusion (DDNN's sensor fusion, in the browser): several phones look at the same object; the class
scores of their views within a time window are fused into one answer.

Two rules, as DDNN compares them: the average of the views' softmax vectors, and their element-wise maximum
(renormalised). Each view's contribution to the fused label is its own probability of that label, so a page can
show who agreed. A window holds each view's newest scores no older than `window_s`; a view that stops sending drops
out by itself. Everything here is pure: (window, event) -> window, with time passed in, never read.

A fusion room (`tilemesh.server.signaling.rooms`) runs this on the server: each camera phone sends its view's
logits once per shown frame, encoded by `encode_scores` in its Pyodide runtime, and the server decodes them with
`decode_scores`, keeps the room's window and sends the fused answer to the room. One implementation, one clock
(the server's), one message in per view and frame.

The default rule is the average: DDNN compares average and max pooling of the devices' class scores for a network
trained with its aggregator; for a pretrained classifier fused after the fact, averaging agreed with the model's
answer on the clean photo more often than max at every view count we measured (`python -m bench.fusion`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .preprocess import softmax

METHODS = ("avg", "max")
DEFAULT_METHOD = "avg"
DEFAULT_WINDOW_S = 2.0
WINDOW_RANGE_S = (0.1, 30.0)
# A view's scores are at most this many classes (8192 float32 = 43.7 KB of base64, inside one signaling message).
MAX_CLASSES = 8192


def encode_scores(logits) -> str:
    """A view's class scores (logits, any shape holding C values) as the wire carries them: base64 of C float32,
    little-endian. Exact: the server fuses the very numbers the phone computed."""
    z = np.ascontiguousarray(np.asarray(logits, dtype="<f4").reshape(-1))
    return base64.b64encode(z.tobytes()).decode("ascii")


def decode_scores(text, classes: int | None = None) -> np.ndarray:
    """(C,) float32 scores from `encode_scores`' text; ValueError saying what is wrong: not a string, not base64,
    not whole float32 values, fewer than 2 or more than MAX_CLASSES classes, not `classes` of them, not finite."""
    if not isinstance(text, str):
        raise ValueError("'scores' must be a base64 string of float32 class scores")
    if len(text) > 4 * (MAX_CLASSES * 4 + 2) // 3 + 4:
        raise ValueError(f"'scores' holds more than {MAX_CLASSES} classes")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("'scores' is not valid base64") from None
    if len(raw) % 4:
        raise ValueError(f"'scores' decodes to {len(raw)} bytes, not whole float32 values")
    z = np.frombuffer(raw, dtype="<f4")
    if not 2 <= z.size <= MAX_CLASSES:
        raise ValueError(f"'scores' holds {z.size} classes; 2 to {MAX_CLASSES} are accepted")
    if classes is not None and z.size != classes:
        raise ValueError(f"'scores' holds {z.size} classes; this room's model has {classes}")
    if not np.all(np.isfinite(z)):
        raise ValueError("'scores' must all be finite (no NaN or infinity)")
    return z.astype(np.float32)


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
    # view -> its weight in the fused top-1's score: for the average its share of the sum of the views'
    # probabilities of that class; for the max 1 for the view(s) holding the maximum (shared on a tie), 0 otherwise.
    weights: dict[str, float] = field(default_factory=dict)
    view_top1_p: dict[str, float] = field(default_factory=dict)  # view -> its probability of its own best class


def fused_result(probabilities: Mapping[str, np.ndarray], method: str = "avg", k: int = 5) -> FusedResult:
    fused = fuse(probabilities, method)
    order = np.argsort(-fused, kind="stable")[:k]
    best = int(order[0])
    probs = {v: np.asarray(p, dtype=np.float64).reshape(-1) for v, p in probabilities.items()}
    support = {v: float(p[best]) for v, p in probs.items()}
    if method == "avg":
        total = sum(support.values())
        weights = {v: (s / total if total > 0 else 1 / len(support)) for v, s in support.items()}
    else:
        top = max(support.values())
        holders = [v for v, s in support.items() if s == top]
        weights = {v: (1 / len(holders) if v in holders else 0.0) for v in support}
    return FusedResult(method, [(int(i), float(fused[i])) for i in order], support,
                       {v: int(np.argmax(p)) for v, p in probs.items()}, weights,
                       {v: float(np.max(p)) for v, p in probs.items()})


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
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

    def remove(self, view: str) -> FusionWindow:
        """The view stopped (its phone left, its camera closed): out of the fusion now, not when it goes stale."""
        return FusionWindow(self.window_s, {v: tp for v, tp in self.views.items() if v != view})

    def times(self) -> dict[str, float]:
        """Each held view's time (of its newest scores)."""
        return {v: t for v, (t, _) in self.views.items()}

    def next_expiry(self) -> float | None:
        """When the next held view goes stale (its time + the window); None when none is held."""
        return min((t + self.window_s for t, _ in self.views.values()), default=None)

    def live(self, now: float) -> dict[str, np.ndarray]:
        return {v: p for v, (t, p) in self.views.items() if now - t <= self.window_s}

    def expire(self, now: float) -> FusionWindow:
        return FusionWindow(self.window_s, {v: tp for v, tp in self.views.items() if now - tp[0] <= self.window_s})

    def result(self, now: float, method: str = "avg", k: int = 5) -> FusedResult | None:
        live = self.live(now)
        return fused_result(live, method, k) if live else None
