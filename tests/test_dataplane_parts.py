"""The data plane's multipart send and receive (`meshkv.dataplane.parts`) on real ZMQ sockets."""

from __future__ import annotations

import time

import pytest
import zmq

from meshkv.dataplane import parts

ARRIVAL_TIMEOUT_S = 5.0


@pytest.fixture
def pair():
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    yield router, dealer
    dealer.close(linger=0)
    router.close(linger=0)
    context.term()


def _arrive(sock: zmq.Socket, *, copy: bool = True) -> list:
    """Polls until a message is queued on ``sock`` (bounded), then receives it."""
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
    while time.monotonic() < deadline:
        if sock.poll(50, zmq.POLLIN):
            received = parts.receive(sock, copy=copy)
            assert received is not None
            return received
    raise AssertionError("nothing arrived")


def test_nothing_queued_is_none_not_an_exception(pair):
    router, _ = pair
    assert parts.receive(router) is None
    assert not parts.readable(router)


def test_a_multipart_message_arrives_whole_and_in_order(pair):
    router, dealer = pair
    sent = [b"header", memoryview(b"payload" * 1000), b""]
    assert parts.send(dealer, sent)
    identity, *received = _arrive(router)
    assert received == [b"header", b"payload" * 1000, b""]
    assert parts.send(router, [identity, b"reply", b"more"])
    frames = _arrive(dealer, copy=False)
    assert [bytes(f.buffer) for f in frames] == [b"reply", b"more"]
    assert parts.receive(dealer) is None


def test_messages_queued_together_are_received_one_by_one(pair):
    router, dealer = pair
    for index in range(3):
        assert parts.send(dealer, [str(index).encode(), b"x"])
    assert [_arrive(router)[1:] for _ in range(3)] == [[b"0", b"x"], [b"1", b"x"], [b"2", b"x"]]


def test_a_full_queue_refuses_the_whole_message():
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.SNDHWM, 1)
    dealer.setsockopt(zmq.IMMEDIATE, 1)  # no peer connected: nothing can be queued
    dealer.connect("tcp://127.0.0.1:1")
    try:
        assert not parts.send(dealer, [b"a", b"b"])
    finally:
        dealer.close(linger=0)
        context.term()
