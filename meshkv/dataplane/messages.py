"""Data-plane wire messages: handshake, lookup, get, put, commit, held-at, chain-at, error.

Requests travel DEALER -> ROUTER and carry a request id (``req``) that the reply echoes, so a
requester may have many requests in flight on one connection (no lock-step, no head-of-line
blocking). Every request also carries the sender's ring ``epoch``; replies carry the
responder's, so either side can tell that their views differ (a stale view costs a miss, never
a wrong answer: bytes are checked against the chunk's checksum on arrival).

Bulk bytes travel by NIXL WRITE from the side that holds them, into slots named by
``SlotRef`` (segment id, offset). With ``transfer_channel: tcp`` they travel in ``payloads``
instead, as frames of their own after the message's frame: no codec copies them.

Every message is a `meshkv.wire.WireMessage`: fields declared once (wire key, kind, meaning),
checked when built and when decoded; `MESSAGES` holds the version history and type ids. This
module owns type ids, fields and their validation, nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from meshkv.keys import KEY_BYTES
from meshkv.transfer.channel import SegmentInfo
from meshkv.wire import (
    AuthPolicy,
    Buffer,
    FrameCodec,
    InvalidField,
    MessageSet,
    Protocol,
    WireMessage,
    wire_field,
)
from meshkv.wire_fields import Attachments, Blob, Items, Nullable, PackedBlobs, Record, Text, UInt

VERSION_HISTORY = {
    1: "first version",
    2: "``keys`` travel packed (one bytes field of n x KEY_BYTES, not a list of n bytes), and "
    "a lookup reply says how many leading keys the responder holds (``held``) plus "
    "``pointers`` for the keys after those, instead of one holder name per key",
    3: "``payloads`` (tcp channel: get replies and puts) travel as ZMQ frames after the "
    "message's frame (attachments, see `meshkv.wire`), not inside its msgpack body",
    4: "a get may ask for one piece of one chunk (``offset``, ``nbytes``), so that a reader "
    "can check a large chunk piece by piece while the rest is still on its way",
    5: "a get carries ``sent_ms``, the requester's clock when it sent it, so that a holder "
    "that reads it late (it was frozen, or its queue was long) refuses it once the requester "
    "has given up, rather than write into slots the requester may have reused",
    6: "a lookup reply's ``pointers`` name one holder per run of keys, with ``runs`` (keys per "
    "run), not one name per key; ``CHAIN_AT`` (one-way) tells the home of a prompt's first "
    "chunk which keys of the prompt's chain a member holds, so that one member can answer a "
    "lookup of the whole prompt",
}
"""What each data-plane protocol version changed. Append on any incompatible change; never
edit an entry."""

MAX_KEYS = 4096
"""Keys in one request (4,096 chunks of 256 tokens = 1M tokens of prompt)."""
MAX_SEGMENTS = 4096
MAX_AGENT_METADATA_BYTES = 1 << 20
MAX_CHECKSUM_BYTES = 32
MAX_NAME_CHARS = 256
MAX_REASON_CHARS = 512
LATE_WRITE_MS = 500
"""How long past a get's end (``sent_ms + budget_ms``), by its own clock, a holder may still
start writing: the clock difference between members that gets tolerate. A requester keeps the
slots of an unanswered get reserved for longer than this past its own deadline."""


def wall_clock_ms() -> int:
    """This member's clock as `Get.sent_ms` carries it: milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


class MessageType(IntEnum):
    """Message type ids. Append only; never renumber."""

    HELLO = 1
    HELLO_REPLY = 2
    LOOKUP = 3
    LOOKUP_REPLY = 4
    GET = 5
    GET_REPLY = 6
    PUT = 7
    PUT_REPLY = 8
    COMMIT = 9
    COMMIT_REPLY = 10
    HELD_AT = 11
    ERROR = 12
    CHAIN_AT = 13


@dataclass(frozen=True, slots=True)
class SlotRef:
    """Where one chunk lives in a member's store: a registered segment and an offset in it."""

    segment: int
    offset: int


REQ = UInt(2**64 - 1)
EPOCH = UInt(2**64 - 1)
COUNT = UInt(2**32 - 1)
MILLIS = UInt(2**48 - 1)
NAME = Text(MAX_NAME_CHARS)
KEYS = PackedBlobs(KEY_BYTES, MAX_KEYS)
CHECKSUMS = Items(Blob(MAX_CHECKSUM_BYTES, reason="malformed"), MAX_KEYS)
SLOT = Record(SlotRef, ("segment", "offset"), 2**48 - 1)
SEGMENT = Record(SegmentInfo, ("segment", "address", "nbytes"), 2**64 - 1)
PAYLOADS = Attachments()


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(WireMessage):
    """First contact: who I am and how to write into my memory (sent both ways, once)."""

    TYPE: ClassVar[MessageType] = MessageType.HELLO
    req: int = wire_field("req", REQ, "request id, echoed by the reply")
    sender: str = wire_field("sender", NAME, 'member name "instance/rank"')
    nonce: int = wire_field("nonce", UInt(2**64 - 1), "boot nonce: a new one, a new NIXL agent")
    channel: str = wire_field("channel", Text(4, choices=("nixl", "tcp")), '"nixl" or "tcp"')
    agent: bytes = wire_field(
        "agent", Blob(MAX_AGENT_METADATA_BYTES), "NIXL agent metadata (empty for tcp)"
    )
    segments: list[SegmentInfo] = wire_field(
        "segments", Items(SEGMENT, MAX_SEGMENTS), "registered segments", default_factory=list
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloReply(Hello):
    TYPE: ClassVar[MessageType] = MessageType.HELLO_REPLY


@dataclass(frozen=True, slots=True, kw_only=True)
class Lookup(WireMessage):
    """Which of these keys (a prefix chain) do you hold or know a holder of?"""

    TYPE: ClassVar[MessageType] = MessageType.LOOKUP
    req: int = wire_field("req", REQ, "request id, echoed by the reply")
    epoch: int = wire_field("epoch", EPOCH, "the sender's ring epoch")
    keys: list[bytes] = wire_field("keys", KEYS, "chunk keys, in prefix order")


@dataclass(frozen=True, slots=True, kw_only=True)
class LookupReply(WireMessage):
    """The responder holds the first ``held`` keys; after those, ``pointers[i]`` names a member
    known to hold the next ``runs[i]`` keys. The answer stops at the first key with neither."""

    TYPE: ClassVar[MessageType] = MessageType.LOOKUP_REPLY
    req: int = wire_field("req", REQ, "the lookup's request id")
    epoch: int = wire_field("epoch", EPOCH, "the responder's ring epoch")
    held: int = wire_field("held", COUNT, "leading keys the responder holds")
    pointers: list[str] = wire_field(
        "pointers", Items(NAME, MAX_KEYS), "a holder per run of the keys after those",
        default_factory=list,
    )  # fmt: skip
    runs: list[int] = wire_field(
        "runs", Items(UInt(MAX_KEYS), MAX_KEYS), "keys in each run", default_factory=list
    )

    def validate(self) -> None:
        if len(self.pointers) != len(self.runs) or 0 in self.runs:
            raise InvalidField("malformed", "pointers and runs differ, or a run is empty")
        if self.held + sum(self.runs) > MAX_KEYS:
            raise InvalidField("too_many", "held and runs name more keys than a request")

    def holders(self, responder: str) -> list[str]:
        """The holder of each leading key, ``responder`` being the member that answered."""
        out = [responder] * self.held
        for name, count in zip(self.pointers, self.runs, strict=True):
            out += [name] * count
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Get(WireMessage):
    """Write the leading keys you hold into my ``dest`` slots (nixl) or inline (tcp).

    With ``nbytes`` > 0 it asks for one piece of one key's chunk: its bytes [``offset``,
    ``offset + nbytes``), written at ``dest[0]`` (the piece's own destination, not the slot's).
    """

    TYPE: ClassVar[MessageType] = MessageType.GET
    req: int = wire_field("req", REQ, "request id, echoed by the reply")
    epoch: int = wire_field("epoch", EPOCH, "the sender's ring epoch")
    sender: str = wire_field("sender", NAME, "the requester: whose NIXL agent to write into")
    keys: list[bytes] = wire_field("keys", KEYS, "chunk keys, in prefix order")
    dest: list[SlotRef] = wire_field(
        "dest", Items(SLOT, MAX_KEYS), "one slot per key for nixl; empty for tcp"
    )
    budget_ms: int = wire_field(
        "budget_ms", UInt(2**32 - 1), "time the requester still waits; the holder gives up past it"
    )
    sent_ms: int = wire_field(
        "sent_ms", MILLIS, "the requester's `wall_clock_ms` when it sent this (`time_left_s`)"
    )
    offset: int = wire_field("offset", MILLIS, "the piece's first byte in its chunk", default=0)
    nbytes: int = wire_field("nbytes", MILLIS, "the piece's length; 0: whole chunks", default=0)

    def validate(self) -> None:
        if self.dest and len(self.dest) != len(self.keys):
            raise InvalidField("malformed", "dest and keys differ in length")
        if self.nbytes and len(self.keys) != 1:
            raise InvalidField("malformed", "a piece is of exactly one key's chunk")
        if self.offset and not self.nbytes:
            raise InvalidField("malformed", "an offset without a piece length")

    def time_left_s(self, now_ms: int) -> float:
        """Seconds the holder may still spend on this get, ``now_ms`` being its own clock:
        the budget, cut short if the request was read late; <= 0 once the requester has given
        up. A requester holds the slots of an unanswered get 2 x LATE_WRITE_MS past its deadline
        (`meshkv.node.fetch`), so a holder clock up to LATE_WRITE_MS behind the requester's
        stops writing before the slots can be reused, and one up to LATE_WRITE_MS ahead never
        cuts a get short."""
        left_ms = min(self.budget_ms, self.sent_ms + self.budget_ms + LATE_WRITE_MS - now_ms)
        return left_ms / 1000

    def piece(self) -> tuple[int, int] | None:
        """(offset, nbytes) of the one piece asked for, or None for whole chunks."""
        return (self.offset, self.nbytes) if self.nbytes else None


@dataclass(frozen=True, slots=True, kw_only=True)
class GetReply(WireMessage):
    """The first ``len(checksums)`` keys were written (or are in ``payloads``, tcp).

    ``payloads`` travel as attachments: a holder's pinned slots on the way out, views of the
    received frames on the way in.
    """

    TYPE: ClassVar[MessageType] = MessageType.GET_REPLY
    req: int = wire_field("req", REQ, "the get's request id")
    checksums: list[bytes] = wire_field("checksums", CHECKSUMS, "one per key written")
    payloads: Sequence[Buffer] = wire_field(
        "payloads", PAYLOADS, "tcp: the chunks' bytes", default_factory=list
    )

    def validate(self) -> None:
        if self.payloads and len(self.payloads) != len(self.checksums):
            raise InvalidField("malformed", "payloads and checksums differ in length")


@dataclass(frozen=True, slots=True, kw_only=True)
class Put(WireMessage):
    """I produced these chunks; reserve slots for the ones you lack (nixl), or take them (tcp)."""

    TYPE: ClassVar[MessageType] = MessageType.PUT
    req: int = wire_field("req", REQ, "request id, echoed by the reply")
    epoch: int = wire_field("epoch", EPOCH, "the sender's ring epoch")
    keys: list[bytes] = wire_field("keys", KEYS, "chunk keys")
    chunk_bytes: int = wire_field("chunk_bytes", UInt(2**40 - 1), "bytes of every chunk")
    checksums: list[bytes] = wire_field(
        "checksums", CHECKSUMS, "tcp only, with payloads", default_factory=list
    )
    payloads: Sequence[Buffer] = wire_field(
        "payloads", PAYLOADS, "tcp: the chunks' bytes", default_factory=list
    )

    def validate(self) -> None:
        if self.payloads and not len(self.payloads) == len(self.checksums) == len(self.keys):
            raise InvalidField("malformed", "payloads, checksums and keys differ in length")


@dataclass(frozen=True, slots=True, kw_only=True)
class PutReply(WireMessage):
    """nixl: a reserved slot per key (None: already held or no room). tcp: ``stored`` count."""

    TYPE: ClassVar[MessageType] = MessageType.PUT_REPLY
    req: int = wire_field("req", REQ, "the put's request id")
    epoch: int = wire_field("epoch", EPOCH, "the responder's ring epoch")
    slots: list[SlotRef | None] = wire_field(
        "slots", Items(Nullable(SLOT), MAX_KEYS), "nixl: where to write each key"
    )
    stored: int = wire_field("stored", COUNT, "tcp: chunks stored", default=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Commit(WireMessage):
    """The bytes for these keys are in the slots you reserved; here are their checksums."""

    TYPE: ClassVar[MessageType] = MessageType.COMMIT
    req: int = wire_field("req", REQ, "request id, echoed by the reply")
    keys: list[bytes] = wire_field("keys", KEYS, "chunk keys written")
    checksums: list[bytes] = wire_field("checksums", CHECKSUMS, "one per key")

    def validate(self) -> None:
        if len(self.keys) != len(self.checksums):
            raise InvalidField("malformed", "keys and checksums differ in length")


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitReply(WireMessage):
    TYPE: ClassVar[MessageType] = MessageType.COMMIT_REPLY
    req: int = wire_field("req", REQ, "the commit's request id")
    stored: int = wire_field("stored", COUNT, "chunks stored")


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldAt(WireMessage):
    """One-way: ``holder`` keeps these keys; answer lookups with it (no bytes moved)."""

    TYPE: ClassVar[MessageType] = MessageType.HELD_AT
    req: int = wire_field("req", REQ, "request id (no reply)")
    epoch: int = wire_field("epoch", EPOCH, "the sender's ring epoch")
    keys: list[bytes] = wire_field("keys", KEYS, "chunk keys held")
    holder: str = wire_field("holder", NAME, "the member that holds them")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainAt(WireMessage):
    """One-way, to the home of ``head``: ``holder`` keeps ``keys``, positions ``start``.. of
    the chain whose first key is ``head`` (`meshkv.dataplane.chain_index`; no bytes moved)."""

    TYPE: ClassVar[MessageType] = MessageType.CHAIN_AT
    req: int = wire_field("req", REQ, "request id (no reply)")
    epoch: int = wire_field("epoch", EPOCH, "the sender's ring epoch")
    head: bytes = wire_field("head", Blob(KEY_BYTES), "the chain's first key")
    start: int = wire_field("start", UInt(MAX_KEYS - 1), "the position of keys[0] in the chain")
    keys: list[bytes] = wire_field("keys", KEYS, "chunk keys held, in chain order")
    holder: str = wire_field("holder", NAME, "the member that holds them")

    def validate(self) -> None:
        if len(self.head) != KEY_BYTES:
            raise InvalidField("malformed", f"head must be {KEY_BYTES} bytes")
        if self.start == 0 and self.keys and self.keys[0] != self.head:
            raise InvalidField("malformed", "a chain from position 0 starts with its head")


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(WireMessage):
    """The request ``req`` was refused; ``reason`` is a short label (e.g. "not_home")."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    req: int = wire_field("req", REQ, "the refused request's id")
    reason: str = wire_field("reason", Text(MAX_REASON_CHARS, empty_ok=True), "a short label")


Message = (
    Hello
    | HelloReply
    | Lookup
    | LookupReply
    | Get
    | GetReply
    | Put
    | PutReply
    | Commit
    | CommitReply
    | HeldAt
    | Error
    | ChainAt
)
MESSAGES = MessageSet(
    Protocol.DATA,
    VERSION_HISTORY,
    [Hello, HelloReply, Lookup, LookupReply, Get, GetReply, Put, PutReply, Commit, CommitReply,
     HeldAt, Error, ChainAt],
)  # fmt: skip
ONE_WAY_TYPES = frozenset({MessageType.HELD_AT, MessageType.CHAIN_AT})
"""Messages that get no reply (a requester awaits nothing on their socket)."""
VERSION = MESSAGES.version


def make_codec(max_frame_bytes: int, auth: AuthPolicy | None = None) -> FrameCodec:
    return MESSAGES.codec(max_frame_bytes, auth)


def encode(codec: FrameCodec, message: Message) -> bytes:
    """The frame of a message that carries no attachments."""
    return MESSAGES.encode(codec, message)


def encode_frames(codec: FrameCodec, message: Message) -> list[Buffer]:
    """The message's frame, then its attachments (payloads), to send as one multipart
    message."""
    return MESSAGES.encode_frames(codec, message)


def decode(codec: FrameCodec, frame: Buffer, attachments: Sequence[Buffer] = ()) -> Message:
    """Decodes one message (its frame and the frames after it); raises ProtocolError (counter
    label in ``reason``) on anything bad."""
    return MESSAGES.decode(codec, frame, attachments)  # type: ignore[no-any-return]
