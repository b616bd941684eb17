"""Frames on their way to the driver: encoding, piggybacked updates, tables split into frames.

`Outbox` turns messages into frames (counting each in the member's stats), fills every probe and
gossip packet with the least-sent queued updates that fit the frame bound, and splits member
tables into as many push-pull or state-reply frames as they need.

This module knows nothing of timers, member states or why a message is sent.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from meshkv.gossip import antientropy
from meshkv.gossip.broadcast import BroadcastQueue, retransmit_limit
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.events import Outgoing
from meshkv.gossip.messages import (
    MAX_SEQ,
    Ack,
    Gossip,
    MemberRecord,
    Message,
    MessageType,
    Ping,
    PingReq,
    PushPull,
    StateReply,
    encode_message,
    wire_bytes,
)
from meshkv.gossip.updates import Update, packed_bytes
from meshkv.wire import AUTH_TRAILER_BYTES, FrameCodec

_HEADER_BYTES = 5
_LIST_HEADER_BYTES = 5  # msgpack array header of an updates or records list, worst case
_INT_GROWTH_BYTES = 16  # room for integer fields that encode longer than in the size probe
_TX_KEYS = {kind: f"tx_{kind.name.lower()}" for kind in MessageType}

Piggybacked = Ping | Ack | PingReq | Gossip


class Outbox:
    """The frames one member has produced since its driver last took them."""

    def __init__(
        self, config: GossipConfig, codec: FrameCodec, stats: collections.Counter[str]
    ) -> None:
        self.config = config
        self.queue = BroadcastQueue(config.max_broadcast_queue)
        self._codec = codec
        self._stats = stats
        self._frames: list[Outgoing] = []
        self._overhead = _HEADER_BYTES + (AUTH_TRAILER_BYTES if codec.auth.enabled else 0)

    def take(self) -> list[Outgoing]:
        frames, self._frames = self._frames, []
        return frames

    def enqueue(self, update: Update) -> None:
        """Queues ``update``'s bytes for piggybacking (replacing any about the same member)."""
        self.queue.put(update.name, update.packed(), packed_bytes(update))

    def send(self, address: str, message: Message) -> None:
        self._emit(Outgoing(address, encode_message(self._codec, message)), message.TYPE)

    def send_with_updates(
        self,
        address: str,
        message: Piggybacked,
        first: Update | None = None,
        *,
        n_members: int,
        require_updates: bool = False,
    ) -> bool:
        """Sends ``message`` with ``first`` and as many queued updates as fit; False (and
        nothing sent) if no update fit and ``require_updates``."""
        fields = message.to_fields()  # validated once, without updates
        base = wire_bytes([int(message.TYPE), fields]) + self._overhead
        budget = self.config.max_packet_bytes - base - _LIST_HEADER_BYTES
        blobs: list[bytes] = []
        if first is not None:
            blobs.append(first.packed())
            budget -= packed_bytes(first)
        wanted = self.config.max_piggyback - len(blobs)
        if wanted > 0 and budget > 0:
            limit = retransmit_limit(self.config.retransmit_mult, n_members)
            blobs += self.queue.take(budget, wanted, limit)
        if require_updates and not blobs:
            return False
        fields["updates"] = blobs
        self._emit(Outgoing(address, self._codec.encode(message.TYPE, fields)), message.TYPE)
        return True

    def send_table(
        self,
        address: str,
        records: Sequence[MemberRecord],
        *,
        source: str,
        source_address: str,
        reply_wanted: bool,
    ) -> None:
        """Sends a member table as push-pull parts; only the last part asks for a reply."""
        empty = PushPull(source=source, source_address=source_address, reply_wanted=True,
                         records=())  # fmt: skip
        parts = antientropy.split_records(records, self._records_budget(empty))
        for index, part in enumerate(parts):
            message = PushPull(
                source=source,
                source_address=source_address,
                reply_wanted=reply_wanted and index == len(parts) - 1,
                records=tuple(part),
            )
            self.send(address, message)

    def send_state(self, reply_to: object, query_id: int, records: Sequence[MemberRecord]) -> None:
        """Answers a state query with the table in numbered parts, on ``reply_to``."""
        empty = StateReply(query_id=MAX_SEQ, part=0, parts=1, records=())
        parts = antientropy.split_records(records, self._records_budget(empty))
        for index, part in enumerate(parts):
            reply = StateReply(query_id=query_id, part=index, parts=len(parts), records=tuple(part))
            frame = encode_message(self._codec, reply)
            self._emit(Outgoing(None, frame, reply_to), reply.TYPE)

    def _records_budget(self, empty: PushPull | StateReply) -> int:
        """Bytes left for records in a frame like ``empty``."""
        base = wire_bytes([int(empty.TYPE), empty.to_fields()]) + self._overhead
        return self.config.max_packet_bytes - base - _LIST_HEADER_BYTES - _INT_GROWTH_BYTES

    def _emit(self, outgoing: Outgoing, message_type: MessageType) -> None:
        self._frames.append(outgoing)
        self._stats["tx"] += 1
        self._stats[_TX_KEYS[message_type]] += 1
