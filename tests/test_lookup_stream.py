"""Lookups on plain TCP: the stream framing, a real `LookupPort` on 127.0.0.1 fed good and bad
bytes, and a `RequestClient` that falls back to the data port when a lookup port fails."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from meshkv.dataplane import messages as m
from meshkv.dataplane.client import RequestClient
from meshkv.dataplane.lookup_port import LookupPort
from meshkv.dataplane.stream import (
    LENGTH_BYTES,
    STREAM_FRAME_MAX,
    STREAM_PREFIX,
    FrameReader,
    stream_frame,
)
from meshkv.errors import ProtocolError, TransportError
from tests.conftest import wait_until

CODEC = m.make_codec(1 << 20)
REPLY_WAIT_S = 10.0


@given(
    frames=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
)
def test_frames_come_out_whole_and_in_order_however_the_stream_is_cut(frames, cuts):
    stream = b"".join(stream_frame(f) for f in frames)
    reader, out, start = FrameReader(), [], 0
    for cut in [*sorted(c for c in cuts if c < len(stream)), len(stream)]:
        out += reader.feed(stream[start:cut])
        start = cut
    assert out == frames


def test_a_length_past_the_bound_breaks_the_stream():
    with pytest.raises(ProtocolError) as raised:
        FrameReader().feed((STREAM_FRAME_MAX + 1).to_bytes(LENGTH_BYTES, "big"))
    assert raised.value.reason == "stream_frame_too_large"


def _answer(lookup: m.Lookup) -> m.Message:
    """The port's answer in these tests: every key held."""
    return m.LookupReply(req=lookup.req, epoch=lookup.epoch, held=len(lookup.keys))


@pytest.fixture
def port() -> Iterator[LookupPort]:
    port = LookupPort(host="127.0.0.1", port=0, codec=CODEC, answer=_answer)
    port.start()
    try:
        yield port
    finally:
        port.stop()


def _lookup(req: int, keys: int = 2) -> bytes:
    return stream_frame(m.encode(CODEC, m.Lookup(req=req, epoch=1, keys=[bytes(16)] * keys)))


def _replies(sock: socket.socket, count: int) -> list[m.Message]:
    """``count`` replies read from ``sock`` (bounded by REPLY_WAIT_S)."""
    reader, out = FrameReader(), []
    sock.settimeout(REPLY_WAIT_S)
    while len(out) < count:
        data = sock.recv(1 << 16)
        assert data, f"the port closed the connection after {len(out)} replies"
        out += [m.decode(CODEC, frame) for frame in reader.feed(data)]
    return out


def _connect(port: LookupPort) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port.port), timeout=REPLY_WAIT_S)


def test_pipelined_and_split_lookups_are_answered_in_order(port: LookupPort) -> None:
    with _connect(port) as sock:
        sock.sendall(_lookup(1) + _lookup(2, keys=5) + _lookup(3)[:7])
        sock.sendall(_lookup(3)[7:])
        replies = _replies(sock, 3)
    assert [(r.req, r.held) for r in replies] == [(1, 2), (2, 5), (3, 2)]
    assert port.stats["rx_lookup"] == 3


def test_a_bad_frame_is_dropped_and_counted_and_the_connection_goes_on(port: LookupPort) -> None:
    held_at = m.HeldAt(req=9, epoch=1, keys=[bytes(16)], holder="x/0")
    with _connect(port) as sock:
        sock.sendall(stream_frame(b"\x00garbage") + stream_frame(m.encode(CODEC, held_at)))
        sock.sendall(_lookup(4))
        (reply,) = _replies(sock, 1)
    assert reply.req == 4
    assert port.stats["drop_unexpected_type"] == 1
    assert sum(v for k, v in port.stats.items() if k.startswith("drop_")) == 2


def test_a_broken_length_closes_only_that_connection(port: LookupPort) -> None:
    with _connect(port) as sock:
        sock.sendall((STREAM_FRAME_MAX + 1).to_bytes(LENGTH_BYTES, "big"))
        sock.settimeout(REPLY_WAIT_S)
        assert sock.recv(16) == b"", "the port should close a stream it cannot frame"
    assert port.stats["drop_stream_frame_too_large"] == 1
    with _connect(port) as sock:
        sock.sendall(_lookup(5))
        assert [r.req for r in _replies(sock, 1)] == [5]


def test_a_client_asks_the_lookup_port_and_falls_back_to_the_data_port_once_it_fails() -> None:
    port = LookupPort(host="127.0.0.1", port=0, codec=CODEC, answer=_answer)
    port.start()
    lookup_address, data_address = f"127.0.0.1:{port.port}", "127.0.0.1:1"
    context = zmq.Context()
    client = RequestClient(context, CODEC)
    try:
        address = client.route(lookup_address, data_address)
        assert address == STREAM_PREFIX + lookup_address
        request = m.Lookup(req=client.next_id(), epoch=1, keys=[bytes(16)])
        reply = client.call(address, request, time.monotonic() + REPLY_WAIT_S)
        assert isinstance(reply, m.LookupReply) and reply.held == 1
        port.stop()  # the member's lookup port is gone (its data port may still answer)

        def fallen_back() -> bool:
            again = m.Lookup(req=client.next_id(), epoch=1, keys=[])
            return client.call(address, again, time.monotonic() + 0.2) is None and (
                client.route(lookup_address, data_address) == data_address
            )

        wait_until("the client sees the link closed and falls back", fallen_back)
        assert client.awaited() == 0
    finally:
        client.close()
        port.stop()
        context.destroy(linger=0)


def test_a_call_to_a_silent_lookup_port_ends_at_its_deadline_and_gives_its_request_up() -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel's backlog), never reads
    context = zmq.Context()
    client = RequestClient(context, CODEC)
    try:
        address = STREAM_PREFIX + f"127.0.0.1:{silent.getsockname()[1]}"
        request = m.Lookup(req=client.next_id(), epoch=1, keys=[bytes(16)])
        started = time.monotonic()
        assert client.call(address, request, started + 0.2) is None
        assert 0.19 <= time.monotonic() - started < REPLY_WAIT_S  # (polls wait whole ms)
        assert client.stats["timeout"] == 1
        assert client.awaited() == 0, "a request given up is not polled for any more"
    finally:
        client.close()
        silent.close()
        context.destroy(linger=0)


def test_a_lookup_port_in_use_is_a_transport_error_naming_it(port: LookupPort) -> None:
    with pytest.raises(TransportError, match=f"cannot bind lookup port 127.0.0.1:{port.port}"):
        LookupPort(host="127.0.0.1", port=port.port, codec=CODEC, answer=_answer)
