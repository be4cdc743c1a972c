"""Faults within a frame: the rules for rescuing pieces, spotting stragglers and catching wrong results.

Pure functions and small frozen states; the device session (`session.DeviceSession`) calls them and turns
their answers into effects. The same rules run in the browser (Pyodide) and on the edge (CPython).

Design (region-level recovery). Every piece a device waits for is named by (tensor, region), so any device of
the plan may deliver it; the first copy is used (`runner.DeviceRunner._piece`). The camera phone (the plan's
source) holds the frame, so it can compute any piece of any segment from the frame alone: the piece's region is
mapped back through every layer before it (`deps.segment_deps` over the graph's prefix) to the input rows and
columns it needs, and only those are computed (`rescue_piece`). A piece of the first segment costs its own tile
plus halo; a piece of a later segment costs its receptive field in the frame, up to the whole frame for the
classifier's head. Nobody else holds a later segment's inputs once they are consumed, so the frame is the one
input every rescue can count on.

Who asks. A device waiting for pieces of a frame asks the source for the ones a device still owes it
(`rescue` broadcast): at once when that device leaves the room or its link closes, or when the frame has made
no progress for `stall_bound(plan)` seconds (a device that vanished silently, or a straggler). The source does
the same for its own missing pieces, locally. Until a new plan arrives, the source computes a gone device's
pieces for every new frame up front. A late copy from a straggler is compared with the rescue (a free check).

Newcomers. A device that becomes ready (profiled) while the source streams is used from the next plan: the
source asks for one in the background as soon as the roster shows a ready device its last plan request did not
know of (`newcomers`), and keeps running its plan until the new one comes; each arrival asks once.

Engines. On a device whose tiles run on an engine outside Python (onnxruntime-web in the browser), rescues and
frames finished alone use it too: one "reference run" per frame, the whole model on the whole frame with every
block boundary's tensor as an output (`reference_tensors`, one model per graph, made once), from which any piece
at a block boundary is cropped (`piece_from_reference`) and whose logits are the frame's answer alone. It costs a
whole model on the engine, so a piece whose receptive field is small stays on the numpy kernels when they are
predicted faster (`use_reference`, from the profile's predicted whole-model times per engine).

Wrong results. With probability `check_rate` per frame, each device picks one piece it expects from another
device (not the source) and asks the source for its own copy; the piece is used only when both copies are here.
Copies that differ by more than float tolerance (`agree`) convict the non-source sender when its inputs were
surely right (they all came from the source, or the frame was audited); it is excluded from the source's plans
and named to the room (`wrong_result` broadcast). Otherwise an honest device may only have passed on a liar's
wrong pieces, so the next AUDIT_FRAMES frames are audited (every piece from another device held until the
source's copy arrives), which shows who computes wrong. Frames touched by a disagreement finish alone on the
source. The source's copy is trusted: the camera phone is the user's own device, and it computed the piece
from the frame itself. Beside these samples, every frame's overlapping halo rows are compared for free
(`overlap`), and the first frame of a plan holding a device no overlap covers is audited
(`DeviceSession(audit_first=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .deps import cut_candidates, live_tensors, segment_deps
from .regions import Region, plane
from .tiling import Transfer, crop, partial_pool, run_steps

# A piece of segment k-1's output still missing `piece_wait(bound, k, n)` = bound + k x step after a device
# first saw its frame is rescued, where bound = STALL_FACTOR x the plan's predicted latency x this device's own
# slowdown (its measured/predicted compute lately, when above 1: a machine under load runs every device of the
# plan behind the prediction, and an honest device must not look stalled for it), at least STALL_MIN_S, at most
# STALL_MAX_S (without a prediction STALL_MAX_S), and step = LEVEL_STEP_S, or less in a plan of n segments (at
# most bound / n).
STALL_FACTOR = 3.0
# A device whose overlap digests failed to come for this many frames of a plan (each then shown unverified) has
# the plan's next frames audited: withholding digests must not be a way around the overlap checks.
WITHHELD_AUDIT = 3
STALL_MIN_S = 0.3
STALL_MAX_S = 2.0
LEVEL_STEP_S = 0.1
# Straggler hysteresis: a device rescued for stalling in STRAGGLE_K of the last STRAGGLE_N frames (silent or
# slow) makes the source replan without it, at most once per REPLAN_HOLD_S; it may come back after EXCLUDE_S.
# A finished frame's stalls are judged `judge_after(bound, levels)` after it finished: time for a device blocked
# upstream to ask for its own rescue (on its tick), which clears it of the blame.
TICK_SLACK_S = 1.0
STRAGGLE_K = 2
STRAGGLE_N = 3
REPLAN_HOLD_S = 10.0
EXCLUDE_S = 30.0
# Spot checks: the share of frames in which each device has one received piece re-computed by the source.
CHECK_RATE = 0.05
# After a disagreement that does not show who lied (the sender's inputs came from other devices), this many
# frames are audited: every piece from a device other than the source is checked before it is used.
AUDIT_FRAMES = 2
# Float tolerance of two copies of one piece (tiled vs whole inference agree within 1e-5 on the demo model).
ATOL = 1e-3
RTOL = 1e-3


def stall_bound(plan_msg: dict | None, slowdown: float = 1.0) -> float:
    """Seconds without progress after which a frame's missing pieces are rescued, from the plan's prediction and
    how far this device's own compute runs behind its prediction (`slowdown`, measured/predicted; below 1 or not
    a number: 1)."""
    try:
        predicted = float((plan_msg or {}).get("predicted_ms")) / 1e3
    except (TypeError, ValueError):
        return STALL_MAX_S
    if not predicted > 0:
        return STALL_MAX_S
    slow = slowdown if isinstance(slowdown, (int, float)) and slowdown > 1.0 else 1.0  # NaN too
    return min(STALL_MAX_S, max(STALL_MIN_S, STALL_FACTOR * predicted * slow))


def piece_wait(bound: float, level: int, levels: int | None = None) -> float:
    """How long a device waits for a piece produced at `level` (0: the frame, k: segment k-1's output) before
    asking for it: deeper pieces wait longer, so a device blocked upstream asks before those waiting on it
    (and the rescue goes to the device that really stalled, not to everyone downstream of it). With the plan's
    depth `levels` the step shrinks to at most bound / levels, so no piece waits more than twice the bound (a
    20-segment plan would otherwise add 2 s to every detection)."""
    step = LEVEL_STEP_S if not levels else min(LEVEL_STEP_S, bound / max(1, int(levels)))
    return bound + step * max(0, int(level))


def judge_after(bound: float, levels: int) -> float:
    """Seconds after a frame finished on the source before its stalls are blamed on devices (`straggle_step`):
    the longest a device blocked upstream waits before asking for a rescue, plus two page ticks."""
    return piece_wait(bound, levels, levels) + TICK_SLACK_S


def rescue_region(graph, tr: Transfer) -> Region:
    """The region of the graph input `rescue_piece` reads for `tr` (its receptive field, clipped)."""
    return _prefix_deps(graph, tr).inputs[graph.input]


def _prefix_deps(graph, tr: Transfer):
    target = tr.of if tr.reduce else tr.tensor
    if target == graph.input:
        return None
    last = next(i for i, n in enumerate(graph.nodes) if n.output == target)
    return segment_deps(graph, graph.nodes[: last + 1], {target: tr.region})


def rescue_piece(graph, pixels: np.ndarray, normalize, tr: Transfer, backend=None) -> np.ndarray:
    """Piece `tr` computed from the frame alone: `pixels` is the (1, 3, H, W) uint8 crop the model sees.

    Only the input region the piece depends on is read and only the layers before it run; the result equals
    what `tr.src` would have sent (a partial pool for a reduction transfer)."""
    full = Region.full(*plane(pixels.shape))
    deps = _prefix_deps(graph, tr)
    if deps is None:  # a piece of the frame itself
        return np.ascontiguousarray(crop(pixels, full, tr.region))
    need = deps.inputs[graph.input]
    target = tr.of if tr.reduce else tr.tensor
    out = run_steps(graph, deps, {graph.input: normalize(crop(pixels, full, need))}, keep=[target],
                    backend=backend)[target]
    if out.ndim == 4:
        out = crop(out, deps.regions[target], tr.region)
    return np.ascontiguousarray(partial_pool(out, tr.reduce) if tr.reduce else out)


def rescue_macs(graph, tr: Transfer) -> int:
    deps = _prefix_deps(graph, tr)
    return 0 if deps is None else deps.macs


def agree(a: np.ndarray, b: np.ndarray) -> tuple[bool, float]:
    """Whether two copies of one piece agree within float tolerance, and their largest difference."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape:
        return False, float("inf")
    if a.size == 0:
        return True, 0.0
    diff = np.abs(a - b)
    err = float(np.nanmax(diff)) if np.isfinite(diff).all() else float("inf")
    return bool(np.all(diff <= ATOL + RTOL * np.abs(a))), err


@dataclass(frozen=True)
class Straggle:
    """Per device, the last STRAGGLE_N frames of the source's plan: True where it had to be rescued."""

    history: tuple[tuple[str, tuple[bool, ...]], ...] = ()
    replanned_at: float | None = None

    def of(self, device: str) -> tuple[bool, ...]:
        return dict(self.history).get(device, ())


def straggle_step(state: Straggle, frame_devices, stalled, now: float) -> tuple[Straggle, list[str]]:
    """One finished frame: `frame_devices` took part, `stalled` (a subset) had pieces rescued for stalling.

    Returns the new state and the devices to replan without (empty unless some device stalled in STRAGGLE_K
    of its last STRAGGLE_N frames and no straggler replan happened in the last REPLAN_HOLD_S)."""
    hist = dict(state.history)
    for d in frame_devices:
        hist[d] = (*hist.get(d, ()), d in stalled)[-STRAGGLE_N:]
    slow = sorted(d for d, h in hist.items() if sum(h) >= STRAGGLE_K)
    held = state.replanned_at is not None and now - state.replanned_at < REPLAN_HOLD_S
    if not slow or held:
        return Straggle(tuple(sorted(hist.items())), state.replanned_at), []
    for d in slow:
        hist[d] = ()
    return Straggle(tuple(sorted(hist.items())), now), slow


def newcomers(known, ready, excluded=()) -> list[str]:
    """Ready devices (profiled, in the roster) that the source's last plan request did not know of and that are
    not excluded: each is a reason to ask for a new plan in the background, once."""
    return sorted(set(ready) - set(known) - set(excluded))


# The reference run's task index in `runner.ComputeRequest`s (tasks of a device plan count from 0).
REFERENCE_TASK = -1
# Without a profile that says, the engine is taken to be this many times faster than the numpy kernels
# (onnxruntime-web vs Pyodide numpy, shared/PLATFORM.md: 5-8x).
ENGINE_SPEEDUP = 5.0


def reference_tensors(graph) -> list[str]:
    """What the reference run keeps: every tensor crossing a block boundary, and the model's output."""
    out = {t for k in cut_candidates(graph) for t in live_tensors(graph, k)} - {graph.input}
    return sorted(out) + [graph.output]


def piece_from_reference(graph, tensors: dict, tr: Transfer) -> np.ndarray | None:
    """Piece `tr` cut out of a reference run's whole tensors (None when the run did not keep its tensor)."""
    target = tr.of if tr.reduce else tr.tensor
    whole = tensors.get(target)
    if whole is None:
        return None
    if whole.ndim == 4:
        whole = crop(whole, Region.full(*plane(whole.shape)), tr.region)
    return np.ascontiguousarray(partial_pool(whole, tr.reduce) if tr.reduce else whole)


def use_reference(piece_macs: int, model_macs: int, engines: dict | None) -> bool:
    """Whether a piece costing `piece_macs` (of `model_macs` for the whole model) is faster from a reference run
    on the engine than on the numpy kernels, by the profile's predicted whole-model ms per engine (`engines`,
    e.g. {"ort-wasm": 25, "numpy": 140}); without them the engine is taken ENGINE_SPEEDUP times faster."""
    if model_macs <= 0:
        return False
    numpy_ms = engine_ms = None
    for name, ms in (engines or {}).items():
        if name == "numpy":
            numpy_ms = float(ms)
        else:
            engine_ms = float(ms) if engine_ms is None else min(engine_ms, float(ms))
    if not numpy_ms or not engine_ms:
        numpy_ms, engine_ms = ENGINE_SPEEDUP, 1.0
    return piece_macs / model_macs * numpy_ms > engine_ms


def up_front_pays(rescue_ms: float, plan_ms: float | None, alone_ms: float) -> bool:
    """Until the new plan comes, a new frame's share of a gone device is computed up front on the source when
    that (`rescue_ms`, then the plan's predicted `plan_ms`) is predicted faster than the frame alone on the
    source's fastest engine (`alone_ms`); otherwise the frame goes alone, so it is never slower than the phone
    alone by prediction. Without a plan prediction: alone."""
    return plan_ms is not None and plan_ms > 0 and rescue_ms + plan_ms < alone_ms
