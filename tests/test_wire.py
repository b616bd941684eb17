"""The frame envelope (versions, bounds, authentication, replay, garbage) and the message
mechanism (fields checked when built and when decoded)."""

import contextlib
import os
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshkv.errors import ProtocolError, UsageError
from meshkv.wire import (
    AuthPolicy,
    FrameCodec,
    InvalidField,
    MessageSet,
    Protocol,
    WireMessage,
    wire_field,
)
from meshkv.wire_fields import Flag, Items, Text, UInt

SECRET = "s" * 16
NEW_SECRET = "n" * 16


def codec(*secrets: str, version: int = 1, protocol: Protocol = Protocol.GOSSIP) -> FrameCodec:
    return FrameCodec(
        protocol, version, max_frame_bytes=4096, auth=AuthPolicy.from_strings(*secrets)
    )


def reason(c: FrameCodec, frame: bytes | memoryview, now_s: float | None = None) -> str:
    with pytest.raises(ProtocolError) as info:
        c.decode(frame, now_s=now_s)
    return info.value.reason


def test_round_trip_plain_and_authenticated() -> None:
    for c in (codec(), codec(SECRET)):
        assert c.decode(c.encode(7, {"a": 1, "b": b"x"})) == (7, {"a": 1, "b": b"x"})


def test_a_received_buffer_decodes_in_place_like_bytes() -> None:
    """The data-plane client hands `decode` a view of ZMQ's buffer (no copy of a large reply)."""
    for c in (codec(), codec(SECRET)):
        frame = c.encode(7, {"payload": b"x" * 1000})
        assert c.decode(memoryview(frame)) == (7, {"payload": b"x" * 1000})
    tampered = bytearray(codec(SECRET).encode(3, {"member": "a/0"}))
    tampered[8] ^= 0x01
    assert reason(codec(SECRET), memoryview(tampered)) == "bad_auth"


def test_refusals_have_counter_labels() -> None:
    plain, authed = codec(), codec(SECRET)
    frame = plain.encode(1, {})
    assert reason(codec(version=2), frame) == "bad_version"
    assert reason(codec(protocol=Protocol.DATA), frame) == "wrong_protocol"
    assert reason(plain, b"XX" + frame[2:]) == "bad_magic"
    assert reason(plain, frame[:3]) == "truncated"
    assert reason(plain, b"\0" * 5000) == "too_large"
    assert reason(authed, frame) == "unauthenticated"
    assert reason(plain, authed.encode(1, {})) == "unexpected_auth"
    assert reason(codec("w" * 16), authed.encode(1, {})) == "bad_auth"
    assert reason(plain, frame[:5] + b"\xc1") == "malformed"
    assert reason(plain, frame[:5] + b"\x93\x01\x02\x03") == "malformed"


def test_tampered_body_fails_authentication() -> None:
    c = codec(SECRET)
    frame = bytearray(c.encode(3, {"member": "a/0"}))
    frame[8] ^= 0x01
    assert reason(c, bytes(frame)) == "bad_auth"


def test_replayed_and_stale_frames_are_refused() -> None:
    sender, receiver = codec(SECRET), codec(SECRET)
    frame = sender.encode(1, {"x": 1}, now_s=1000.0)
    assert receiver.decode(frame, now_s=1000.5) == (1, {"x": 1})
    assert reason(receiver, frame, now_s=1001.0) == "replayed"
    assert reason(receiver, sender.encode(1, {}, now_s=1000.0), now_s=1100.0) == "stale"


def test_rotation_accepts_both_secrets_and_signs_with_the_first() -> None:
    old, rotating, new = codec(SECRET), codec(NEW_SECRET, SECRET), codec(NEW_SECRET)
    assert rotating.decode(old.encode(1, {}))[0] == 1
    assert new.decode(rotating.encode(2, {}))[0] == 2
    assert reason(old, rotating.encode(2, {})) == "bad_auth"


def test_oversized_encode_is_our_bug() -> None:
    with pytest.raises(UsageError):
        codec().encode(1, {"blob": b"x" * 5000})


def test_short_secret_refused() -> None:
    with pytest.raises(UsageError):
        AuthPolicy.from_strings("short")


@given(st.binary(max_size=600))
def test_random_bytes_never_escape_as_anything_but_protocol_error(data: bytes) -> None:
    for c in (codec(), codec(SECRET)):
        for frame in (data, memoryview(data)):
            with contextlib.suppress(ProtocolError):
                c.decode(frame)


def test_replay_cache_is_bounded() -> None:
    c = FrameCodec(
        Protocol.DATA,
        1,
        max_frame_bytes=1024,
        auth=AuthPolicy(secrets=(os.urandom(16),), replay_cache_entries=8),
    )
    for _ in range(100):
        c.decode(c.encode(1, {}))
    assert len(c._seen_nonces) <= 8


@dataclass(frozen=True, slots=True, kw_only=True)
class _Probe(WireMessage):
    TYPE: ClassVar[IntEnum] = IntEnum("ProbeType", "PROBE").PROBE
    count: int = wire_field("n", UInt(10), "a small count")
    flag: bool = wire_field("f", Flag(), "a flag")
    names: list[str] = wire_field("names", Items(Text(4), 2), "up to two short names")

    def validate(self) -> None:
        if self.flag and not self.names:
            raise InvalidField("malformed", "a flag needs a name")


PROBES = MessageSet(Protocol.GOSSIP, {1: "first"}, [_Probe])


def test_a_message_is_checked_field_by_field_when_built() -> None:
    assert _Probe(count=3, flag=True, names=["ab"]).to_fields() == {
        "n": 3, "f": True, "names": ["ab"]
    }  # fmt: skip
    for bad in (
        {"count": True, "flag": False, "names": []},  # a bool is not an int
        {"count": 11, "flag": False, "names": []},
        {"count": 1, "flag": 1, "names": []},
        {"count": 1, "flag": False, "names": ["toolong"]},
        {"count": 1, "flag": False, "names": ("a",)},
        {"count": 1, "flag": True, "names": []},  # the rule across fields
    ):
        with pytest.raises(UsageError):
            _Probe(**bad)
    with pytest.raises(InvalidField) as info:
        _Probe(count=1, flag=False, names=["a", "b", "c"])
    assert info.value.reason == "too_many"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"n": 1, "f": False}, "malformed"),  # a field missing
        ({"n": True, "f": False, "names": []}, "malformed"),
        ({"n": 1, "f": False, "names": "ab"}, "malformed"),
        ({"n": 1, "f": False, "names": ["a", "b", "c"]}, "too_many"),
        ({"n": 1, "f": True, "names": []}, "malformed"),
    ],
)
def test_a_decoded_message_is_refused_with_the_label_of_its_first_defect(
    fields: dict, reason: str
) -> None:
    codec = PROBES.codec(1024)
    with pytest.raises(ProtocolError) as info:
        PROBES.decode(codec, codec.encode(1, fields))
    assert info.value.reason == reason
    with pytest.raises(ProtocolError) as info:
        PROBES.decode(codec, codec.encode(1, {"n": 1, "f": False, "names": []}), [b"x"])
    assert info.value.reason == "malformed"  # it carries no attachments
    with pytest.raises(ProtocolError) as info:
        PROBES.decode(codec, codec.encode(2, {}))
    assert info.value.reason == "unknown_type"


def test_a_message_set_has_one_version_history_and_unique_type_ids() -> None:
    assert PROBES.version == 1 and PROBES.codec(64).version == 1
    with pytest.raises(UsageError):
        MessageSet(Protocol.GOSSIP, {1: "first", 3: "skipped a number"}, [_Probe])
    with pytest.raises(UsageError):
        MessageSet(Protocol.GOSSIP, {1: "first"}, [_Probe, _Probe])
