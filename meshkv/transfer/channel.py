"""The transfer channel contract: how a member moves chunk bytes into a peer's store slots.

A `Channel` is the handshake half: this member's registered memory (the store's segments) as a
handshake describes it, and each peer's after one. Both channels implement it: NIXL (UCX WRITE,
the default) and tcp (no memory to describe: the data plane carries the bytes inline in its own
messages, `meshkv.dataplane.byte_path`).

A `WriteChannel` also moves bytes (NIXL only): it WRITEs local regions into a peer's slots, and
the caller polls the transfer until it completes, fails, or the caller's deadline passes, then
always `release`s the handle. A peer that died or froze is dropped with `remove_peer`, which
makes its in-flight transfers fail fast instead of hanging.

This module knows nothing of keys, rings or the data-plane protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from meshkv.store import Region

TransferState = Literal["done", "pending", "failed"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SegmentInfo:
    """One registered segment, as a handshake describes it to the peer that will write into it."""

    segment: int
    address: int
    nbytes: int


class SlotAddress(Protocol):
    """A slot in a peer's store: a segment id and an offset in it."""

    @property
    def segment(self) -> int: ...

    @property
    def offset(self) -> int: ...


class TransferHandle:
    """An in-flight batched WRITE to ``peer`` of ``nbytes`` bytes (channels subclass it)."""

    __slots__ = ("nbytes", "peer")

    def __init__(self, *, peer: str, nbytes: int) -> None:
        self.peer = peer
        self.nbytes = nbytes


class Channel(Protocol):
    """What a handshake exchanges, and the peers learnt from it."""

    kind: str
    """"nixl" or "tcp": both ends of a transfer must use the same kind."""

    def metadata(self) -> bytes:
        """What a peer needs to reach this member's memory (NIXL agent metadata)."""
        ...

    def segments(self) -> list[SegmentInfo]:
        """This member's registered segments, to send in a handshake."""
        ...

    def add_peer(self, name: str, metadata: bytes, segments: Sequence[SegmentInfo]) -> bool:
        """Learns a peer's memory; the same metadata again is a no-op; False if refused."""
        ...

    def remove_peer(self, name: str) -> None:
        """Forgets a peer; its in-flight transfers fail."""
        ...

    def close(self) -> None: ...


class WriteChannel(Channel, Protocol):
    """A channel that WRITEs local regions into peers' slots (batched, polled, with deadlines)."""

    def post_write(
        self, peer: str, local: Sequence[Region], remote: Sequence[SlotAddress]
    ) -> TransferHandle:
        """Starts one batched WRITE of ``local[i]`` into ``remote[i]``; raises TransportError."""
        ...

    def poll(self, handle: TransferHandle) -> TransferState:
        """Advances and checks a transfer; never waits."""
        ...

    def release(self, handle: TransferHandle, *, failed: bool) -> None:
        """Frees the handle once; ``failed``: the caller gave up (the peer may be frozen)."""
        ...

    def write(
        self, peer: str, local: Sequence[Region], remote: Sequence[SlotAddress], deadline_s: float
    ) -> bool:
        """Posts, polls until done or ``deadline_s`` (time.monotonic), releases; True if done."""
        ...
