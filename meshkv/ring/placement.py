"""Where the copies of chunks go, and who restores them after a death: placement, pure.

With ``replicas`` = r, a chunk's copies live on the first r distinct members of its preference
list (`HashRing.preference_list`); the member after them (position r) is its *pointer host*:
it holds no bytes, only a "held at the producer" pointer, so that a reader whose replicas are
all silent can still find the producer's own copy (with r = 1 the only fallback there is).

When a member dies, each chunk it held a copy of is re-pushed to its new preference list by
exactly one member: the first survivor of its old list (it holds a copy). So the chunk is
back at r copies without a flood of duplicate pushes. A member that restarted (a new boot,
same name: still on the ring, but empty) gets its copies back the same way. Joins need no
pushes (a newcomer is pointed at the holders) and a graceful leaver pushes its own chunks
before leaving.

A copy can end up away from its key's replicas: a producer's own copy, a copy a restore or a
read repair pushed to the placement of an older ring, or the copies of a member back from a
freeze while the others restored without it. After each membership change its holder points
the key's replicas and pointer host on the new ring at it (`stray_pointers`: ``HELD_AT``, no
bytes), so a reader whose replicas lack the key finds the copy through a lookup at its home
instead of missing it.

This module knows rings and keys; not stores, sockets or gossip.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshkv.ring.hashring import HashRing


def replica_targets(
    ring: HashRing, keys: Sequence[bytes], replicas: int, *, me: str
) -> dict[str, list[bytes]]:
    """Members other than ``me`` that should hold a copy of each key, with their keys."""
    targets: dict[str, list[bytes]] = {}
    if not ring.members:
        return targets
    for key, names in zip(keys, ring.preference_lists_of(keys, replicas), strict=True):
        for name in names:
            if name != me:
                targets.setdefault(name, []).append(key)
    return targets


def pointer_hosts(
    ring: HashRing, keys: Sequence[bytes], replicas: int, *, me: str
) -> dict[str, list[bytes]]:
    """Each key's pointer host (position ``replicas`` of its preference list) other than
    ``me``, with their keys; none on a ring of ``replicas`` members or fewer."""
    hosts: dict[str, list[bytes]] = {}
    if len(ring.members) <= replicas:
        return hosts
    for key, names in zip(keys, ring.preference_lists_of(keys, replicas + 1), strict=True):
        if names[replicas] != me:
            hosts.setdefault(names[replicas], []).append(key)
    return hosts


def to_restore(
    ring: HashRing, gone: str, keys: Sequence[bytes], replicas: int, *, me: str
) -> list[bytes]:
    """Which of ``keys`` (held by ``me``) ``me`` must re-push now that ``gone`` lost its
    copies (it left ``ring``, or is on it again with a new, empty boot): those ``gone`` was a
    replica of, whose first other replica is ``me``."""
    if not ring.members or ring.members == (gone,):
        return []
    before = ring if gone in ring.members else ring.with_member(gone)
    restore: list[bytes] = []
    for key, names in zip(keys, before.preference_lists_of(keys, replicas), strict=True):
        if gone in names:
            survivors = [name for name in names if name != gone]
            if survivors[:1] == [me]:
                restore.append(key)
    return restore


def stray_pointers(
    ring: HashRing, keys: Sequence[bytes], replicas: int, *, me: str
) -> dict[str, list[bytes]]:
    """For the ``keys`` ``me`` holds but is not a replica of on ``ring``: each key's replicas
    and pointer host (position ``replicas``), with the keys to point at ``me``."""
    targets: dict[str, list[bytes]] = {}
    if not ring.members:
        return targets
    for key, names in zip(keys, ring.preference_lists_of(keys, replicas + 1), strict=True):
        if me in names[:replicas]:
            continue
        for name in names:
            if name != me:
                targets.setdefault(name, []).append(key)
    return targets
