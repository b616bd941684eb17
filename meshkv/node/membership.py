"""Who is in this member's ring, and how to reach them: gossip events in, a ring view out.

A member's gossip metadata (its schema is `meshkv.member_meta`) says which namespace it serves
(a namespace label, or ``"*"`` for a storage-only member that serves every namespace), its role
and its data-plane address. The ring of a namespace is its live members (alive or suspected)
plus storage-only members; the shim (role ``seed``) and dead or departed members are on no ring.

`Membership` is fed member events by the gossip thread and read by the data-plane threads, so
its state sits behind one lock; the ring it returns is immutable. Each event it is fed returns
the `PeerChange` it made: peers that died, left or restarted (so transfer handles and sockets
to them are dropped) and members that joined or came back with a new boot (so the chunks whose
home they now are can be pointed out to them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshkv.gossip.events import EventKind, MemberEvent
from meshkv.gossip.member import MemberState, MemberView
from meshkv.member_meta import (
    ANY_NAMESPACE,
    ROLE_ENGINE,
    ROLE_SEED,
    ROLE_STORAGE,
    data_address_of,
    lookup_address_of,
    namespace_of,
    role_of,
)
from meshkv.ring.hashring import HashRing
from meshkv.ring.view import RingView

_ON_RING = (MemberState.ALIVE, MemberState.SUSPECT)


@dataclass(frozen=True, slots=True)
class Peer:
    """A member as the data plane needs it."""

    name: str
    nonce: int
    data_address: str
    namespace: str
    role: str
    gossip_address: str = ""
    """Where it gossips (its ``peer_init_url`` in LMCache's words); "" for this member."""
    lookup_address: str | None = None
    """Its lookup port (`meshkv.dataplane.stream`); None: lookups go to ``data_address``."""


@dataclass(frozen=True, slots=True)
class PeerChange:
    """What one gossip event changed among the live peers."""

    gone: str | None = None  # died, left or restarted: drop its transfer state
    lost_state: bool = False  # it left or restarted: whatever it held is gone
    joined: str | None = None  # joined, or came back with a new boot


def peer_of(view: MemberView) -> Peer | None:
    """The data-plane view of a gossip member, or None if it advertises no data plane."""
    data = data_address_of(view.meta)
    if data is None:
        return None
    return Peer(
        name=view.name,
        nonce=view.nonce,
        data_address=data,
        namespace=namespace_of(view.meta) or "",
        role=role_of(view.meta) or ROLE_ENGINE,
        gossip_address=view.address,
        lookup_address=lookup_address_of(view.meta),
    )


class Membership:
    """The ring view of one namespace, kept current from gossip events."""

    def __init__(
        self, *, me: Peer, vnodes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.me = me
        self._clock = clock
        self._lock = threading.Lock()
        self._live: dict[str, Peer] = {}
        self._on_ring = me.role != ROLE_SEED
        self._view = RingView([me.name] if self._on_ring else [], vnodes)
        self._changed_s = clock()

    def ring(self) -> RingView:
        with self._lock:
            return self._view

    def ring_unchanged_s(self) -> float:
        """Seconds since the ring's member set last changed (or since this member started)."""
        with self._lock:
            return self._clock() - self._changed_s

    def peer(self, name: str) -> Peer | None:
        """The live peer of that name (this member included), or None."""
        if name == self.me.name:
            return self.me
        with self._lock:
            return self._live.get(name)

    def is_alive(self, name: str) -> bool:
        return self.peer(name) is not None

    def peers(self) -> list[Peer]:
        with self._lock:
            return list(self._live.values())

    def seed_from(self, views: Iterable[MemberView]) -> None:
        """Adopts a full member table (at start, from the runner's snapshot)."""
        for view in views:
            if view.name != self.me.name:
                state_kind = EventKind.JOINED if view.state in _ON_RING else EventKind.DEAD
                self.on_event(MemberEvent(kind=state_kind, member=view))

    def on_event(self, event: MemberEvent) -> PeerChange:
        """Gossip callback (runs on the gossip thread; short and non-blocking); returns what
        the event changed among the live peers."""
        view = event.member
        if view.name == self.me.name:
            return PeerChange()
        gone: str | None = None
        lost_state = False  # the peer left or restarted: whatever it held is gone
        joined: str | None = None
        with self._lock:
            known = self._live.get(view.name)
            if event.kind in (EventKind.DEAD, EventKind.LEFT):
                if self._live.pop(view.name, None) is not None:
                    gone = view.name
                    lost_state = event.kind is EventKind.LEFT
            else:
                peer = peer_of(view)
                if peer is not None and view.state in _ON_RING:
                    if known is not None and known.nonce != peer.nonce:
                        gone, lost_state = view.name, True  # restarted: its state is void
                    if known is None or known.nonce != peer.nonce:
                        joined = view.name
                    self._live[view.name] = peer
            if self._view.update(self._ring_members()):
                self._changed_s = self._clock()
        return PeerChange(gone, lost_state, joined)

    def ring_of(self, namespace: str) -> HashRing:
        """The ring another namespace's members compute (a storage-only member serves them
        all, and needs their ring to tell a newcomer which chunks it is home for)."""
        with self._lock:
            if namespace == self.me.namespace:
                return self._view.current
            peers = list(self._live.values())
        names = [p.name for p in peers if _serves(p, namespace)]
        if self._on_ring and _serves(self.me, namespace):
            names.append(self.me.name)
        return HashRing(names, self._view.current.vnodes, probes=self._view.current.probes)

    def _ring_members(self) -> list[str]:
        names = [self.me.name] if self._on_ring else []
        for peer in self._live.values():
            if self.me.namespace == ANY_NAMESPACE:
                if peer.role == ROLE_STORAGE:
                    names.append(peer.name)
            elif _serves(peer, self.me.namespace):
                names.append(peer.name)
        return names


def _serves(peer: Peer, namespace: str) -> bool:
    """True if ``peer`` is on the ring of ``namespace``."""
    return peer.role != ROLE_SEED and peer.namespace in (namespace, ANY_NAMESPACE)
