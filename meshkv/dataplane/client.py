"""Blocking data-plane requests with deadlines: a DEALER per peer, many requests in flight.

A `RequestClient` belongs to one thread (ZMQ sockets are not thread-safe). `call_many` sends
every request first and then waits for all replies together, so a fan-out to k homes costs one
round trip, not k; `as_answered` does the same but hands each reply over as it arrives, so the
caller can work on one (check a fetched batch) while the others are still in flight.

Replies are matched by request id; late replies to requests that already gave up are dropped.
Nothing here can wait past the caller's deadline: a peer that is dead, frozen or slow yields no
reply (`None` in `call_many`), which callers treat as a miss.

This module knows the wire codec and sockets, not what a lookup or a get means.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence

import zmq

from meshkv.dataplane import messages as m
from meshkv.errors import ProtocolError
from meshkv.wire import FrameCodec

log = logging.getLogger("vllm.meshkv.dataplane.client")

PEER_SOCKETS_MAX = 128
"""Open DEALER sockets kept per client; the least recently used closes past this."""
SEND_HWM = 64
"""Requests ZMQ queues per peer connection before sends fail fast."""


class RequestClient:
    """Sends requests and waits for their replies, each call bounded by a deadline."""

    def __init__(self, context: zmq.Context, codec: FrameCodec) -> None:
        self._context = context
        self._codec = codec
        self._sockets: OrderedDict[str, zmq.Socket] = OrderedDict()
        self._poller = zmq.Poller()
        self._ids = itertools.count(1)
        self.stats: Counter[str] = Counter()

    def next_id(self) -> int:
        return next(self._ids)

    def call(self, address: str, request: m.Message, deadline_s: float) -> m.Message | None:
        """One request; the reply, or None on timeout, send failure or a malformed reply."""
        return self.call_many([(address, request)], deadline_s)[0]

    def call_many(
        self, requests: Sequence[tuple[str, m.Message]], deadline_s: float
    ) -> list[m.Message | None]:
        """Sends all requests, then waits until every reply is in or the deadline passes."""
        replies: list[m.Message | None] = [None] * len(requests)
        for index, reply in self.as_answered(requests, deadline_s):
            replies[index] = reply
        return replies

    def as_answered(
        self, requests: Sequence[tuple[str, m.Message]], deadline_s: float
    ) -> Iterator[tuple[int, m.Message]]:
        """Sends all requests, then yields (index in ``requests``, reply) as replies arrive,
        until every reply is in or the deadline passes; unanswered requests yield nothing."""
        waiting: dict[int, int] = {}
        for index, (address, request) in enumerate(requests):
            if self._send(address, request):
                waiting[request.req] = index
        yield from self.answers(waiting, deadline_s)
        self.stats["timeout"] += len(waiting)

    def answers(self, waiting: dict[int, int], until_s: float) -> Iterator[tuple[int, m.Message]]:
        """Yields (``waiting[req]``, reply) for replies to the requests ``waiting`` names (sent
        with `send_only`), removing each as it arrives, until none is left or ``until_s``
        passes. The caller may add requests to ``waiting`` between two calls (a hedge)."""
        while waiting:
            remaining_ms = int((until_s - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return
            for sock, _ in self._poller.poll(remaining_ms):
                yield from self._drain(sock, waiting)

    def send_only(self, address: str, message: m.Message) -> bool:
        """Sends a one-way message (no reply expected); False if it could not be queued."""
        return self._send(address, message)

    def forget(self, address: str) -> None:
        """Closes the socket to a peer that left or restarted (queued frames are dropped)."""
        sock = self._sockets.pop(address, None)
        if sock is not None:
            self._poller.unregister(sock)
            sock.close(linger=0)

    def close(self) -> None:
        for address in list(self._sockets):
            self.forget(address)

    def _send(self, address: str, request: m.Message) -> bool:
        try:
            frames = m.encode_frames(self._codec, request)  # copied into ZMQ before return
            self._socket(address).send_multipart(frames, zmq.NOBLOCK, copy=True)
        except zmq.Again:
            self.stats["send_dropped"] += 1
            return False
        self.stats["sent"] += 1
        return True

    def _drain(self, sock: zmq.Socket, waiting: dict[int, int]) -> Iterator[tuple[int, m.Message]]:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)  # read in place
            except zmq.Again:
                return
            try:
                reply = m.decode(self._codec, frames[0].buffer, [f.buffer for f in frames[1:]])
            except ProtocolError as exc:
                self.stats[f"drop_{exc.reason}"] += 1
                continue
            index = waiting.pop(reply.req, None)
            if index is None:
                self.stats["late_reply"] += 1
                continue
            yield index, reply

    def _socket(self, address: str) -> zmq.Socket:
        sock = self._sockets.get(address)
        if sock is not None:
            self._sockets.move_to_end(address)
            return sock
        if len(self._sockets) >= PEER_SOCKETS_MAX:
            self.forget(next(iter(self._sockets)))
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.RCVHWM, SEND_HWM * 4)
        sock.setsockopt(zmq.IMMEDIATE, 0)  # queue while the first connection opens
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, self._codec.max_frame_bytes)
        sock.connect(f"tcp://{address}")
        self._sockets[address] = sock
        self._poller.register(sock, zmq.POLLIN)
        return sock
