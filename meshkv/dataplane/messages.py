"""Data-plane wire messages: handshake, lookup, get, put, commit, held-at, error.

Requests travel DEALER -> ROUTER and carry a request id (``req``) that the reply echoes, so a
requester may have many requests in flight on one connection (no lock-step, no head-of-line
blocking). Every request also carries the sender's ring ``epoch``; replies carry the
responder's, so either side can tell that their views differ (a stale view costs a miss, never
a wrong answer: bytes are checked against the chunk's checksum on arrival).

Bulk bytes travel by NIXL WRITE from the side that holds them, into slots named by
``SlotRef`` (segment id, offset). With ``transfer_channel: tcp`` they travel in ``payloads``
instead, as frames of their own after the message's frame: no codec copies them.

This module owns type ids, fields and their validation, nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any, ClassVar

from meshkv.errors import ProtocolError, UsageError
from meshkv.keys import KEY_BYTES
from meshkv.transfer.channel import SegmentInfo
from meshkv.wire import AuthPolicy, Buffer, FrameCodec, Protocol, require, require_list

VERSION = 5
"""Data-plane protocol version. Bump on any incompatible change and list it here:
1 - first version;
2 - ``keys`` travel packed (one bytes field of n x KEY_BYTES, not a list of n bytes), and a
    lookup reply says how many leading keys the responder holds (``held``) plus ``pointers``
    for the keys after those, instead of one holder name per key;
3 - ``payloads`` (tcp channel: get replies and puts) travel as ZMQ frames after the message's
    frame (attachments, see `meshkv.wire`), not inside its msgpack body;
4 - a get may ask for one piece of one chunk (``offset``, ``nbytes``), so that a reader can
    check a large chunk piece by piece while the rest is still on its way;
5 - a get carries ``sent_ms``, the requester's clock when it sent it, so that a holder that
    reads it late (it was frozen, or its queue was long) refuses it once the requester has
    given up, rather than write into slots the requester may have reused."""

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


class DataType(IntEnum):
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


def make_codec(max_frame_bytes: int, auth: AuthPolicy | None = None) -> FrameCodec:
    return FrameCodec(Protocol.DATA, VERSION, max_frame_bytes=max_frame_bytes, auth=auth)


def _plain(message: Any) -> dict[str, Any]:
    """A message's fields as a map, without copying the values; a ``keys`` list goes packed
    (see `_keys`), and ``payloads`` are left out (they travel as attachments: `encode_frames`)."""
    out = {f.name: getattr(message, f.name) for f in fields(message) if f.name != "payloads"}
    if "keys" in out:
        out["keys"] = b"".join(out["keys"])
    return out


def _keys(fields: dict[str, Any], name: str = "keys") -> list[bytes]:
    """Keys travel as one bytes field, n x KEY_BYTES: one msgpack item to check, not n."""
    packed = require(fields, name, bytes)
    if len(packed) % KEY_BYTES:
        raise ProtocolError("malformed", f"{name!r} is not a whole number of {KEY_BYTES}-byte keys")
    if len(packed) > MAX_KEYS * KEY_BYTES:
        raise ProtocolError("too_many", f"field {name!r} has {len(packed) // KEY_BYTES} keys")
    return [packed[i : i + KEY_BYTES] for i in range(0, len(packed), KEY_BYTES)]


def _name(fields: dict[str, Any], name: str) -> str:
    value = require(fields, name, str)
    if not 0 < len(value) <= MAX_NAME_CHARS:
        raise ProtocolError("malformed", f"field {name!r} length {len(value)}")
    return value


def _uint(fields: dict[str, Any], name: str, bits: int = 64) -> int:
    value = require(fields, name, int)
    if not 0 <= value < 1 << bits:
        raise ProtocolError("malformed", f"field {name!r} out of range")
    return value


def _slots(fields: dict[str, Any], name: str, allow_none: bool) -> list[SlotRef | None]:
    raw = require(fields, name, list)
    if len(raw) > MAX_KEYS:
        raise ProtocolError("too_many", f"field {name!r} has {len(raw)} items")
    out: list[SlotRef | None] = []
    for item in raw:
        if item is None and allow_none:
            out.append(None)
        elif (
            isinstance(item, list)
            and len(item) == 2
            and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 48 for v in item
            )
        ):
            out.append(SlotRef(segment=item[0], offset=item[1]))
        else:
            raise ProtocolError("malformed", f"bad slot reference in {name!r}")
    return out


def _checksums(fields: dict[str, Any], name: str = "checksums") -> list[bytes]:
    sums = require_list(fields, name, bytes, MAX_KEYS)
    if any(len(s) > MAX_CHECKSUM_BYTES for s in sums):
        raise ProtocolError("malformed", "checksum too long")
    return sums


@dataclass(frozen=True, slots=True)
class SlotRef:
    """Where one chunk lives in a member's store: a registered segment and an offset in it."""

    segment: int
    offset: int

    def wire(self) -> list[int]:
        return [self.segment, self.offset]


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """First contact: who I am and how to write into my memory (sent both ways, once)."""

    TYPE: ClassVar[DataType] = DataType.HELLO
    req: int
    sender: str  # member name "instance/rank"
    nonce: int  # sender's boot nonce: a new one means a new NIXL agent
    channel: str  # "nixl" or "tcp"
    agent: bytes  # NIXL agent metadata (empty for tcp)
    segments: list[SegmentInfo] = field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        return {
            "req": self.req,
            "sender": self.sender,
            "nonce": self.nonce,
            "channel": self.channel,
            "agent": self.agent,
            "segments": [[s.segment, s.address, s.nbytes] for s in self.segments],
        }

    @classmethod
    def parse(cls, f: dict[str, Any]) -> Hello:
        channel = require(f, "channel", str)
        if channel not in ("nixl", "tcp"):
            raise ProtocolError("malformed", f"unknown channel {channel!r}")
        agent = require(f, "agent", bytes)
        if len(agent) > MAX_AGENT_METADATA_BYTES:
            raise ProtocolError("too_large", "agent metadata")
        raw = require(f, "segments", list)
        if len(raw) > MAX_SEGMENTS:
            raise ProtocolError("too_many", "segments")
        segments = []
        for item in raw:
            if not (
                isinstance(item, list)
                and len(item) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in item)
            ):
                raise ProtocolError("malformed", "bad segment")
            segments.append(SegmentInfo(segment=item[0], address=item[1], nbytes=item[2]))
        return cls(
            req=_uint(f, "req"),
            sender=_name(f, "sender"),
            nonce=_uint(f, "nonce"),
            channel=channel,
            agent=agent,
            segments=segments,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloReply(Hello):
    TYPE: ClassVar[DataType] = DataType.HELLO_REPLY


@dataclass(frozen=True, slots=True, kw_only=True)
class Lookup:
    """Which of these keys (a prefix chain) do you hold or know a holder of?"""

    TYPE: ClassVar[DataType] = DataType.LOOKUP
    req: int
    epoch: int
    keys: list[bytes]

    def fields(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def parse(cls, f: dict[str, Any]) -> Lookup:
        return cls(req=_uint(f, "req"), epoch=_uint(f, "epoch"), keys=_keys(f))


@dataclass(frozen=True, slots=True, kw_only=True)
class LookupReply:
    """The responder holds the first ``held`` keys; ``pointers[i]`` names a member known to
    hold key ``held + i``. The answer stops at the first key with neither."""

    TYPE: ClassVar[DataType] = DataType.LOOKUP_REPLY
    req: int
    epoch: int
    held: int
    pointers: list[str] = field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def parse(cls, f: dict[str, Any]) -> LookupReply:
        pointers = require_list(f, "pointers", str, MAX_KEYS)
        if any(not 0 < len(h) <= MAX_NAME_CHARS for h in pointers):
            raise ProtocolError("malformed", "bad holder name")
        held = _uint(f, "held", 32)
        if held + len(pointers) > MAX_KEYS:
            raise ProtocolError("too_many", "held and pointers name more keys than a request")
        return cls(req=_uint(f, "req"), epoch=_uint(f, "epoch"), held=held, pointers=pointers)

    def holders(self, responder: str) -> list[str]:
        """The holder of each leading key, ``responder`` being the member that answered."""
        return [responder] * self.held + self.pointers


@dataclass(frozen=True, slots=True, kw_only=True)
class Get:
    """Write the leading keys you hold into my ``dest`` slots (nixl) or inline (tcp).

    With ``nbytes`` > 0 it asks for one piece of one key's chunk: its bytes [``offset``,
    ``offset + nbytes``), written at ``dest[0]`` (the piece's own destination, not the slot's).
    """

    TYPE: ClassVar[DataType] = DataType.GET
    req: int
    epoch: int
    sender: str  # the requester's member name: whose NIXL agent to write into
    keys: list[bytes]
    dest: list[SlotRef]  # one per key for nixl; empty for tcp
    budget_ms: int  # time the requester still waits; the holder gives up past it
    sent_ms: int  # the requester's `wall_clock_ms` when it sent this (see `time_left_s`)
    offset: int = 0
    nbytes: int = 0  # 0: whole chunks

    def fields(self) -> dict[str, Any]:
        return {
            "req": self.req,
            "epoch": self.epoch,
            "sender": self.sender,
            "keys": b"".join(self.keys),
            "dest": [d.wire() for d in self.dest],
            "budget_ms": self.budget_ms,
            "sent_ms": self.sent_ms,
            "offset": self.offset,
            "nbytes": self.nbytes,
        }

    @classmethod
    def parse(cls, f: dict[str, Any]) -> Get:
        keys = _keys(f)
        dest = [d for d in _slots(f, "dest", allow_none=False) if d is not None]
        if dest and len(dest) != len(keys):
            raise ProtocolError("malformed", "dest and keys differ in length")
        offset, nbytes = _uint(f, "offset", 48), _uint(f, "nbytes", 48)
        if nbytes and len(keys) != 1:
            raise ProtocolError("malformed", "a piece is of exactly one key's chunk")
        if offset and not nbytes:
            raise ProtocolError("malformed", "an offset without a piece length")
        return cls(
            req=_uint(f, "req"),
            epoch=_uint(f, "epoch"),
            sender=_name(f, "sender"),
            keys=keys,
            dest=dest,
            budget_ms=_uint(f, "budget_ms", 32),
            sent_ms=_uint(f, "sent_ms", 48),
            offset=offset,
            nbytes=nbytes,
        )

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
class GetReply:
    """The first ``len(checksums)`` keys were written (or are in ``payloads``, tcp).

    ``payloads`` travel as attachments: a holder's pinned slots on the way out, views of the
    received frames on the way in.
    """

    TYPE: ClassVar[DataType] = DataType.GET_REPLY
    req: int
    checksums: list[bytes]
    payloads: Sequence[Buffer] = field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def parse(cls, f: dict[str, Any], attachments: Sequence[Buffer] = ()) -> GetReply:
        sums = _checksums(f)
        if attachments and len(attachments) != len(sums):
            raise ProtocolError("malformed", "payloads and checksums differ in length")
        return cls(req=_uint(f, "req"), checksums=sums, payloads=list(attachments))


@dataclass(frozen=True, slots=True, kw_only=True)
class Put:
    """I produced these chunks; reserve slots for the ones you lack (nixl), or take them (tcp)."""

    TYPE: ClassVar[DataType] = DataType.PUT
    req: int
    epoch: int
    keys: list[bytes]
    chunk_bytes: int
    checksums: list[bytes] = field(default_factory=list)  # tcp only, with payloads
    payloads: Sequence[Buffer] = field(default_factory=list)  # attachments, as in GetReply

    def fields(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def parse(cls, f: dict[str, Any], attachments: Sequence[Buffer] = ()) -> Put:
        keys = _keys(f)
        sums = _checksums(f)
        payloads = list(attachments)
        if payloads and not len(payloads) == len(sums) == len(keys):
            raise ProtocolError("malformed", "payloads, checksums and keys differ in length")
        return cls(
            req=_uint(f, "req"),
            epoch=_uint(f, "epoch"),
            keys=keys,
            chunk_bytes=_uint(f, "chunk_bytes", 40),
            checksums=sums,
            payloads=payloads,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PutReply:
    """nixl: a reserved slot per key (None: already held or no room). tcp: ``stored`` count."""

    TYPE: ClassVar[DataType] = DataType.PUT_REPLY
    req: int
    epoch: int
    slots: list[SlotRef | None]
    stored: int = 0

    def fields(self) -> dict[str, Any]:
        return {
            "req": self.req,
            "epoch": self.epoch,
            "slots": [s.wire() if s else None for s in self.slots],
            "stored": self.stored,
        }

    @classmethod
    def parse(cls, f: dict[str, Any]) -> PutReply:
        return cls(
            req=_uint(f, "req"),
            epoch=_uint(f, "epoch"),
            slots=_slots(f, "slots", allow_none=True),
            stored=_uint(f, "stored", 32),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Commit:
    """The bytes for these keys are in the slots you reserved; here are their checksums."""

    TYPE: ClassVar[DataType] = DataType.COMMIT
    req: int
    keys: list[bytes]
    checksums: list[bytes]

    def fields(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def parse(cls, f: dict[str, Any]) -> Commit:
        keys, sums = _keys(f), _checksums(f)
        if len(keys) != len(sums):
            raise ProtocolError("malformed", "keys and checksums differ in length")
        return cls(req=_uint(f, "req"), keys=keys, checksums=sums)


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitReply:
    TYPE: ClassVar[DataType] = DataType.COMMIT_REPLY
    req: int
    stored: int

    def fields(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def parse(cls, f: dict[str, Any]) -> CommitReply:
        return cls(req=_uint(f, "req"), stored=_uint(f, "stored", 32))


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldAt:
    """One-way: ``holder`` keeps these keys; answer lookups with it (no bytes moved)."""

    TYPE: ClassVar[DataType] = DataType.HELD_AT
    req: int
    epoch: int
    keys: list[bytes]
    holder: str

    def fields(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def parse(cls, f: dict[str, Any]) -> HeldAt:
        return cls(
            req=_uint(f, "req"), epoch=_uint(f, "epoch"), keys=_keys(f), holder=_name(f, "holder")
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """The request ``req`` was refused; ``reason`` is a short label (e.g. "not_home")."""

    TYPE: ClassVar[DataType] = DataType.ERROR
    req: int
    reason: str

    def fields(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def parse(cls, f: dict[str, Any]) -> Error:
        reason = require(f, "reason", str)
        if len(reason) > MAX_REASON_CHARS:
            raise ProtocolError("malformed", "reason too long")
        return cls(req=_uint(f, "req"), reason=reason)


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
)
_PARSERS: dict[int, Any] = {
    m.TYPE: m
    for m in (
        Hello,
        HelloReply,
        Lookup,
        LookupReply,
        Get,
        GetReply,
        Put,
        PutReply,
        Commit,
        CommitReply,
        HeldAt,
        Error,
    )
}


_ATTACHING = (GetReply, Put)
"""The messages whose ``payloads`` travel as attachments."""


def encode(codec: FrameCodec, message: Message) -> bytes:
    """The frame of a message that carries no attachments."""
    frames = encode_frames(codec, message)
    if len(frames) != 1:
        raise UsageError(f"{type(message).__name__} has attachments: use encode_frames")
    return frames[0]


def encode_frames(codec: FrameCodec, message: Message) -> list[Buffer]:
    """The message's frame, then its attachments (payloads), to send as one multipart
    message."""
    attachments = list(message.payloads) if isinstance(message, _ATTACHING) else []
    return [codec.encode(message.TYPE, message.fields(), attachments=attachments), *attachments]


def decode(codec: FrameCodec, frame: Buffer, attachments: Sequence[Buffer] = ()) -> Message:
    """Decodes one message (its frame and the frames after it); raises ProtocolError (counter
    label in ``reason``) on anything bad."""
    message_type, fields = codec.decode(frame, attachments=attachments)
    parser = _PARSERS.get(message_type)
    if parser is None:
        raise ProtocolError("unknown_type", str(message_type))
    if parser in _ATTACHING:
        return parser.parse(fields, attachments)
    if attachments:
        raise ProtocolError("malformed", f"{parser.__name__} carries no attachments")
    return parser.parse(fields)
