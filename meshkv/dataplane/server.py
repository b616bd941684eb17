"""The data-plane driver: runs one member's `DataService` core on a thread with a real socket.

`DataServer` owns the ROUTER socket the service listens on and one daemon thread: wait for
frames, decode them, feed them to the core, send its replies, post the writes it orders on the
byte path's NIXL channel, report finished writes back. Every malformed frame is dropped and
counted (``drop_<reason>``); nothing a peer sends can stop the loop.

Waiting: with no write in flight the loop sleeps in ``zmq_poll`` until a frame, a wake-up (stop,
a peer lost) or the idle bound. NIXL 1.5.1 tells the writer that a WRITE completed only when
asked (``getXferStatus``: no notification to the initiator, no fd to wait on), so while writes
are in flight the loop checks them after a wait that starts at `transfer_poll_min_s` and doubles
to `transfer_poll_max_s` while nothing completes; that wait is a ``select`` on the sockets' own
fds, so a request arriving ends it at once. Over UCX's cma (one host) a write completes inside
its post, so no write is ever in flight and the loop only sleeps on its sockets.

Other threads reach the core only through `forget_peer`, which drops the peer from the channel
at once (its in-flight writes fail fast) and queues the name for the core, waking the loop: the
core's peer table is changed on the loop thread alone.

This module knows sockets, the codec and the write channel's handles; not what a get means.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time
from collections import Counter
from queue import Empty, SimpleQueue

import zmq

from meshkv.dataplane import messages as m
from meshkv.dataplane import parts as frames
from meshkv.dataplane.byte_path import BytePath, WriteOrder
from meshkv.dataplane.config import DataPlaneConfig
from meshkv.dataplane.service import DataService, Reply, TransferOutcome
from meshkv.errors import ProtocolError, TransportError
from meshkv.transfer import TransferHandle
from meshkv.wire import FrameCodec

log = logging.getLogger("vllm.meshkv.dataplane.server")

RECEIVE_BATCH_MAX = 256
"""Frames read per loop turn before in-flight writes are checked again."""
WAKE_UPS_MAX = 1024
"""Wake-up frames drained per turn (each is one empty frame; more wait for the next turn)."""

_POLLIN = frames.POLLIN
_ROUTER = 1
"""`_poll_ready`'s bit for "the ROUTER socket has frames"."""
_WAKE = 2
"""`_poll_ready`'s bit for "the wake-up socket has frames"."""
_TX_KEYS = {t: f"tx_{t.name.lower()}" for t in m.MessageType}
"""The replies-sent counter of each message type (``tx_lookup_reply``...)."""


def _poll_ready(items: list[tuple[zmq.Socket, int]], timeout_ms: int) -> int:
    """One ``zmq_poll`` of the ROUTER and wake-up sockets (in that order); the `_ROUTER` and
    `_WAKE` bits of those with frames."""
    ready = 0
    for sock, _ in zmq.zmq_poll(items, timeout_ms):
        ready |= _ROUTER if sock is items[0][0] else _WAKE
    return ready


def bind_router(
    context: zmq.Context, host: str, port: int, *, codec: FrameCodec, config: DataPlaneConfig
) -> tuple[zmq.Socket, int]:
    """The service's ROUTER socket, bound (port 0: any free port), and its port."""
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVHWM, config.inbound_queue_max)
    router.setsockopt(zmq.SNDHWM, config.inbound_queue_max)
    router.setsockopt(zmq.MAXMSGSIZE, codec.max_frame_bytes)
    try:
        if port:
            router.bind(f"tcp://{host}:{port}")
        else:
            port = router.bind_to_random_port(f"tcp://{host}")
    except zmq.ZMQError:
        router.close(linger=0)
        raise
    return router, port


class DataServer:
    """Drives a `DataService` on its bound ROUTER socket (see the module docstring)."""

    def __init__(
        self,
        *,
        context: zmq.Context,
        router: zmq.Socket,
        codec: FrameCodec,
        service: DataService,
        path: BytePath,
        config: DataPlaneConfig,
    ) -> None:
        self._router = router
        self._codec = codec
        self._service = service
        self._channel = path.channel
        self._writer = path.writer
        self._config = config
        self._handles: dict[int, TransferHandle] = {}  # transfer id -> its posted write
        self._forgotten: SimpleQueue[str] = SimpleQueue()  # drained at every wake-up
        self._wake_in = context.socket(zmq.PAIR)
        self._wake_out = context.socket(zmq.PAIR)
        wake_address = f"inproc://meshkv-data-wake-{id(self)}"
        self._wake_in.bind(wake_address)
        self._wake_out.connect(wake_address)
        self._wake_lock = threading.Lock()  # guards _wake_out
        self._poll_items = [(router, _POLLIN), (self._wake_in, _POLLIN)]
        self._fds = [router.get(zmq.FD), self._wake_in.get(zmq.FD)]
        self._next_expire_s = 0.0
        self._stats = service.stats
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meshkv-data", daemon=True)

    @property
    def stats(self) -> Counter[str]:
        """The data plane's counters: requests by type and refusals (the core's), drops by
        reason and replies sent (this driver's), in the core's one Counter."""
        return self._service.stats

    def start(self) -> None:
        self._running.set()
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._running.clear()
        self._wake()
        self._thread.join(timeout_s)
        with self._wake_lock:
            self._wake_out.close(linger=0)

    def forget_peer(self, name: str) -> None:
        """Any thread: gossip says ``name`` died, left or restarted. Its memory is dropped from
        the channel now (so its in-flight writes fail fast, before anyone greets its next
        boot); the core forgets its greeting on the loop thread."""
        self._forgotten.put(name)
        self._wake()
        self._channel.remove_peer(name)

    def _wake(self) -> None:
        with self._wake_lock, contextlib.suppress(zmq.Again, zmq.ZMQError):  # Again: queued
            self._wake_out.send(b"", zmq.NOBLOCK)

    # --- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        wait_s = self._config.transfer_poll_min_s
        try:
            while self._running.is_set():
                if self._handles:
                    ready = self._wait_on_fds(wait_s)
                else:
                    ready = _poll_ready(self._poll_items, self._config.idle_wait_ms)
                if ready & _WAKE:
                    self._drain_wake_ups()
                received = bool(ready & _ROUTER) and self._receive_batch()
                completed = bool(self._handles) and self._poll_transfers()
                now_s = time.monotonic()
                if self._handles or now_s >= self._next_expire_s:
                    self._expire(now_s)
                if ready or received or completed:
                    wait_s = self._config.transfer_poll_min_s
                else:
                    wait_s = min(2 * wait_s, self._config.transfer_poll_max_s)
        finally:
            for transfer in self._service.in_flight():
                self._end(transfer, "stopped")
            self._router.close(linger=0)
            self._wake_in.close(linger=0)

    def _wait_on_fds(self, timeout_s: float) -> int:
        """Waits up to ``timeout_s`` for either socket to become readable; which are (the
        `_ROUTER` and `_WAKE` bits).

        ZMQ's fds are edge-triggered: they only say "look at ``zmq.EVENTS``", so events are
        checked before sleeping and after waking."""
        ready = _poll_ready(self._poll_items, 0)
        if ready:
            return ready
        select.select(self._fds, [], [], timeout_s)
        return _poll_ready(self._poll_items, 0)

    def _drain_wake_ups(self) -> None:
        with contextlib.suppress(zmq.Again):
            for _ in range(WAKE_UPS_MAX):
                self._wake_in.recv(zmq.NOBLOCK)
        while True:
            try:
                name = self._forgotten.get_nowait()
            except Empty:
                return
            self._service.forget_peer(name)

    def _receive_batch(self) -> bool:
        """Reads, decodes and answers up to RECEIVE_BATCH_MAX frames, until none is queued;
        True if any came."""
        router, codec, service, stats = self._router, self._codec, self._service, self._stats
        for count in range(RECEIVE_BATCH_MAX):
            parts = frames.receive(router)
            if parts is None:  # drained
                return count > 0
            if len(parts) < 2:
                stats["drop_bad_parts"] += 1
                continue
            identity, frame, *attachments = parts
            try:
                request = m.decode(codec, frame, attachments)
            except ProtocolError as exc:
                stats[f"drop_{exc.reason}"] += 1
                continue
            step = service.handle(identity, request, time.monotonic(), wall_ms=m.wall_clock_ms())
            self._send(step.replies)
            for order in step.writes:
                self._post(order)
        return True

    def _post(self, order: WriteOrder) -> None:
        assert self._writer is not None, "a byte path without a writer ordered a write"
        try:
            handle = self._writer.post_write(order.peer, order.local, order.remote)
        except (TransportError, ProtocolError) as exc:  # ProtocolError: a slot out of bounds
            log.info("get from %s: transfer not started: %s", order.peer, exc)
            self._send(self._service.transfer_done(order.transfer, "failed"))
            return
        self._handles[order.transfer] = handle
        if self._writer.poll(handle) == "done":  # copied while posting: answer now
            self._end(order.transfer, "done")

    def _poll_transfers(self) -> bool:
        """Checks every write in flight; True if any ended."""
        ended = False
        for transfer, handle in list(self._handles.items()):
            assert self._writer is not None  # only a writer made handles
            state = self._writer.poll(handle)
            if state != "pending":
                self._end(transfer, state)
                ended = True
        return ended

    def _expire(self, now_s: float) -> None:
        """Abandons the writes past their deadline; lets the core sweep its pins and
        reservations (called every turn while writes are in flight, else every
        `DataPlaneConfig.expire_interval_s`)."""
        self._next_expire_s = now_s + self._config.expire_interval_s
        for transfer in self._service.expire(now_s):
            self._end(transfer, "timeout")

    def _end(self, transfer: int, outcome: TransferOutcome) -> None:
        """Releases the write's handle (resetting the connection if it did not finish), then
        lets the core unpin its chunks and answer."""
        handle = self._handles.pop(transfer, None)
        if handle is not None:
            assert self._writer is not None  # only a writer made handles
            self._writer.release(handle, failed=outcome != "done")
        self._send(self._service.transfer_done(transfer, outcome))

    def _send(self, replies: list[Reply]) -> None:
        """Sends replies; their frames are copied into ZMQ before this returns."""
        for reply in replies:
            try:
                parts = [reply.to, *m.encode_frames(self._codec, reply.message)]
                if frames.send(self._router, parts):
                    self._stats[_TX_KEYS[reply.message.TYPE]] += 1
                else:
                    self._stats["reply_dropped"] += 1
            finally:
                if reply.on_sent is not None:
                    reply.on_sent()
