"""Overlap cross-checks: the halo rows two devices both compute inside a fused segment, used as a free check.

In a fused segment each device computes its output tile from an input region grown by the halo of every layer
(`deps.segment_deps`), so at the segment's intermediate layers neighbouring tiles overlap: both devices compute
the same cells from the same inputs (redundant work the plan pays for anyway). For each pair of devices of a
segment whose intermediate regions overlap, `checks` names one such region: the deepest intermediate tensor with
an overlap (a wrong computation anywhere before it in the segment shows there). Each of the two devices sums its
copy of that region into a compact `digest` (per group of channels: the sum and the sum of absolute values, 2 x
`GROUPS` floats) and the camera phone (the plan's source) compares the two (`agree_digests`); a mismatch is
settled by a third computation on the source, from the frame (`recovery.rescue_piece` of the region), as spot
checks are. The digest goes to the source in the tensor wire format (`wire.FLAG_DIGEST`: the tensor id of the
checked tensor, the overlap region, the digest as the payload); the source holds a frame's answer until every
check of the frame is in (or a device of the pair is gone), so a device whose engine computes wrong is caught
before its first wrong answer is shown.

Engines differ in float rounding (numpy's kernels, native onnxruntime, onnxruntime-web), so digests are compared
with a relative tolerance (`DIGEST_RTOL`, against the group's sum of absolute values) set well above the largest
honest difference measured (`python -m bench.verify`), never by exact hashes.

What it cannot see: cells no other device computes. A device that computes honestly and then changes its own
output tile (the segment's last layer overlaps nothing) passes every overlap check; spot checks and audits
(`recovery`) remain for it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .regions import Region

# Channels are summed in this many contiguous groups (a digest is 2 x GROUPS float32: 64 bytes on the wire).
GROUPS = 8
# Two digests of one region agree when every group's |sum difference| and |abs-sum difference| are at most
# DIGEST_RTOL x the group's abs-sum (+ DIGEST_ATOL per cell). The largest honest relative difference measured
# between numpy and native onnxruntime on the demo model's checks is 1.7e-7 (`python -m bench.verify --only
# engines`); 1e-4 leaves a 600x margin and still sees a 1% scale of any group (1e-2), or one channel of 12 shifted.
DIGEST_RTOL = 1e-4
DIGEST_ATOL = 1e-6


@dataclass(frozen=True)
class Check:
    """Segment `segment`'s devices `devices` (sorted: a pair, or more after `merged`) all compute `region` of
    `tensor`."""

    segment: int
    tensor: str
    region: Region
    devices: tuple[str, ...]

    @property
    def key(self) -> tuple:
        return (self.tensor, self.region)


def checks(graph, plan) -> list[Check]:
    """Every overlap check of `plan` (a `tiling.Plan`): per segment and pair of its devices with overlapping
    intermediate regions, the deepest such tensor and the overlap. Deterministic: every device derives the same."""
    out: list[Check] = []
    nodes = {n.name: n for n in graph.nodes}
    for seg in plan.segments:
        tasks = sorted((t for t in plan.tasks if t.segment == seg.index), key=lambda t: t.device)
        for i, a in enumerate(tasks):
            for b in tasks[i + 1:]:
                owned = set(a.owned) | set(b.owned)
                for step in reversed(a.deps.steps):
                    t = nodes[step.node].output
                    if t in owned or t not in b.deps.regions or len(graph.shapes[t]) != 4:
                        continue
                    r = a.deps.regions[t].intersect(b.deps.regions[t])
                    if not r.empty:
                        out.append(Check(seg.index, t, r, (a.device, b.device)))
                        break
    return out


def merged(checks) -> dict[tuple, Check]:
    """One check per (tensor, region), holding every device of the pairs that share it: where four tiles of a
    2x2 grid meet, the pairs (a, d) and (b, c) overlap in the same corner, and a digest names only the tensor
    and region it covers, so the corner is one check of four copies (each device sends it once)."""
    out: dict[tuple, Check] = {}
    for c in checks:
        m = out.get(c.key)
        out[c.key] = c if m is None else replace(m, devices=tuple(sorted({*m.devices, *c.devices})))
    return out


def output_name(tensor: str, region: Region) -> str:
    """The name a task model gives its copy of `region` of `tensor` (`task_model.task_model(slices=...)`)."""
    return f"{tensor}@{region.r0}_{region.r1}_{region.c0}_{region.c1}"


def groups_of(channels: int) -> list[slice]:
    """The contiguous channel groups a digest sums (GROUPS of them, fewer for fewer channels)."""
    g = max(1, min(GROUPS, channels))
    edges = np.linspace(0, channels, g + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def digest(array: np.ndarray) -> np.ndarray:
    """The digest of one copy of a check's region (an NCHW array holding exactly the region): float32 (2, G),
    row 0 the sum of each channel group, row 1 its sum of absolute values (float64 accumulation)."""
    a = np.asarray(array)
    if a.ndim != 4:
        raise ValueError(f"a digest is of an NCHW region, got shape {a.shape}")
    per_c = a.sum(axis=(0, 2, 3), dtype=np.float64)
    abs_c = np.abs(a).sum(axis=(0, 2, 3), dtype=np.float64)
    groups = groups_of(a.shape[1])
    return np.array([[per_c[g].sum() for g in groups], [abs_c[g].sum() for g in groups]], np.float32)


def digest_error(a: np.ndarray, b: np.ndarray, cells: int) -> float:
    """The largest difference of two digests, relative to the groups' abs-sums (inf: not comparable or not
    finite). `cells`: values summed per group (for the absolute floor)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    scale = np.maximum(np.maximum(np.abs(a[1]), np.abs(b[1])), DIGEST_ATOL / DIGEST_RTOL * max(1, cells))
    return float(np.max(np.abs(a - b) / scale))


def agree_digests(a: np.ndarray, b: np.ndarray, cells: int) -> tuple[bool, float]:
    """Whether two digests of one region agree within the engines' float tolerance, and their relative error."""
    err = digest_error(a, b, cells)
    return err <= DIGEST_RTOL, err


def cells(graph, check: Check) -> int:
    """Values summed per group of `check`'s digest (roughly: channels per group x the region's area)."""
    c = graph.shapes[check.tensor][1]
    return max(1, -(-c // max(1, min(GROUPS, c)))) * check.region.area


def uncovered(devices, checks, source: str) -> list[str]:
    """Devices of a plan (not its source) that no overlap check covers: nothing they compute is ever compared
    unless spot-checked (a frame whole on one device, a head computed alone by a device in no split)."""
    covered = {d for c in checks for d in c.devices}
    return sorted(set(devices) - covered - {source})
