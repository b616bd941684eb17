"""The gossip protocol's messages: type ids, fields, validation, and their frames.

Every message is a `meshkv.wire.WireMessage`: its fields declared once (wire key, kind,
meaning), checked when built and when decoded. `MESSAGES` holds the version history and type
ids; `decode_message` turns any defect (unknown type, missing or mistyped field, out-of-range
value, too many items) into `ProtocolError`, whose ``reason`` the receiver counts before
dropping the frame.

Member updates (see `updates`) travel as the encoded blobs their first sender made, in the
``updates`` lists of probes and gossip. Full member records travel in ``records`` lists
(push-pull, state replies), each carrying the member's latest Alive blob.

This module knows nothing of timers, sockets or what a receiver does with a message.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import msgpack

from meshkv.errors import UsageError
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
    update_from_packed,
)
from meshkv.wire import (
    AuthPolicy,
    FieldKind,
    FrameCodec,
    InvalidField,
    MessageSet,
    Protocol,
    WireMessage,
    trusted,
    wire_field,
)
from meshkv.wire_fields import Checked, Flag, Items, UInt

VERSION_HISTORY = {
    1: "Ping, Ack, PingReq, Nack, Gossip, PushPull, StateQuery, StateReply; each update a bin "
    "blob holding its msgpack array.",
}
"""What each protocol version changed. Append on any change a peer of the previous version
would misread; never edit an entry."""

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


class _Updates(FieldKind):
    """Member updates as the encoded blobs their first sender made (see `updates`); decoding
    goes through the receiver's `UpdateCache` when it has one."""

    __slots__ = ()

    def check(self, name: str, value: Any) -> None:
        if type(value) is not tuple or len(value) > MAX_UPDATES_PER_FRAME:
            raise UsageError(f"{name} must be a tuple of <= {MAX_UPDATES_PER_FRAME} items")
        if not all(isinstance(item, (Alive, Suspect, Dead)) for item in value):
            raise UsageError(f"{name} has an item of the wrong type")

    def dump(self, value: Any) -> Any:
        return [u.packed() for u in value]

    def load(self, key: str, raw: Any, context: Any) -> Any:
        if type(raw) is not list:
            raise InvalidField("malformed", f"field {key!r} missing or not a list")
        if len(raw) > MAX_UPDATES_PER_FRAME:
            raise InvalidField("too_many", f"{len(raw)} updates")
        cache = cast(UpdateCache | None, context)
        if cache is None:
            return tuple(update_from_packed(blob) for blob in raw)
        return cache.build_all(raw)


class _Record(FieldKind):
    """One `MemberRecord`, as its array form."""

    __slots__ = ()

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, MemberRecord):
            raise UsageError(f"{name} has an item of the wrong type")

    def dump(self, value: Any) -> Any:
        return value.to_wire()

    def load(self, key: str, raw: Any, context: Any) -> Any:
        return MemberRecord.from_wire(raw, cast(UpdateCache | None, context))


SEQ = UInt(MAX_SEQ)
NAME = Checked(check_name)
ADDRESS = Checked(check_address)
UPDATES = _Updates()
RECORDS = Items(_Record(), MAX_RECORDS_PER_FRAME, container=tuple)


# --------------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping(WireMessage):
    """Are you alive? Sent to ``target``; the ack goes to ``source_address``."""

    TYPE: ClassVar[MessageType] = MessageType.PING
    seq: int = wire_field("seq", SEQ, "probe number, echoed by the ack")
    target: str = wire_field("target", NAME, "the member probed")
    source: str = wire_field("src", NAME, "the prober")
    source_address: str = wire_field("src_addr", ADDRESS, "where the ack goes")
    updates: tuple[Update, ...] = wire_field("updates", UPDATES, "piggybacked", default=())


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(WireMessage):
    """Answer to the ping (or forwarded indirect ping) numbered ``seq``."""

    TYPE: ClassVar[MessageType] = MessageType.ACK
    seq: int = wire_field("seq", SEQ, "the ping's number")
    source: str = wire_field("src", NAME, "the member that answers")
    updates: tuple[Update, ...] = wire_field("updates", UPDATES, "piggybacked", default=())


@dataclass(frozen=True, slots=True, kw_only=True)
class PingReq(WireMessage):
    """Please ping ``target`` for me and forward its ack (as ``seq``) to ``source_address``."""

    TYPE: ClassVar[MessageType] = MessageType.PING_REQ
    seq: int = wire_field("seq", SEQ, "probe number the forwarded ack carries")
    target: str = wire_field("target", NAME, "the member to probe")
    target_address: str = wire_field("target_addr", ADDRESS, "where it listens")
    source: str = wire_field("src", NAME, "the prober")
    source_address: str = wire_field("src_addr", ADDRESS, "where the ack goes")
    updates: tuple[Update, ...] = wire_field("updates", UPDATES, "piggybacked", default=())


@dataclass(frozen=True, slots=True, kw_only=True)
class Nack(WireMessage):
    """The relay of indirect probe ``seq`` got no ack in time: the relay itself is healthy."""

    TYPE: ClassVar[MessageType] = MessageType.NACK
    seq: int = wire_field("seq", SEQ, "the indirect probe's number")
    source: str = wire_field("src", NAME, "the relay")


@dataclass(frozen=True, slots=True, kw_only=True)
class Gossip(WireMessage):
    """Updates only, fanned out while there is news; no answer expected."""

    TYPE: ClassVar[MessageType] = MessageType.GOSSIP
    source: str = wire_field("src", NAME, "the sender")
    updates: tuple[Update, ...] = wire_field("updates", UPDATES, "the news")


@dataclass(frozen=True, slots=True, kw_only=True)
class PushPull(WireMessage):
    """Part of a member table; with ``reply_wanted`` the receiver answers with its whole table.

    A table is split into as many frames as it needs; each part merges on its own.
    """

    TYPE: ClassVar[MessageType] = MessageType.PUSH_PULL
    source: str = wire_field("src", NAME, "the sender")
    source_address: str = wire_field("src_addr", ADDRESS, "where a reply goes")
    reply_wanted: bool = wire_field("reply", Flag(), "answer with your whole table")
    records: tuple[MemberRecord, ...] = wire_field("records", RECORDS, "this part's records")


@dataclass(frozen=True, slots=True, kw_only=True)
class StateQuery(WireMessage):
    """A client (e.g. the CLI) asks a member for its member table."""

    TYPE: ClassVar[MessageType] = MessageType.STATE_QUERY
    query_id: int = wire_field("query_id", SEQ, "echoed by every part of the reply")


@dataclass(frozen=True, slots=True, kw_only=True)
class StateReply(WireMessage):
    """Part ``part`` of ``parts`` of the answering member's table, for query ``query_id``."""

    TYPE: ClassVar[MessageType] = MessageType.STATE_REPLY
    query_id: int = wire_field("query_id", SEQ, "the query answered")
    part: int = wire_field("part", UInt(MAX_STATE_PARTS), "this part's index")
    parts: int = wire_field("parts", UInt(MAX_STATE_PARTS), "how many parts the table took")
    records: tuple[MemberRecord, ...] = wire_field("records", RECORDS, "this part's records")

    def validate(self) -> None:
        if not 0 <= self.part < self.parts:
            raise UsageError(f"part {self.part} is not in 0..{self.parts - 1}")


Message = Ping | Ack | PingReq | Nack | Gossip | PushPull | StateQuery | StateReply

MESSAGES = MessageSet(
    Protocol.GOSSIP,
    VERSION_HISTORY,
    [Ping, Ack, PingReq, Nack, Gossip, PushPull, StateQuery, StateReply],
)
VERSION = MESSAGES.version


def gossip_codec(config: GossipConfig, auth: AuthPolicy | None = None) -> FrameCodec:
    """The codec every gossip member and client uses: this version, frames <= max_packet_bytes."""
    return MESSAGES.codec(config.max_packet_bytes, auth)


def encode_message(codec: FrameCodec, message: Message) -> bytes:
    """The frame for ``message``; UsageError if it exceeds the codec's size bound."""
    return MESSAGES.encode(codec, message)


def decode_message(codec: FrameCodec, frame: bytes, cache: UpdateCache | None = None) -> Message:
    """The message in ``frame``; ProtocolError (with a counter reason) on any defect.

    ``cache`` (optional) is the receiver's memory of validated updates (see `UpdateCache`)."""
    return cast(Message, MESSAGES.decode(codec, frame, context=cache))
