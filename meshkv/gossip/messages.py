"""The gossip protocol's messages: type ids, fields, validation, and their frames.

Every message is a frozen, slotted, keyword-only dataclass that validates on construction.
Frames go through `meshkv.wire.FrameCodec` (protocol GOSSIP, `VERSION`); `decode_message`
turns any defect (unknown type, missing or mistyped field, out-of-range value, too many items)
into `ProtocolError`, whose ``reason`` the receiver counts before dropping the frame.

Member updates (see `updates`) travel as the encoded blobs their first sender made, in the
``updates`` lists of probes and gossip. Full member records travel in ``records`` lists
(push-pull, state replies), each carrying the member's latest Alive blob.

This module knows nothing of timers, sockets or what a receiver does with a message.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from meshkv.errors import ProtocolError, UsageError
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.member import (
    MAX_INCARNATION,
    MemberState,
    MetaValue,
    check_address,
    check_int,
    check_meta,
    check_name,
)
from meshkv.gossip.updates import (
    Alive,
    Dead,
    Suspect,
    Update,
    UpdateCache,
    check_identity,
    trusted,
    update_from_packed,
)
from meshkv.wire import AuthPolicy, FrameCodec, Protocol, require

VERSION = 1
# Protocol version history (bump on any change a peer of the previous version would misread):
#   1: Ping, Ack, PingReq, Nack, Gossip, PushPull, StateQuery, StateReply; each update a bin
#      blob holding its msgpack array.

MAX_SEQ = 2**32 - 1
MAX_UPDATES_PER_FRAME = 256
MAX_RECORDS_PER_FRAME = 1024
MAX_STATE_PARTS = 4096


class MessageType(enum.IntEnum):
    """Message type ids on the wire. Append only; never renumber."""

    PING = 1
    ACK = 2
    PING_REQ = 3
    NACK = 4
    GOSSIP = 5
    PUSH_PULL = 6
    STATE_QUERY = 7
    STATE_REPLY = 8


def gossip_codec(config: GossipConfig, auth: AuthPolicy | None = None) -> FrameCodec:
    """The codec every gossip member and client uses: this version, frames <= max_packet_bytes."""
    return FrameCodec(Protocol.GOSSIP, VERSION, max_frame_bytes=config.max_packet_bytes, auth=auth)


def wire_bytes(item: list[Any]) -> int:
    """Encoded size of one record array."""
    return len(msgpack.packb(item, use_bin_type=True))


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberRecord:
    """One member's full record as a member holds it (push-pull and state replies).

    On the wire it is ``[state, incarnation, alive]``, where ``alive`` is the bytes of the
    member's latest Alive update exactly as gossip relays them: a receiver that has seen that
    update already recognises it (`UpdateCache`) instead of decoding and validating it again.
    """

    name: str
    nonce: int
    address: str
    incarnation: int
    state: MemberState
    meta: Mapping[str, MetaValue]
    _alive: Alive | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_identity(self.name, self.nonce, self.incarnation)
        check_address(self.address)
        if not isinstance(self.state, MemberState):
            raise UsageError("state must be a MemberState")
        check_meta(self.meta if type(self.meta) is dict else dict(self.meta))

    def alive(self) -> Alive:
        """The Alive update that carries this member's address and metadata."""
        if self._alive is None:
            alive = Alive(name=self.name, nonce=self.nonce, incarnation=self.incarnation,
                          address=self.address, meta=self.meta)  # fmt: skip
            object.__setattr__(self, "_alive", alive)
        return self._alive  # type: ignore[return-value]

    def to_wire(self) -> list[Any]:
        return [int(self.state), self.incarnation, self.alive().packed()]

    def wire_size(self) -> int:
        """Encoded size in a ``records`` list (at most)."""
        return len(self.alive().packed()) + _RECORD_OVERHEAD_BYTES

    @classmethod
    def from_wire(cls, item: object, cache: UpdateCache | None = None) -> MemberRecord:
        """Builds a record from its array form; raises UsageError on any defect."""
        if type(item) is not list or len(item) != 3:
            raise UsageError("member record is not an array of 3")
        state, incarnation, blob = item
        if type(state) is not int or not 0 <= state <= 3:
            raise UsageError(f"member state {state!r} is unknown")
        check_int("incarnation", incarnation, MAX_INCARNATION)
        alive = cache.build(blob) if cache is not None else update_from_packed(blob)
        if not isinstance(alive, Alive) or alive.incarnation > incarnation:
            raise UsageError("a member record must carry an Alive no newer than the record")
        if state == MemberState.ALIVE and alive.incarnation != incarnation:
            raise UsageError("an alive record must carry the Alive of its incarnation")
        return trusted(cls, name=alive.name, nonce=alive.nonce, address=alive.address,
                       incarnation=incarnation, state=MemberState(state), meta=alive.meta,
                       _alive=alive)  # fmt: skip


_RECORD_OVERHEAD_BYTES = 16  # array header, state, incarnation, bin header


def _check_items(what: str, items: object, kind: type | tuple[type, ...], bound: int) -> None:
    if not isinstance(items, tuple) or len(items) > bound:
        raise UsageError(f"{what} must be a tuple of <= {bound} items")
    if not all(isinstance(item, kind) for item in items):
        raise UsageError(f"{what} has an item of the wrong type")


def _updates_from(fields: dict[str, Any], cache: UpdateCache | None) -> tuple[Update, ...]:
    raw = require(fields, "updates", list)
    if len(raw) > MAX_UPDATES_PER_FRAME:
        raise ProtocolError("too_many", f"{len(raw)} updates")

    if cache is None:
        return tuple(update_from_packed(blob) for blob in raw)
    return cache.build_all(raw)


def _records_from(fields: dict[str, Any], cache: UpdateCache | None) -> tuple[MemberRecord, ...]:
    raw = require(fields, "records", list)
    if len(raw) > MAX_RECORDS_PER_FRAME:
        raise ProtocolError("too_many", f"{len(raw)} records")
    return tuple(MemberRecord.from_wire(item, cache) for item in raw)


# --------------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    """Are you alive? Sent to ``target``; the ack goes to ``source_address``."""

    seq: int
    target: str
    source: str
    source_address: str
    updates: tuple[Update, ...] = ()

    TYPE: ClassVar[MessageType] = MessageType.PING

    def __post_init__(self) -> None:
        check_int("seq", self.seq, MAX_SEQ)
        check_name(self.target)
        check_name(self.source)
        check_address(self.source_address)
        _check_items("updates", self.updates, (Alive, Suspect, Dead), MAX_UPDATES_PER_FRAME)

    def to_fields(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "target": self.target,
            "src": self.source,
            "src_addr": self.source_address,
            "updates": [u.packed() for u in self.updates],
        }

    @classmethod
    def from_fields(cls, fields: dict[str, Any], cache: UpdateCache | None = None) -> Ping:
        return cls(
            seq=require(fields, "seq", int),
            target=require(fields, "target", str),
            source=require(fields, "src", str),
            source_address=require(fields, "src_addr", str),
            updates=_updates_from(fields, cache),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    """Answer to the ping (or forwarded indirect ping) numbered ``seq``."""

    seq: int
    source: str
    updates: tuple[Update, ...] = ()

    TYPE: ClassVar[MessageType] = MessageType.ACK

    def __post_init__(self) -> None:
        check_int("seq", self.seq, MAX_SEQ)
        check_name(self.source)
        _check_items("updates", self.updates, (Alive, Suspect, Dead), MAX_UPDATES_PER_FRAME)

    def to_fields(self) -> dict[str, Any]:
        return {"seq": self.seq, "src": self.source, "updates": [u.packed() for u in self.updates]}

    @classmethod
    def from_fields(cls, fields: dict[str, Any], cache: UpdateCache | None = None) -> Ack:
        return cls(
            seq=require(fields, "seq", int),
            source=require(fields, "src", str),
            updates=_updates_from(fields, cache),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PingReq:
    """Please ping ``target`` for me and forward its ack (as ``seq``) to ``source_address``."""

    seq: int
    target: str
    target_address: str
    source: str
    source_address: str
    updates: tuple[Update, ...] = ()

    TYPE: ClassVar[MessageType] = MessageType.PING_REQ

    def __post_init__(self) -> None:
        check_int("seq", self.seq, MAX_SEQ)
        check_name(self.target)
        check_address(self.target_address)
        check_name(self.source)
        check_address(self.source_address)
        _check_items("updates", self.updates, (Alive, Suspect, Dead), MAX_UPDATES_PER_FRAME)

    def to_fields(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "target": self.target,
            "target_addr": self.target_address,
            "src": self.source,
            "src_addr": self.source_address,
            "updates": [u.packed() for u in self.updates],
        }

    @classmethod
    def from_fields(cls, fields: dict[str, Any], cache: UpdateCache | None = None) -> PingReq:
        return cls(
            seq=require(fields, "seq", int),
            target=require(fields, "target", str),
            target_address=require(fields, "target_addr", str),
            source=require(fields, "src", str),
            source_address=require(fields, "src_addr", str),
            updates=_updates_from(fields, cache),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Nack:
    """The relay of indirect probe ``seq`` got no ack in time: the relay itself is healthy."""

    seq: int
    source: str

    TYPE: ClassVar[MessageType] = MessageType.NACK

    def __post_init__(self) -> None:
        check_int("seq", self.seq, MAX_SEQ)
        check_name(self.source)

    def to_fields(self) -> dict[str, Any]:
        return {"seq": self.seq, "src": self.source}

    @classmethod
    def from_fields(cls, fields: dict[str, Any], cache: UpdateCache | None = None) -> Nack:
        return cls(seq=require(fields, "seq", int), source=require(fields, "src", str))


@dataclass(frozen=True, slots=True, kw_only=True)
class Gossip:
    """Updates only, fanned out while there is news; no answer expected."""

    source: str
    updates: tuple[Update, ...]

    TYPE: ClassVar[MessageType] = MessageType.GOSSIP

    def __post_init__(self) -> None:
        check_name(self.source)
        _check_items("updates", self.updates, (Alive, Suspect, Dead), MAX_UPDATES_PER_FRAME)

    def to_fields(self) -> dict[str, Any]:
        return {"src": self.source, "updates": [u.packed() for u in self.updates]}

    @classmethod
    def from_fields(cls, fields: dict[str, Any], cache: UpdateCache | None = None) -> Gossip:
        return cls(source=require(fields, "src", str), updates=_updates_from(fields, cache))


@dataclass(frozen=True, slots=True, kw_only=True)
class PushPull:
    """Part of a member table; with ``reply_wanted`` the receiver answers with its whole table.

    A table is split into as many frames as it needs; each part merges on its own.
    """

    source: str
    source_address: str
    reply_wanted: bool
    records: tuple[MemberRecord, ...]

    TYPE: ClassVar[MessageType] = MessageType.PUSH_PULL

    def __post_init__(self) -> None:
        check_name(self.source)
        check_address(self.source_address)
        if not isinstance(self.reply_wanted, bool):
            raise UsageError("reply_wanted must be a bool")
        _check_items("records", self.records, MemberRecord, MAX_RECORDS_PER_FRAME)

    def to_fields(self) -> dict[str, Any]:
        return {
            "src": self.source,
            "src_addr": self.source_address,
            "reply": self.reply_wanted,
            "records": [r.to_wire() for r in self.records],
        }

    @classmethod
    def from_fields(cls, fields: dict[str, Any], cache: UpdateCache | None = None) -> PushPull:
        return cls(
            source=require(fields, "src", str),
            source_address=require(fields, "src_addr", str),
            reply_wanted=require(fields, "reply", bool),
            records=_records_from(fields, cache),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StateQuery:
    """A client (e.g. the CLI) asks a member for its member table."""

    query_id: int

    TYPE: ClassVar[MessageType] = MessageType.STATE_QUERY

    def __post_init__(self) -> None:
        check_int("query_id", self.query_id, MAX_SEQ)

    def to_fields(self) -> dict[str, Any]:
        return {"query_id": self.query_id}

    @classmethod
    def from_fields(cls, fields: dict[str, Any], cache: UpdateCache | None = None) -> StateQuery:
        return cls(query_id=require(fields, "query_id", int))


@dataclass(frozen=True, slots=True, kw_only=True)
class StateReply:
    """Part ``part`` of ``parts`` of the answering member's table, for query ``query_id``."""

    query_id: int
    part: int
    parts: int
    records: tuple[MemberRecord, ...]

    TYPE: ClassVar[MessageType] = MessageType.STATE_REPLY

    def __post_init__(self) -> None:
        check_int("query_id", self.query_id, MAX_SEQ)
        check_int("parts", self.parts, MAX_STATE_PARTS)
        check_int("part", self.part, MAX_STATE_PARTS)
        if not 0 <= self.part < self.parts:
            raise UsageError(f"part {self.part} is not in 0..{self.parts - 1}")
        _check_items("records", self.records, MemberRecord, MAX_RECORDS_PER_FRAME)

    def to_fields(self) -> dict[str, Any]:
        return {
            "query_id": self.query_id,
            "part": self.part,
            "parts": self.parts,
            "records": [r.to_wire() for r in self.records],
        }

    @classmethod
    def from_fields(cls, fields: dict[str, Any], cache: UpdateCache | None = None) -> StateReply:
        return cls(
            query_id=require(fields, "query_id", int),
            part=require(fields, "part", int),
            parts=require(fields, "parts", int),
            records=_records_from(fields, cache),
        )


Message = Ping | Ack | PingReq | Nack | Gossip | PushPull | StateQuery | StateReply

_BY_TYPE: dict[int, Any] = {
    cls.TYPE: cls for cls in (Ping, Ack, PingReq, Nack, Gossip, PushPull, StateQuery, StateReply)
}


def encode_message(codec: FrameCodec, message: Message) -> bytes:
    """The frame for ``message``; UsageError if it exceeds the codec's size bound."""
    return codec.encode(message.TYPE, message.to_fields())


def decode_message(codec: FrameCodec, frame: bytes, cache: UpdateCache | None = None) -> Message:
    """The message in ``frame``; ProtocolError (with a counter reason) on any defect.

    ``cache`` (optional) is the receiver's memory of validated updates (see `UpdateCache`)."""
    message_type, fields = codec.decode(frame)
    cls = _BY_TYPE.get(message_type)
    if cls is None:
        raise ProtocolError("unknown_type", str(message_type))
    try:
        return cls.from_fields(fields, cache)
    except UsageError as exc:
        raise ProtocolError("malformed", str(exc)) from None
