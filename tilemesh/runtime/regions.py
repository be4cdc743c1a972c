"""Half-open rectangles in a tensor's (H, W) plane, and splits of a plane among devices.

A `Region(r0, r1, c0, c1)` covers rows r0..r1-1 and columns c0..c1-1. Coordinates may be negative or
exceed the tensor before `clip` (that part is padding). Non-spatial tensors such as (1, F) are treated
as a 1x1 plane, so every tensor has a region and the same code handles the classifier head.

Everything here is plain ints and tuples so plans travel as JSON to the browsers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Region:
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def rows(self) -> int:
        return max(0, self.r1 - self.r0)

    @property
    def cols(self) -> int:
        return max(0, self.c1 - self.c0)

    @property
    def area(self) -> int:
        return self.rows * self.cols

    @property
    def empty(self) -> bool:
        return self.rows == 0 or self.cols == 0

    def intersect(self, other: Region) -> Region:
        return Region(
            max(self.r0, other.r0), min(self.r1, other.r1), max(self.c0, other.c0), min(self.c1, other.c1)
        )

    def hull(self, other: Region) -> Region:
        """Smallest rectangle containing both; an empty side is ignored so hulls can start from EMPTY."""
        if self.empty:
            return other
        if other.empty:
            return self
        return Region(
            min(self.r0, other.r0), max(self.r1, other.r1), min(self.c0, other.c0), max(self.c1, other.c1)
        )

    def contains(self, other: Region) -> bool:
        if other.empty:
            return True
        return self.r0 <= other.r0 and other.r1 <= self.r1 and self.c0 <= other.c0 and other.c1 <= self.c1

    def clip(self, h: int, w: int) -> Region:
        return self.intersect(Region(0, h, 0, w))

    def shift(self, dr: int, dc: int) -> Region:
        return Region(self.r0 + dr, self.r1 + dr, self.c0 + dc, self.c1 + dc)

    def relative_to(self, base: Region) -> tuple[slice, slice]:
        """Slices selecting this region out of an array that holds `base` (which must contain it)."""
        return slice(self.r0 - base.r0, self.r1 - base.r0), slice(self.c0 - base.c0, self.c1 - base.c0)

    def to_list(self) -> list[int]:
        return [self.r0, self.r1, self.c0, self.c1]

    @classmethod
    def from_list(cls, v) -> Region:
        r0, r1, c0, c1 = (int(x) for x in v)
        return cls(r0, r1, c0, c1)

    @classmethod
    def full(cls, h: int, w: int) -> Region:
        return cls(0, h, 0, w)


EMPTY = Region(0, 0, 0, 0)


def plane(shape: tuple[int, ...]) -> tuple[int, int]:
    """(H, W) of an activation shape; anything that is not NCHW counts as a single 1x1 cell."""
    if len(shape) == 4:
        return int(shape[2]), int(shape[3])
    return 1, 1


def is_spatial(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4


def _cuts(n: int, shares) -> list[int]:
    """Boundaries 0 = b0 <= b1 <= ... = n splitting n cells in proportion to `shares` (largest remainder)."""
    total = float(sum(shares))
    if total <= 0 or any(s < 0 for s in shares):
        raise ValueError(f"shares must be non-negative with a positive sum: {shares!r}")
    exact = [n * s / total for s in shares]
    sizes = [int(e) for e in exact]
    # Largest remainder keeps the split as close to the requested shares as integers allow.
    order = sorted(range(len(shares)), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in order[: n - sum(sizes)]:
        sizes[i] += 1
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    return bounds


def grid_split(h: int, w: int, devices, row_shares=None, col_shares=None) -> dict[str, Region]:
    """Split an h x w plane into a grid; `devices[i][j]` owns cell (i, j).

    `devices` is a list of rows of device ids. Shares default to equal. A device may appear in several
    cells only if those cells form a rectangle; cells that round to nothing are left out, so a device
    may own nothing of a small tensor.
    """
    nr, nc = len(devices), len(devices[0])
    if any(len(row) != nc for row in devices):
        raise ValueError("devices must be a rectangular grid")
    rb = _cuts(h, row_shares or [1] * nr)
    cb = _cuts(w, col_shares or [1] * nc)
    if len(rb) != nr + 1 or len(cb) != nc + 1:
        raise ValueError("share counts must match the grid")
    out: dict[str, Region] = {}
    for i in range(nr):
        for j in range(nc):
            cell = Region(rb[i], rb[i + 1], cb[j], cb[j + 1])
            if cell.empty:
                continue
            dev = devices[i][j]
            merged = out[dev].hull(cell) if dev in out else cell
            if dev in out and merged.area != out[dev].area + cell.area:
                raise ValueError(f"cells of device {dev!r} do not form a rectangle")
            out[dev] = merged
    return out


def row_split(h: int, w: int, shares: dict[str, float]) -> dict[str, Region]:
    """Horizontal bands, top to bottom in the dict's order, sized by share (e.g. 50/30/20)."""
    devs = list(shares)
    return grid_split(h, w, [[d] for d in devs], row_shares=[shares[d] for d in devs])


def whole(h: int, w: int, device: str) -> dict[str, Region]:
    return {device: Region.full(h, w)}


def check_partition(part: dict[str, Region], h: int, w: int) -> None:
    """Raise unless the regions are inside the plane, pairwise disjoint and cover it."""
    regs = [r for r in part.values() if not r.empty]
    for r in regs:
        if not Region.full(h, w).contains(r):
            raise ValueError(f"{r} outside {h}x{w}")
    for i, a in enumerate(regs):
        for b in regs[i + 1 :]:
            if not a.intersect(b).empty:
                raise ValueError(f"{a} and {b} overlap")
    if sum(r.area for r in regs) != h * w:
        raise ValueError(f"partition does not cover {h}x{w}")
