"""Gossip messages: round trips, and every malformed frame refused, dropped and counted."""

from __future__ import annotations

import random
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshkv.errors import ProtocolError, UsageError
from meshkv.gossip.config import GossipConfig
from meshkv.gossip.member import MemberInfo, MemberState
from meshkv.gossip.messages import (
    MAX_UPDATES_PER_FRAME,
    VERSION,
    Ack,
    Gossip,
    MemberRecord,
    MessageType,
    Nack,
    Ping,
    PingReq,
    PushPull,
    StateQuery,
    StateReply,
    decode_message,
    encode_message,
    gossip_codec,
)
from meshkv.gossip.swim import Swim
from meshkv.gossip.updates import Alive, Dead, Suspect, UpdateCache
from meshkv.wire import AuthPolicy, FrameCodec, Protocol

CONFIG = GossipConfig.test()
CODEC = gossip_codec(CONFIG)

ALIVE = Alive(name="a/0", nonce=7, incarnation=1_700_000_000_000, address="127.0.0.1:7001",
              meta={"ns": "n", "free": 12, "ratio": 0.5, "ok": True})  # fmt: skip
SUSPECT = Suspect(name="b/1", nonce=2**64 - 1, incarnation=3, source="a/0")
LEFT = Dead(name="c/0", nonce=0, incarnation=9, source="c/0", left=True)
RECORD = MemberRecord(name="d/0", nonce=1, address="h:9", incarnation=2, state=MemberState.DEAD,
                      meta={})  # fmt: skip

SAMPLES = [
    Ping(seq=1, target="b/1", source="a/0", source_address="127.0.0.1:7001",
         updates=(ALIVE, SUSPECT, LEFT)),
    Ack(seq=2**32 - 1, source="b/1", updates=(SUSPECT,)),
    PingReq(seq=3, target="c/0", target_address="h:2", source="a/0", source_address="h:1"),
    Nack(seq=4, source="c/0"),
    Gossip(source="a/0", updates=(ALIVE,)),
    PushPull(source="a/0", source_address="h:1", reply_wanted=True, records=(RECORD,)),
    StateQuery(query_id=5),
    StateReply(query_id=5, part=1, parts=2, records=(RECORD, RECORD)),
]  # fmt: skip


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: object) -> None:
    frame = encode_message(CODEC, message)  # type: ignore[arg-type]
    assert decode_message(CODEC, frame) == message
    assert decode_message(CODEC, frame, UpdateCache(8)) == message


def test_cache_returns_the_validated_update_for_equal_bytes() -> None:
    cache = UpdateCache(max_entries=2)
    frame = encode_message(CODEC, Gossip(source="x/0", updates=(ALIVE, SUSPECT)))
    first = decode_message(CODEC, frame, cache)
    second = decode_message(CODEC, frame, UpdateCache(max_entries=2))  # shared per process
    assert isinstance(first, Gossip) and isinstance(second, Gossip)
    assert first.updates[0] is second.updates[0]


def test_settled_updates_are_left_out_and_bounded() -> None:
    cache = UpdateCache(max_entries=2)
    frame = encode_message(CODEC, Gossip(source="x/0", updates=(ALIVE, SUSPECT, LEFT)))
    cache.settle(ALIVE)
    message = decode_message(CODEC, frame, cache)
    assert isinstance(message, Gossip) and message.updates == (SUSPECT, LEFT)
    cache.settle(SUSPECT)
    cache.settle(LEFT)  # the oldest (ALIVE) is forgotten
    message = decode_message(CODEC, frame, cache)
    assert isinstance(message, Gossip) and message.updates == (ALIVE,)
    assert decode_message(CODEC, frame) == Gossip(source="x/0", updates=(ALIVE, SUSPECT, LEFT))


names = st.text(
    st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1, max_size=20
).filter(str.isprintable)
meta_values = st.one_of(
    st.text(max_size=10),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
)
alive_updates = st.builds(
    Alive,
    name=names,
    nonce=st.integers(0, 2**64 - 1),
    incarnation=st.integers(0, 2**63 - 1),
    address=st.builds(lambda h, p: f"{h}:{p}", names, st.integers(1, 65535)),
    meta=st.dictionaries(st.text(min_size=1, max_size=8), meta_values, max_size=4),
)


@settings(max_examples=100, deadline=None)
@given(updates=st.lists(alive_updates, max_size=5), seq=st.integers(0, 2**32 - 1))
def test_round_trip_property(updates: list[Alive], seq: int) -> None:
    message = Ack(seq=seq, source="s/0", updates=tuple(updates))
    assert decode_message(CODEC, encode_message(CODEC, message)) == message


TINY = msgpack.packb([1, "b", 0, 0, "a"])  # a small Suspect update


def _frame(message_type: int, fields: dict, version: int = VERSION) -> bytes:
    body = msgpack.packb([message_type, fields], use_bin_type=True)
    return struct.pack("!2sBBB", b"MK", Protocol.GOSSIP, version, 0) + body


def _ping_fields(**changes: object) -> dict:
    fields = SAMPLES[0].to_fields()  # type: ignore[union-attr]
    fields.update(changes)
    return fields


MALFORMED = {
    "empty": (b"", "truncated"),
    "garbage": (b"\x00\x01\x02\x03\x04\x05\x06", "bad_magic"),
    "truncated": (encode_message(CODEC, SAMPLES[0])[:20], "malformed"),
    "oversized": (b"MK" + b"\x01" * 5000, "too_large"),
    "wrong version": (_frame(MessageType.PING, _ping_fields(), VERSION + 1), "bad_version"),
    "wrong protocol": (b"MK\x02\x01\x00" + msgpack.packb([1, {}]), "wrong_protocol"),
    "unknown type": (_frame(200, {}), "unknown_type"),
    "body not a list": (b"MK\x01\x01\x00" + msgpack.packb({"a": 1}), "malformed"),
    "missing field": (_frame(MessageType.PING, _ping_fields(seq=None)), "malformed"),
    "seq as str": (_frame(MessageType.PING, _ping_fields(seq="1")), "malformed"),
    "seq as bool": (_frame(MessageType.PING, _ping_fields(seq=True)), "malformed"),
    "seq negative": (_frame(MessageType.PING, _ping_fields(seq=-1)), "malformed"),
    "seq too big": (_frame(MessageType.PING, _ping_fields(seq=2**32)), "malformed"),
    "bad address": (_frame(MessageType.PING, _ping_fields(src_addr="nohost")), "malformed"),
    "name too long": (_frame(MessageType.PING, _ping_fields(src="x" * 200)), "malformed"),
    "updates not a list": (_frame(MessageType.PING, _ping_fields(updates=5)), "malformed"),
    "update not bytes": (_frame(MessageType.PING, _ping_fields(updates=[[0, "a"]])), "malformed"),
    "update garbage": (_frame(MessageType.PING, _ping_fields(updates=[b"\xc1"])), "malformed"),
    "update trailing": (
        _frame(MessageType.PING, _ping_fields(updates=[ALIVE.packed() + b"\x00"])),
        "malformed",
    ),
    "update unknown kind": (
        _frame(MessageType.GOSSIP, {"src": "a/0", "updates": [msgpack.packb([9, "a", 1, 1, "b"])]}),
        "malformed",
    ),
    "update nonce float": (
        _frame(MessageType.GOSSIP,
               {"src": "a/0", "updates": [msgpack.packb([1, "a", 1.0, 1, "b"])]}),
        "malformed",
    ),
    "meta value list": (
        _frame(MessageType.GOSSIP,
               {"src": "a/0", "updates": [msgpack.packb([0, "a", 1, 1, "h:1", {"k": [1]}])]}),
        "malformed",
    ),
    "too many updates": (
        _frame(MessageType.GOSSIP, {"src": "a/0", "updates": [TINY] * (MAX_UPDATES_PER_FRAME + 1)}),
        "too_many",
    ),
    "record bad state": (
        _frame(MessageType.PUSH_PULL, {"src": "a/0", "src_addr": "h:1", "reply": False,
                                       "records": [[7, ALIVE.incarnation, ALIVE.packed()]]}),
        "malformed",
    ),
    "record older than its alive": (
        _frame(MessageType.PUSH_PULL, {"src": "a/0", "src_addr": "h:1", "reply": False,
                                       "records": [[2, ALIVE.incarnation - 1, ALIVE.packed()]]}),
        "malformed",
    ),
    "alive record of another incarnation": (
        _frame(MessageType.STATE_REPLY, {"query_id": 1, "part": 0, "parts": 1,
                                         "records": [[0, ALIVE.incarnation + 1, ALIVE.packed()]]}),
        "malformed",
    ),
    "record without an alive": (
        _frame(MessageType.PUSH_PULL, {"src": "a/0", "src_addr": "h:1", "reply": False,
                                       "records": [[1, 3, SUSPECT.packed()]]}),
        "malformed",
    ),
    "reply not bool": (
        _frame(MessageType.PUSH_PULL, {"src": "a/0", "src_addr": "h:1", "reply": 1,
                                       "records": []}),
        "malformed",
    ),
    "part out of range": (
        _frame(MessageType.STATE_REPLY, {"query_id": 1, "part": 2, "parts": 2, "records": []}),
        "malformed",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_frames_raise_protocol_error(case: str) -> None:
    frame, reason = MALFORMED[case]
    with pytest.raises(ProtocolError) as caught:
        decode_message(CODEC, frame, UpdateCache(8))
    assert caught.value.reason == reason


def _swim(codec: FrameCodec | None = None) -> Swim:
    me = MemberInfo(name="me/0", nonce=1, address="127.0.0.1:7000", meta={})
    return Swim(config=CONFIG, me=me, incarnation_start=10, rng=random.Random(0), now_s=0.0,
                codec=codec)  # fmt: skip


def test_swim_drops_and_counts_every_malformed_frame() -> None:
    swim = _swim()
    expected: dict[str, int] = {}
    for frame, reason in MALFORMED.values():
        swim.receive(frame, 1.0)
        expected[f"drop_{reason}"] = expected.get(f"drop_{reason}", 0) + 1
    assert {k: v for k, v in swim.stats.items() if k.startswith("drop_")} == expected
    assert swim.stats["rx_ok"] == 0
    assert swim.members()[0].state is MemberState.ALIVE


@settings(max_examples=300, deadline=None)
@given(frame=st.binary(max_size=300))
def test_swim_never_raises_on_random_bytes(frame: bytes) -> None:
    swim = _swim()
    swim.receive(frame, 1.0)
    swim.receive(b"MK\x01\x01\x00" + frame, 1.0)
    assert sum(swim.stats.values()) >= 2


def test_unauthenticated_and_wrongly_signed_frames_are_dropped() -> None:
    secret = AuthPolicy(secrets=(b"s" * 16,))
    swim = _swim(gossip_codec(CONFIG, secret))
    ping = Ping(seq=1, target="me/0", source="x/0", source_address="h:1")
    swim.receive(encode_message(CODEC, ping), 1.0)
    swim.receive(encode_message(gossip_codec(CONFIG, AuthPolicy(secrets=(b"t" * 16,))), ping), 1.0)
    assert swim.stats["drop_unauthenticated"] == 1 and swim.stats["drop_bad_auth"] == 1
    swim.receive(encode_message(gossip_codec(CONFIG, secret), ping), 1.0)
    assert swim.stats["rx_ping"] == 1
    assert len(swim.take_outgoing()) == 1  # the ack


def test_messages_validate_on_construction() -> None:
    with pytest.raises(UsageError):
        Ping(seq=-1, target="a/0", source="b/0", source_address="h:1")
    with pytest.raises(UsageError):
        Gossip(source="a/0", updates=[ALIVE])  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        StateReply(query_id=1, part=3, parts=3, records=())
    with pytest.raises(UsageError):
        Dead(name="a/0", nonce=1, incarnation=1, source="a/0", left=1)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        encode_message(CODEC, Gossip(source="a/0", updates=(ALIVE,) * 100))  # over the frame bound
