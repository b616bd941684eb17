"""The consistent-hash ring: which member is home for a chunk, computed the same way everywhere.

A `HashRing` is an immutable value built from a set of member names. Every member owns `vnodes`
points on a 64-bit ring; a chunk key's position is the first 8 bytes of the key, big-endian.
Any process on any machine that knows the same member set computes the same points, the same
homes and the same `epoch`, with no coordination (no PYTHONHASHSEED, no randomness).

Definitions (part of the wire contract: changing any of them changes homes, so bump
`RING_SCHEME`, which enters the epoch):

- point ``i`` of member ``name`` (``0 <= i < vnodes``):
  ``mmh3.hash64(f"{name}#{i}".encode(), 0, signed=False)[0]``, the first 64-bit half of
  MurmurHash3_x64_128 of the UTF-8 text with seed 0. Equal points are ordered by member name.
- probes of a position ``p``: probe 0 is ``p``; probe ``j >= 1`` is
  ``fmix64(p XOR (j * 0x9E3779B97F4A7C15 mod 2**64))`` (`meshkv.ring.probes`).
- the home of ``p`` (multi-probe consistent hashing, Appleton & O'Reilly 2015): for each probe
  take its first point clockwise (the smallest point >= the probe, wrapping around) and keep the
  probe whose point is closest clockwise (ties: the lowest probe index); the home is that
  point's member. With ``probes=1`` this is the classic ring: the first member clockwise.

Why probes: with one probe a member's share is the sum of `vnodes` random arcs, so the busiest
of 64 members holds ~1 + 2.4/sqrt(vnodes) times the mean (1.15 at 256 vnodes, and 1024 vnodes
still miss 1.10 on some name sets). Keeping the closest of 4 probes caps the load of long arcs:
~1.05 at 256 vnodes (tools/bench_ring.py). Probing keeps the ring's key property: adding a
member only moves keys to it and removing one only moves its keys, because every other point,
and so every other probe's distance, stays where it was.

This module knows nothing of gossip, sockets, clocks or stores.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Iterable, Sequence

import numpy as np

from meshkv.errors import UsageError
from meshkv.keys import KEY_BYTES, POSITION_BYTES, ring_position
from meshkv.ring.points import SortedPoints, member_points
from meshkv.ring.probes import (
    MAX_PROBES,
    multi_probe_arc_loads,
    probe_positions,
    probe_positions_of,
)

RING_SCHEME = 1  # bump when the point, probe or home definition above changes
DEFAULT_VNODES = 256
DEFAULT_PROBES = 4
MAX_VNODES = 4096  # as config.mesh_vnodes allows
MAX_RING_POINTS = 1 << 24  # members x vnodes; 16M points is 192 MiB of ring arrays
SCALAR_HOMES_MAX = 2
"""`homes_of` computes up to this many distinct positions in plain ints (numpy's per-call
overhead is larger than the work below this)."""
PREFERENCE_WINDOW_MIN_POINTS = 64  # points scanned first for a preference list (then x4)

_MASK_64 = (1 << 64) - 1
_RING_SIZE = float(1 << 64)


def positions_of(keys: Sequence[bytes]) -> np.ndarray:
    """Ring positions (uint64) of 16-byte chunk keys: each key's first 8 bytes, big-endian."""
    if any(len(key) != KEY_BYTES for key in keys):
        raise UsageError(f"chunk keys must be {KEY_BYTES} bytes each")
    packed = np.frombuffer(b"".join(keys), dtype=">u8").reshape(len(keys), 2)
    return packed[:, 0].astype(np.uint64)


def _validate_members(members: Iterable[str]) -> tuple[str, ...]:
    names = set()
    for name in members:
        if not isinstance(name, str) or not name:
            raise UsageError(f"ring member names must be non-empty str, got {name!r}")
        names.add(name)
    return tuple(sorted(names))


def _epoch_of(members: tuple[str, ...], vnodes: int, probes: int) -> int:
    digest = hashlib.blake2b(digest_size=8, person=b"meshkv-ring")
    digest.update(f"{RING_SCHEME}:{vnodes}:{probes}:{len(members)}".encode())
    for name in members:
        encoded = name.encode()
        digest.update(len(encoded).to_bytes(4, "big") + encoded)
    return int.from_bytes(digest.digest(), "big")


class HashRing:
    """An immutable ring over `members`, `vnodes` points each, homes found with `probes` probes.

    All members of one mesh must use the same `vnodes` and `probes` (both enter `epoch`). An
    empty ring is allowed and has an epoch, but asking it for a home raises `UsageError`: the
    caller checks `members` first (there is nobody to ask). Rings over the same member set and
    parameters are equal (`==`, `hash`).
    """

    __slots__ = (
        "_epoch",
        "_members",
        "_owners",
        "_points",
        "_probes",
        "_vnodes",
        "_wrapped_owners",
    )

    def __init__(
        self,
        members: Iterable[str],
        vnodes: int = DEFAULT_VNODES,
        *,
        probes: int = DEFAULT_PROBES,
    ) -> None:
        if not 1 <= vnodes <= MAX_VNODES:
            raise UsageError(f"vnodes must be in 1..{MAX_VNODES}, got {vnodes}")
        if not 1 <= probes <= MAX_PROBES:
            raise UsageError(f"probes must be in 1..{MAX_PROBES}, got {probes}")
        self._members = _validate_members(members)
        if len(self._members) * vnodes > MAX_RING_POINTS:
            raise UsageError(
                f"{len(self._members)} members x {vnodes} vnodes exceeds {MAX_RING_POINTS} points"
            )
        self._vnodes = vnodes
        self._probes = probes
        self._epoch = _epoch_of(self._members, vnodes, probes)
        self._points: SortedPoints | None = None
        self._owners = np.empty(0, dtype=np.int32)
        self._wrapped_owners = self._owners
        if self._members:
            points = np.concatenate([member_points(name, vnodes) for name in self._members])
            owners = np.repeat(np.arange(len(self._members), dtype=np.int32), vnodes)
            order = np.argsort(points, kind="stable")  # equal points: lower member index first
            self._points = SortedPoints(points[order])
            self._owners = owners[order]
            # owners of `SortedPoints.wrapped`: index len(points) is the first point again
            self._wrapped_owners = np.append(self._owners, self._owners[0])
        self._owners.flags.writeable = False
        self._wrapped_owners.flags.writeable = False

    @property
    def members(self) -> tuple[str, ...]:
        """Member names, sorted; `homes` returns indexes into this tuple."""
        return self._members

    @property
    def vnodes(self) -> int:
        return self._vnodes

    @property
    def probes(self) -> int:
        return self._probes

    @property
    def epoch(self) -> int:
        """64-bit digest of the sorted member names, vnodes, probes and ring scheme."""
        return self._epoch

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HashRing):
            return NotImplemented
        return (self._members, self._vnodes, self._probes) == (
            other._members,
            other._vnodes,
            other._probes,
        )

    def __hash__(self) -> int:
        return hash((self._members, self._vnodes, self._probes))

    def __repr__(self) -> str:
        return (
            f"HashRing({len(self._members)} members, vnodes={self._vnodes}, "
            f"probes={self._probes}, epoch={self._epoch:016x})"
        )

    def _ring_points(self) -> SortedPoints:
        if self._points is None:
            raise UsageError("the ring has no members: check HashRing.members before a lookup")
        return self._points

    def homes(self, positions: np.ndarray) -> np.ndarray:
        """Home of each ring position (1-D uint64), as indexes into `members` (int32)."""
        points = self._ring_points()
        positions = np.ascontiguousarray(positions)
        if positions.dtype != np.uint64 or positions.ndim != 1:
            raise UsageError(
                f"positions must be a 1-D uint64 array, got {positions.dtype} {positions.shape}"
            )
        if self._probes == 1:
            return self._wrapped_owners[points.successors(positions)]
        probed = probe_positions(positions, self._probes)
        found = points.successors(probed.ravel()).reshape(probed.shape)
        distance = points.wrapped[found]
        distance -= probed  # uint64 wraps around: the clockwise distance
        best = distance.argmin(axis=0)
        return self._wrapped_owners[found[best, np.arange(positions.shape[0])]]

    def homes_of(self, keys: Sequence[bytes]) -> list[str]:
        """Home of each chunk key, computed once per distinct ring position (the keys of one
        home group share a position: `meshkv.keys`). Raises `UsageError` on an empty ring."""
        first_key: dict[bytes, bytes] = {}
        for key in keys:
            first_key.setdefault(key[:POSITION_BYTES], key)
        if len(first_key) <= SCALAR_HOMES_MAX:
            home_at = {position: self.home(key) for position, key in first_key.items()}
        else:
            indexes = self.homes(positions_of(list(first_key.values()))).tolist()
            home_at = {
                position: self._members[i] for position, i in zip(first_key, indexes, strict=True)
            }
        return [home_at[key[:POSITION_BYTES]] for key in keys]

    def _home_point(self, key: bytes) -> int:
        """Index of the point that owns one key (plain ints and `bisect`: cheaper than numpy
        for one key)."""
        points = self._ring_points()
        if len(key) != KEY_BYTES:
            raise UsageError(f"a chunk key is {KEY_BYTES} bytes, got {len(key)}")
        values = points.as_ints()
        count = len(values)
        best_index, best_distance = 0, _MASK_64 + 1
        for probe in probe_positions_of(ring_position(key), self._probes):
            index = bisect_left(values, probe)
            index = 0 if index == count else index
            distance = (values[index] - probe) & _MASK_64
            if distance < best_distance:
                best_index, best_distance = index, distance
        return best_index

    def home(self, key: bytes) -> str:
        """The member that is home for one chunk key. Raises `UsageError` on an empty ring."""
        return self._members[self._owners[self._home_point(key)]]

    def preference_list(self, key: bytes, n: int) -> list[str]:
        """The first `n` distinct members clockwise from the key's home point, home first.

        Fewer than `n` if the ring has fewer members; empty on an empty ring or if n <= 0.
        The points after the home are read in windows (one slice each, deduplicated as plain
        ints: numpy's fixed cost per call made a replica set cost 16-20 us this way).
        """
        if n <= 0 or not self._members:
            return []
        wanted = min(n, len(self._members))
        start = self._home_point(key)
        count = self._owners.shape[0]
        window = min(count, max(PREFERENCE_WINDOW_MIN_POINTS, 8 * wanted))
        while True:  # the window grows x4 up to the whole ring, which holds every member
            owners = self._owners[start : start + window].tolist()
            if start + window > count:  # the window wraps past the last point
                owners += self._owners[: start + window - count].tolist()
            found = list(dict.fromkeys(owners))  # distinct, in first-seen order
            if len(found) >= wanted or window == count:
                return [self._members[i] for i in found[:wanted]]
            window = min(count, window * 4)

    def preference_lists_of(self, keys: Sequence[bytes], n: int) -> list[list[str]]:
        """`preference_list` of each chunk key, computed once per distinct ring position (the
        keys of one home group share a position). Empty lists on an empty ring."""
        lists: dict[bytes, list[str]] = {}
        for key in keys:
            if key[:POSITION_BYTES] not in lists:
                lists[key[:POSITION_BYTES]] = self.preference_list(key, n)
        return [lists[key[:POSITION_BYTES]] for key in keys]

    def with_member(self, name: str) -> HashRing:
        """This ring plus `name`. Raises `UsageError` if `name` is already a member."""
        if name in self._members:
            raise UsageError(f"{name!r} is already a ring member")
        return HashRing((*self._members, name), self._vnodes, probes=self._probes)

    def without_member(self, name: str) -> HashRing:
        """This ring without `name`. Raises `UsageError` if `name` is not a member."""
        if name not in self._members:
            raise UsageError(f"{name!r} is not a ring member")
        rest = [member for member in self._members if member != name]
        return HashRing(rest, self._vnodes, probes=self._probes)

    def shares(self) -> dict[str, float]:
        """Expected fraction of uniformly random keys each member is home for (sums to 1).

        With one probe, each member's exact fraction of the ring; with more, the model of
        `meshkv.ring.probes.multi_probe_arc_loads`. Empty ring: {}.
        """
        if self._points is None:
            return {}
        if len(self._members) == 1:
            return {self._members[0]: 1.0}
        values = self._points.values
        arcs = (values - np.roll(values, 1)).astype(np.float64) / _RING_SIZE
        loads = arcs if self._probes == 1 else multi_probe_arc_loads(arcs, self._probes)
        totals = np.bincount(self._owners, weights=loads, minlength=len(self._members))
        totals /= totals.sum()
        return dict(zip(self._members, totals.tolist(), strict=True))
