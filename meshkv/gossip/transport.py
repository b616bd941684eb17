"""Datagram-like ZMQ transport for gossip: frames in on one ROUTER, out through per-peer DEALERs.

Gossip wants UDP semantics (a frame arrives whole or not at all, nothing waits for a dead peer)
with ZMQ's framing, reconnects and authentication hooks. This module gives exactly that:

- inbound: one ROUTER bound on the gossip port. Each frame comes with the ROUTER identity of
  the connection it arrived on (``reply_to``), so a client that is not a member (a CLI asking
  for the member table) can be answered on its own connection. ZMQ_MAXMSGSIZE bounds a frame
  part: parts over ``max_frame_bytes * OVERSIZE_SLACK_FACTOR`` make ZMQ drop that connection
  (the peer reconnects); smaller oversized frames reach the codec, which drops and counts them.
- outbound: one DEALER per peer address, kept in a bounded LRU cache. ZMQ_IMMEDIATE means
  nothing queues for a peer without a live connection; sends never block: a full or
  unconnected peer drops the frame and counts it. A freshly created DEALER has no connection
  yet, so its first frames wait in a small bounded buffer for at most ``connect_grace_s`` and go
  out as soon as the connection opens. A peer restarted at the same address is reconnected by
  ZMQ on its own; `forget` skips ZMQ's reconnect backoff when the caller knows it restarted.
- links: `watch` names the addresses (the suspects) whose process should be told apart from a
  frozen or dead one; `meshkv.gossip.links` keeps a heartbeating link to each, and
  `take_link_changes` reports each watched link that went up or down. Ordinary peer
  connections send no heartbeats (each would cost a wake-up per peer per interval).

Every socket here belongs to the thread that calls `wait`/`send`/`reply`; only `wake` may be
called from any thread. This module knows nothing of SWIM or of what a frame means.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Collection
from dataclasses import dataclass, field

import zmq

from meshkv.errors import TransportError, UsageError
from meshkv.gossip.links import LinkLimits, SuspectLinks

log = logging.getLogger("vllm.meshkv.gossip.transport")

OVERSIZE_SLACK_FACTOR = 2
"""Frames up to this many times ``max_frame_bytes`` reach the codec (dropped and counted
there); ZMQ cuts the connection of anything larger before it is buffered whole."""

_ROUTER_PARTS = 2  # identity, frame


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportLimits:
    """Bounds of every queue and cache in the transport."""

    max_frame_bytes: int
    """Largest frame the gossip codec accepts, in bytes."""
    peer_sockets_max: int = 256
    """Outbound DEALER sockets kept open; the least recently used one is closed past this."""
    peer_send_hwm: int = 16
    """Frames ZMQ queues per connected peer before sends to it are dropped (a stalled peer)."""
    pending_frames_max: int = 8
    """Frames held for a peer whose connection is still opening; later ones are dropped."""
    connect_grace_s: float = 1.0
    """How long frames wait for a new peer connection before they are dropped."""
    inbound_hwm: int = 1024
    """Inbound frames ZMQ queues before it drops new ones (we are the slow side)."""
    receive_batch_max: int = 256
    """Frames `wait` returns at most per call, so timers run even under a flood."""
    reconnect_max_ms: int = 1000
    """Upper bound of ZMQ's reconnect backoff to a vanished peer, in ms."""
    links: LinkLimits = field(default_factory=LinkLimits)
    """How the links watched for suspects are kept (`meshkv.gossip.links`)."""

    def __post_init__(self) -> None:
        for name in (
            "max_frame_bytes",
            "peer_sockets_max",
            "peer_send_hwm",
            "pending_frames_max",
            "inbound_hwm",
            "receive_batch_max",
            "reconnect_max_ms",
        ):
            if getattr(self, name) <= 0:
                raise UsageError(f"TransportLimits.{name} must be positive")
        if self.connect_grace_s < 0:
            raise UsageError("TransportLimits.connect_grace_s must not be negative")


@dataclass(frozen=True, slots=True)
class Inbound:
    """One frame received, with the ROUTER identity of the connection it came on."""

    frame: bytes
    reply_to: bytes


@dataclass(slots=True)
class _Peer:
    address: str
    sock: zmq.Socket
    connect_deadline_s: float
    pending: deque[bytes] = field(default_factory=deque)


class GossipTransport:
    """The gossip port of one member: bind on ``host:port`` (port 0 picks a free one)."""

    def __init__(self, host: str, port: int, *, limits: TransportLimits) -> None:
        self.limits = limits
        self.stats: collections.Counter[str] = collections.Counter()
        self._ctx = zmq.Context(io_threads=1)
        self._peers: OrderedDict[str, _Peer] = OrderedDict()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.RCVHWM, limits.inbound_hwm)
        self._router.setsockopt(zmq.SNDHWM, limits.peer_send_hwm)
        self._router.setsockopt(zmq.MAXMSGSIZE, limits.max_frame_bytes * OVERSIZE_SLACK_FACTOR)
        try:
            if port == 0:
                port = self._router.bind_to_random_port(f"tcp://{host}")
            else:
                self._router.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as exc:
            self._router.close()
            self._ctx.term()
            raise TransportError(f"cannot bind gossip port {host}:{port}: {exc}") from exc
        self.address = f"{host}:{port}"
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)
        # Pollers kept for the transport's life (rebuilding one on every wait cost most of an
        # idle member's gossip CPU at 64 peers): the router and the wake-up, waited on (peers
        # holding frames add their POLLOUT for one wait).
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        # by descriptor: pyzmq reports a ready Python socket by its file number, so a wake-up
        # checked as the socket object would never be drained (the loop then spins on it)
        self._wake_fd = self._wake_recv.fileno()
        self._poller.register(self._wake_fd, zmq.POLLIN)
        self._links = SuspectLinks(self._ctx, limits.links, self.stats)
        self._holding: dict[str, _Peer] = {}  # peers with frames held for their connection
        self._closed = False

    # -- outbound ---------------------------------------------------------------------------

    def send(self, address: str, frame: bytes) -> bool:
        """Sends one frame to the member at ``address``; never blocks. False = dropped."""
        now_s = time.monotonic()
        peer = self._peer(address, now_s)
        if peer is None:
            return False
        if peer.pending:
            self._flush_pending(peer)
        if peer.pending:
            return self._hold(peer, frame, now_s)
        try:
            peer.sock.send(frame, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return self._hold(peer, frame, now_s)
        self.stats["transport.sent"] += 1
        return True

    def reply(self, reply_to: bytes, frame: bytes) -> bool:
        """Answers on the connection a frame came in on; never blocks. False = dropped."""
        try:
            self._router.send_multipart([reply_to, frame], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # Again (full) or EHOSTUNREACH (client gone)
            self.stats["transport.reply_dropped"] += 1
            log.debug("reply dropped: %s", exc)
            return False
        self.stats["transport.replied"] += 1
        return True

    def forget(self, address: str) -> None:
        """Closes the socket to ``address`` (its queued frames are dropped).

        For a peer that died, left or restarted: ZMQ's reconnect backoff to a vanished peer
        would otherwise delay the first frames to its next boot; a fresh socket connects at once.
        """
        peer = self._peers.pop(address, None)
        if peer is not None:
            self._drop_pending(peer)
            self._close_peer(peer, linger_ms=0)
            self.stats["transport.peer_sockets_closed"] += 1

    def _peer(self, address: str, now_s: float) -> _Peer | None:
        peer = self._peers.get(address)
        if peer is not None:
            self._peers.move_to_end(address)
            return peer
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, self.limits.peer_send_hwm)
        sock.setsockopt(zmq.RCVHWM, 1)  # members answer on our ROUTER, never on this socket
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, self.limits.reconnect_max_ms)
        try:
            sock.connect(f"tcp://{address}")
        except zmq.ZMQError as exc:
            sock.close()
            self.stats["transport.bad_address"] += 1
            log.debug("cannot connect to %r: %s", address, exc)
            return None
        if len(self._peers) >= self.limits.peer_sockets_max:
            _, evicted = self._peers.popitem(last=False)
            self._close_peer(evicted, linger_ms=0)
            self.stats["transport.peer_sockets_evicted"] += 1
        peer = _Peer(
            address=address,
            sock=sock,
            connect_deadline_s=now_s + self.limits.connect_grace_s,
        )
        self._peers[address] = peer
        return peer

    def _close_peer(self, peer: _Peer, *, linger_ms: int) -> None:
        self._holding.pop(peer.address, None)
        peer.sock.close(linger=linger_ms)

    # -- links ------------------------------------------------------------------------------

    def watch(self, addresses: Collection[str]) -> None:
        """Keeps a link to exactly these addresses (the caller's suspects; see
        `meshkv.gossip.links`): new ones are opened, the others closed."""
        self._links.watch(addresses)

    def take_link_changes(self) -> dict[str, bool]:
        """Watched addresses whose link went up or down since the last call: address -> up.
        Up means the peer's kernel accepted the connection and its ZMQ has answered within
        the link timeout since (its process runs, whether or not its gossip thread does);
        down, for good, that it did not (refused, closed, frozen, unreachable)."""
        return self._links.take_changes()

    def _hold(self, peer: _Peer, frame: bytes, now_s: float) -> bool:
        """Keeps a frame for a connection still opening, or drops it (unreachable or full)."""
        if now_s >= peer.connect_deadline_s:
            self._drop_pending(peer)
            self.stats["transport.send_dropped"] += 1
            return False
        if len(peer.pending) >= self.limits.pending_frames_max:
            self.stats["transport.send_dropped"] += 1
            return False
        peer.pending.append(frame)
        self._holding[peer.address] = peer
        return True

    def _drop_pending(self, peer: _Peer) -> None:
        self.stats["transport.send_dropped"] += len(peer.pending)
        peer.pending.clear()
        self._holding.pop(peer.address, None)

    def _flush_pending(self, peer: _Peer) -> None:
        while peer.pending:
            try:
                peer.sock.send(peer.pending[0], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            peer.pending.popleft()
            self.stats["transport.sent"] += 1
        self._holding.pop(peer.address, None)

    # -- inbound ----------------------------------------------------------------------------

    def wait(self, timeout_s: float) -> list[Inbound]:
        """Waits up to ``timeout_s`` for frames or a `wake`; returns what arrived (bounded).

        Also sends frames held for new connections as soon as those connections open.
        """
        now_s = time.monotonic()
        waiting = []
        for peer in list(self._holding.values()):
            if now_s >= peer.connect_deadline_s:
                self._drop_pending(peer)
                continue
            waiting.append(peer)
            self._poller.register(peer.sock, zmq.POLLOUT)
            timeout_s = min(timeout_s, peer.connect_deadline_s - now_s)
        try:
            ready = dict(self._poller.poll(max(0, math.ceil(timeout_s * 1000))))
        finally:
            for peer in waiting:
                self._poller.unregister(peer.sock)
        for peer in waiting:
            if ready.get(peer.sock, 0) & zmq.POLLOUT:
                self._flush_pending(peer)
        self._links.read()
        if self._wake_fd in ready:
            self._drain_wake()
        if self._router not in ready:
            return []
        return self._receive_ready()

    def _receive_ready(self) -> list[Inbound]:
        received: list[Inbound] = []
        while len(received) < self.limits.receive_batch_max:
            try:
                parts = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(parts) != _ROUTER_PARTS:
                self.stats["transport.bad_parts"] += 1
                continue
            self.stats["transport.received"] += 1
            received.append(Inbound(frame=parts[1], reply_to=parts[0]))
        return received

    def wake(self) -> None:
        """Makes a `wait` in progress return early. The one method safe from any thread."""
        # OSError: the buffer is full of wake-ups already (the waiter will wake), or closed.
        with contextlib.suppress(OSError):
            self._wake_send.send(b"\x00")

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_recv.recv(4096):
                pass

    # -- lifetime ---------------------------------------------------------------------------

    def close(self, linger_s: float = 0.0) -> None:
        """Closes every socket. ``linger_s`` > 0 gives queued frames that long to go out
        (including frames waiting for a connection to open); the rest are dropped."""
        if self._closed:
            return
        self._closed = True
        deadline_s = time.monotonic() + linger_s
        self._flush_pending_until(deadline_s)
        linger_ms = max(0, math.ceil((deadline_s - time.monotonic()) * 1000))
        for peer in self._peers.values():
            self._drop_pending(peer)
            self._close_peer(peer, linger_ms=linger_ms)
        self._peers.clear()
        self._links.close()
        self._router.close(linger=linger_ms)
        self._ctx.term()
        self._wake_recv.close()
        self._wake_send.close()

    def _flush_pending_until(self, deadline_s: float) -> None:
        waiting = list(self._peers.values())
        while True:
            for peer in waiting:
                self._flush_pending(peer)
            waiting = [peer for peer in waiting if peer.pending]
            left_s = deadline_s - time.monotonic()
            if not waiting or left_s <= 0:
                return
            poller = zmq.Poller()
            for peer in waiting:
                poller.register(peer.sock, zmq.POLLOUT)
            poller.poll(math.ceil(left_s * 1000))
