"""The frame envelope: versions, bounds, authentication, replay, garbage."""

import contextlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshkv.errors import ProtocolError, UsageError
from meshkv.wire import AuthPolicy, FrameCodec, Protocol, require, require_list

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


def test_field_helpers_validate() -> None:
    fields = {"n": 3, "flag": True, "keys": [b"a", b"b"]}
    assert require(fields, "n", int) == 3
    assert require_list(fields, "keys", bytes, 4) == [b"a", b"b"]
    for call in (
        lambda: require(fields, "flag", int),  # a bool is not an int on the wire
        lambda: require(fields, "missing", int),
        lambda: require_list(fields, "keys", bytes, 1),
        lambda: require_list(fields, "keys", int, 4),
    ):
        with pytest.raises(ProtocolError):
            call()
