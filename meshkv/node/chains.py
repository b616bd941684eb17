"""Telling a prompt's first home which keys of its chain this member holds (producer's side).

When the connector saves a prompt, in one slice or in the slices of a chunked prefill, each
slice is a `ChainSlice`: the prompt's first key (its *head*) and the position of the slice's
first key in the prompt. After `MeshNode.put` stored them, `announce` sends ``CHAIN_AT`` to
the head's ``replicas`` first members (its home, then the members a hedged lookup asks next;
it records it here where this member is one of them), so that one member can answer a lookup
of the whole prompt (`meshkv.dataplane.chain_index`). One-way and never
blocking: a lost announcement costs lookups a second round trip, nothing else.

This module knows the ring, the chain index and the data-plane client; not vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshkv.dataplane import messages as m
from meshkv.dataplane.client import RequestClient
from meshkv.dataplane.directory import HolderDirectory
from meshkv.node.membership import Membership


@dataclass(frozen=True, slots=True)
class ChainSlice:
    """``count`` consecutive keys of a put are positions ``start``.. of the chain ``head``."""

    head: bytes
    start: int
    count: int


def announce(
    keys: Sequence[bytes],
    slices: Sequence[ChainSlice],
    stored: set[bytes],
    *,
    membership: Membership,
    directory: HolderDirectory,
    client: RequestClient,
    replicas: int = 1,
) -> int:
    """Announces each slice's leading stored keys (``keys`` as put, cut into ``slices`` in
    order) to its head's first ``replicas`` members; returns how many announcements went out
    or were recorded."""
    me = membership.me.name
    ring = membership.ring()
    announced = 0
    offset = 0
    for piece in slices:
        run = list(keys[offset : offset + piece.count])
        offset += piece.count
        leading = next((i for i, key in enumerate(run) if key not in stored), len(run))
        run = run[:leading]
        if not run or piece.start + len(run) > m.MAX_KEYS:
            continue
        names = ring.current.preference_list(piece.head, replicas) or [me]
        for name in names:
            if name == me:
                announced += directory.chains.record(piece.head, piece.start, run, me) > 0
                continue
            peer = membership.peer(name)
            notice = m.ChainAt(
                req=client.next_id(), epoch=ring.epoch, head=piece.head, start=piece.start,
                keys=run, holder=me,
            )  # fmt: skip
            if peer is not None and client.send_only(peer.data_address, notice):
                announced += 1
    return announced
