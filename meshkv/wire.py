"""The frame envelope shared by every meshkv protocol: header, size bound, optional HMAC.

A frame is ``header | body | trailer``:

- header (5 bytes): magic ``b"MK"``, protocol id, protocol version, flags;
- body: msgpack of ``[message_type, fields]`` where ``fields`` is a map of field name to value;
- trailer, present when flag AUTH is set (49 bytes): key fingerprint (1 byte), sender wall
  time in ms (8), random nonce (8), HMAC-SHA256 over everything before the MAC, then over each
  attachment (its length as 8 bytes, then its bytes) (32).

A message may carry attachments: bulk bytes sent as ZMQ frames of their own after the frame,
so that no codec copies them.

This module owns framing, versions, limits and authentication. It knows nothing of what any
message means: each protocol keeps its messages (type ids, fields, validation) in its own
``messages`` module and uses a `FrameCodec` to turn them into bytes and back.

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
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any
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
        size = len(frame) + sum(memoryview(a).nbytes for a in attachments)
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
        size = len(frame) + sum(memoryview(a).nbytes for a in attachments)
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


def require(fields: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """Returns ``fields[name]`` if present and of ``kind``, else raises ProtocolError."""
    value = fields.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ProtocolError("malformed", f"field {name!r} missing or not {kind}")
    return value


def require_list(fields: dict[str, Any], name: str, item: type, max_items: int) -> list[Any]:
    """Returns a list field whose items are all ``item``, bounded by ``max_items``."""
    value = require(fields, name, list)
    if len(value) > max_items:
        raise ProtocolError("too_many", f"field {name!r} has {len(value)} > {max_items} items")
    if not all(
        isinstance(v, item) and not (isinstance(v, bool) and item is not bool) for v in value
    ):
        raise ProtocolError("malformed", f"field {name!r} has an item that is not {item}")
    return value


def _as_tuple(kind: type | Sequence[type]) -> tuple[type, ...]:
    return tuple(kind) if isinstance(kind, tuple) else (kind,)
