"""`AwaitedReplies`: a client polls a peer's socket only while a reply is awaited on it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshkv.dataplane.awaited import AWAITED_MAX, REPLY_WAIT_MAX_S, AwaitedReplies


def test_a_socket_is_polled_until_its_last_reply_comes():
    awaited = AwaitedReplies()
    awaited.sent(1, "a", 0.0)
    awaited.sent(2, "a", 0.0)
    awaited.sent(3, "b", 0.0)
    assert set(awaited.sockets(1.0)) == {"a", "b"}
    awaited.answered(1)
    awaited.answered(3)
    assert set(awaited.sockets(1.0)) == {"a"}
    awaited.answered(2)
    awaited.answered(2)  # a late duplicate changes nothing
    assert set(awaited.sockets(1.0)) == set()


def test_a_request_never_answered_stops_being_polled_after_the_reply_wait():
    awaited = AwaitedReplies()
    awaited.sent(1, "a", 10.0)
    assert set(awaited.sockets(10.0 + REPLY_WAIT_MAX_S - 1)) == {"a"}
    assert set(awaited.sockets(10.0 + REPLY_WAIT_MAX_S)) == set()
    assert len(awaited) == 0


def test_a_forgotten_socket_is_never_named_again():
    awaited = AwaitedReplies()
    awaited.sent(1, "a", 0.0)
    awaited.sent(2, "a", 0.0)
    awaited.forget_socket("a")
    assert set(awaited.sockets(0.0)) == set()
    awaited.answered(1)  # its entries drop out without naming it again
    assert set(awaited.sockets(0.0)) == set()


def test_the_table_is_bounded():
    awaited = AwaitedReplies()
    for req in range(AWAITED_MAX + 10):
        awaited.sent(req, req % 3, 0.0)
    assert len(awaited) == AWAITED_MAX


@given(
    st.lists(
        st.tuples(st.sampled_from(["send", "reply"]), st.integers(0, 20), st.sampled_from("abc")),
        max_size=60,
    )
)
def test_the_sockets_named_are_those_of_the_requests_still_awaited(steps):
    awaited = AwaitedReplies()
    expected: dict[int, str] = {}
    for what, req, sock in steps:
        if what == "send":
            awaited.sent(req, sock, 0.0)
            expected[req] = sock
        else:
            awaited.answered(req)
            expected.pop(req, None)
        assert set(awaited.sockets(0.0)) == set(expected.values())
