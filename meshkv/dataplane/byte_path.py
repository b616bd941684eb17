"""Two byte paths, one contract: how chunk bytes travel between members.

A get and a put agree on the chunks in small messages; the bytes then travel one of two ways,
chosen by ``transfer_channel`` and the same at both ends:

- `NixlWrite` (``nixl``, the default): the side that has the bytes WRITEs them with NIXL into
  slots the other side reserved. A holder answers a get with an order to write
  (`WriteOrder`, posted and polled by the service driver) and replies once it completes; a
  producer asks the home to reserve slots, writes, then commits.
- `InlineBytes` (``tcp``, for hosts without NIXL/UCX): the bytes ride inline, as ZMQ frames
  after a `GetReply`'s or a `Put`'s own. A get asks for at most one frame's worth per reply.

Either way the receiver checks every chunk against its checksum before publishing it, so a
torn or corrupted transfer is a miss, never wrong KV.

This module knows the data-plane messages, the store's slots and the channel; not rings,
membership or threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from meshkv.dataplane import messages as m
from meshkv.dataplane.client import RequestClient
from meshkv.errors import ProtocolError
from meshkv.store import Region, SegmentPool, Slot
from meshkv.transfer import Channel, TcpChannel, WriteChannel


@dataclass(frozen=True, slots=True)
class WriteOrder:
    """A WRITE the service core wants posted: ``local[i]`` into the peer's ``remote[i]``.

    The driver posts it on the path's `writer`, polls it, and reports the outcome with
    `DataService.transfer_done(transfer, ...)`."""

    transfer: int
    peer: str
    local: list[Region]
    remote: list[m.SlotRef]


class BytePath(Protocol):
    """The contract both byte paths keep (see the module docstring)."""

    channel: Channel
    """The handshake half: what a hello carries, and peers' memory."""

    writer: WriteChannel | None
    """Posts the service's `WriteOrder`s; None for a path that never gives any."""

    reply_max_bytes: int | None
    """Requester side: the most chunk bytes one get reply may carry (inline), or None when the
    holder WRITEs into slots reserved here (the get then names them)."""

    def admit_get(self, get: m.Get, *, greeted: bool) -> None:
        """Holder side, before pinning anything: raises ProtocolError if this get cannot be
        served on this path (``greeted``: its sender has greeted this member, this boot)."""
        ...

    def serve_get(
        self, get: m.Get, slots: Sequence[Slot], regions: list[Region], *, transfer: int
    ) -> m.GetReply | WriteOrder:
        """Holder side: the reply now (bytes inline), or the write to post first."""
        ...

    def push(
        self,
        client: RequestClient,
        *,
        address: str,
        home: str,
        slots: Sequence[Slot],
        epoch: int,
        deadline_s: float,
    ) -> int:
        """Producer side: stores the pinned ``slots``' chunks at ``home``; how many it stored."""
        ...


class InlineBytes:
    """The tcp channel's path: bytes inline in data-plane messages."""

    writer: WriteChannel | None = None

    def __init__(self, channel: TcpChannel, pool: SegmentPool, *, reply_max_bytes: int) -> None:
        self.channel = channel
        self._pool = pool
        self.reply_max_bytes: int | None = reply_max_bytes

    def admit_get(self, get: m.Get, *, greeted: bool) -> None:
        return None  # the bytes go back on the socket the get came in on: nothing to know

    def serve_get(
        self, get: m.Get, slots: Sequence[Slot], regions: list[Region], *, transfer: int
    ) -> m.GetReply:
        """The reply carrying the pinned chunks' bytes (views: keep them pinned until sent)."""
        return m.GetReply(
            req=get.req,
            checksums=[slot.checksum for slot in slots],
            payloads=[memoryview(self._pool.view(region)) for region in regions],
        )

    def push(
        self,
        client: RequestClient,
        *,
        address: str,
        home: str,
        slots: Sequence[Slot],
        epoch: int,
        deadline_s: float,
    ) -> int:
        put = m.Put(
            req=client.next_id(),
            epoch=epoch,
            keys=[slot.key for slot in slots],
            chunk_bytes=slots[0].region.nbytes,
            checksums=[slot.checksum for slot in slots],
            payloads=[memoryview(self._pool.view(slot.region)) for slot in slots],  # pinned
        )
        reply = client.call(address, put, deadline_s)
        return reply.stored if isinstance(reply, m.PutReply) else 0


class NixlWrite:
    """The NIXL channel's path: the side with the bytes WRITEs them into reserved slots."""

    reply_max_bytes: int | None = None

    def __init__(self, channel: WriteChannel) -> None:
        self.channel: Channel = channel
        self.writer: WriteChannel | None = channel
        self._channel = channel

    def admit_get(self, get: m.Get, *, greeted: bool) -> None:
        if not greeted:  # whose slots would we write?
            raise ProtocolError("no_handshake", get.sender)
        if not get.dest:
            raise ProtocolError("malformed", "a get over NIXL names no destination slots")

    def serve_get(
        self, get: m.Get, slots: Sequence[Slot], regions: list[Region], *, transfer: int
    ) -> WriteOrder:
        return WriteOrder(transfer, get.sender, regions, list(get.dest[: len(slots)]))

    def push(
        self,
        client: RequestClient,
        *,
        address: str,
        home: str,
        slots: Sequence[Slot],
        epoch: int,
        deadline_s: float,
    ) -> int:
        """Reserve at the home, WRITE into the slots it chose, commit with checksums."""
        keys = [slot.key for slot in slots]
        put = m.Put(
            req=client.next_id(), epoch=epoch, keys=keys, chunk_bytes=slots[0].region.nbytes
        )
        reply = client.call(address, put, deadline_s)
        if not isinstance(reply, m.PutReply):
            return 0
        chosen = [(s, ref) for s, ref in zip(slots, reply.slots, strict=False) if ref]
        if not chosen or not self._channel.write(
            home, [s.region for s, _ in chosen], [ref for _, ref in chosen], deadline_s
        ):
            return 0
        commit = m.Commit(
            req=client.next_id(),
            keys=[s.key for s, _ in chosen],
            checksums=[s.checksum for s, _ in chosen],
        )
        done = client.call(address, commit, deadline_s)
        return done.stored if isinstance(done, m.CommitReply) else 0


def byte_path_for(channel: Channel, pool: SegmentPool, *, inline_reply_max_bytes: int) -> BytePath:
    """The path ``channel`` carries: inline for the tcp channel, NIXL WRITE for a channel that
    writes (the one place the channel's kind is asked)."""
    if isinstance(channel, TcpChannel):
        return InlineBytes(channel, pool, reply_max_bytes=inline_reply_max_bytes)
    return NixlWrite(channel)  # type: ignore[arg-type]  # every other channel writes
