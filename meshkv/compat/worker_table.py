"""LMCache's view of workers, derived from the gossip member table.

LMCache workers register with the controller and send it heartbeats; meshkv members do neither:
they gossip, and the shim is one more member that listens. A *worker* here is an engine member
(role ``engine``, a data-plane address, a name ``instance_id/rank``); its ``worker_id`` is the
rank. It is listed while gossip holds it alive or suspect, and leaves the listing when it is
declared dead or leaves.

Times are wall-clock seconds, like LMCache's:
- ``registration_time``: when this shim first heard of the worker's current boot (a restarted
  shim learns every live worker anew, so this is never older than the shim).
- ``last_heartbeat_time``: the last time this shim's member table held the worker alive: now,
  while it is alive; the moment it was suspected, while it is suspect.

This module knows nothing of sockets, HTTP or how the member table is obtained.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from meshkv.gossip.events import EventKind, MemberEvent
from meshkv.gossip.member import MemberState, MemberView
from meshkv.member_meta import ROLE_ENGINE, admin_port_of, chunk_count_of, namespace_of
from meshkv.node.membership import peer_of

LISTED_STATES = (MemberState.ALIVE, MemberState.SUSPECT)
HEALTH_OK = 0
HEALTH_WORKER_ERROR = -1001
"""LMCache's code for a worker that did not answer; here: suspected or declared dead."""
TRACKED_BOOTS_MAX = 16384
"""Boots whose first-seen time is kept (as many as gossip tracks members)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Worker:
    """One engine worker as the shim sees it."""

    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str
    registration_time: float
    last_heartbeat_time: float
    state: MemberState
    namespace: str
    key_count: int | None

    def worker_info(self) -> dict[str, Any]:
        """LMCache's ``WorkerInfo`` fields."""
        return {
            "instance_id": self.instance_id,
            "worker_id": self.worker_id,
            "ip": self.ip,
            "port": self.port,
            "peer_init_url": self.peer_init_url,
            "registration_time": self.registration_time,
            "last_heartbeat_time": self.last_heartbeat_time,
        }


def split_name(name: str) -> tuple[str, int] | None:
    """``"instance/rank"`` -> (instance, rank); None for names of another form."""
    instance, sep, rank = name.rpartition("/")
    if not sep or not instance or not (rank.isascii() and rank.isdigit()):  # isdigit: "²" too
        return None
    return instance, int(rank)


def is_engine(view: MemberView) -> bool:
    peer = peer_of(view)
    return peer is not None and peer.role == ROLE_ENGINE and split_name(view.name) is not None


class WorkerTable:
    """First-seen and last-alive times of engine boots, fed by gossip events; thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._first_seen: dict[tuple[str, int], float] = {}
        self._alive_until: dict[tuple[str, int], float] = {}

    def on_event(self, event: MemberEvent) -> None:
        """Gossip callback (on the gossip thread): records when boots appear and stop being
        alive."""
        view = event.member
        boot = (view.name, view.nonce)
        now = self._clock()
        with self._lock:
            if view.state in LISTED_STATES and len(self._first_seen) < TRACKED_BOOTS_MAX:
                self._first_seen.setdefault(boot, now)
            if event.kind in (EventKind.SUSPECT, EventKind.DEAD, EventKind.LEFT):
                self._alive_until.setdefault(boot, now)
            elif event.kind in (EventKind.ALIVE, EventKind.JOINED):
                self._alive_until.pop(boot, None)

    def workers(self, views: Iterable[MemberView]) -> list[Worker]:
        """Listed workers, sorted by (instance, rank); forgets boots no longer in ``views``."""
        now = self._clock()
        views = list(views)
        present = {(v.name, v.nonce) for v in views}
        listed: list[Worker] = []
        with self._lock:
            for boot in [b for b in self._first_seen if b not in present]:
                del self._first_seen[boot]
                self._alive_until.pop(boot, None)
            for view in views:
                if view.state in LISTED_STATES and is_engine(view):
                    listed.append(self._worker(view, now))
        return sorted(listed, key=lambda w: (w.instance_id, w.worker_id))

    def _worker(self, view: MemberView, now: float) -> Worker:
        boot = (view.name, view.nonce)
        first_seen = self._first_seen.setdefault(boot, now)
        alive_until = now if view.state is MemberState.ALIVE else self._alive_until.get(boot, now)
        instance_id, rank = split_name(view.name) or (view.name, 0)
        host, _, data_port = str(view.meta["data"]).rpartition(":")
        # LMCache's `port` is the worker's lmcache_worker_ports port; a member serving none
        # is reached at its data-plane port
        port = admin_port_of(view.meta) or (
            int(data_port) if data_port.isascii() and data_port.isdigit() else 0
        )
        return Worker(
            instance_id=instance_id,
            worker_id=rank,
            ip=host,
            port=port,
            peer_init_url=view.address,
            registration_time=first_seen,
            last_heartbeat_time=alive_until,
            state=view.state,
            namespace=namespace_of(view.meta) or "",
            key_count=chunk_count_of(view.meta),
        )


def health_codes(views: Iterable[MemberView], instance_id: str) -> dict[int, int]:
    """LMCache's ``/health`` answer for one instance: worker id -> 0 (alive) or -1001
    (suspected or declared dead). Workers that left gracefully are not listed."""
    codes: dict[int, int] = {}
    for view in views:
        parts = split_name(view.name)
        if parts is None or parts[0] != instance_id or not is_engine(view):
            continue
        if view.state is MemberState.LEFT:
            continue
        codes[parts[1]] = HEALTH_OK if view.state is MemberState.ALIVE else HEALTH_WORKER_ERROR
    return dict(sorted(codes.items()))
