"""What every step of a member's read shares: who it is, what it knows, how it hedges.

`Readers` bundles the member's membership, store and holder directory with its hedging state
and replica count, so `meshkv.node.locate` (who holds the keys) and `meshkv.node.fetch` (move
them here) rank candidates the same way: a key's preference list (``replicas`` copies, the
home first, then its pointer host), the live holder this member's directory names in place of
this member, and members just found silent last (`meshkv.node.hedging`).

This module knows membership, the store's and directory's read side and the placement rule;
not sockets, threads or messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshkv.dataplane.directory import HolderDirectory
from meshkv.node.hedged_calls import HedgeState
from meshkv.node.membership import Membership
from meshkv.store import ChunkStore


@dataclass(frozen=True, slots=True, kw_only=True)
class Readers:
    """What every step of a read shares."""

    membership: Membership
    store: ChunkStore
    directory: HolderDirectory
    hedge: HedgeState
    replicas: int  # copies on each key's preference list (`mesh_replicas`)

    def pointer_host(self, key: bytes) -> str | None:
        """The member after ``key``'s replicas: it holds a pointer to the producer's copy
        (`meshkv.ring.placement`), not the bytes."""
        names = self.membership.ring().current.preference_list(key, self.replicas + 1)
        return names[self.replicas] if len(names) > self.replicas else None

    def others(self, key: bytes, names: Sequence[str]) -> list[str]:
        """``names`` without this member (which lacks ``key``): in its place the live holder
        its directory names, if any; the avoided ones last."""
        me, membership = self.membership.me.name, self.membership
        if me in names:
            holder = self.directory.holder_of(key)
            pointed = [holder] if holder is not None and membership.is_alive(holder) else []
            names = [*pointed, *(n for n in names if n not in (me, holder))]
        return self.hedge.order(names)
