"""Push-pull anti-entropy: how often full member tables are exchanged and how they are merged.

A table travels as several frames, each holding as many records as fit the frame bound; every
part merges on its own, so a lost part only delays what it carried. A remote record of a member
the remote holds DEAD is merged as a suspicion, not a death: the member then gets the chance to
refute, which is how the two sides of a healed partition accept each other again.

This module knows nothing of the network, timers or member tables.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from meshkv.gossip.member import MemberState
from meshkv.gossip.messages import MemberRecord
from meshkv.gossip.updates import Dead, Suspect, Update
from meshkv.wire import trusted

_SCALE_THRESHOLD_MEMBERS = 32


def push_pull_interval_s(base_s: float, n_members: int) -> float:
    """The push-pull interval grown with cluster size, so total full-state traffic stays flat:
    ``base`` up to 32 members, then ``base * (ceil(log2(N) - log2(32)) + 1)`` (memberlist)."""
    if n_members <= _SCALE_THRESHOLD_MEMBERS:
        return base_s
    multiplier = math.ceil(math.log2(n_members) - math.log2(_SCALE_THRESHOLD_MEMBERS)) + 1
    return base_s * multiplier


def split_records(records: Iterable[MemberRecord], budget_bytes: int) -> list[list[MemberRecord]]:
    """Groups records into parts whose encoded records fit ``budget_bytes`` each."""
    parts: list[list[MemberRecord]] = [[]]
    used = 0
    for record in records:
        size = record.wire_size()
        if parts[-1] and used + size > budget_bytes:
            parts.append([])
            used = 0
        parts[-1].append(record)
        used += size
    return parts


def updates_from_record(record: MemberRecord, source: str) -> list[Update]:
    """The updates that merge a remote ``record`` (sent by validated ``source``) locally."""
    name, nonce, incarnation = record.name, record.nonce, record.incarnation
    if record.state is MemberState.ALIVE:
        return [record.alive()]
    if record.state is MemberState.SUSPECT:
        suspect = trusted(Suspect, name=name, nonce=nonce, incarnation=incarnation, source=source)
        return [record.alive(), suspect]
    if record.state is MemberState.DEAD:
        return [trusted(Suspect, name=name, nonce=nonce, incarnation=incarnation, source=source)]
    left = trusted(Dead, name=name, nonce=nonce, incarnation=incarnation, source=source, left=True)
    return [left]
