"""What one member believes the ring is now, and what it was just before the last change.

DESIGN §4: every data-plane request carries the sender's epoch, and after a membership change a
miss at the new home falls back once to the previous home. `RingView` holds exactly the two rings
that this needs: `current` and `previous` (the ring replaced by the last change). A request is
served if its epoch is either one; a stale view costs a miss, never a wrong answer.

Pure: members in, rings out. This module knows nothing of gossip, sockets, threads or clocks;
the gossip driver calls `update` with the live member set whenever it changes.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshkv.ring.hashring import DEFAULT_PROBES, DEFAULT_VNODES, HashRing


class RingView:
    """The current ring and the one before the last membership change."""

    __slots__ = ("_current", "_previous")

    def __init__(
        self,
        members: Iterable[str] = (),
        vnodes: int = DEFAULT_VNODES,
        *,
        probes: int = DEFAULT_PROBES,
    ) -> None:
        self._current = HashRing(members, vnodes, probes=probes)
        self._previous: HashRing | None = None

    @property
    def current(self) -> HashRing:
        return self._current

    @property
    def previous(self) -> HashRing | None:
        """The ring before the last change; None until the member set first changes."""
        return self._previous

    @property
    def epoch(self) -> int:
        """The current ring's epoch."""
        return self._current.epoch

    def update(self, members: Iterable[str]) -> bool:
        """Adopt the live member set `members`; True if it differs from the current ring's.

        Gossip calls this on every member event, and almost all of them (refutations, metadata,
        suspicions cleared) leave the set as it was: those cost a set comparison, not a ring
        build (256 points per member).
        """
        names = set(members)
        if names == set(self._current.members):
            return False
        ring = HashRing(names, self._current.vnodes, probes=self._current.probes)
        self._previous = self._current
        self._current = ring
        return True

    def accepts_epoch(self, epoch: int) -> bool:
        """True if `epoch` is the current or the previous ring's epoch."""
        return epoch == self._current.epoch or (
            self._previous is not None and epoch == self._previous.epoch
        )

    def home(self, key: bytes) -> str:
        """The key's home on the current ring. Raises `UsageError` if the ring is empty."""
        return self._current.home(key)

    def fallback_home(self, key: bytes) -> str | None:
        """Where to look once after a miss at `home(key)`: the key's home on the previous ring.

        None when there is no previous ring (or it was empty), when the previous home is the
        current home (nothing moved), or when the previous home is no longer a member (it left
        or died: asking it can only time out). Raises `UsageError` if the current ring is empty.
        """
        home = self._current.home(key)
        if self._previous is None or not self._previous.members:
            return None
        previous_home = self._previous.home(key)
        if previous_home == home or previous_home not in self._current.members:
            return None
        return previous_home
