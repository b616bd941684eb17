"""Ring points: where a member's vnodes sit on the 64-bit ring, and finding a position's successor.

`member_points` is the point hash (part of the wire contract, see `meshkv.ring.hashring`).
`SortedPoints` holds a ring's points in order and answers, for a batch of positions, the index
of the first point at or after each one, wrapping past the top of the ring to the first point.

A binary search over a ring of 16k points costs ~100 ns per position here (cache and branch
misses). `SortedPoints` instead splits the ring into 2^b equal slices (about two slices per
point) and keeps the index of the first point of each slice; a search is one table read plus a
step past the few points of the position's slice that lie before it, done for the whole batch at
once, ~4x faster on large batches (tools/bench_ring.py).

This module knows nothing of member names' meaning, probes, keys or epochs.
"""

from __future__ import annotations

import functools

import mmh3
import numpy as np

POINT_CACHE_MEMBERS = 2048  # member point arrays kept between ring builds: <= 64 MiB at 4096 vnodes
MAX_SLICE_BITS = 20  # slice table of at most 2^20 int32 entries (4 MiB)
MIN_SLICE_BITS = 4
# Below this many positions a plain binary search wins: the slice steps cost a few numpy calls.
SLICE_SEARCH_MIN_POSITIONS = 1024
_TOP_POSITION = np.uint64((1 << 64) - 1)


@functools.lru_cache(maxsize=POINT_CACHE_MEMBERS)
def member_points(name: str, vnodes: int) -> np.ndarray:
    """The `vnodes` ring points of member `name` (uint64, read-only, in vnode order).

    Point i is ``mmh3.hash64(f"{name}#{i}".encode(), 0, signed=False)[0]``: the first 64-bit
    half of MurmurHash3_x64_128 of the UTF-8 text, seed 0.
    """
    points = np.fromiter(
        (mmh3.hash64(f"{name}#{i}".encode(), 0, signed=False)[0] for i in range(vnodes)),
        dtype=np.uint64,
        count=vnodes,
    )
    points.flags.writeable = False
    return points


class SortedPoints:
    """A non-empty, sorted uint64 array of ring points with a slice table for successor search."""

    __slots__ = (
        "_as_ints",
        "_max_slice_points",
        "_padded",
        "_shift",
        "_slice_starts",
        "values",
        "wrapped",
    )

    def __init__(self, sorted_points: np.ndarray) -> None:
        count = sorted_points.shape[0]
        bits = min(MAX_SLICE_BITS, max(MIN_SLICE_BITS, int(count - 1).bit_length() + 1))
        self._shift = np.uint64(64 - bits)
        slice_bottoms = np.arange(1 << bits, dtype=np.uint64) << self._shift
        starts = np.searchsorted(sorted_points, slice_bottoms, side="left")
        self._slice_starts = starts.astype(np.int32)
        self._max_slice_points = int(np.diff(starts, append=count).max())
        # A top sentinel ends every step past a slice's points: no position is above it.
        self._padded = np.append(sorted_points, _TOP_POSITION)
        self.values = sorted_points
        self.values.flags.writeable = False
        self.wrapped = np.append(sorted_points, sorted_points[0])
        self.wrapped.flags.writeable = False
        self._as_ints: list[int] | None = None

    def as_ints(self) -> list[int]:
        """`values` as a list of Python ints, made on first use: one key's search (`bisect`
        over it) costs less than numpy's fixed cost per call."""
        if self._as_ints is None:
            self._as_ints = self.values.tolist()
        return self._as_ints

    def successors(self, positions: np.ndarray) -> np.ndarray:
        """For each position (1-D uint64), the index in `wrapped` of the first point >= it.

        `wrapped` is `values` followed by the first point again: index ``len(values)`` is a
        position past the last point, whose successor is the first point (the ring wraps).
        """
        if positions.shape[0] < SLICE_SEARCH_MIN_POSITIONS:
            return self.values.searchsorted(positions)
        found = self._slice_starts[(positions >> self._shift).astype(np.intp)]
        behind = np.flatnonzero(self._padded[found] < positions)
        for _ in range(self._max_slice_points):  # each step passes one point of the slice
            if not behind.size:
                break
            found[behind] += 1
            behind = behind[self._padded[found[behind]] < positions[behind]]
        return found
