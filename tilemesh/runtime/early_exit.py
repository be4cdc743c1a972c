"""Early exit on the camera phone: decide from a cheap pass's class scores whether the room needs to be asked.

The cheap pass is the same network on a downscaled frame (a 112x112 input costs a quarter of the MACs of
224x224; MobileNet-style models end in a global pool, so they run at any input size with the same weights).
We chose it over "first blocks + a small exit head" because an exit head needs training and no training set can
be fetched here; the downscaled pass needs none, keeps the model's own classifier, and its confidence is
calibrated against the full model's answers on real photos (`bench/early_exit.py`).

Confidence is the normalized entropy of the softmax, H(p) / log(C), in [0, 1]: 0 when one class has all the
mass, 1 when the scores are uniform (Huang and Qiao's web early-exit branch uses the same measure). A frame exits
when its normalized entropy is at most the threshold.

Everything here is a pure function of numbers, so the rule is the same on every device and in every test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from .preprocess import softmax


def normalized_entropy(logits: np.ndarray) -> float:
    """H(softmax(logits)) / log(C) of one score vector ((C,) or (1, C)), in [0, 1]."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 2 and z.shape[0] == 1:
        z = z[0]
    if z.ndim != 1 or z.shape[0] < 2:
        raise ValueError(f"need one vector of at least 2 class scores, got shape {np.shape(logits)}")
    if not np.all(np.isfinite(z)):
        raise ValueError("class scores must be finite")
    p = softmax(z)
    nz = p[p > 0]
    h = float(-(nz * np.log(nz)).sum())
    return min(max(h / float(np.log(z.shape[0])), 0.0), 1.0)


@dataclass(frozen=True)
class ExitDecision:
    exit: bool
    entropy: float
    top1: int  # the cheap pass's best class: the only label an exit may show


def decide(logits: np.ndarray, threshold: float) -> ExitDecision:
    """Exit when the cheap pass is confident enough: normalized entropy <= threshold (0 never... 1 always)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold} is outside [0, 1]")
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    h = normalized_entropy(z)
    return ExitDecision(h <= threshold, h, int(np.argmax(z)))


@dataclass(frozen=True)
class CalibrationRow:
    threshold: float
    exit_rate: float  # share of frames that exit
    exit_agreement: float  # among exits: cheap top-1 == full top-1 (1.0 when nothing exits)
    overall_agreement: float  # shown label == full model's, over all frames (non-exits always agree)
    relative_cost: float  # compute per frame against full-model-always (cheap pass + the rest of the frames)


def calibration_table(entropies: Sequence[float], agree: Sequence[bool], thresholds: Sequence[float],
                      cheap_cost: float) -> list[CalibrationRow]:
    """For each threshold, what exiting would have done on a calibration set.

    `entropies[i]`: the cheap pass's normalized entropy on sample i; `agree[i]`: its top-1 equals the full
    model's; `cheap_cost`: the cheap pass's MACs as a fraction of the full model's.
    """
    h = np.asarray(entropies, dtype=np.float64)
    a = np.asarray(agree, dtype=bool)
    if h.shape != a.shape or h.ndim != 1 or h.size == 0:
        raise ValueError("need equally long, non-empty entropies and agreements")
    rows = []
    for t in thresholds:
        ex = h <= t
        n_ex = int(ex.sum())
        exit_agree = float(a[ex].mean()) if n_ex else 1.0
        rate = n_ex / h.size
        overall = float((a | ~ex).mean())
        rows.append(CalibrationRow(float(t), rate, exit_agree, overall, cheap_cost + (1.0 - rate)))
    return rows


def choose_threshold(rows: Sequence[CalibrationRow], min_exit_agreement: float = 0.97,
                     min_exits: int = 1, n: int | None = None) -> float:
    """The largest threshold whose exits agree with the full model at least `min_exit_agreement` of the time.

    With `n` (the calibration set's size) a threshold must also make at least `min_exits` exits to count, so a
    lucky handful of exits cannot set the default. Returns 0.0 (exit only on certainty) when none qualifies.
    """
    best = 0.0
    for r in sorted(rows, key=lambda r: r.threshold):
        enough = n is None or r.exit_rate * n >= min_exits
        if enough and r.exit_agreement >= min_exit_agreement:
            best = r.threshold
    return best


# --------------------------------------------------------------------------- the rule on a camera stream


@dataclass(frozen=True)
class StreamExit:
    """The camera phone's early-exit state on a stream of frames (a pure value; `step` and `room_answer` move it).

    A frame exits (its cheap answer is shown and the room is not asked) when the cheap pass is confident, normalized
    entropy <= `threshold`, AND its top-1 names the room's latest full answer: consecutive frames of a stream show
    the same scene, so a confident cheap pass agreeing with what the full model just said is very likely what the
    full model would say again. With no room answer yet (the first frames, or after `reset`), only a very confident
    cheap pass exits (`alone_threshold`). At most `max_run` frames exit in a row, so the room's answer stays fresh.
    """

    threshold: float
    alone_threshold: float = 0.0
    max_run: int = 8
    last_room: int | None = None  # the room's latest answer (class index), None before the first
    run: int = 0  # frames exited since the room last answered
    frames: int = 0
    exits: int = 0

    def __post_init__(self):
        for name in ("threshold", "alone_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} {getattr(self, name)} is outside [0, 1]")
        if self.max_run < 1:
            raise ValueError(f"max_run must be at least 1, got {self.max_run}")

    @property
    def exit_rate(self) -> float:
        return self.exits / self.frames if self.frames else 0.0


@dataclass(frozen=True)
class StreamDecision:
    exit: bool
    entropy: float
    top1: int  # the cheap pass's best class: the only label an exit may show
    reason: str  # why: "confident and names the room's answer", "confident, no room answer yet", or why not


def step(state: StreamExit, logits: np.ndarray) -> tuple[StreamExit, StreamDecision]:
    """One frame's cheap-pass scores -> (the next state, whether the frame exits)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    h = normalized_entropy(z)
    top1 = int(np.argmax(z))
    if state.run >= state.max_run:
        ok, why = False, f"{state.max_run} exits in a row: the room is asked"
    elif state.last_room is None:
        ok = h <= state.alone_threshold
        why = "confident, no room answer yet" if ok else "no room answer yet and not confident enough"
    elif h > state.threshold:
        ok, why = False, "not confident"
    elif top1 != state.last_room:
        ok, why = False, "confident but differs from the room's answer"
    else:
        ok, why = True, "confident and names the room's answer"
    nxt = replace(state, frames=state.frames + 1, exits=state.exits + ok, run=state.run + 1 if ok else state.run)
    return nxt, StreamDecision(ok, h, top1, why)


def room_answer(state: StreamExit, top1: int) -> StreamExit:
    """The room's full answer for a frame arrived (class index `top1`): it becomes the one exits must name."""
    return replace(state, last_room=int(top1), run=0)


def reset(state: StreamExit) -> StreamExit:
    """Forget the room's answer (the camera stopped, the scene is new): counts are kept."""
    return replace(state, last_room=None, run=0)
