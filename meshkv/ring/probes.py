"""Multi-probe lookup math: the probe positions of a key, and the expected share of each arc.

Probe 0 of a position p is p itself; probe j >= 1 is fmix64(p XOR (j * 0x9E3779B97F4A7C15 mod
2^64)), with fmix64 MurmurHash3's 64-bit finalizer (a bijection of uint64). The ring keeps the
probe whose first point clockwise is the closest (`meshkv.ring.hashring`).

This module knows nothing of members, keys or epochs.
"""

from __future__ import annotations

import numpy as np

MAX_PROBES = 32

_MASK_64 = (1 << 64) - 1
_FMIX_C1 = 0xFF51AFD7ED558CCD
_FMIX_C2 = 0xC4CEB9FE1A85EC53
_PROBE_STRIDE = 0x9E3779B97F4A7C15
_PROBE_OFFSETS = [(j * _PROBE_STRIDE) & _MASK_64 for j in range(MAX_PROBES)]
_PROBE_OFFSETS_COLUMN = np.array(_PROBE_OFFSETS, dtype=np.uint64)[:, np.newaxis]
_SHIFT_33 = np.uint64(33)
_FMIX_C1_U64 = np.uint64(_FMIX_C1)
_FMIX_C2_U64 = np.uint64(_FMIX_C2)


def probe_positions(positions: np.ndarray, probes: int) -> np.ndarray:
    """The probe positions of a 1-D uint64 array: shape (probes, len(positions)), uint64."""
    k = positions ^ _PROBE_OFFSETS_COLUMN[:probes]
    shifted = k >> _SHIFT_33
    k ^= shifted
    k *= _FMIX_C1_U64
    np.right_shift(k, _SHIFT_33, out=shifted)
    k ^= shifted
    k *= _FMIX_C2_U64
    np.right_shift(k, _SHIFT_33, out=shifted)
    k ^= shifted
    k[0] = positions
    return k


def probe_positions_of(position: int, probes: int) -> list[int]:
    """The probe positions of one position, as ints (the same values as `probe_positions`)."""
    out = [position]
    for offset in _PROBE_OFFSETS[1:probes]:
        k = position ^ offset
        k ^= k >> 33
        k = (k * _FMIX_C1) & _MASK_64
        k ^= k >> 33
        k = (k * _FMIX_C2) & _MASK_64
        out.append(k ^ (k >> 33))
    return out


def multi_probe_arc_loads(arcs: np.ndarray, probes: int) -> np.ndarray:
    """Expected fraction of uniformly random keys that each arc wins with `probes` probes.

    `arcs` are the arc lengths as fractions of the ring (summing to 1); the arc ending at a
    point is the stretch of positions whose first point clockwise is that point. An arc of
    length L wins a key with probability probes * integral_0^L G(d)^(probes-1) dd, where
    G(d) = 1 - sum_j min(d, L_j) is the chance that another probe's point is farther than d.
    The probes are taken as independent uniform positions (they are a bijective mix of the
    key's position); tools/bench_ring.py checks the result against counted keys.
    """
    count = arcs.shape[0]
    order = np.argsort(arcs)
    sorted_arcs = arcs[order]
    below = np.concatenate(([0.0], np.cumsum(sorted_arcs)[:-1]))  # sum of the shorter arcs
    longer = (count - np.arange(count)).astype(np.float64)  # arcs at least this long
    start = np.concatenate(([0.0], sorted_arcs[:-1]))
    # Between consecutive arc lengths, G(d) = 1 - below - longer * d is linear.
    g_start = np.clip(1.0 - below - longer * start, 0.0, 1.0)
    g_end = np.clip(1.0 - below - longer * sorted_arcs, 0.0, 1.0)
    segment = (g_start**probes - g_end**probes) / longer  # = probes * integral of G^(probes-1)
    loads = np.empty(count, dtype=np.float64)
    loads[order] = np.cumsum(segment)
    return loads
