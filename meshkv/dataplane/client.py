"""Data-plane requests with deadlines: a DEALER per peer, many requests in flight.

A `RequestClient` belongs to one thread (ZMQ sockets are not thread-safe). `call_many` sends
every request first and then waits for all replies together, so a fan-out to k homes costs one
round trip, not k; `as_answered` does the same but hands each reply over as it arrives, so the
caller can work on one (check a fetched batch) while the others are still in flight.

A lookup may go to a member's lookup port instead (plain TCP, `meshkv.dataplane.stream`): its
address is then ``stream:host:port`` (`route` picks it), and the client keeps those links
(`meshkv.dataplane.stream_links`) beside its DEALERs and polls both together.

Replies are matched by request id; late replies to requests that already gave up are dropped.
Nothing here can wait past the caller's deadline: a peer that is dead, frozen or slow yields no
reply (`None` in `call_many`), which callers treat as a miss.

A `RequestLoop` is the asynchronous form: one thread, one `RequestClient`, one poll loop. Any
thread `submit`s a batch of requests with a deadline and a callback; the loop sends them, and
calls the callback (on its thread) with every reply, or None for those that did not come by the
deadline. So one client keeps many callers' requests in flight at once, with no thread per
caller; a callback may submit the next batch at once (a lookup's second round trip).

This module knows the wire codec and sockets, not what a lookup or a get means.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue

import zmq

from meshkv.dataplane import messages as m
from meshkv.dataplane import parts as frames
from meshkv.dataplane.awaited import AwaitedReplies
from meshkv.dataplane.stream import STREAM_PREFIX
from meshkv.dataplane.stream_links import StreamLinks
from meshkv.errors import ProtocolError
from meshkv.wire import FrameCodec

log = logging.getLogger("vllm.meshkv.dataplane.client")

PEER_SOCKETS_MAX = 128
"""Open DEALER sockets kept per client; the least recently used closes past this."""
SEND_HWM = 64
"""Requests ZMQ queues per peer connection before sends fail fast."""
LOOP_BATCHES_MAX = 4096
"""Batches a `RequestLoop` keeps in flight; a submit past it is answered at once with no
replies (a miss), so nothing waits on a loop that is overwhelmed."""
LOOP_IDLE_WAIT_MS = 200
"""Longest a `RequestLoop` sleeps with nothing in flight (submits wake it at once)."""


class RequestClient:
    """Sends requests and waits for their replies, each call bounded by a deadline."""

    def __init__(self, context: zmq.Context, codec: FrameCodec) -> None:
        self._context = context
        self._codec = codec
        self._sockets: OrderedDict[str, zmq.Socket] = OrderedDict()
        self._streams = StreamLinks()  # links to lookup ports (``stream:`` addresses)
        self._awaited = AwaitedReplies()  # the sockets a poll looks at
        self._ids = itertools.count(1)
        self.stats: Counter[str] = Counter()

    def next_id(self) -> int:
        return next(self._ids)

    def route(self, lookup_address: str | None, data_address: str) -> str:
        """Where a lookup goes: the member's lookup port, if it has one whose link has not
        failed lately (`meshkv.dataplane.stream_links`), else its ZMQ data port."""
        if lookup_address and self._streams.usable(lookup_address, time.monotonic()):
            return STREAM_PREFIX + lookup_address
        return data_address

    def call(self, address: str, request: m.Message, deadline_s: float) -> m.Message | None:
        """One request; the reply, or None on timeout, send failure or a malformed reply."""
        if not self._send(address, request):
            return None
        for _, reply in self.answers({request.req: 0}, deadline_s):
            return reply
        self.stats["timeout"] += 1
        self.give_up(request.req)
        return None

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
        for req in waiting:
            self.give_up(req)

    def answers(self, waiting: dict[int, int], until_s: float) -> Iterator[tuple[int, m.Message]]:
        """Yields (``waiting[req]``, reply) for replies to the requests ``waiting`` names (sent
        with `send_only`), removing each as it arrives, until none is left or ``until_s``
        passes. The caller may add requests to ``waiting`` between two calls (a hedge)."""
        while waiting:
            remaining_ms = int((until_s - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return
            for sock, _ in zmq.zmq_poll(self._poll_items(), remaining_ms):
                for reply in self._read(sock):
                    index = waiting.pop(reply.req, None)
                    if index is None:
                        self.stats["late_reply"] += 1
                        continue
                    yield index, reply

    def awaited(self) -> int:
        """Requests whose replies are still awaited (their sockets are polled for them)."""
        return len(self._awaited)

    def give_up(self, req: int) -> None:
        """No reply to ``req`` is awaited any more: its socket need not be polled for it (a
        request not given up is polled for `awaited.REPLY_WAIT_MAX_S`)."""
        self._awaited.answered(req)

    def send_only(self, address: str, message: m.Message) -> bool:
        """Sends a one-way message (no reply expected); False if it could not be queued."""
        return self._send(address, message)

    def forget(self, address: str) -> None:
        """Closes the socket to a peer that left or restarted (queued frames are dropped)."""
        sock = self._sockets.pop(address, None)
        if sock is not None:
            self._awaited.forget_socket(sock)
            sock.close(linger=0)

    def close(self) -> None:
        for address in list(self._sockets):
            self.forget(address)
        self._streams.close()

    def _send(self, address: str, request: m.Message) -> bool:
        sock: zmq.Socket | int | None
        if address.startswith(STREAM_PREFIX):  # (a lookup: one frame, no attachments)
            sock = self._streams.send(address[len(STREAM_PREFIX) :], m.encode(self._codec, request))
            self._forget_dropped_links()
        else:
            sock = self._socket(address)
            # (the frames are copied into ZMQ before send returns)
            if not frames.send(sock, m.encode_frames(self._codec, request)):
                sock = None
        if sock is None:
            self.stats["send_dropped"] += 1
            return False
        if request.TYPE not in m.ONE_WAY_TYPES:
            self._awaited.sent(request.req, sock, time.monotonic())
        self.stats["sent"] += 1
        return True

    def _poll_items(self, wake_fd: int | None = None) -> list[tuple[zmq.Socket | int, int]]:
        """What a poll looks at: the sockets a reply is awaited on, and ``wake_fd``."""
        items: list[tuple[zmq.Socket | int, int]] = [
            (sock, frames.POLLIN)
            for sock in self._awaited.sockets(time.monotonic())  # type: ignore[misc]
        ]
        if wake_fd is not None:
            items.append((wake_fd, frames.POLLIN))
        return items

    def receive(self, timeout_ms: int, wake_fd: int) -> tuple[list[m.Message], bool]:
        """Waits up to ``timeout_ms`` for replies or for ``wake_fd`` to be readable; returns
        every reply that came (any request) and whether ``wake_fd`` is readable."""
        ready = zmq.zmq_poll(self._poll_items(wake_fd), timeout_ms)
        replies: list[m.Message] = []
        woken = False
        for sock, _ in ready:
            if sock == wake_fd:
                woken = True
            else:
                replies.extend(self._read(sock))
        return replies, woken

    def _read(self, sock: zmq.Socket | int) -> Iterator[m.Message]:
        """Every reply waiting on ``sock`` (a lookup link's fd, or a DEALER), decoded;
        malformed ones are dropped and counted."""
        if isinstance(sock, int):
            yield from self._read_link(sock)
            return
        while (parts := frames.receive(sock, copy=False)) is not None:  # read in place
            try:
                reply = m.decode(self._codec, parts[0].buffer, [f.buffer for f in parts[1:]])
            except ProtocolError as exc:
                self.stats[f"drop_{exc.reason}"] += 1
                continue
            self._awaited.answered(reply.req)
            yield reply

    def _read_link(self, fd: int) -> Iterator[m.Message]:
        received, alive = self._streams.read(fd)
        if not alive:
            self._forget_dropped_links()
        for frame in received:
            try:
                reply = m.decode(self._codec, frame)
            except ProtocolError as exc:
                self.stats[f"drop_{exc.reason}"] += 1
                continue
            self._awaited.answered(reply.req)
            yield reply

    def _forget_dropped_links(self) -> None:
        for fd in self._streams.take_dropped():
            self._awaited.forget_socket(fd)

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
        return sock


Done = Callable[[list["m.Message | None"]], None]
"""A batch's callback: one reply (or None) per request, in the order submitted."""


@dataclass(slots=True)
class _Batch:
    requests: Sequence[tuple[str, m.Message]]
    deadline_s: float
    done: Done
    replies: list[m.Message | None] = field(default_factory=list)
    waiting: int = 0


class RequestLoop:
    """Many callers' requests in flight on one client and one thread (see the module)."""

    def __init__(self, context: zmq.Context, codec: FrameCodec, name: str = "meshkv-requests"):
        self._client = RequestClient(context, codec)
        self._inbox: SimpleQueue[_Batch | None] = SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._by_req: dict[int, tuple[_Batch, int]] = {}  # request id -> (batch, index)
        self._deadlines: list[tuple[float, int, _Batch]] = []  # heap of (deadline, seq, batch)
        self._seq = itertools.count()
        self._in_flight = 0
        self._closing = False
        self._on_loop = threading.local()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def stats(self) -> Counter[str]:
        return self._client.stats

    def next_id(self) -> int:
        """A request id (any thread: the counter's step is atomic)."""
        return self._client.next_id()

    def route(self, lookup_address: str | None, data_address: str) -> str:
        """Where a lookup goes (`RequestClient.route`; any thread)."""
        return self._client.route(lookup_address, data_address)

    def submit(
        self, requests: Sequence[tuple[str, m.Message]], deadline_s: float, done: Done
    ) -> None:
        """Sends ``requests`` (from any thread); ``done`` gets their replies on the loop's
        thread once all are in or ``deadline_s`` passed. Never blocks."""
        batch = _Batch(requests, deadline_s, done, [None] * len(requests))
        if self._closing:
            self._callback(batch)
            return
        if getattr(self._on_loop, "running", False):
            self._start(batch)  # a callback's next batch: no wake-up needed
            return
        self._inbox.put(batch)
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is already pending
            os.write(self._wake_write, b"x")

    def close(self, timeout_s: float = 2.0) -> None:
        """Stops the loop; batches still in flight are answered with the replies they have
        (None for the others), and batches submitted from then on at once."""
        self._closing = True
        self._inbox.put(None)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"x")
        self._thread.join(timeout_s)
        os.close(self._wake_write)

    def _run(self) -> None:
        self._on_loop.running = True
        try:
            while True:
                if not self._take_inbox():
                    return
                wait_ms = LOOP_IDLE_WAIT_MS
                if self._deadlines:
                    wait_ms = max(0, int((self._deadlines[0][0] - time.monotonic()) * 1000) + 1)
                replies, woken = self._client.receive(wait_ms, self._wake_read)
                if woken:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self._wake_read, 4096):
                            pass
                for reply in replies:
                    self._answered(reply)
                self._expire(time.monotonic())
        finally:
            self._closing = True
            self._take_inbox()  # (answered at once: closing)
            self._expire(float("inf"))
            self._client.close()
            os.close(self._wake_read)

    def _take_inbox(self) -> bool:
        """Starts every submitted batch; False once close was asked."""
        while True:
            try:
                batch = self._inbox.get_nowait()
            except Empty:
                return True
            if batch is None:
                return False
            self._start(batch)

    def _start(self, batch: _Batch) -> None:
        if self._closing or self._in_flight >= LOOP_BATCHES_MAX:
            self._client.stats["loop_closed" if self._closing else "loop_full"] += 1
            self._callback(batch)
            return
        for index, (address, request) in enumerate(batch.requests):
            if self._client.send_only(address, request):
                self._by_req[request.req] = (batch, index)
                batch.waiting += 1
        if not batch.waiting:
            self._callback(batch)
            return
        self._in_flight += 1
        heapq.heappush(self._deadlines, (batch.deadline_s, next(self._seq), batch))

    def _answered(self, reply: m.Message) -> None:
        entry = self._by_req.pop(reply.req, None)
        if entry is None:
            self._client.stats["late_reply"] += 1
            return
        batch, index = entry
        batch.replies[index] = reply
        batch.waiting -= 1
        if batch.waiting == 0:
            self._finish(batch)

    def _expire(self, now_s: float) -> None:
        """Answers every batch past its deadline (None for its missing replies); drops the heap
        entries of batches already answered."""
        while self._deadlines:
            deadline_s, _, batch = self._deadlines[0]
            if not batch.waiting:
                heapq.heappop(self._deadlines)
                continue
            if deadline_s > now_s:
                return
            self._client.stats["timeout"] += batch.waiting
            for _, request in batch.requests:
                if self._by_req.pop(request.req, None) is not None:
                    self._client.give_up(request.req)
            batch.waiting = 0
            self._finish(batch)

    def _finish(self, batch: _Batch) -> None:
        """Calls the batch's callback; its heap entry goes once it reaches the top."""
        self._in_flight -= 1
        self._callback(batch)

    def _callback(self, batch: _Batch) -> None:
        try:
            batch.done(batch.replies)
        except Exception:  # a caller's bug must not stop every other caller's lookups
            log.exception("a request callback failed")
