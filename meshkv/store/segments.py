"""The store's memory: a fixed pool of large, page-aligned segments allocated once at start.

The whole byte budget is mapped up front as anonymous memory in segments of
``segment_bytes`` (the last one may be smaller). Pages are committed lazily, on first write,
unless ``populate`` asks for them at start. Because the pool never changes, a transfer channel
registers each segment exactly once and the segment table a peer learns at handshake stays
valid for the life of the process: slots are only ever addresses inside these segments.

This module owns memory and addresses; it knows nothing of slots, keys or transfers.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from meshkv.errors import UsageError
from meshkv.store.slots import PAGE_BYTES, Region

DEFAULT_SEGMENT_BYTES = 256 << 20
"""256 MiB: holds a whole chunk of the largest common models (256 tokens of a 405B model at TP 1
is ~126 MiB), keeps registration and handshake metadata small (one descriptor per segment:
~17 KB for 100 GiB), and is still a useful step for a slab class to grow or shrink by."""
MAX_SEGMENTS = 4096
"""Upper bound on segments per store (the data-plane handshake carries one entry each)."""


def segment_bytes_for(budget_bytes: int) -> int:
    """`DEFAULT_SEGMENT_BYTES`, or larger for a budget that would need over `MAX_SEGMENTS`."""
    fewest = -(-budget_bytes // MAX_SEGMENTS)
    return max(DEFAULT_SEGMENT_BYTES, -(-fewest // PAGE_BYTES) * PAGE_BYTES)


def segment_sizes(budget_bytes: int, segment_bytes: int | None = None) -> list[int]:
    """Splits a byte budget into segment sizes: whole segments, then a page-rounded remainder.

    ``segment_bytes`` defaults to `segment_bytes_for` the budget.
    """
    if segment_bytes is None:
        segment_bytes = segment_bytes_for(budget_bytes)
    if segment_bytes < PAGE_BYTES or segment_bytes % PAGE_BYTES:
        raise UsageError(f"segment_bytes must be a positive multiple of {PAGE_BYTES}")
    if budget_bytes < PAGE_BYTES:
        raise UsageError(f"a store budget of {budget_bytes} bytes is less than one page")
    sizes = [segment_bytes] * (budget_bytes // segment_bytes)
    rest = budget_bytes % segment_bytes // PAGE_BYTES * PAGE_BYTES
    if rest:
        sizes.append(rest)
    if len(sizes) > MAX_SEGMENTS:
        raise UsageError(
            f"{len(sizes)} segments exceed MAX_SEGMENTS={MAX_SEGMENTS}: raise segment_bytes"
        )
    return sizes


@dataclass(frozen=True, slots=True, kw_only=True)
class Segment:
    """One mapped segment: its id in the pool, its bytes, and where they live."""

    segment_id: int
    buffer: np.ndarray  # uint8, writable, page-aligned
    address: int
    nbytes: int


class SegmentPool:
    """The store's segments, mapped once; `view` turns a `Region` into a writable array."""

    def __init__(self, sizes: Sequence[int], *, populate: bool = False) -> None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if populate:
            flags |= mmap.MAP_POPULATE
        segments = []
        for segment_id, nbytes in enumerate(sizes):
            buffer = np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype=np.uint8)
            segments.append(
                Segment(
                    segment_id=segment_id,
                    buffer=buffer,
                    address=buffer.ctypes.data,
                    nbytes=nbytes,
                )
            )
        self.segments: tuple[Segment, ...] = tuple(segments)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def contains(self, region: Region) -> bool:
        """True if ``region`` lies inside one of this pool's segments."""
        if region.segment_id >= len(self.segments):
            return False
        return region.offset + region.nbytes <= self.segments[region.segment_id].nbytes

    def view(self, region: Region) -> np.ndarray:
        """The region's bytes as a writable uint8 array (no copy)."""
        if not self.contains(region):
            raise UsageError(f"region {region} is outside the segment pool")
        buffer = self.segments[region.segment_id].buffer
        return buffer[region.offset : region.offset + region.nbytes]

    def address(self, region: Region) -> int:
        """The virtual address of the region's first byte."""
        if not self.contains(region):
            raise UsageError(f"region {region} is outside the segment pool")
        return self.segments[region.segment_id].address + region.offset
