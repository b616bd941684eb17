"""Fuzzing the gossip and data-plane decoders field by field (hypothesis).

The existing fuzzers feed random bytes (which rarely get past the envelope) and random flat
field maps. Here every frame is well-formed msgpack in a valid envelope, built from a real
message with one field, or one field nested inside an update or a record, replaced by a hostile
value: text that ``str.isdigit`` accepts but ``int`` refuses ("²"), huge integers, bytes where
text belongs, nesting, None. A member must drop and count such a frame: `Swim.receive` never
raises, and the data-plane decoder raises nothing but `ProtocolError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshkv.compat.worker_table import split_name
from meshkv.dataplane import messages as m
from meshkv.errors import ProtocolError
from meshkv.gossip.messages import Ping, encode_message
from tests.test_dataplane_messages import CODEC as DATA_CODEC
from tests.test_dataplane_messages import SAMPLES as DATA_SAMPLES
from tests.test_gossip_messages import CODEC as GOSSIP_CODEC
from tests.test_gossip_messages import SAMPLES as GOSSIP_SAMPLES
from tests.test_gossip_messages import _swim

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HOSTILE_TEXT = ["h:²", "h:٣", "²", "a/²", "a/٣", "", "\x00", "h:0", "h:65536", ":1", "h:", "/0",
                "a" * 300, "h:1:2", "[::1]:7", "é/0", "\u202e/0"]  # fmt: skip

hostile = st.recursive(
    st.sampled_from(HOSTILE_TEXT)
    | st.text(max_size=16)
    | st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
    | st.floats()
    | st.binary(max_size=24)
    | st.booleans()
    | st.none(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=5,
)


def paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a decoded field map (the map itself excluded)."""
    if path:
        yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*path, key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from paths(item, (*path, i))


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {k: replaced(v, rest, new) if k == head else v for k, v in value.items()}
    return [replaced(v, rest, new) if i == head else v for i, v in enumerate(value)]


def mutated_frames(codec: Any, samples: list[tuple[int, dict[str, Any]]]) -> st.SearchStrategy:
    @st.composite
    def frames(draw: st.DrawFn) -> bytes:
        message_type, fields = draw(st.sampled_from(samples))
        path = draw(st.sampled_from(list(paths(fields))))
        return codec.encode(message_type, replaced(fields, path, draw(hostile)))

    return frames()


GOSSIP_FIELDS = [GOSSIP_CODEC.decode(encode_message(GOSSIP_CODEC, s)) for s in GOSSIP_SAMPLES]
DATA_FIELDS = [DATA_CODEC.decode(m.encode_frames(DATA_CODEC, s)[0]) for s in DATA_SAMPLES]


@FUZZ
@given(mutated_frames(GOSSIP_CODEC, GOSSIP_FIELDS))
def test_swim_drops_and_counts_gossip_frames_with_hostile_fields(frame: bytes) -> None:
    swim = _swim()
    before = sum(swim.stats.values())
    swim.receive(frame, 1.0)  # must not raise, whatever the frame holds
    assert sum(swim.stats.values()) > before


@FUZZ
@given(mutated_frames(DATA_CODEC, DATA_FIELDS))
def test_data_frames_with_hostile_fields_are_protocol_errors_or_messages(frame: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        m.decode(DATA_CODEC, frame)


def test_a_port_that_isdigit_accepts_but_int_refuses_is_dropped() -> None:
    message_type, fields = GOSSIP_CODEC.decode(
        encode_message(GOSSIP_CODEC, Ping(seq=1, target="me/0", source="b/0", source_address="h:1"))
    )
    swim = _swim()
    swim.receive(GOSSIP_CODEC.encode(message_type, {**fields, "src_addr": "h:²"}), 1.0)
    assert swim.stats.get("drop_malformed", 0) == 1, dict(swim.stats)


@pytest.mark.parametrize(("name", "split"), [("a/0", ("a", 0)), ("a/²", None), ("a/", None)])
def test_member_names_with_a_rank_int_refuses_are_not_engines(name: str, split: Any) -> None:
    assert split_name(name) == split
