"""The gossip transport over real ZMQ sockets on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from meshkv.errors import TransportError
from meshkv.gossip.links import LinkLimits
from meshkv.gossip.transport import (
    OVERSIZE_SLACK_FACTOR,
    GossipTransport,
    Inbound,
    TransportLimits,
)

MAX_FRAME_BYTES = 4096
DEADLINE_S = 5.0


def _limits(**changes: object) -> TransportLimits:
    return TransportLimits(max_frame_bytes=MAX_FRAME_BYTES, **changes)  # type: ignore[arg-type]


@pytest.fixture
def opened() -> Iterator[Callable[..., GossipTransport]]:
    transports: list[GossipTransport] = []

    def open_transport(port: int = 0, **changes: object) -> GossipTransport:
        transport = GossipTransport("127.0.0.1", port, limits=_limits(**changes))
        transports.append(transport)
        return transport

    yield open_transport
    for transport in transports:
        transport.close()


@pytest.fixture
def client() -> Iterator[Callable[[str], zmq.Socket]]:
    ctx = zmq.Context()
    sockets: list[zmq.Socket] = []

    def connect(address: str) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{address}")
        sockets.append(sock)
        return sock

    yield connect
    for sock in sockets:
        sock.close()
    ctx.term()


def _receive(
    receiver: GossipTransport,
    *others: GossipTransport,
    count: int = 1,
    deadline_s: float = DEADLINE_S,
) -> list[Inbound]:
    """Pumps every transport until ``receiver`` got ``count`` frames or the deadline passes."""
    got: list[Inbound] = []
    end = time.monotonic() + deadline_s
    while len(got) < count and time.monotonic() < end:
        for other in others:
            other.wait(0)
        got += receiver.wait(0.02)
    return got


def test_first_frame_to_a_new_peer_waits_for_the_connection_and_arrives(opened):
    a, b = opened(), opened()
    assert a.send(b.address, b"hello")  # held: the connection is still opening
    (inbound,) = _receive(b, a)
    assert inbound.frame == b"hello"
    assert a.stats["transport.sent"] == 1
    assert b.stats["transport.received"] == 1


def test_reply_reaches_the_client_connection(opened, client):
    member = opened()
    sock = client(member.address)
    sock.send(b"query")
    (inbound,) = _receive(member)
    assert member.reply(inbound.reply_to, b"answer")
    assert sock.poll(int(DEADLINE_S * 1000)) and sock.recv() == b"answer"


def test_reply_to_a_vanished_client_is_dropped_and_counted(opened):
    member = opened()
    assert not member.reply(b"\x00nobody", b"answer")
    assert member.stats["transport.reply_dropped"] == 1


def test_frames_to_an_unreachable_peer_are_dropped_and_counted_without_blocking(opened):
    a = opened(connect_grace_s=0.1, pending_frames_max=3)
    gone = opened()
    address = gone.address
    gone.close()
    started = time.monotonic()
    held = [a.send(address, b"x%d" % i) for i in range(5)]
    assert time.monotonic() - started < 0.5
    assert held == [True, True, True, False, False]  # bounded by pending_frames_max
    time.sleep(0.15)  # past connect_grace_s
    assert a.wait(0) == []
    assert not a.send(address, b"late")
    assert a.stats["transport.send_dropped"] == 6
    assert a.stats["transport.sent"] == 0


def test_a_peer_restarted_at_the_same_address_gets_frames_again(opened):
    a, b = opened(), opened()
    port = int(b.address.rsplit(":", 1)[1])
    a.send(b.address, b"one")
    assert [i.frame for i in _receive(b, a)] == [b"one"]
    b.close()
    b2 = opened(port=port)
    got: list[Inbound] = []
    end = time.monotonic() + DEADLINE_S
    while not got and time.monotonic() < end:
        a.send(b2.address, b"again")
        got = _receive(b2, a, deadline_s=0.1)
    assert got and got[0].frame == b"again"


def test_oversized_frames_are_cut_by_zmq_and_the_member_keeps_receiving(opened, client):
    member = opened()
    sock = client(member.address)
    slightly_large = b"s" * (MAX_FRAME_BYTES + 1)
    sock.send(slightly_large)  # reaches the codec, which drops and counts it
    (inbound,) = _receive(member)
    assert inbound.frame == slightly_large
    huge = client(member.address)
    huge.send(b"h" * (MAX_FRAME_BYTES * OVERSIZE_SLACK_FACTOR + 1))
    assert _receive(member, deadline_s=0.3) == []
    sock.send(b"still here")
    assert [i.frame for i in _receive(member)] == [b"still here"]


def test_multipart_frames_are_dropped_and_counted(opened, client):
    member = opened()
    sock = client(member.address)
    sock.send_multipart([b"a", b"b"])
    sock.send(b"single")
    assert [i.frame for i in _receive(member)] == [b"single"]
    assert member.stats["transport.bad_parts"] == 1


def test_peer_sockets_are_bounded_least_recently_used_first(opened):
    a = opened(peer_sockets_max=2)
    peers = [opened() for _ in range(3)]
    for peer in peers:
        a.send(peer.address, b"x")
    assert a.stats["transport.peer_sockets_evicted"] == 1
    assert a.send(peers[2].address, b"y")  # still cached: no new eviction
    assert a.stats["transport.peer_sockets_evicted"] == 1


def test_bad_address_is_counted(opened):
    a = opened()
    assert not a.send("not-an-address", b"x")
    assert a.stats["transport.bad_address"] == 1


def test_wake_from_another_thread_ends_a_wait_early(opened):
    a = opened()
    timer = threading.Timer(0.05, a.wake)
    started = time.monotonic()
    timer.start()
    assert a.wait(DEADLINE_S) == []
    assert time.monotonic() - started < DEADLINE_S / 2
    timer.join()


def test_a_taken_port_is_a_transport_error(opened):
    a = opened()
    with pytest.raises(TransportError, match="cannot bind"):
        opened(port=int(a.address.rsplit(":", 1)[1]))


def test_receive_batches_are_bounded(opened, client):
    member = opened(receive_batch_max=4)
    sock = client(member.address)
    for i in range(10):
        sock.send(b"%d" % i)
    batches: list[list[Inbound]] = []
    end = time.monotonic() + DEADLINE_S
    while sum(map(len, batches)) < 10 and time.monotonic() < end:
        batches.append(member.wait(0.05))
    assert [i.frame for batch in batches for i in batch] == [b"%d" % i for i in range(10)]
    assert max(map(len, batches)) <= 4


def test_close_with_linger_sends_frames_still_waiting_for_their_connection(opened):
    a, b = opened(), opened()
    assert a.send(b.address, b"goodbye")  # the connection is still opening
    a.close(linger_s=DEADLINE_S)
    assert [i.frame for i in _receive(b)] == [b"goodbye"]


def test_forget_closes_the_peer_socket_and_the_next_send_opens_a_fresh_one(opened):
    a, b = opened(), opened()
    a.send(b.address, b"one")
    assert [i.frame for i in _receive(b, a)] == [b"one"]
    a.forget(b.address)
    assert a.stats["transport.peer_sockets_closed"] == 1
    a.send(b.address, b"two")
    assert [i.frame for i in _receive(b, a)] == [b"two"]


def test_wait_drains_a_wake_up(opened):
    """A wake() is consumed by the next wait, not left pending: a pending one would make every
    later wait return at once and the gossip loop spin at 100 % CPU."""
    transport = opened()
    transport.wake()
    assert transport.wait(1.0) == []
    try:
        leftover = transport._wake_recv.recv(1)
    except BlockingIOError:
        leftover = b""
    assert leftover == b""


# ---------------------------------------------------------------- watched links

LINKS = {"links": LinkLimits(heartbeat_interval_s=0.05, timeout_s=0.3)}


def _link_changes(transport: GossipTransport, duration_s: float) -> list[dict[str, bool]]:
    """Every non-empty `take_link_changes` while ``transport`` alone is pumped for
    ``duration_s``."""
    seen = []
    end = time.monotonic() + duration_s
    while time.monotonic() < end:
        transport.wait(0.02)
        if changes := transport.take_link_changes():
            seen.append(changes)
    return seen


def _link_change(transport: GossipTransport, address: str) -> bool:
    """The next change of the link to ``address`` (fails past DEADLINE_S)."""
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        transport.wait(0.02)
        changes = transport.take_link_changes()
        if address in changes:
            return changes[address]
    pytest.fail(f"no link change to {address} within {DEADLINE_S} s")


def test_a_watched_link_is_up_while_the_peer_runs_even_if_it_never_reads(opened):
    """The peer's ZMQ I/O thread answers the handshake and heartbeats: a member whose gossip
    thread cannot run (its process holds the GIL elsewhere) still has its link up."""
    a, b = opened(**LINKS), opened(**LINKS)
    a.watch({b.address})
    assert _link_change(a, b.address) is True
    assert _link_changes(a, 5 * LINKS["links"].timeout_s) == []  # b never waited
    assert a.stats["transport.link_down"] == 0


def test_a_closed_peers_link_goes_down_for_good_and_an_unwatched_one_is_reported_down(opened):
    a, b, c = opened(**LINKS), opened(**LINKS), opened(**LINKS)
    a.watch({b.address})
    assert _link_change(a, b.address) is True
    a.watch({b.address, c.address})
    assert _link_change(a, c.address) is True
    b.close()
    assert _link_change(a, b.address) is False
    reopened = opened(port=int(b.address.rpartition(":")[2]), **LINKS)  # same address, running
    assert reopened.address == b.address
    assert _link_changes(a, 5 * LINKS["links"].timeout_s) == []  # down is final: no reconnect
    a.watch({b.address})
    assert a.take_link_changes() == {c.address: False}
    assert a.stats["transport.link_up"] == 2 and a.stats["transport.link_down"] == 2


def test_a_watch_of_an_address_nobody_listens_on_never_comes_up(opened):
    a = opened(**LINKS)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"  # bound, not listening: refused
        a.watch({address})
        assert _link_changes(a, 3 * LINKS["links"].timeout_s) == []


def test_peers_that_are_only_sent_to_have_no_link_and_watches_are_bounded(opened):
    a = opened(links=LinkLimits(heartbeat_interval_s=0.05, timeout_s=0.3, watched_max=2))
    b, c, d = opened(), opened(), opened()
    a.send(b.address, b"ping")
    assert [i.frame for i in _receive(b, a)] == [b"ping"]
    assert _link_changes(a, 0.3) == []  # sending opens no link
    a.watch([b.address, c.address, d.address])
    a.watch([b.address, c.address, d.address, "not an address"])
    assert a.stats["transport.watch_refused"] == 2  # once per address, however often named
    assert a.stats["transport.bad_address"] == 0  # (no room to try it)
    ups = {address for changes in _link_changes(a, 0.5) for address, up in changes.items() if up}
    assert len(ups) == 2 and ups <= {b.address, c.address, d.address}


def test_a_malformed_address_is_counted_once_and_a_freed_link_goes_to_a_refused_one(opened):
    a = opened(links=LinkLimits(heartbeat_interval_s=0.05, timeout_s=0.3, watched_max=1))
    b, c = opened(), opened()
    for _ in range(3):
        a.watch(["not an address"])
    assert a.stats["transport.bad_address"] == 1
    a.watch([b.address])
    assert _link_change(a, b.address) is True
    a.watch([c.address, b.address])  # no room for c
    assert a.stats["transport.watch_refused"] == 1
    a.watch([c.address])  # b is no longer a suspect: its link goes to c
    assert a.take_link_changes() == {b.address: False}
    assert _link_change(a, c.address) is True


def test_no_heartbeats_no_links(opened):
    a, b = opened(links=LinkLimits(heartbeat_interval_s=0)), opened()
    a.watch({b.address})
    assert _link_changes(a, 0.3) == []


_PEER_PROCESS = """
import sys, time
from meshkv.gossip.transport import GossipTransport, TransportLimits
t = GossipTransport("127.0.0.1", 0, limits=TransportLimits(max_frame_bytes=4096))
print(t.address, flush=True)
time.sleep(120)
"""


@pytest.fixture
def peer_process() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A transport in a process of its own (to freeze), and its address."""
    peer = subprocess.Popen(
        [sys.executable, "-c", _PEER_PROCESS], stdout=subprocess.PIPE, text=True
    )
    try:
        assert peer.stdout is not None
        yield peer, peer.stdout.readline().strip()
    finally:
        os.kill(peer.pid, signal.SIGKILL)
        peer.wait()


@pytest.mark.processes
def test_a_watched_link_goes_down_when_the_peer_process_is_frozen(opened, peer_process):
    """SIGSTOP stops the peer's ZMQ I/O thread too: its heartbeats stop and the link goes
    down after the link timeout."""
    peer, address = peer_process
    a = opened(**LINKS)
    a.watch({address})
    assert _link_change(a, address) is True
    os.kill(peer.pid, signal.SIGSTOP)
    assert _link_change(a, address) is False


@pytest.mark.processes
def test_a_peer_frozen_when_watched_is_up_for_the_timeout_or_until_it_thaws(opened, peer_process):
    """Its kernel accepts the connection, its ZMQ cannot answer: up for the link timeout (a
    short freeze is held), then down for good; thawed within it, the link stays up."""
    peer, address = peer_process
    timeout_s = LINKS["links"].timeout_s
    os.kill(peer.pid, signal.SIGSTOP)
    frozen, thawed = opened(**LINKS), opened(**LINKS)
    frozen.watch({address})
    assert _link_change(frozen, address) is True
    assert _link_change(frozen, address) is False
    thawed.watch({address})
    assert _link_change(thawed, address) is True
    time.sleep(timeout_s / 3)
    os.kill(peer.pid, signal.SIGCONT)
    assert _link_changes(thawed, 3 * timeout_s) == []
