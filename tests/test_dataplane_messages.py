"""Data-plane messages: every type round-trips; malformed fields are refused with a label."""

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshkv.dataplane import messages as m
from meshkv.errors import ProtocolError, UsageError
from meshkv.transfer.channel import SegmentInfo
from meshkv.wire import AuthPolicy

CODEC = m.make_codec(1 << 20)
KEY = bytes(range(16))

SAMPLES = [
    m.Hello(req=1, sender="a/0", nonce=7, channel="nixl", agent=b"md",
            segments=[SegmentInfo(segment=0, address=4096, nbytes=1 << 20)]),
    m.HelloReply(req=1, sender="b/0", nonce=8, channel="tcp", agent=b"", segments=[]),
    m.Lookup(req=2, epoch=3, keys=[KEY, KEY]),
    m.LookupReply(req=2, epoch=3, held=2, pointers=["a/0"], runs=[3]),
    m.LookupReply(req=2, epoch=3, held=0),
    m.ChainAt(req=9, epoch=3, head=KEY, start=0, keys=[KEY, KEY[::-1]], holder="a/0"),
    m.Get(req=4, epoch=3, sender="a/0", keys=[KEY], dest=[m.SlotRef(0, 4096)], budget_ms=100,
          sent_ms=1_790_000_000_000),
    m.Get(req=4, epoch=3, sender="a/0", keys=[KEY], dest=[m.SlotRef(0, 8192)], budget_ms=100,
          sent_ms=1_790_000_000_000, offset=4096, nbytes=4096),
    m.GetReply(req=4, checksums=[b"c" * 16], payloads=[b"x" * 10]),
    m.Put(req=5, epoch=3, keys=[KEY], chunk_bytes=10, checksums=[b"c"], payloads=[b"x" * 10]),
    m.PutReply(req=5, epoch=3, slots=[m.SlotRef(1, 0), None], stored=0),
    m.Commit(req=6, keys=[KEY], checksums=[b"c" * 16]),
    m.CommitReply(req=6, stored=1),
    m.HeldAt(req=7, epoch=3, keys=[KEY], holder="a/0"),
    m.Error(req=8, reason="stale_epoch"),
]  # fmt: skip


@pytest.mark.parametrize("message", SAMPLES, ids=lambda x: type(x).__name__)
def test_round_trip(message: m.Message) -> None:
    frame, *attachments = m.encode_frames(CODEC, message)
    assert m.decode(CODEC, frame, attachments) == message


def test_a_get_reply_s_payloads_travel_as_frames_of_their_own() -> None:
    payloads = [b"x" * 1000, b"y" * 1000]
    reply = m.GetReply(req=4, checksums=[b"c" * 16, b"d" * 16], payloads=payloads)
    frame, *attachments = m.encode_frames(CODEC, reply)
    assert attachments == payloads and b"x" * 1000 not in frame
    with pytest.raises(UsageError, match="encode_frames"):
        m.encode(CODEC, reply)
    with pytest.raises(ProtocolError) as info:
        m.decode(CODEC, frame, attachments[:1])
    assert info.value.reason == "malformed"
    lookup = m.encode(CODEC, m.Lookup(req=1, epoch=0, keys=[KEY]))
    with pytest.raises(ProtocolError) as info:
        m.decode(CODEC, lookup, [b"stowaway"])
    assert info.value.reason == "malformed"


def test_the_mac_covers_a_get_reply_s_payloads() -> None:
    signed = m.make_codec(1 << 20, AuthPolicy.from_strings("s" * 16))
    reply = m.GetReply(req=4, checksums=[b"c" * 16], payloads=[b"x" * 100])
    frame, payload = m.encode_frames(signed, reply)
    assert m.decode(signed, frame, [payload]).payloads == [b"x" * 100]
    for forged in ([b"y" + bytes(payload)[1:]], [payload, b""], []):
        with pytest.raises(ProtocolError) as info:
            m.decode(signed, frame, forged)
        assert info.value.reason == "bad_auth"


def test_keys_travel_packed_and_a_lookup_reply_names_the_responder_for_what_it_holds() -> None:
    frame = m.encode(CODEC, m.Lookup(req=1, epoch=0, keys=[KEY, KEY[::-1]]))
    assert KEY + KEY[::-1] in frame
    reply = m.LookupReply(req=1, epoch=0, held=2, pointers=["c/0", "d/0"], runs=[2, 1])
    assert reply.holders("b/0") == ["b/0", "b/0", "c/0", "c/0", "d/0"]


@pytest.mark.parametrize(
    ("message_type", "fields", "reason"),
    [
        (m.MessageType.LOOKUP, {"req": 1, "epoch": 0, "keys": KEY + b"short"}, "malformed"),
        (m.MessageType.LOOKUP, {"req": 1, "epoch": 0, "keys": [KEY]}, "malformed"),  # v1's list
        (m.MessageType.LOOKUP, {"req": -1, "epoch": 0, "keys": b""}, "malformed"),
        (m.MessageType.LOOKUP, {"req": 1, "epoch": 0, "keys": KEY * (m.MAX_KEYS + 1)}, "too_many"),
        (m.MessageType.LOOKUP_REPLY, {"req": 1, "epoch": 0, "held": m.MAX_KEYS,
                                   "pointers": ["a/0"], "runs": [1]}, "too_many"),
        (m.MessageType.LOOKUP_REPLY, {"req": 1, "epoch": 0, "held": 1, "pointers": [""],
                                   "runs": [1]}, "malformed"),
        (m.MessageType.LOOKUP_REPLY, {"req": 1, "epoch": 0, "held": 1, "pointers": ["a/0"],
                                   "runs": []}, "malformed"),  # a holder for no run
        (m.MessageType.LOOKUP_REPLY, {"req": 1, "epoch": 0, "held": 1, "pointers": ["a/0"],
                                   "runs": [0]}, "malformed"),  # an empty run
        (m.MessageType.CHAIN_AT, {"req": 1, "epoch": 0, "head": KEY, "start": 0,
                               "keys": KEY[::-1], "holder": "a/0"}, "malformed"),  # not its head
        (m.MessageType.CHAIN_AT, {"req": 1, "epoch": 0, "head": b"short", "start": 1,
                               "keys": KEY, "holder": "a/0"}, "malformed"),
        (m.MessageType.GET, {"req": 1, "epoch": 0, "sender": "a", "keys": KEY,
                          "dest": [[0, 0], [0, 1]], "budget_ms": 1}, "malformed"),
        (m.MessageType.GET, {"req": 1, "epoch": 0, "sender": "a", "keys": KEY * 2, "dest": [],
                          "budget_ms": 1, "offset": 0, "nbytes": 64}, "malformed"),  # 2 keys
        (m.MessageType.GET, {"req": 1, "epoch": 0, "sender": "a", "keys": KEY, "dest": [],
                          "budget_ms": 1, "offset": 64, "nbytes": 0}, "malformed"),
        (m.MessageType.HELLO, {"req": 1, "sender": "a", "nonce": 1, "channel": "rdma",
                            "agent": b"", "segments": []}, "malformed"),
        (m.MessageType.COMMIT, {"req": 1, "keys": KEY, "checksums": []}, "malformed"),
        (m.MessageType.PUT_REPLY, {"req": 1, "epoch": 0, "slots": [[1]], "stored": 0}, "malformed"),
        (99, {"req": 1}, "unknown_type"),
    ],
)  # fmt: skip
def test_bad_fields_are_refused(message_type: int, fields: dict, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        m.decode(CODEC, CODEC.encode(message_type, fields))
    assert info.value.reason == reason


@settings(suppress_health_check=[HealthCheck.too_slow])  # a busy CI host draws slowly
@given(st.integers(0, 20), st.dictionaries(st.sampled_from(["req", "epoch", "keys", "sender",
       "held", "pointers", "runs", "head", "start", "holder", "dest", "slots", "checksums",
       "payloads", "budget_ms", "reason", "offset", "nbytes", "sent_ms"]),
       st.one_of(st.integers(-(2**63), 2**64 - 1), st.binary(max_size=20), st.text(max_size=5),
                 st.lists(st.binary(max_size=17), max_size=3), st.none())))  # fmt: skip
def test_random_fields_never_escape_as_anything_but_protocol_error(t: int, fields: dict) -> None:
    with contextlib.suppress(ProtocolError):
        m.decode(CODEC, CODEC.encode(t, fields))


def late_get(budget_ms: int, sent_ms: int) -> m.Get:
    return m.Get(req=1, epoch=0, sender="a/0", keys=[KEY], dest=[], budget_ms=budget_ms,
                 sent_ms=sent_ms)  # fmt: skip


def test_a_get_read_late_is_given_only_the_time_its_requester_still_waits() -> None:
    get = late_get(budget_ms=100, sent_ms=10_000)
    assert get.time_left_s(10_000) == 0.1  # read at once
    assert get.time_left_s(9_000) == 0.1  # the holder's clock is behind: the budget, no more
    assert get.time_left_s(10_000 + m.LATE_WRITE_MS) == 0.1  # a clock ahead by that much
    assert get.time_left_s(10_000 + m.LATE_WRITE_MS + 60) == pytest.approx(0.04)
    assert get.time_left_s(10_000 + 100 + m.LATE_WRITE_MS) <= 0  # the requester gave up


@given(
    budget_ms=st.integers(1, 60_000),
    sent_ms=st.integers(0, 1 << 44),
    read_after_ms=st.integers(0, 120_000),
    skew_ms=st.integers(-m.LATE_WRITE_MS, m.LATE_WRITE_MS),
)
def test_a_holder_stops_writing_before_a_requester_reuses_its_slots(
    budget_ms: int, sent_ms: int, read_after_ms: int, skew_ms: int
) -> None:
    """With clocks at most LATE_WRITE_MS apart, a holder that reads a get ``read_after_ms``
    after it was sent stops by the requester's deadline + 2 x LATE_WRITE_MS (when the
    requester may reuse the slots), and a get read at once keeps its whole budget."""
    get = late_get(budget_ms, sent_ms)
    read_at = sent_ms + read_after_ms  # by the requester's clock
    left_ms = get.time_left_s(read_at + skew_ms) * 1000
    if left_ms > 0:
        assert read_at + left_ms <= sent_ms + budget_ms + 2 * m.LATE_WRITE_MS + 1e-6
    if read_after_ms == 0:
        assert left_ms == pytest.approx(budget_ms)
