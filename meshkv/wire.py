"""The frame envelope shared by every meshkv protocol: header, size bound, optional HMAC.

A frame is ``header | body | trailer``:

- header (5 bytes): magic ``b"MK"``, protocol id, protocol version, flags;
- body: msgpack of ``[message_type, fields]`` where ``fields`` is a map of field name to value;
- trailer, present when flag AUTH is set (49 bytes): key fingerprint (1 byte), sender wall
  time in ms (8), random nonce (8), HMAC-SHA256 over everything before the MAC, then over each
  attachment (its length as 8 bytes, then its bytes) (32).

A message may carry attachments: bulk bytes sent as ZMQ frames of their own after the frame,
so that no codec copies them.

This module owns framing, versions, limits and authentication, and the one mechanism that
every protocol's messages are written in: a message is a frozen, slotted, keyword-only
dataclass (`WireMessage`) whose fields are declared once, with `wire_field` (wire key, kind,
meaning); the kind (a `FieldKind`, the common ones in `meshkv.wire_fields`) validates a value
when the message is built and when it is decoded, and says how it travels. A `MessageSet`
holds one protocol's version history and type ids. It knows nothing of what any message
means: each protocol keeps its messages in its own ``messages`` module.

Every refusal raises `ProtocolError` with a short ``reason`` that receivers use as a counter
label; a receiver drops the frame, counts it, and keeps running.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from enum import IntEnum
from typing import Any, ClassVar, TypeVar
from typing import Protocol as TypingProtocol

import msgpack

from meshkv.errors import ProtocolError, UsageError

Buffer = bytes | bytearray | memoryview
"""What frames and attachments may be: received ZMQ buffers are read in place."""

MAGIC = b"MK"
_HEADER = struct.Struct("!2sBBB")
_AUTH_META = struct.Struct("!BQ8s")  # key fingerprint, sender time in ms, nonce
_MAC_BYTES = 32
AUTH_TRAILER_BYTES = _AUTH_META.size + _MAC_BYTES
FLAG_AUTH = 0x01


class Protocol(IntEnum):
    """Protocol ids in the header. Append only; never renumber."""

    GOSSIP = 1
    DATA = 2


class SecretsConfig(TypingProtocol):
    """The config keys authentication reads (``meshkv.config.MeshConfig`` has them)."""

    @property
    def mesh_secret(self) -> str | None: ...

    @property
    def mesh_previous_secret(self) -> str | None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthPolicy:
    """Who may talk to us: the mesh secrets and the replay window.

    ``secrets[0]`` signs outgoing frames; every secret in the list is accepted inbound, so a
    key rotation runs with two secrets for a while. An empty tuple means no authentication.
    """

    secrets: tuple[bytes, ...] = ()
    replay_window_s: float = 30.0
    replay_cache_entries: int = 65536

    def __post_init__(self) -> None:
        if any(len(s) < 16 for s in self.secrets):
            raise UsageError("every mesh secret must be at least 16 bytes")
        if self.replay_window_s <= 0 or self.replay_cache_entries <= 0:
            raise UsageError("replay_window_s and replay_cache_entries must be positive")

    @classmethod
    def from_strings(cls, *secrets: str | None) -> AuthPolicy:
        """Builds a policy from config strings, skipping empty ones (first = signing key)."""
        return cls(secrets=tuple(s.encode() for s in secrets if s))

    @classmethod
    def from_config(cls, config: SecretsConfig) -> AuthPolicy:
        """The policy a member's config asks for: ``mesh_secret`` signs, and it and
        ``mesh_previous_secret`` (a rotation in progress) are accepted."""
        return cls.from_strings(config.mesh_secret, config.mesh_previous_secret)

    @property
    def enabled(self) -> bool:
        return bool(self.secrets)


def _fingerprint(secret: bytes) -> int:
    return hashlib.blake2b(secret, digest_size=1, person=b"meshkv-keyid").digest()[0]


class FrameCodec:
    """Encodes and decodes the frames of one protocol at one version.

    Not thread-safe when authentication is on (the replay cache is shared state): use one codec
    per receiving thread.
    """

    def __init__(
        self,
        protocol: Protocol,
        version: int,
        *,
        max_frame_bytes: int,
        auth: AuthPolicy | None = None,
    ) -> None:
        if not 0 < version < 256:
            raise UsageError(f"protocol version must fit one byte, got {version}")
        self.protocol = protocol
        self.version = version
        self.max_frame_bytes = max_frame_bytes
        self.auth = auth or AuthPolicy()
        self._keys = {_fingerprint(s): s for s in reversed(self.auth.secrets)}
        self._seen_nonces: OrderedDict[bytes, float] = OrderedDict()

    def encode(
        self,
        message_type: int,
        fields: dict[str, Any],
        *,
        attachments: Sequence[Buffer] = (),
        now_s: float | None = None,
    ) -> bytes:
        """Returns the frame for one message; raises UsageError if it exceeds the size bound.

        ``attachments`` travel as frames of their own after this one (bulk bytes that msgpack
        would copy); the size bound counts them, and the MAC covers them.
        """
        flags = FLAG_AUTH if self.auth.enabled else 0
        head = _HEADER.pack(MAGIC, self.protocol, self.version, flags)
        body = msgpack.packb([message_type, fields], use_bin_type=True)
        frame = head + body
        if self.auth.enabled:
            secret = self.auth.secrets[0]
            sent_ms = int((time.time() if now_s is None else now_s) * 1000)
            meta = _AUTH_META.pack(_fingerprint(secret), sent_ms, os.urandom(8))
            signed = frame + meta
            frame = signed + _mac(secret, signed, attachments)
        size = len(frame)
        if attachments:
            size += sum(memoryview(a).nbytes for a in attachments)
        if size > self.max_frame_bytes:
            raise UsageError(
                f"frame of {size} bytes exceeds max_frame_bytes={self.max_frame_bytes}"
            )
        return frame

    def decode(
        self,
        frame: Buffer,
        *,
        attachments: Sequence[Buffer] = (),
        now_s: float | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Returns ``(message_type, fields)`` or raises ProtocolError with a counter label.

        ``frame`` may be a memoryview of a received buffer: the body is read in place, never
        copied. ``attachments``: the frames that came after it (see `encode`).
        """
        frame = memoryview(frame)
        size = len(frame)
        if attachments:
            size += sum(memoryview(a).nbytes for a in attachments)
        if size > self.max_frame_bytes:
            raise ProtocolError("too_large", f"{size} > {self.max_frame_bytes} bytes")
        if len(frame) < _HEADER.size:
            raise ProtocolError("truncated", f"{len(frame)} bytes")
        magic, protocol, version, flags = _HEADER.unpack_from(frame)
        if magic != MAGIC:
            raise ProtocolError("bad_magic")
        if protocol != self.protocol:
            raise ProtocolError("wrong_protocol", f"got {protocol}, want {int(self.protocol)}")
        if version != self.version:
            raise ProtocolError("bad_version", f"got {version}, want {self.version}")
        if flags & ~FLAG_AUTH:
            raise ProtocolError("bad_flags", f"{flags:#x}")
        body_end = len(frame)
        if self.auth.enabled:
            if not flags & FLAG_AUTH:
                raise ProtocolError("unauthenticated")
            body_end = self._verify(frame, attachments, time.time() if now_s is None else now_s)
        elif flags & FLAG_AUTH:
            raise ProtocolError("unexpected_auth", "this member has no mesh secret")
        return _unpack_body(frame[_HEADER.size : body_end])

    def _verify(self, frame: memoryview, attachments: Sequence[Buffer], now_s: float) -> int:
        """Checks MAC, time window and nonce; returns where the body ends."""
        if len(frame) < _HEADER.size + AUTH_TRAILER_BYTES:
            raise ProtocolError("truncated", "no room for the auth trailer")
        meta_at = len(frame) - AUTH_TRAILER_BYTES
        key_id, sent_ms, nonce = _AUTH_META.unpack_from(frame, meta_at)
        secret = self._keys.get(key_id)
        mac_at = len(frame) - _MAC_BYTES
        if secret is None or not hmac.compare_digest(
            _mac(secret, frame[:mac_at], attachments), frame[mac_at:]
        ):
            raise ProtocolError("bad_auth")
        window = self.auth.replay_window_s
        if abs(now_s - sent_ms / 1000) > window:
            raise ProtocolError("stale", f"sent {sent_ms / 1000 - now_s:+.1f}s from now")
        self._remember_nonce(nonce, now_s)
        return meta_at

    def _remember_nonce(self, nonce: bytes, now_s: float) -> None:
        """Refuses a nonce seen within the window; the cache is bounded, oldest out first."""
        seen = self._seen_nonces
        while seen and (
            next(iter(seen.values())) <= now_s or len(seen) >= self.auth.replay_cache_entries
        ):
            seen.popitem(last=False)
        if nonce in seen:
            raise ProtocolError("replayed")
        seen[nonce] = now_s + 2 * self.auth.replay_window_s


def _mac(secret: bytes, signed: Buffer, attachments: Sequence[Buffer]) -> bytes:
    """HMAC-SHA256 of the signed part of a frame, then of each attachment after its length."""
    mac = hmac.new(secret, signed, "sha256")
    for attachment in attachments:
        view = memoryview(attachment)
        mac.update(view.nbytes.to_bytes(8, "big"))
        mac.update(view)
    return mac.digest()


def _unpack_body(body: memoryview) -> tuple[int, dict[str, Any]]:
    try:
        decoded = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("malformed", type(exc).__name__) from None
    if (
        not isinstance(decoded, list)
        or len(decoded) != 2
        or not isinstance(decoded[0], int)
        or not isinstance(decoded[1], dict)
    ):
        raise ProtocolError("malformed", "body is not [type, fields]")
    return decoded[0], decoded[1]


# ------------------------------------------------------------------------------ messages

_T = TypeVar("_T")


class InvalidField(UsageError):
    """A message field with a value its protocol refuses; ``reason`` is the counter label a
    receiver drops such a frame under (``malformed`` unless a bound was exceeded)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class FieldKind:
    """How one message field is checked and how it travels.

    ``check`` validates a value when a message is built (raises UsageError, e.g. InvalidField);
    ``dump`` gives its wire form; ``load`` turns a wire form into a checked value (raises
    ProtocolError or UsageError). ``context`` is what the protocol's decoder was given (e.g. a
    cache of validated updates). A kind with ``in_body = False`` travels as attachments.
    """

    __slots__ = ()
    in_body: ClassVar[bool] = True

    def check(self, name: str, value: Any) -> None:
        raise NotImplementedError

    def check_items(self, name: str, values: Any) -> None:
        """Checks every value of a list field (a kind may do it faster than one by one)."""
        for value in values:
            self.check(name, value)

    def dump(self, value: Any) -> Any:
        return value

    def dump_items(self, values: Any) -> list[Any]:
        """The wire forms of every value of a list field."""
        return [self.dump(value) for value in values]

    def load(self, key: str, raw: Any, context: Any) -> Any:
        self.check(key, raw)
        return raw


def wire_field(key: str, kind: FieldKind, doc: str, **default: Any) -> Any:
    """Declares a message field: its ``key`` on the wire, its ``kind`` and its meaning."""
    return field(metadata={"wire": key, "kind": kind, "doc": doc}, **default)


@dataclass(frozen=True, slots=True)
class _Spec:
    name: str
    key: str
    kind: FieldKind
    plain_dump: bool  # the kind's wire form is the value itself (no dump call)
    plain_load: bool  # loading is checking (no load call past the check)


_SPECS: dict[type, tuple[_Spec, ...]] = {}
_ATTACHMENT_FIELD: dict[type, str | None] = {}  # per class: its attachments field, if any


def _specs(cls: type) -> tuple[_Spec, ...]:
    specs = _SPECS.get(cls)
    if specs is None:
        declared: tuple[Field[Any], ...] = fields(cls)  # type: ignore[arg-type]
        specs = _SPECS[cls] = tuple(
            _Spec(
                f.name,
                f.metadata["wire"],
                kind := f.metadata["kind"],
                plain_dump=type(kind).dump is FieldKind.dump,
                plain_load=type(kind).load is FieldKind.load,
            )
            for f in declared
        )
        _ATTACHMENT_FIELD[cls] = next((s.name for s in specs if not s.kind.in_body), None)
    return specs


def _attachment_field(cls: type) -> str | None:
    if cls not in _ATTACHMENT_FIELD:
        _specs(cls)
    return _ATTACHMENT_FIELD[cls]


class WireMessage:
    """Base of every wire message: checks its fields when built, and turns them into the
    ``fields`` map of a frame and back. A subclass is a frozen, slotted, keyword-only dataclass
    with a ``TYPE`` and every field declared with `wire_field`; `validate` holds the rules
    that span several fields."""

    __slots__ = ()
    TYPE: ClassVar[IntEnum]

    def __post_init__(self) -> None:
        for spec in _specs(type(self)):
            spec.kind.check(spec.name, getattr(self, spec.name))
        self.validate()

    def validate(self) -> None:
        """Rules across fields; raises UsageError (InvalidField for a specific label)."""

    def to_fields(self) -> dict[str, Any]:
        """The frame's ``fields`` map, in declaration order (attachments left out)."""
        return {
            s.key: getattr(self, s.name) if s.plain_dump else s.kind.dump(getattr(self, s.name))
            for s in _specs(type(self))
            if s.kind.in_body
        }

    def attachments(self) -> list[Buffer]:
        """The bulk buffers that travel as frames after this message's frame."""
        name = _attachment_field(type(self))
        return [] if name is None else list(getattr(self, name))

    @classmethod
    def from_fields(
        cls: type[_W],
        fields: dict[str, Any],
        attachments: Sequence[Buffer] = (),
        context: Any = None,
    ) -> _W:
        """The message in a decoded ``fields`` map; ProtocolError (with its label) if any field
        is missing or refused."""
        values: dict[str, Any] = {}
        carried = False
        try:
            for spec in _specs(cls):
                if spec.kind.in_body:
                    if spec.key not in fields:
                        raise ProtocolError("malformed", f"field {spec.key!r} missing")
                    raw = fields[spec.key]
                    if spec.plain_load:
                        spec.kind.check(spec.key, raw)
                        values[spec.name] = raw
                        continue
                else:
                    raw, carried = list(attachments), True
                values[spec.name] = spec.kind.load(spec.key, raw, context)
            if attachments and not carried:
                raise ProtocolError("malformed", f"{cls.__name__} carries no attachments")
            message = trusted(cls, **values)
            message.validate()
        except UsageError as exc:
            raise ProtocolError(getattr(exc, "reason", "malformed"), str(exc)) from None
        return message


_W = TypeVar("_W", bound=WireMessage)


class MessageSet:
    """One protocol's messages: its version history (version -> what that version changed;
    append only), and its message classes by type id (append only; never renumber)."""

    def __init__(
        self,
        protocol: Protocol,
        history: Mapping[int, str],
        messages: Sequence[type[WireMessage]],
    ) -> None:
        if sorted(history) != list(range(1, len(history) + 1)):
            raise UsageError(f"{protocol.name} version history must number 1..n")
        self.protocol = protocol
        self.version = len(history)
        self.history = dict(history)
        self._by_type = {int(m.TYPE): m for m in messages}
        if len(self._by_type) != len(messages):
            raise UsageError(f"{protocol.name} has two messages with one type id")

    def codec(self, max_frame_bytes: int, auth: AuthPolicy | None = None) -> FrameCodec:
        """A codec for this protocol at its current version."""
        return FrameCodec(self.protocol, self.version, max_frame_bytes=max_frame_bytes, auth=auth)

    def encode_frames(self, codec: FrameCodec, message: WireMessage) -> list[Buffer]:
        """The message's frame, then its attachments: one multipart message to send."""
        attachments = message.attachments()
        frame = codec.encode(message.TYPE, message.to_fields(), attachments=attachments)
        return [frame, *attachments]

    def encode(self, codec: FrameCodec, message: WireMessage) -> bytes:
        """The frame of a message that carries no attachments."""
        if message.attachments():
            raise UsageError(f"{type(message).__name__} has attachments: use encode_frames")
        return codec.encode(message.TYPE, message.to_fields())

    def decode(
        self,
        codec: FrameCodec,
        frame: Buffer,
        attachments: Sequence[Buffer] = (),
        context: Any = None,
        now_s: float | None = None,
    ) -> Any:
        """The message in ``frame`` (and the frames after it); ProtocolError (counter label in
        ``reason``) on anything bad. ``context`` goes to the field kinds (see `FieldKind`);
        ``now_s``: the receiver's clock for the auth trailer's time window (None: read it)."""
        message_type, fields = codec.decode(frame, attachments=attachments, now_s=now_s)
        cls = self._by_type.get(message_type)
        if cls is None:
            raise ProtocolError("unknown_type", str(message_type))
        return cls.from_fields(fields, attachments, context)


def trusted(cls: type[_T], **values: Any) -> _T:
    """Builds dataclass ``cls`` from values that already passed its checks (e.g. decoded and
    checked field by field), skipping the validation that would repeat them."""
    built = object.__new__(cls)
    defaults = _NOT_INIT.get(cls)
    if defaults is None:
        declared = fields(cls)  # type: ignore[arg-type]
        defaults = _NOT_INIT[cls] = [(f.name, f.default) for f in declared if not f.init]
    for name, value in defaults:
        object.__setattr__(built, name, value)
    for name, value in values.items():
        object.__setattr__(built, name, value)
    return built


_NOT_INIT: dict[type, list[tuple[str, Any]]] = {}  # fields set outside __init__, by class
