"""Failure detection bookkeeping: whom to probe next, the probe in flight, relayed probes.

- `ProbeOrder`: shuffled round robin over members, so every member is probed once per round
  and a new member is probed within one round (inserted at a random place in the current one).
- `ProbeRound`: the one probe this member has in flight (direct ping, then indirect pings).
- `RelayTable`: indirect pings this member performs for others, oldest first, bounded.

This module knows nothing of messages, member states or the network.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass


class ProbeOrder:
    """Shuffled round robin over member names."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._order: list[str] = []
        self._next = 0

    def add(self, name: str) -> None:
        """Puts a new member at a random place among those not yet probed this round."""
        places = len(self._order) - self._next + 1
        self._order.insert(self._next + int(self._rng.random() * places), name)

    def next(
        self, names: Callable[[], Iterable[str]], eligible: Callable[[str], bool]
    ) -> str | None:
        """The next eligible name; reshuffles ``names()`` when a round ends. None if none."""
        for _ in range(2):
            while self._next < len(self._order):
                name = self._order[self._next]
                self._next += 1
                if eligible(name):
                    return name
            self._order = [name for name in names() if eligible(name)]
            self._rng.shuffle(self._order)
            self._next = 0
        return None


@dataclass(slots=True, kw_only=True)
class ProbeRound:
    """The probe in flight: direct ping until ``direct_deadline_s``, indirect until ``end_s``."""

    target: str
    nonce: int
    seq: int
    direct_deadline_s: float
    end_s: float
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0

    def next_deadline_s(self) -> float:
        return self.end_s if self.indirect_sent else self.direct_deadline_s


@dataclass(frozen=True, slots=True)
class Relay:
    """An indirect ping this member sent for ``origin_address``'s probe ``origin_seq``."""

    origin_address: str
    origin_seq: int
    deadline_s: float


class RelayTable:
    """Relayed pings by our own sequence number; deadlines are in insertion order."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self._relays: OrderedDict[int, Relay] = OrderedDict()

    def __len__(self) -> int:
        return len(self._relays)

    def full(self) -> bool:
        return len(self._relays) >= self.max_pending

    def add(self, seq: int, relay: Relay) -> None:
        self._relays[seq] = relay

    def pop(self, seq: int) -> Relay | None:
        return self._relays.pop(seq, None)

    def next_deadline_s(self) -> float:
        return next(iter(self._relays.values())).deadline_s if self._relays else float("inf")

    def pop_expired(self, now_s: float) -> list[Relay]:
        expired = []
        while self._relays and next(iter(self._relays.values())).deadline_s <= now_s:
            expired.append(self._relays.popitem(last=False)[1])
        return expired
